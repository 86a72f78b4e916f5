#!/usr/bin/env python
"""What host memory, the disk and a transpose cost on this machine: the measurements behind
the start-up's choices (docs/PERFORMANCE.md, "The cold start on the CPU").

    python scripts/bench_host_memory.py --gb 0.5

Each line is seconds per GB, the first of `--repeats` runs (what a cold start meets: a fresh
process, a new file) and the best:
  fresh pages      writing a new numpy buffer (its pages faulted in), in a fresh process, with
                   glibc's defaults and after `runtime.host_memory.reuse_freed_memory`
  mapped write     stores into a new file mapped writable (what the cache writer did)
  pwrite           the same bytes by `pwrite`, 4 MB blocks, into a sparse and a fallocated file
  transpose        a bf16 [1024, 2048] expert matrix: numpy's transposing copy, and the loader's
                   device-side layout (`io.loader._in_our_layout`, 4 experts a call)
Files go to a temporary folder in `--dir` (default: the system's), removed at the end.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time

FRESH = """
import sys, time, numpy as np
from dynaexq_jax.runtime import host_memory
if sys.argv[1] == "reuse":
    host_memory.reuse_freed_memory()
n, times = int(float(sys.argv[2]) * 2**30), []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    a = np.empty(n, np.uint8)
    a.fill(1)
    times.append(time.perf_counter() - t)
    del a
print(times[0], min(times))
"""


def parse_args(argv=None):
    from dynaexq_jax.launch.flags import command_parser

    p = command_parser(__doc__)
    p.add_argument("--gb", type=float, default=0.5,
                   help="bytes each measurement moves, in GB (under 1: the heap serves and keeps up to 1 GB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where the temporary files go")
    return p.parse_args(argv)


def first_and_best(repeats: int, run) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times[0], min(times)


def file_writes(folder: str, n: int, repeats: int) -> dict[str, tuple[float, float]]:
    import numpy as np

    src = np.ones(n, np.uint8)
    path = os.path.join(folder, "bench.bin")

    def new_file(allocate: bool) -> int:
        with open(path, "wb") as f:
            f.truncate(n)
            if allocate:
                os.posix_fallocate(f.fileno(), 0, n)
        return os.open(path, os.O_RDWR)

    def mapped():
        fd = new_file(False)
        with mmap.mmap(fd, n) as m:
            np.frombuffer(m, np.uint8)[:] = src
        os.close(fd)

    def pwrite(allocate: bool):
        fd = new_file(allocate)
        block = 4 << 20
        for off in range(0, n, block):
            os.pwrite(fd, memoryview(src[off : off + block]), off)
        os.close(fd)

    try:
        return {"mapped write": first_and_best(repeats, mapped),
                "pwrite, sparse file": first_and_best(repeats, lambda: pwrite(False)),
                "pwrite, fallocated file": first_and_best(repeats, lambda: pwrite(True))}
    finally:
        if os.path.exists(path):
            os.remove(path)


def transposes(repeats: int) -> tuple[dict[str, tuple[float, float]], int]:
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    from dynaexq_jax.io.loader import _in_our_layout

    mats = [np.random.default_rng(i).standard_normal((1024, 2048)).astype(ml_dtypes.bfloat16) for i in range(8)]
    nbytes = sum(m.nbytes for m in mats)

    def on_device():
        x, finite = _in_our_layout([jax.device_put(m) for m in mats], 2, jnp.bfloat16)
        assert bool(finite)
        jax.block_until_ready(x)

    on_device()  # compiled outside the timing
    return {"transpose, numpy": first_and_best(repeats, lambda: [np.ascontiguousarray(m.T) for m in mats]),
            "transpose, on the device": first_and_best(repeats, on_device)}, nbytes


def check(args) -> None:
    from dynaexq_jax.launch.flags import FlagError, above_zero, at_least_each

    above_zero("a size in GB")("--gb", args.gb)
    at_least_each(args, repeats=1)
    if args.dir is not None and not os.path.isdir(args.dir):
        raise FlagError(f"--dir {args.dir}: no such folder; pass an existing one")


def main(argv=None) -> int:
    from dynaexq_jax.cli import refusals_as_errors

    return refusals_as_errors(run)(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    check(args)
    n = int(args.gb * 2**30)
    rows = {}
    for how in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", FRESH, how, str(args.gb), str(args.repeats)], check=True,
                             capture_output=True, text=True).stdout
        name = f"fresh pages, {'glibc defaults' if how == 'default' else 'reuse_freed_memory'}"
        rows[name] = tuple(float(x) * 2**30 / n for x in out.split())
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows.update({k: tuple(x * 2**30 / n for x in v) for k, v in file_writes(folder, n, args.repeats).items()})
    times, nbytes = transposes(args.repeats)
    rows.update({k: tuple(x * 2**30 / nbytes for x in v) for k, v in times.items()})
    print("| what | s per GB, first | s per GB, best |\n|---|---|---|")
    for k, (first, best) in rows.items():
        print(f"| {k} | {first:.2f} | {best:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
