"""Output files: all of a file or nothing, and unwritable targets refused before the work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dynaexq_jax.errors import UserError


def write_atomic(path: Path, text: str) -> None:
    """All of `text` or nothing at `path`: a reader (or a crash) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(path, flag: str) -> None:
    """Fail now, not after the work whose result `path` (given with `flag`) is to hold."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory; name a file in it")
    if not target.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {target.parent} does not exist; create it first")
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {target.parent} ({e.strerror}); name a writable folder") \
            from None
