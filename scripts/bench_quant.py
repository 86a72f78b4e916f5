"""Relative output error ||XW - XW_q|| / ||XW|| of quantization methods, per bit width.

  python scripts/bench_quant.py                 # print the table
  python scripts/bench_quant.py --group-size 64 --model checkpoints/tiny-qwen3-moe   # + trained up projections
  python scripts/bench_quant.py --markdown      # also append it to docs/PERFORMANCE.md

Weights are [K, N] = [2048, 768] (a Qwen3-30B-A3B gate/up expert matrix): Gaussian and
heavy-tailed (Student t, 3 degrees of freedom), and with --model a checkpoint's trained expert up
projections. X is [512, K] Gaussian. Seeds are fixed. Methods: RTN, `mse`, `hqq` (quant.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynaexq_jax.experts import quant  # noqa: E402
from dynaexq_jax.io import files  # noqa: E402
from dynaexq_jax.launch.flags import at_least_each, command_parser  # noqa: E402


def rel_error(w, x, qt) -> float:
    deq = np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
    ref = x @ w
    return float(np.linalg.norm(ref - x @ deq) / np.linalg.norm(ref))


def main(argv=None) -> int:
    ap = command_parser(__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--model", help="also a checkpoint's trained expert up projections (every MoE layer; K = hidden)")
    ap.add_argument("--markdown", nargs="?", const="docs/PERFORMANCE.md", default=None,
                    metavar="PATH")
    args = ap.parse_args(argv)
    try:
        at_least_each(args, k=1, n=1)
        for bits in quant.SUPPORTED_BITS:
            quant.check_group_size(args.k, bits, args.group_size)
        if args.markdown:
            files.check_append_file(args.markdown, "--markdown")
    except ValueError as e:  # already one line, naming the fix (a UserError is one too)
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, args.k))
    weights = {
        "gaussian": rng.standard_normal((args.k, args.n)),
        "student-t3": rng.standard_t(3, (args.k, args.n)),
    }
    xs = {name: x for name in weights}
    if args.model:  # trained weights: the up half of each expert's gate_up [E, H, 2I]
        from dynaexq_jax.io import loader

        ex = loader.load(args.model, jnp.float32).experts
        half = ex.gate_up[0].shape[-1] // 2
        weights[f"{Path(args.model).name} up"] = np.concatenate([np.asarray(g)[..., half:] for g in ex.gate_up])
        xs[f"{Path(args.model).name} up"] = rng.standard_normal((512, ex.gate_up[0].shape[1]))
    rows = []
    for name, w in weights.items():
        w, x = w.astype(np.float32), xs[name]
        for bits in quant.SUPPORTED_BITS:
            errs = {m: rel_error(w.astype(np.float64), x,
                                 quant.quantize(jnp.asarray(w), bits, args.group_size, m))
                    for m in quant.METHODS}
            rows.append((name, bits, errs["rtn"], errs["mse"], errs["hqq"]))
    head = "| weights | bits | rtn | mse | mse reduction | hqq | hqq reduction |\n|---|---|---|---|---|---|---|"
    body = "\n".join(f"| {n} | int{b} | {r:.4f} | {m:.4f} | {100 * (1 - m / r):.1f}% | {h:.4f} | "
                     f"{100 * (1 - h / r):.1f}% |" for n, b, r, m, h in rows)
    print(head + "\n" + body)
    if args.markdown:
        cmd = "python scripts/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = (f"\n### `{cmd.strip()}`\n\nK x N = {args.k} x {args.n}, group {args.group_size}, "
                f"X [512, K] Gaussian; relative output error.\n\n{head}\n{body}\n")
        with Path(args.markdown).open("a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
