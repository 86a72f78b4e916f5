"""The shipped tiny model's corpus: the Python standard library's source files, split into
training and held-out files by a hash of their path (scripts/train_tiny.py trains on the one,
scripts/build_tasks.py builds the evaluation tasks from the other, scripts/calibrate.py
calibrates on the training side)."""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELD_OUT_EVERY = 20


def stdlib_files() -> tuple[Path, list[str]]:
    """(the stdlib's folder, its .py files' paths relative to it, sorted), tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                rels.append(Path(dirpath, f).relative_to(root).as_posix())
    return root, sorted(rels)


def is_held_out(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELD_OUT_EVERY == 0


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text(encoding="utf-8", errors="replace")
