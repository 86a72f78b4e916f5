#!/usr/bin/env python
"""Build the shipped evaluation tasks from the tiny model's held-out corpus, deterministically.

The held-out files are those `scripts/train_tiny.py` never trained on (`dynaexq_jax.io.corpus`:
crc32 of the path % 20 == 0, same stdlib). Writes to `checkpoints/tiny-qwen3-moe/tasks/`:

  heldout.jsonl        perplexity: `{"path", "text"}` per held-out file, in path order, up to
                       --ppl-bytes of text
  next_line_mc.jsonl   multiple choice: the previous lines of a held-out file; which line comes
                       next? The true line and 3 distractors drawn from elsewhere in the same
                       file, re-indented like the true line so indentation gives nothing away
  next_line_em.jsonl   exact match: the previous lines; greedy-generate the next line
  hotness_train.json   dynaexq warm-start profile: the full model's router mass per token of
                       every expert, over evenly spaced windows of the *training* split (never
                       the eval data)

    python scripts/build_tasks.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from dynaexq_jax.errors import UserError
from dynaexq_jax.io import corpus, files  # corpus: the tiny model's training / held-out split
from dynaexq_jax.launch.flags import at_least, command_parser

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"
CONTEXT_LINES = 8
MIN_CHARS, MAX_CHARS = 8, 60  # candidate lines: long enough to mean something, short enough to generate


def candidate(line: str) -> bool:
    s = line.strip()
    return MIN_CHARS <= len(s) <= MAX_CHARS and not s.startswith("#")


def indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def items_of(text: str) -> list[tuple[str, str, list[str]]]:
    """(context, true line, candidate distractor lines) for every usable position of a file."""
    lines = text.splitlines()
    pool = sorted({l.strip() for l in lines if candidate(l)})
    out = []
    for i in range(CONTEXT_LINES, len(lines)):
        if not candidate(lines[i]) or len(pool) < 4:
            continue
        context = "\n".join(lines[i - CONTEXT_LINES : i])
        if not context.strip():
            continue
        out.append((context, lines[i], [p for p in pool if p != lines[i].strip()]))
    return out


def build(args) -> None:
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax.io import loader
    from dynaexq_jax.policies import hotness
    from dynaexq_jax.policies.dynaexq import DynaExqOptions
    from dynaexq_jax.runtime.engine import Engine

    out = files.OutputDir(args.out, "--out")  # new, empty or written here before: checked before the work
    root, rels = corpus.stdlib_files()
    held = [r for r in rels if corpus.is_held_out(r)]
    train = [r for r in rels if not corpus.is_held_out(r)]
    texts = {r: corpus.read(root, r) for r in held}

    docs, size = [], 0
    for r in held:
        if size >= args.ppl_bytes:
            break
        docs.append({"path": r, "text": texts[r]})
        size += len(texts[r].encode())
    write_jsonl(out, "heldout.jsonl", docs)

    rng = random.Random(args.seed)
    positions = [(r, it) for r in held for it in items_of(texts[r])]
    picked = rng.sample(positions, args.mc + args.em)
    mc, em = [], []
    for r, (context, line, pool) in picked[: args.mc]:
        choices = [indent(line) + d for d in rng.sample(pool, 3)] + [line]
        rng.shuffle(choices)
        mc.append({"path": r, "context": context, "choices": ["\n" + c for c in choices],
                   "answer": choices.index(line)})
    for r, (context, line, _) in picked[args.mc :]:
        em.append({"path": r, "prompt": context, "answer": line.strip()})
    write_jsonl(out, "next_line_mc.jsonl", mc)
    write_jsonl(out, "next_line_em.jsonl", em)

    # Warm-start profile: the full model's routing over windows spread evenly over the training split.
    ckpt = loader.load(args.model, jnp.bfloat16)
    eos = ckpt.eos_token_ids[0]
    stream = []
    for enc in ckpt.tokenizer.encode_batch([corpus.read(root, r) for r in train], add_special_tokens=False):
        stream += enc.ids + [eos]
    W = args.window
    starts = np.linspace(0, len(stream) - W, args.profile_windows).astype(int)
    engine = Engine(ckpt)  # the full policy
    mass, tokens = 0.0, 0
    for i in range(0, len(starts), 16):
        _, stats = engine.score([stream[s : s + W] for s in starts[i : i + 16]])
        mass = mass + np.asarray(stats.mass, np.float64)
        tokens += int(stats.tokens)
    L, E = mass.shape
    hotness.HotnessTracker(L, E, DynaExqOptions().half_life_steps, mass / tokens).save(out / "hotness_train.json")
    total = sum(f.stat().st_size for f in out.path.iterdir())
    print(f"{len(docs)} perplexity documents ({size:,} bytes), {len(mc)} multiple-choice and {len(em)} exact-match "
          f"items from {len(held)} held-out files; profile from {tokens:,} training tokens; {out.path} holds "
          f"{total:,} bytes",
          file=sys.stderr)


def write_jsonl(out: files.OutputDir, name: str, rows: list[dict]) -> None:
    out.write(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv=None) -> int:
    p = command_parser(__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL / "tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-bytes", type=int, default=60_000, help="held-out text for perplexity")
    p.add_argument("--mc", type=int, default=100, help="multiple-choice items")
    p.add_argument("--em", type=int, default=48, help="exact-match items")
    p.add_argument("--window", type=int, default=256, help="tokens per profiling window")
    p.add_argument("--profile-windows", type=int, default=64,
                   help="training windows the warm-start profile is read from")
    args = p.parse_args(argv)
    try:
        for flag, value, low in (("--ppl-bytes", args.ppl_bytes, 1), ("--mc", args.mc, 0), ("--em", args.em, 0),
                                 ("--window", args.window, 2), ("--profile-windows", args.profile_windows, 1)):
            at_least(low)(flag, value)
        build(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
