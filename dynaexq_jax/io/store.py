"""On-disk cache of converted experts (quantized fallbacks, int8 host copies), with orbax.

Converting a checkpoint's experts is pure: the same source weights and the same quantization
settings always give the same arrays. So each converted piece is written once, as an orbax
checkpoint, and read back on the next run.

Where: `$DYNAEXQ_CACHE_DIR`, else `$XDG_CACHE_HOME/dynaexq` (`~/.cache/dynaexq`), as the Hugging
Face and JAX caches do; never inside the checkpoint folder, which may be a read-only model
store. Each checkpoint folder has its own subfolder (its name and a hash of its path), so
checkpoints sharing a cache never touch each other's entries. The hotness profile a run saves
for the next one's warm start lives there too (`profile_path`).

An entry's name holds a hash of its settings and a fingerprint of its source: config.json, the
shard index and the full contents of every `*.safetensors` file. A file's hash is remembered
(`hashes.json`) under its size, mtime, ctime and inode, so later runs only stat it, and any
write to it (which moves its ctime, whatever its mtime is set back to) has it hashed again. A
changed source or setting misses and is rebuilt; the stale sibling with the same settings is
then removed.

Nothing in the cache is trusted: `meta.json` holds a SHA-256 of every array, checked on each
restore. A damaged entry (flipped bytes, a truncated file, no `meta.json`) is a warning, and
is removed and rebuilt.

Writes are atomic: an entry is built in `.tmp-<entry>-<host>-<pid>-*` next to its final place
and renamed into it only when complete; the next run removes temporaries whose process is gone
(a killed run). A cache that cannot be written (read-only, disk full) is a warning, and the
run goes on without it. Experts without a source (random presets), or `DYNAEXQ_CACHE=0`, are
converted without a cache.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from dynaexq_jax.io import files

FORMAT_VERSION = 2  # bump when the layout of what is cached changes
HASHES = "hashes.json"
# Temporaries are named after the host (hashed: no dashes) and pid of the run writing them.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_HASHED: dict[str, str] = {}  # this process's file hashes, by path and stat (a cache may be unwritable)


class CacheWarning(UserWarning):
    """The cache could not be used; the run goes on without it."""


def _warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


def enabled() -> bool:
    return os.environ.get("DYNAEXQ_CACHE", "1") != "0"


def cache_root() -> Path:
    override = os.environ.get("DYNAEXQ_CACHE_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dynaexq"


def source_dir(source: Path) -> Path:
    """The cache folder of checkpoint folder `source` (absolute)."""
    return cache_root() / f"{source.name}-{hashlib.sha256(str(source).encode()).hexdigest()[:10]}"


def _file_hash(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)  # releases the GIL: shards hash in parallel threads
    return h.hexdigest()


def _stat_key(f: Path) -> str:
    st = f.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _file_hashes(files: list[Path], memo_file: Path) -> list[str]:
    """Content hashes of `files`, read only where the remembered (stat -> hash) is out of date."""
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = {**(memo if isinstance(memo, dict) else {}), **_HASHED}
    keys = [f"{f}|{_stat_key(f)}" for f in files]
    todo = [(k, f) for k, f in zip(keys, files) if not isinstance(memo.get(k), str)]
    if todo:
        with concurrent.futures.ThreadPoolExecutor(min(8, len(todo))) as pool:
            memo.update(zip([k for k, _ in todo], pool.map(_file_hash, [f for _, f in todo])))
        current = {k: memo[k] for k in keys}
        _HASHED.update(current)
        _write_json_atomic(memo_file, current)
    return [memo[k] for k in keys]


def _write_json_atomic(path: Path, doc) -> None:
    """Best effort: the hash memo only saves time, so a cache that cannot take it goes without."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, json.dumps(doc))
    except OSError:
        pass


def source_fingerprint(checkpoint_dir: Path) -> str:
    """Hash of the source weights' contents, with config.json and the shard index."""
    d = Path(checkpoint_dir).resolve()
    h = hashlib.sha256()
    shards = sorted(d.glob("*.safetensors"))
    for f, digest in zip(shards, _file_hashes(shards, source_dir(d) / HASHES)):
        h.update(f"{f.name}\0{digest}\n".encode())
    for name in ("config.json", "model.safetensors.index.json"):
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    return h.hexdigest()[:16]


def _settings_slug(kind: str, settings: dict) -> str:
    text = json.dumps({"kind": kind, "version": FORMAT_VERSION, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _leaves(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{name}/").items()}
    return {prefix.rstrip("/"): tree}


def _array_hash(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def checksums(tree) -> dict[str, str]:
    """SHA-256 of every array of a nested dict, by path (hashed in parallel threads)."""
    leaves = _leaves(tree)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(leaves, pool.map(_array_hash, leaves.values())))


def _restore(path: Path, like):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "arrays", like)


def _load_verified(entry: Path):
    """The entry's tree if it restores and matches its checksums; else None, the entry removed."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        tree = _restore(entry, _abstract(meta["tree"]))
        ok = checksums(tree) == meta["checksums"]
        why = "its arrays do not match their checksums"
    except Exception as e:  # orbax and tensorstore raise many types for a damaged entry
        ok, why = False, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    if ok:
        return tree
    _warn(f"the cache entry {entry} is damaged ({why}); rebuilding it")
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _remove_dead_temporaries(home: Path) -> None:
    """Temporaries of runs on this host that died mid-write (a kill -9 runs no cleanup)."""
    for tmp in home.glob(".tmp-*"):
        parts = tmp.name.rsplit("-", 3)  # .tmp-<entry>, host, pid, random
        if len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit() and not _alive(int(parts[2])):
            shutil.rmtree(tmp, ignore_errors=True)


def _save_atomic(home: Path, name: str, tree, meta: dict) -> bool:
    """Write the entry, or warn and return False if the cache cannot take it."""
    import orbax.checkpoint as ocp

    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".tmp-{name}-{_HOST}-{os.getpid()}-"))
    except OSError as e:
        _warn(f"cannot write the expert cache at {home} ({e}); running without it "
              "(set DYNAEXQ_CACHE_DIR to a writable folder, or DYNAEXQ_CACHE=0)")
        return False
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "arrays", tree)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, home / name)
        except OSError:  # another process finished the same entry first: theirs is as good
            shutil.rmtree(tmp)
        return True
    except Exception as e:  # a full disk surfaces as OSError or as orbax's own error types
        shutil.rmtree(tmp, ignore_errors=True)
        _warn(f"cannot write the expert cache at {home} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
              "running without it (free space there, or set DYNAEXQ_CACHE_DIR or DYNAEXQ_CACHE=0)")
        return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached(source: Path | None, kind: str, settings: dict, build: Callable[[], object],
           like: Callable[[object], object] | None = None):
    """`build()` (a pytree of numpy arrays), through the cache of checkpoint directory `source`.

    `settings` (JSON-serialisable) are everything besides the source that changes the result.
    `like(tree)` is optional post-processing applied to both fresh and restored trees.
    """
    finish = like or (lambda t: t)
    src = Path(source).resolve() if source is not None else None  # orbax wants absolute paths
    if src is None or not src.is_dir() or not enabled():
        return finish(build())
    home = source_dir(src)
    slug = _settings_slug(kind, settings)
    name = f"{slug}-{source_fingerprint(src)}"
    entry = home / name
    if home.is_dir():
        _remove_dead_temporaries(home)
    if entry.is_dir():
        tree = _load_verified(entry)
        if tree is not None:
            return finish(tree)
    tree = build()
    meta = {"kind": kind, "settings": settings, "source": str(src), "version": FORMAT_VERSION,
            "tree": _describe(tree), "checksums": checksums(tree)}
    if _save_atomic(home, name, tree, meta):
        for stale in home.glob(f"{slug}-*"):  # same settings, older source (of this checkpoint only)
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
    return source_dir(src) / f"hotness-{source_fingerprint(src)}.json"
