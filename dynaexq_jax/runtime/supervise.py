"""One process of a multi-process mesh, watched by a parent that turns the mesh's breaking
into one `error:` line and exit status 2.

When a process of the mesh dies, the others learn it from XLA in one of two ways: a collective
in flight fails at once (gloo: "Connection reset by peer", a Python exception), or the
coordination service misses the dead process's heartbeats for `--distributed-timeout` seconds
(at once when the coordinator itself is gone) and XLA ends every other process with a fatal
log line, its stack and SIGABRT, which no Python code can catch. So a command forks before it
joins (`supervise`): the child runs the command, with its C-level stderr (XLA's and gloo's
logs) sent through a pipe to the parent and Python's own stderr straight out. The parent passes
those lines on until the child's mesh breaks (XLA's fatal lines, or `lose` from the child's own
handler of a failed collective, which also skips jax.distributed's shutdown barrier, where it
would wait for the dead), then prints the one line and exits 2; otherwise it exits as the child did.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import NoReturn

MARK = b"dynaexq: the mesh broke: "  # the child's line to the parent (`lose`)
# XLA's lines (logs, their continuations follow) when the coordination service reports a process
# dead or is itself gone: from the first on, the child's C-level lines are held back.
XLA_SIGNS = (b"coordination service", b"coordination_service", b"CoordinationService", b"JAX distributed service")


def supervise(process_id: int, num_processes: int, coordinator: str) -> None:
    """Fork: returns in the child, which runs on; the parent waits for it and never returns.
    Call before anything starts a JAX backend (no threads yet), and only from a command line."""
    if not hasattr(os, "fork"):  # no fork (Windows): XLA's own ending stands
        return
    read, write = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _die_with(parent)
        os.close(read)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)  # Python's own lines: straight out
        os.dup2(write, 2)  # C-level writes (XLA, gloo): through the parent
        os.close(write)
        return
    os.close(write)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child too (one process group)
    signal.signal(signal.SIGTERM, lambda *_: _signal(child, signal.SIGTERM))
    why, held = None, []
    with os.fdopen(read, "rb") as pipe:
        for line in pipe:
            if line.startswith(MARK):
                why = why or line[len(MARK):].decode(errors="replace").strip()
                continue
            if why is None and any(sign in line for sign in XLA_SIGNS):
                why = "the coordination service reports a process gone"
            if why is None:
                os.write(2, line)
            else:
                held = held[-100:] + [line]
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if why is not None and code != 0:
        print(f"error: process {process_id} of {num_processes} stopped: the mesh broke ({why}); another process "
              f"died or the coordinator at {coordinator} went away: restart all {num_processes} processes",
              file=sys.stderr, flush=True)
        os._exit(2)
    for line in held:  # the child ended well after all: its lines were only noise
        os.write(2, line)
    os._exit(code if code >= 0 else 128 - code)


def _die_with(parent: int) -> None:
    """The child ends when the parent does, however it ends (the pid one started, and may kill, is
    the parent's): Linux's parent-death signal."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: an orphan runs on until the mesh's heartbeats end it
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(2)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # already gone: its status tells
        pass


def lose(detail) -> NoReturn:
    """In the child: the mesh broke (`detail`: why, e.g. a failed collective's error). Tells the
    parent and leaves at once, without jax.distributed's shutdown (it waits for every process)."""
    os.write(2, MARK + " ".join(str(detail).split())[:200].encode() + b"\n")
    os._exit(2)
