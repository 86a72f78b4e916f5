"""On-disk cache of converted experts (quantized fallbacks, int8 host copies), with orbax.

Converting a checkpoint's experts is pure: the same source weights and the same quantization
settings always give the same arrays. So each converted piece is written once, as an orbax
checkpoint under `<checkpoint dir>/.dynaexq-cache/<entry>/`, and read back on the next run.

An entry's name holds a hash of its settings and of its source, so a changed source or
setting misses and is rebuilt (the stale sibling with the same settings is then removed).
The source is identified cheaply, without reading the weights: names, sizes and mtimes of
the `*.safetensors` files and the contents of `config.json` and the shard index.

Writes are atomic: an entry is built in a temporary directory next to its final place and
renamed into it only when complete, so an interrupted build never leaves an entry that a
later run would trust.

Callers name the checkpoint directory the experts came from (`source`); experts without one
(random presets), or `DYNAEXQ_CACHE=0`, are converted without a cache. `DYNAEXQ_CACHE_DIR`
moves the cache root (tests use it to keep out of `checkpoints/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_DIRNAME = ".dynaexq-cache"
FORMAT_VERSION = 1  # bump when the layout of what is cached changes

def enabled() -> bool:
    return os.environ.get("DYNAEXQ_CACHE", "1") != "0"


def cache_root(checkpoint_dir: Path) -> Path:
    override = os.environ.get("DYNAEXQ_CACHE_DIR")
    return Path(override) if override else Path(checkpoint_dir) / CACHE_DIRNAME


def source_fingerprint(checkpoint_dir: Path) -> str:
    """Hash of what identifies the source weights, without reading them."""
    d = Path(checkpoint_dir)
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for name in ("config.json", "model.safetensors.index.json"):
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    return h.hexdigest()[:16]


def _settings_slug(kind: str, settings: dict) -> str:
    text = json.dumps({"kind": kind, "version": FORMAT_VERSION, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _restore(path: Path, like):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "arrays", like)


def _save_atomic(root: Path, name: str, tree, meta: dict) -> None:
    import orbax.checkpoint as ocp

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "arrays", tree)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, root / name)
        except OSError:  # another process finished the same entry first: theirs is as good
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached(source: Path | None, kind: str, settings: dict, build: Callable[[], object], like: Callable[[object], object] | None = None):
    """`build()` (a pytree of numpy arrays), through the cache of checkpoint directory `source`.

    `settings` (JSON-serialisable) are everything besides the source that changes the result.
    `like(tree)` is optional post-processing applied to both fresh and restored trees.
    """
    finish = like or (lambda t: t)
    src = Path(source).resolve() if source is not None else None  # orbax wants absolute paths
    if src is None or not src.is_dir() or not enabled():
        return finish(build())
    root = cache_root(src)
    slug = _settings_slug(kind, settings)
    name = f"{slug}-{source_fingerprint(src)}"
    entry = root / name
    if entry.is_dir():
        meta = json.loads((entry / "meta.json").read_text())
        return finish(_restore(entry, _abstract(meta["tree"])))
    tree = build()
    meta = {"kind": kind, "settings": settings, "source": str(src), "version": FORMAT_VERSION, "tree": _describe(tree)}
    _save_atomic(root, name, tree, meta)
    for stale in root.glob(f"{slug}-*"):  # same settings, older source
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
    return finish(tree)


def _describe(tree):
    """Shapes and dtypes of a nested dict of arrays, JSON-serialisable (restore needs them)."""
    if isinstance(tree, dict):
        return {k: _describe(v) for k, v in tree.items()}
    return {"shape": list(tree.shape), "dtype": str(tree.dtype)}


def _abstract(desc):
    """Restore targets: numpy arrays, so restored trees stay in host memory like fresh ones."""
    import numpy as np

    from dynaexq_jax.io.loader import np_dtype

    if isinstance(desc.get("shape"), list):
        return np.empty(tuple(desc["shape"]), np_dtype(desc["dtype"]))  # untouched pages: no real allocation
    return {k: _abstract(v) for k, v in desc.items()}


def profile_path(source: Path | None) -> Path | None:
    """Where the hotness profile of checkpoint `source` is saved between runs (beside its
    converted experts), or None when there is no source or the cache is off (`DYNAEXQ_CACHE=0`)."""
    src = Path(source).resolve() if source is not None else None
    if src is None or not src.is_dir() or not enabled():
        return None
    return cache_root(src) / f"hotness-{source_fingerprint(src)}.json"
