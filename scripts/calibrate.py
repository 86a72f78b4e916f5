#!/usr/bin/env python
"""FloE's offline calibration: channel thresholds for a target sparsity and the early layers'
inter-expert predictor, saved beside the checkpoint's converted experts (orbax) and reused.

    python scripts/calibrate.py                                  # the shipped model, sparsity 0.9, int2 up
    python scripts/calibrate.py --model M --text calib.jsonl --sparsity 0.8 --out calib-dir
    python scripts/generate.py --policy floe --prompt "def f(" --floe-calibration calib-dir

Calibration text: --text (JSONL of {"text"} or plain text files, never the evaluation data);
for the shipped model without --text, its training split (the stdlib files scripts/train_tiny.py
trained on), up to --max-bytes; the documents are joined by EOS, or, for a checkpoint whose config
names no eos_token_id, calibrated one by one. An existing calibration for the same checkpoint weights,
settings and text is reused; a change of any of them rebuilds it (--force: always).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from dynaexq_jax.launch.flags import at_least, command_parser, none_or_int

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "checkpoints" / "tiny-qwen3-moe"


def parse_args(argv=None):
    p = command_parser(__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--text", action="append", help="calibration text: JSONL of {\"text\"} or a text file (repeatable)")
    p.add_argument("--max-bytes", type=int, default=200_000, help="calibration text used, at most")
    p.add_argument("--sparsity", type=float, default=0.9, help="target share of up-projection channels dropped")
    p.add_argument("--up-bits", type=none_or_int, choices=[2, 3, 4, 8, None], default=2,
                   help="width of the resident up projections (HQQ), or none")
    p.add_argument("--group-size", type=int, default=64,
                   help="up projection's quantization group (the largest power of two <= this dividing hidden_size)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--early-layers", type=int, help="MoE layers given an MLP predictor (default: a quarter, >= 1)")
    p.add_argument("--predictor-steps", type=int, default=300)
    p.add_argument("--out", help="calibration folder: new, empty, or one written by this script (default: the "
                                 "checkpoint's cache folder)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date calibration exists")
    return p.parse_args(argv)


def calibration_docs(args, model: Path) -> list[str]:
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.eval.evaluate import load_task

    if args.text:
        docs = [d for t in args.text for d in load_task("ppl", t, what="--text").items]
    elif model.resolve() == DEFAULT_MODEL.resolve():
        from dynaexq_jax.io import corpus

        root, rels = corpus.stdlib_files()
        docs = [corpus.read(root, r) for r in rels if not corpus.is_held_out(r)]
    else:
        raise UserError(f"no calibration text for {model}: pass --text FILE (training-like text, never eval data)")
    out, size = [], 0
    for d in docs:
        if size >= args.max_bytes:
            break
        out.append(d[: args.max_bytes - size])
        size += len(out[-1].encode())
    return out


def check(args) -> None:
    """The flags' values, before anything is read."""
    from dynaexq_jax.errors import UserError

    if not 0 < args.sparsity < 1:
        raise UserError(f"--sparsity {args.sparsity}: a target sparsity is a share strictly between 0 and 1, e.g. 0.9")
    for flag, value, low in (("--max-bytes", args.max_bytes, 1), ("--group-size", args.group_size, 8),
                             ("--window", args.window, 2), ("--batch-size", args.batch_size, 1),
                             ("--early-layers", args.early_layers, 1), ("--predictor-steps", args.predictor_steps, 0)):
        if value is not None:
            at_least(low)(flag, value)


def run(args) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.eval import floe_calibrate as fc
    from dynaexq_jax.io import files, floe_calibration, loader
    from dynaexq_jax.models import registry
    from dynaexq_jax.policies.floe import FloeOptions

    check(args)
    cfg = registry.read_config(args.model)  # a bad checkpoint, output folder or text fails before any weight is read
    group = budget_lib.floe_up_group(cfg, args.group_size)
    settings = floe_calibration.settings(args.sparsity, args.up_bits, group)
    out = Path(args.out) if args.out else floe_calibration.default_path(args.model, args.sparsity, args.up_bits, group)
    if out is None:
        raise UserError("the cache is off (DYNAEXQ_CACHE=0): pass --out DIR")
    files.check_output_dir(out, "--out")
    docs = calibration_docs(args, Path(args.model))
    ckpt = loader.load(args.model, getattr(jnp, args.dtype))
    L = len(cfg.moe_layers)
    early = args.early_layers if args.early_layers is not None else max(1, L // 4)
    sha = fc.text_sha(docs)
    extra = {"early_layers": early, "predictor_steps": args.predictor_steps, "window": args.window,
             "dtype": args.dtype}
    meta = floe_calibration.read_meta(out)
    if (not args.force and meta is not None and meta.get("text_sha") == sha and meta.get("settings") == settings
            and all(meta.get(k) == v for k, v in extra.items())):
        try:  # verifies the weights' fingerprint and checksums
            cal = floe_calibration.load(out, ckpt, settings)
            return {"path": str(out), "reused": True, **cal.meta["summary"]}
        except floe_calibration.DamagedCalibration:
            warnings.warn(f"the FloE calibration at {out} is damaged; rebuilding it")
    opts = FloeOptions(up_bits=args.up_bits, group_size=group, sparsity=args.sparsity)
    rec = fc.record(ckpt, docs, opts, window=args.window, batch_size=args.batch_size)
    thr, unseen = fc.thresholds(rec, args.sparsity)
    achieved = np.mean([np.mean(np.concatenate(c) < thr[m, e]) for m in range(L) for e, c in rec.absu[m].items()])
    params, report = fc.train_predictor(rec, fc.router_fn(ckpt), cfg.num_experts, early_layers=early,
                                        steps=args.predictor_steps)
    summary = {"documents": len(docs), "tokens": int(sum(len(h) for h in rec.hidden[0])),
               "achieved_sparsity": float(achieved), "unseen_experts": unseen, "predictor": report}
    floe_calibration.save(out, ckpt, settings, thr, params, sha, {**extra, "summary": summary})
    return {"path": str(out), "reused": False, **summary}


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.cli import show_warning
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.runtime import compile_cache

    compile_cache.enable()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            result = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
