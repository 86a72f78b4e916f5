"""Side-by-side benchmark of expert-residency policies on one model, budget and prompts.

    python scripts/bench.py --preset qwen3-30b-a3b --budget 20GB --routing-skew 1.0 \\
        --policies static,offload,prefetch,dynaexq --batch-sizes 1,8,32 --json bench.json
    python scripts/bench.py --preset qwen3-moe-smoke --budget 64MB --batch-sizes 1,4 --gen-len 8   # CPU smoke

Every policy runs in this one process on the same prompts. Per (policy, batch): one warm-up
generation (compilation, residency warm-up) is excluded, then the medians of `--repeats`
generations are reported. Quality: each policy's next-token distributions on fixed token
sequences are compared with a reference: `full` without a budget (it only needs to fit the
device, not the budget) or, if `--reference static8`, every expert at int8.

Next to the measured rates, `min_decode_bytes` is what a decode step must read at least and
`min_bytes_gbs` the rate the step reached on those bytes (`eval.throughput`).

The budget, batch sizes and policies are checked against each policy's memory plan from the
config alone, before any weight is made or read.

`peak_device_bytes` is the allocator's peak since the process started (null on CPU); policies
run in the order given, so list them from the smallest footprint up. With --mesh it also
reports each placement's load imbalance and the step's collective bytes (`runtime.mesh.load_report`).
"""

from __future__ import annotations

import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.eval import big_little, plots, throughput
from dynaexq_jax.eval.agreement import compare
from dynaexq_jax.io import files, loader, preset
from dynaexq_jax.launch.flags import at_least_each, comma_list, command_parser
from dynaexq_jax.launch.options import (
    DYNAEXQ_FLAGS,
    FLOE_FLAGS,
    BigLittleSweep,
    MeshOptions,
    ModelOptions,
    PlanOptions,
    PolicyOptions,
    check_applies,
    check_tiers,
)
from dynaexq_jax.models import registry
from dynaexq_jax.models.big_little import BigLittle
from dynaexq_jax.policies import POLICIES
from dynaexq_jax.policies.dynaexq import DynaExqOptions
from dynaexq_jax.runtime import costmodel
from dynaexq_jax.runtime import mesh as mesh_lib
from dynaexq_jax.runtime.build import build_engine
from dynaexq_jax.runtime.engine import Engine, check_context

POLICY_FLAGS = ("rebalance_every", "floe_sparsity", "floe_up_bits", "floe_calibration")


def parser():
    p = command_parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Hugging Face checkpoint directory")
    src.add_argument("--preset", default="qwen3-moe-smoke", help="preset name or config.json path (random weights)")
    p.add_argument("--policies", default="static,offload,prefetch,dynaexq,dynaexq/int8,full",
                   help="comma-separated; dynaexq/int8: dynaexq with int8 slots (more slots in the same bytes)")
    PlanOptions.add_flags(p, only=("budget",))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    ModelOptions.add_flags(p, only=("dtype",))
    p.add_argument("--lo-bits", type=int, choices=[4, 3, 2], default=4, help="fallback width of dynaexq and static")
    PolicyOptions.add_flags(p, only=POLICY_FLAGS)
    p.add_argument("--routing-skew", type=float, default=0.0, help="presets: Zipf-like expert popularity (0 = uniform)")
    p.add_argument("--routing-shift-every", type=int, default=0,
                   help="presets: new hot set every N decode steps (0 = never)")
    p.add_argument("--reference", choices=["full", "static8"], default="full")
    p.add_argument("--quality-seqs", type=int, default=2, help="sequences for KL / top-1 agreement")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, the quality sequences and preset weights")
    p.add_argument("--json", help="write results here (a new file, or one this command wrote)")
    p.add_argument("--plot", help="write a PNG of decode tokens/s by batch size per policy (with --big-little: "
                                  "also decode tokens/s against KL vs the reference, one line per policy)")
    BigLittleSweep.add_flags(p)
    MeshOptions.add_flags(p, only=("mesh",))
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynaexq_jax.runtime import host_memory

    host_memory.reuse_freed_memory()
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_args(args):
    """Everything a user can get wrong that needs no weights: -> (batch sizes, policies, budget)."""
    batch_sizes = comma_list("--batch-sizes", args.batch_sizes, convert=int, low=1)
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    for n in names or [args.policies]:
        policy, _, hi = n.partition("/")
        if policy not in POLICIES or hi not in ("", "int8", "int4", "bfloat16") or (hi and policy != "dynaexq"):
            raise UserError(f"unknown policy {n!r} in --policies; choose from {', '.join(POLICIES)} "
                            "(dynaexq/int8, dynaexq/int4: quantized slots)")
    for n in names:
        hi = n.partition("/")[2]
        if hi:
            check_tiers(hi, args.lo_bits, f"--policies {n} over --lo-bits {{lo}}")
    # --gen-len 1 has no decode step to time; numpy's generator takes no negative seed
    at_least_each(args, prompt_len=1, gen_len=2, repeats=1, quality_seqs=1, seed=0, routing_skew=0,
                  routing_shift_every=0)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            files.check_output_file(path, flag)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib; pip install matplotlib") from None
    policy = PolicyOptions.from_args(args)
    policy.check()
    runs = {n.partition("/")[0] for n in names}
    check_applies(policy, FLOE_FLAGS, "floe" in runs, "FloE", "add floe to --policies")
    check_applies(policy, DYNAEXQ_FLAGS, "dynaexq" in runs, "dynaexq", "add dynaexq to --policies")
    MeshOptions.from_args(args).check()
    sweep = BigLittleSweep.from_args(args).sweep()
    return batch_sizes, names, PlanOptions.from_args(args).budget_bytes(), sweep


def model_config(args):
    if args.model:
        return registry.read_config(args.model)
    return preset.preset_config(args.preset)


def run(args):
    batch_sizes, names, budget, sweep = check_args(args)
    cfg = model_config(args)

    dtype = jnp.dtype(args.dtype)
    # Quality sequences are prompt + gen tokens long; generation adds gen to the prompt.
    longest = args.prompt_len + args.gen_len
    check_context(cfg, longest, 0)
    opts = DynaExqOptions(lo_bits=args.lo_bits, rebalance_every=args.rebalance_every)
    shape = dict(batch=max(batch_sizes), longest_prompt=longest, max_new_tokens=args.gen_len)
    floe = PolicyOptions.from_args(args).floe()
    devices = MeshOptions.from_args(args).size() or 1
    if args.mesh and any(throughput.variant(n, opts)[0] not in mesh_lib.MESH_POLICIES for n in names):
        raise UserError(f"--mesh runs --policies from {', '.join(mesh_lib.MESH_POLICIES)} only; drop the others")
    plans = throughput.fitting_plans(cfg, names, budget, itemsize=dtype.itemsize, opts=opts, floe=floe,
                                     devices=devices, **shape)
    mesh = mesh_lib.expert_mesh(devices) if args.mesh else None

    if args.model:
        ckpt = loader.load(args.model, dtype)
    else:
        ckpt = preset.random_checkpoint(cfg, dtype, seed=args.seed, routing_skew=args.routing_skew)
    shift = preset.RouterShift(ckpt, args.routing_skew or 1.0) if args.routing_shift_every else None
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, cfg.vocab_size, (max(batch_sizes), args.prompt_len)).tolist()
    quality = rng.integers(1, cfg.vocab_size, (args.quality_seqs, longest)).tolist()
    bw = costmodel.measure_bandwidth(64 * 2**20)
    device = str(jax.devices()[0].device_kind)
    print(f"device: {device}; measured copy {bw.hbm / 1e9:.1f} GB/s, host->device {bw.h2d / 1e9:.1f} GB/s",
          file=sys.stderr)

    def build(policy, budget_bytes, o=opts, on_mesh=True):
        return build_engine(ckpt, policy, budget=budget_bytes, opts=o, floe=floe, mesh=mesh if on_mesh else None,
                            **shape)

    levels = {}
    if sweep:  # thresholds for the target shares, from the plain model on the quality sequences
        little_k = sweep.little_k or max(1, cfg.experts_per_token // 2)
        cut = big_little.thresholds(Engine(ckpt), quality, little_k, sweep.rule, sweep.shares)
        levels = {s: BigLittle(little_k, sweep.rule, t, sweep.floor).checked(cfg.experts_per_token)
                  for s, t in cut.items() if s > 0}

    results, costs, logits = [], [], {}
    for base in plans:
        policy, popts = throughput.variant(base, opts)
        eng, plan = build(policy, budget, popts)
        for share, bl in [(None, None)] + list(levels.items()):  # the plain rows, then big-little's
            eng.big_little = bl
            name = base if bl is None else f"{base} little {share:.0%}"
            for B in batch_sizes:
                row, cost = throughput.measure(
                    eng, plan, policy, popts, cfg=cfg, prompts=prompts[:B], gen_len=args.gen_len,
                    repeats=args.repeats, longest_batch=max(batch_sizes), bw=bw, itemsize=dtype.itemsize,
                    quality=quality if mesh is not None else None, on_tokens=router_shift(eng, shift, args))
                results.append({"policy": name, **row})
                costs.append(cost)
                print(f"{name:>12} B={B:<3} decode {row['decode_tokens_per_s'] or 0:9.1f} tok/s  tpot "
                      f"{row['tpot_s'] * 1e3:8.2f} ms (model {cost.seconds * 1e3:8.2f} ms)  reads >= "
                      f"{row['min_decode_bytes'] / 1e6:9.2f} MB/step = {row['min_bytes_gbs']:7.2f} GB/s",
                      file=sys.stderr)
            logits[name] = eng.logits(quality)
        del eng
        gc.collect()

    ref_name = "full" if args.reference == "full" else "static8"
    if ref_name in plans and budget is None:
        ref = logits[ref_name]
    else:  # one device's logits: what the mesh must match
        ref = throughput.reference_logits(cfg, args.reference, lambda *a: build(*a, on_mesh=False), quality,
                                          itemsize=dtype.itemsize, opts=opts, shape=shape)
    if ref is not None:
        for r in results:
            r["kl_vs_full"], r["top1_agreement"] = compare(ref, logits[r["policy"]])

    print_table(results)
    if args.json:
        files.write_json(args.json, {"device": device, "reference": ref_name,
                                     "bandwidth": {"hbm": bw.hbm, "h2d": bw.h2d}, "args": vars(args),
                                     "results": results}, indent=2)
    if args.plot:
        plots.throughput(results, args.plot, device)
    project(results, costs)
    return results


def router_shift(eng, shift, args):
    """With --routing-shift-every: a token callback moving the preset's hot set every N steps."""
    if shift is None:
        return None
    state = {"step": 0}

    def on_tokens(_ids):
        state["step"] += 1
        if state["step"] % args.routing_shift_every == 0:
            eng.params = shift.params(eng.params, state["step"] // args.routing_shift_every)

    return on_tokens


def print_table(results):
    cols = ["policy", "batch_size", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "tpot_s",
            "predicted_tpot_s", "min_decode_bytes", "min_bytes_gbs", "h2d_bytes_per_token",
            "h2d_decode_bytes_per_token", "stream_gbps", "transfer_wait_s", "hi_hit_rate", "kl_vs_full",
            "top1_agreement", "little_share", "pairs_saved_per_token", "expert_bytes_saved_per_token",
            "accounted_device_bytes", "peak_device_bytes"]
    cols += [c for c in ("mesh_devices", "imbalance_contiguous", "imbalance_balanced", "collective_bytes_per_step",
                         "expert_bytes_per_device_step") if c in results[0]]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = []
        for c in cols:
            v = r[c]
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def project(results, costs):
    """Where the measured mix of bytes would land on other GPUs (the cost model alone)."""
    print("\nprojected decode tokens/s from the cost model (measured hit rates and h2d bytes):", file=sys.stderr)
    for r, cost in zip(results, costs):
        proj = costmodel.project(r["policy"], cost)
        cells = ", ".join(f"{name} {r['batch_size'] / s:.0f}" for name, s in proj.items())
        print(f"  {r['policy']:>9} B={r['batch_size']:<3} {cells}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
