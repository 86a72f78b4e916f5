#!/usr/bin/env python
"""Time to the first token, phase by phase, cold and warm, each start in a fresh process.

    python scripts/bench_startup.py --preset olmoe-1b-7b --budget 6GB --policies dynaexq,static,offload \\
        --export olmoe-1b-7b:2 --json startup.json

Per source (a preset, `--model DIR`, and with `--export PRESET:LAYERS` a real safetensors
checkpoint the benchmark writes first from that preset cut to LAYERS layers) and policy: a
*cold* start (an empty converted-expert cache and an empty compilation cache) and then a *warm*
one (both as the cold start left them). Phases are `dynaexq_jax.runtime.startup`'s; `total`
runs from the process's start (interpreter and imports included) to the first token.
Prints a Markdown table; `--json` writes every figure.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before any import: a start includes its imports

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from argparse import SUPPRESS  # noqa: E402
from pathlib import Path  # noqa: E402

PHASES = ("read", "tiers", "convert", "build", "fill", "compile", "first")


def parse_args(argv=None):
    from dynaexq_jax.launch.flags import command_parser  # the worker imports the package anyway

    p = command_parser(__doc__)
    p.add_argument("--preset", action="append", default=[], help="a preset to start (repeatable)")
    p.add_argument("--model", action="append", default=[], help="a checkpoint folder to start (repeatable)")
    p.add_argument("--export", action="append", default=[], metavar="PRESET:LAYERS",
                   help="write this preset with LAYERS layers as a safetensors checkpoint, then start it")
    p.add_argument("--policies", default="dynaexq,static,offload")
    p.add_argument("--budget", default="6GB", help="device memory budget of every start (accelerate's sizes)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--work-dir", help="where exported checkpoints are kept between runs: new, empty, or one this "
                                      "script wrote (each start's caches are made and removed in it; default: a "
                                      "temporary folder, removed at the end)")
    p.add_argument("--json", help="write every figure here (a new file, or one this script wrote)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one start may take")
    p.add_argument("--worker", nargs=3, metavar=("SOURCE", "POLICY", "BUDGET"), help=SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    """One start, in this fresh process: its figures as one JSON line on stdout."""
    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.runtime import compile_cache, host_memory, startup

    host_memory.reuse_freed_memory()  # as the commands do
    compile_cache.enable()
    source, policy, budget = args.worker
    out = startup.measure(source, policy, None if budget == "none" else budget_lib.parse_size(budget),
                          dtype=args.dtype, prompt_len=args.prompt_len, started=_T0)
    print(json.dumps(out))


def export_spec(spec: str) -> tuple[str, int]:
    """--export NAME:LAYERS -> (preset name, layers), checked."""
    from dynaexq_jax.errors import UserError
    from dynaexq_jax.io import preset

    name, _, layers = spec.partition(":")
    if name not in preset.PRESETS or not layers.isdigit() or int(layers) < 1:
        raise UserError(f"--export {spec!r}: expected PRESET:LAYERS with a preset of {', '.join(preset.PRESETS)} "
                        "and at least one layer")
    return name, int(layers)


def export(spec: str, work, dtype: str) -> Path:
    """Preset `spec` = NAME:LAYERS written as a checkpoint folder in `work` (an `OutputDir`; once)."""
    import jax.numpy as jnp

    from dynaexq_jax.io import hf_export, preset
    from dynaexq_jax.models import registry

    name, layers = export_spec(spec)
    path = work / f"{name}-{layers}-layers"
    if (path / "model.safetensors").is_file():
        return path
    hf = dict(preset.PRESETS[name], num_hidden_layers=int(layers))
    cfg = registry.adapter_for(hf).config_from_hf(hf)
    ckpt = preset.random_checkpoint(cfg, jnp.dtype(dtype))
    hf_export.save_checkpoint(path, cfg, ckpt.params, ckpt.experts, dtype=dtype, eos_token_id=0)
    return path


EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Warning)\b")


def run_one(source: str, policy: str, args, caches: Path) -> dict:
    from dynaexq_jax.eval import process

    env = dict(os.environ, DYNAEXQ_CACHE_DIR=str(caches / "experts"), DYNAEXQ_COMPILE_CACHE=str(caches / "jax"),
               DYNAEXQ_CACHE="1")
    argv = [sys.executable, __file__, "--worker", source, policy, args.budget, "--dtype", args.dtype,
            "--prompt-len", str(args.prompt_len)]
    done = process.run(argv, env=env, timeout=args.timeout)
    failed = {"source": source, "policy": policy, "wall": done.seconds}
    if done.returncode is None:
        return dict(failed, error=f"no first token within {args.timeout} s", stderr=done.stderr[-4000:])
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        # The exception's own line, not the traceback's last frame (a thread's traceback ends elsewhere).
        why = next((line for line in reversed(lines) if line.startswith("error:") or EXCEPTION.match(line)), lines[-1])
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} (out of host memory?); last: {why}"
        return dict(failed, error=why, stderr="\n".join(lines[-40:]))
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), wall=done.seconds)


def table(rows: list[dict]) -> str:
    head = ["source", "policy", "start", *PHASES, "to first token", "of which compile ahead", "converted GB/s",
            "checkpoint read"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = Path(r["source"]).name
        if "error" in r:
            lines.append(f"| {name} | {r['policy']} | {r['start']} | failed: {r['error']} |")
            continue
        gbs = f"{r['converted_gbs']:.2f}" if r.get("converted_gbs") else "-"
        read = f"{r['checkpoint_bytes_read'] / 1e9:.2f} GB" if r["checkpoint_bytes_read"] else "- (drawn)"
        cells = [name, r["policy"], r["start"], *(f"{r[p]:.2f}" for p in PHASES), f"**{r['total']:.1f} s**",
                 f"{r['compile_ahead']:.1f} s", gbs, read]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(args) -> list[str]:
    """Every flag, before any start: -> the policies."""
    from dynaexq_jax import budget as budget_lib
    from dynaexq_jax.io import files
    from dynaexq_jax.launch.flags import above_zero, at_least_each, comma_list
    from dynaexq_jax.policies import POLICIES

    policies = comma_list("--policies", args.policies, choices=POLICIES)
    at_least_each(args, prompt_len=1)
    above_zero("a number of seconds")("--timeout", args.timeout)
    if args.budget != "none":
        budget_lib.parse_size(args.budget)
    for spec in args.export:
        export_spec(spec)
    if args.json:
        files.check_output_file(args.json, "--json")
    return policies


def main(argv=None) -> int:
    from dynaexq_jax.cli import refusals_as_errors

    return refusals_as_errors(run)(argv)


def run(argv=None) -> int:
    from dynaexq_jax.io import files

    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    policies = check(args)
    work = files.OutputDir(args.work_dir or tempfile.mkdtemp(prefix="bench-startup-"), "--work-dir")
    try:
        sources = args.preset + args.model + [str(export(s, work, args.dtype)) for s in args.export]
        rows = []
        for source in sources or ["olmoe-1b-7b"]:
            for policy in policies:
                # Caches of their own (a cold start finds them empty), gone after the warm start.
                work.path.mkdir(parents=True, exist_ok=True)
                caches = Path(tempfile.mkdtemp(prefix=f"caches-{policy}-", dir=work.path))
                try:
                    for start in ("cold", "warm"):
                        row = dict(run_one(source, policy, args, caches), start=start)
                        rows.append(row)
                        print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                finally:
                    shutil.rmtree(caches, ignore_errors=True)
    finally:
        if args.work_dir is None:  # a folder of our own: the exported checkpoints go with it
            shutil.rmtree(work.path, ignore_errors=True)
    print(table(rows))
    if args.json:
        files.write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
