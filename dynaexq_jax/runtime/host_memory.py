"""How the process's C allocator treats big host buffers, set once by a command before its work.

Page faults are the price of fresh host memory on the machines this project runs on: on the
2-core CPU machines a fresh gigabyte costs up to 2.7 s to fault in, a reused one 0.1-0.2 s to
write (`scripts/bench_host_memory.py`).
glibc hands every allocation above its mmap threshold (at most 32 MB by default) fresh pages and
returns them on free, and gives each thread its own arena, so a conversion that draws, quantizes
and frees a read of experts a hundred times pays for fresh pages every time (on the CPU backend
XLA's buffers are such allocations). Kept instead, the olmoe-1b-7b preset's conversion loop runs
in 7.6-8.3 s instead of 12.2-13.4 s (`scripts/bench_startup.py`; docs/PERFORMANCE.md).

A library import changes nothing: only the commands (`dynaexq_jax.cli.command`) call this.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
KEEP_BYTES = 1 << 30  # buffers up to this size come from the heap; this much free heap is kept


def reuse_freed_memory() -> bool:
    """Ask glibc to serve buffers up to `KEEP_BYTES` from one heap and keep up to `KEEP_BYTES`
    of freed memory for reuse. -> whether the allocator took the settings (False off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, KEEP_BYTES), (_M_TRIM_THRESHOLD, KEEP_BYTES), (_M_ARENA_MAX, 1))
    return all([mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in settings])
