#!/usr/bin/env python
"""Train the tiny Qwen3-MoE that ships with the project, on the Python standard library.

Corpus: the stdlib's own *.py sources (present on every Python install; site-packages and
test suites excluded), sorted, split by file into train / held-out (a file is held out when
crc32 of its relative path % 20 == 0, so the split is stable). A byte-level BPE tokenizer is
trained on the train files; `<|endoftext|>` is EOS and separates documents, `<|im_start|>` /
`<|im_end|>` are reserved for a chat template.

Reports held-out perplexity next to a unigram baseline (train-set token frequencies, add-one
smoothing) over the same tokens, and the routing unevenness of held-out code vs prose
(docstrings), then writes the checkpoint (bf16) with `train_metrics.json` atomically.

    python scripts/train_tiny.py --steps 1200 --out checkpoints/tiny-qwen3-moe
"""

from __future__ import annotations

import ast
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from dynaexq_jax import train
from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files
from dynaexq_jax.io.corpus import HELD_OUT_EVERY, is_held_out, read, stdlib_files
from dynaexq_jax.io.hf_export import save_checkpoint
from dynaexq_jax.launch.flags import above_zero, at_least_each, command_parser
from dynaexq_jax.models.config import ModelConfig

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """Documents joined by EOS (one after each document)."""
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(np.asarray(enc.ids, np.int32))
        out.append(np.asarray([eos_id], np.int32))
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


def windows(stream: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping [N, length+1] windows (consecutive windows share one boundary token)."""
    n = (len(stream) - 1) // length
    if limit is not None:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return stream[idx]


def split_code_prose(source: str) -> tuple[str, list[str]]:
    """(code with docstrings and comments removed, the docstrings), via `ast`."""
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=True)
            body = node.body
            if d is not None and body and isinstance(body[0], ast.Expr):
                if len(d.split()) >= 3:
                    docs.append(d)
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree), docs


def routing_figures(counts_code: np.ndarray, counts_prose: np.ndarray) -> dict:
    """Per-layer share of routed pairs going to the top quarter of experts, and the overlap
    (Jaccard) of each layer's top-quarter sets between code and prose."""
    L, E = counts_code.shape
    q = max(1, E // 4)

    def top(c):
        return [set(np.argsort(-row, kind="stable")[:q].tolist()) for row in c]

    def share(c, sets):
        return [float(c[l, sorted(s)].sum() / max(c[l].sum(), 1)) for l, s in enumerate(sets)]

    tc, tp = top(counts_code), top(counts_prose)
    jac = [len(a & b) / len(a | b) for a, b in zip(tc, tp)]
    return {
        "top_quarter_experts": q,
        "uniform_share": q / E,
        "code_top_quarter_share": share(counts_code, tc),
        "prose_top_quarter_share": share(counts_prose, tp),
        # how much of prose's traffic code's hot set would cover, and vice versa
        "prose_share_on_code_hot_set": share(counts_prose, tc),
        "code_share_on_prose_hot_set": share(counts_code, tp),
        "jaccard_code_vs_prose_hot_set": jac,
        "mean_jaccard": float(np.mean(jac)),
        "code_hot_sets": [sorted(s) for s in tc],
        "prose_hot_sets": [sorted(s) for s in tp],
        "code_routed_pairs": int(counts_code.sum()),
        "prose_routed_pairs": int(counts_prose.sum()),
    }


def main(argv=None):
    ap = command_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lb-coef", type=float, default=0.01)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="cap on held-out windows (of --seq-len) to score; default all")
    ap.add_argument("--out", type=Path, default=Path("checkpoints/tiny-qwen3-moe"),
                    help="checkpoint folder: new, empty, or one this script wrote (its other files stay)")
    args = ap.parse_args(argv)
    try:  # before 20 minutes of training
        at_least_each(args, steps=1, batch_size=1, seq_len=2, vocab_size=256, eval_windows=1, lb_coef=0)
        above_zero("a learning rate")("--lr", args.lr)
        files.check_output_dir(args.out, "--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)

    # ---- corpus -------------------------------------------------------------------------
    root, rels = stdlib_files()
    train_rels = [r for r in rels if not is_held_out(r)]
    held_rels = [r for r in rels if is_held_out(r)]
    train_texts = [read(root, r) for r in train_rels]
    held_texts = [read(root, r) for r in held_rels]
    log(f"corpus: {len(train_rels)} train files, {len(held_rels)} held-out files from {root}")

    tok = train_tokenizer(train_texts, args.vocab_size)
    eos_id = tok.token_to_id(EOS)
    V = tok.get_vocab_size()
    train_stream = encode_stream(tok, train_texts, eos_id)
    held_stream = encode_stream(tok, held_texts, eos_id)
    log(f"tokenizer: vocab {V}; train {len(train_stream):,} tokens, held-out {len(held_stream):,} tokens")

    # ---- model --------------------------------------------------------------------------
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=32,
        experts_per_token=4,
        moe_intermediate_size=64,
        intermediate_size=512,  # unused: every layer is MoE
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    params, experts = train.init_params(cfg, args.seed)
    n_params = sum(int(a.size) for a in jax.tree.leaves((params, experts)))
    optimizer = train.make_optimizer(args.lr, args.steps)
    state = train.init_state(params, experts, optimizer)
    step_fn = train.make_train_step(cfg, optimizer, lb_coef=args.lb_coef)

    rng = np.random.default_rng(args.seed)
    T, B = args.seq_len, args.batch_size
    valid = np.ones((B, T + 1), bool)
    history = []
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", file=sys.stderr, dynamic_ncols=True)
    ema = None
    for i in bar:
        starts = rng.integers(0, len(train_stream) - T - 1, B)
        batch = train_stream[starts[:, None] + np.arange(T + 1)[None, :]]
        state, m = step_fn(state, batch, valid)
        loss = float(m["loss"])
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.set_postfix(loss=f"{loss:.3f}", ema=f"{ema:.3f}", lb=f"{float(m['lb']):.3f}", refresh=False)
        if i % 50 == 0 or i == args.steps - 1:
            history.append({"step": i + 1, "loss": round(loss, 4), "ce": round(float(m["ce"]), 4),
                            "lb": round(float(m["lb"]), 4), "grad_norm": round(float(m["grad_norm"]), 4)})
    bar.close()
    train_s = time.perf_counter() - t_train
    params, experts = state.params, state.experts

    # ---- held-out perplexity vs unigram -------------------------------------------------
    eval_step = train.make_eval_step(cfg)
    held_w = windows(held_stream, T, args.eval_windows)
    nll, n_scored, _ = train.evaluate(eval_step, params, experts, held_w, B)
    uni_counts = np.bincount(train_stream, minlength=V).astype(np.float64) + 1.0
    uni_logp = np.log(uni_counts / uni_counts.sum())
    uni_nll = float(-uni_logp[held_w[:, 1:]].mean())
    log(f"held-out: ppl {math.exp(nll):.2f} (nll {nll:.4f}) vs unigram ppl {math.exp(uni_nll):.2f} "
        f"over {int(n_scored):,} tokens")

    # ---- routing on held-out code vs prose ----------------------------------------------
    codes, proses = [], []
    for text in held_texts:
        try:
            code, docs = split_code_prose(text)
        except (SyntaxError, ValueError, RecursionError):
            continue
        codes.append(code)
        proses.append("\n\n".join(docs))
    code_stream = encode_stream(tok, [c for c in codes if c], eos_id)
    prose_stream = encode_stream(tok, [p for p in proses if p], eos_id)
    code_windows, prose_windows = (windows(s, T, args.eval_windows) for s in (code_stream, prose_stream))
    code_nll, _, code_counts = train.evaluate(eval_step, params, experts, code_windows, B)
    prose_nll, _, prose_counts = train.evaluate(eval_step, params, experts, prose_windows, B)
    routing = routing_figures(code_counts, prose_counts)
    routing["code_ppl"] = math.exp(code_nll)
    routing["prose_ppl"] = math.exp(prose_nll)
    routing["code_tokens"] = int(len(code_stream))
    routing["prose_tokens"] = int(len(prose_stream))
    log("top-quarter share per layer: code " + " ".join(f"{s:.3f}" for s in routing["code_top_quarter_share"])
        + " | prose " + " ".join(f"{s:.3f}" for s in routing["prose_top_quarter_share"])
        + " | Jaccard code/prose " + " ".join(f"{j:.2f}" for j in routing["jaccard_code_vs_prose_hot_set"]))

    # ---- checkpoint ---------------------------------------------------------------------
    metrics = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "parameters": n_params,
        "steps": args.steps,
        "tokens_seen": args.steps * B * T,
        "final_train_loss": history[-1]["loss"],
        "final_train_ce": history[-1]["ce"],
        "final_train_lb": history[-1]["lb"],
        "train_loss_ema": round(ema, 4),
        "heldout_nll": nll,
        "heldout_ppl": math.exp(nll),
        "heldout_tokens_scored": int(n_scored),
        "unigram_heldout_ppl": math.exp(uni_nll),
        "train_wall_s": round(train_s, 1),
        "steps_per_s": round(args.steps / train_s, 3),
        "corpus": {
            "source": "Python stdlib *.py (sysconfig stdlib path; site-packages and test dirs excluded)",
            "python_version": sys.version.split()[0],
            "files": len(rels),
            "train_files": len(train_rels),
            "heldout_files": len(held_rels),
            "heldout_rule": f"crc32(relative path) % {HELD_OUT_EVERY} == 0",
            "train_bytes": sum(len(t.encode()) for t in train_texts),
            "heldout_bytes": sum(len(t.encode()) for t in held_texts),
            "train_tokens": int(len(train_stream)),
            "heldout_tokens": int(len(held_stream)),
            "vocab_size": V,
        },
        "routing_heldout": routing,
        "loss_history": history,
    }
    metrics["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = save_checkpoint(
        args.out, cfg, params, train.host_experts(experts), tokenizer=tok, eos_token_id=eos_id, dtype="bfloat16",
        extra_files={"train_metrics.json": json.dumps(metrics, indent=1) + "\n"},
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.2f} MB) in {metrics['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
