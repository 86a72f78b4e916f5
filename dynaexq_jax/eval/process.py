"""A measurement in a fresh process of its own, under a time limit: what it printed, as far as it
got (the start-up benchmark's starts, gpu_check's stages)."""

from __future__ import annotations

import dataclasses
import subprocess
import time


@dataclasses.dataclass(frozen=True)
class Finished:
    returncode: int | None  # None: it ran out of its time and was killed
    stdout: str
    stderr: str
    seconds: float


def _text(stream) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


def run(cmd: list[str], *, env: dict, timeout: float) -> Finished:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return Finished(None, _text(e.stdout), _text(e.stderr), time.perf_counter() - t0)
    return Finished(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)
