"""On-disk cache of converted experts (quantized fallbacks, int8 host copies), as mapped files.

Converting a checkpoint's experts is pure: the same source weights and the same quantization
settings always give the same arrays. So each converted piece is written once and read back
on the next run, and read back means *mapped*: an entry's arrays live in one safetensors file
(`arrays.safetensors`, readable by any safetensors reader) whose tensors a run uses as numpy
views of the file, with no copy in process memory. A dynaexq run with int8 slots keeps its
host bank of int8 copies as such a mapping: memory the page cache already holds, not a second
copy. (orbax, which the cache used before, restores through tensorstore into fresh buffers:
right for checkpoints of a training run, a copy too many for a bank the run maps.)

Entries are written as they are produced, layer by layer: the file is laid out from the
arrays' shapes first, then each array is written into its place, so a conversion never holds
more than the layer it is on.

Where: `$DYNAEXQ_CACHE_DIR`, else `$XDG_CACHE_HOME/dynaexq` (`~/.cache/dynaexq`), as the Hugging
Face and JAX caches do; never inside the checkpoint folder, which may be a read-only model
store. Each source has its own subfolder: a checkpoint folder's name and a hash of its path,
or a generated source's (a random preset's) name and a hash of its recipe, so sources sharing a
cache never touch each other's entries. The hotness profile a run saves for the next one's
warm start lives there too (`profile_path`).

An entry's name holds a hash of its settings and a fingerprint of its source: for a checkpoint
config.json, the shard index and the full contents of every `*.safetensors` file (a file's
hash is remembered in `hashes.json` under its size, mtime, ctime and inode, so later runs only
stat it, and any write to it, which moves its ctime whatever its mtime is set back to, has it
hashed again); for a generated source its recipe. A changed source or setting misses and is
rebuilt; the stale sibling with the same settings is then removed.

Nothing in the cache is trusted: `meta.json` holds a SHA-256 of every array, checked on each
read (in parallel threads). A damaged entry (flipped bytes, a truncated file, no `meta.json`)
is a warning, and is removed and rebuilt. Every entry holds the marker of a folder the tool made
(`files.MARKER`, listing its files), and only what a marker lists is ever removed: a cache
folder shared with other files (`DYNAEXQ_CACHE_DIR=~`) loses none of them.

Writes are atomic: an entry is built in `.tmp-<entry>-<host>-<pid>-*` next to its final place
and renamed into it only when complete; the next run removes temporaries whose process is gone
(a killed run). A cache that cannot be written (read-only, disk full) is a warning, and the
run goes on without it. `DYNAEXQ_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from dynaexq_jax.errors import UserError
from dynaexq_jax.io import files

FORMAT_VERSION = 4  # bump when the layout of what is cached changes (3: mapped safetensors files; 4: marked)
HASHES = "hashes.json"
ARRAYS = "arrays.safetensors"
ENTRY_FILES = (ARRAYS, "meta.json", "verified.json")  # what an entry's folder holds (its marker lists them)
# Temporaries are named after the host (hashed: no dashes) and pid of the run writing them.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_HASHED: dict[str, str] = {}  # this process's file hashes, by path and stat (a cache may be unwritable)
_PENDING: dict[Path, dict] = {}  # hash memos computed but not yet written, by memo file
_THREADS = min(16, os.cpu_count() or 1)
WRITE_AHEAD = 512 << 20  # bytes an `ArrayWriter` may hold to write behind its caller


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


@dataclasses.dataclass(frozen=True)
class Generated:
    """A source of experts made by a program rather than read from files (a random preset):
    cached under its `name` and a hash of its `recipe`, everything the experts depend on."""

    name: str
    recipe: tuple  # hashable, JSON-serialisable parts: shapes, dtype, seed, generator version

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.name, *self.recipe]).encode()).hexdigest()


def source_dir(source: Path) -> Path:
    """The cache folder of checkpoint folder `source` (absolute)."""
    return cache_root() / f"{source.name}-{hashlib.sha256(str(source).encode()).hexdigest()[:10]}"


def _file_hash(f: Path) -> str:
    """SHA-256 of a file's contents, read through a mapping (no buffer the size of a chunk per
    thread); hashlib releases the GIL, so shards hash in parallel threads."""
    h = hashlib.sha256()
    if f.stat().st_size:
        with _map(f) as buf:
            view = memoryview(buf)
            for start in range(0, len(buf), 1 << 26):
                h.update(view[start : start + (1 << 26)])
            view.release()
    return h.hexdigest()


def _stat_key(f: Path) -> str:
    st = f.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _file_hashes(paths: list[Path], memo_file: Path) -> list[str]:
    """Content hashes of `paths`, read only where the remembered (stat -> hash) is out of date."""
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = {**(memo if isinstance(memo, dict) else {}), **_HASHED}
    keys = [f"{f}|{_stat_key(f)}" for f in paths]
    todo = [(k, f) for k, f in zip(keys, paths) if not isinstance(memo.get(k), str)]
    if todo:
        with concurrent.futures.ThreadPoolExecutor(min(8, len(todo))) as pool:
            memo.update(zip([k for k, _ in todo], pool.map(_file_hash, [f for _, f in todo])))
        current = {k: memo[k] for k in keys}
        _HASHED.update(current)
        _PENDING[memo_file] = current  # written with the first entry: a refused run writes nothing
    return [memo[k] for k in keys]


def _flush_memo(home: Path) -> None:
    memo = _PENDING.pop(home / HASHES, None)
    if memo is not None:
        _write_json_atomic(home / HASHES, memo)


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


def _where(source) -> tuple[Path, str] | None:
    """(cache folder, fingerprint) of `source`: a checkpoint folder or a `Generated` source;
    None when it has none (no folder) or the cache is off."""
    if not enabled() or source is None:
        return None
    if isinstance(source, Generated):
        return cache_root() / f"{source.name}-{source.digest[:10]}", source.digest[:16]
    src = Path(source).resolve()  # absolute: the folder's hash must not depend on the working directory
    if not src.is_dir():
        return None
    return source_dir(src), source_fingerprint(src)


def has_cache(source) -> bool:
    """Whether `source`'s converted experts go through the cache (a folder or a generated
    source, and the cache on)."""
    return _where(source) is not None


def _settings_slug(kind: str, settings: dict) -> str:
    text = json.dumps({"kind": kind, "version": FORMAT_VERSION, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _leaves(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{name}/").items()}
    return {prefix.rstrip("/"): tree}


def _nest(flat: dict[str, np.ndarray]) -> dict:
    """The nested dict whose `_leaves` are `flat`."""
    out: dict = {}
    for path, a in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = a
    return out


def _array_hash(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


# ----------------------------------------------------------------------------- the array file

_ST_DTYPES = {"float64": "F64", "float32": "F32", "int32": "I32", "bfloat16": "BF16", "float16": "F16",
              "uint8": "U8", "int8": "I8", "bool": "BOOL"}


def _layout(spec: dict[str, tuple[tuple[int, ...], np.dtype]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header for arrays `spec` {name: (shape, dtype)} and each array's byte range
    in the file. Widest dtypes first, so every array starts aligned to its element size."""
    order = sorted(spec, key=lambda n: (-np.dtype(spec[n][1]).itemsize, n))
    header, offset = {}, 0
    for name in order:
        shape, dtype = spec[name]
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype.name], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 64)  # the data starts 64-byte aligned
    start = 8 + len(raw)
    ranges = {n: (start + h["data_offsets"][0], start + h["data_offsets"][1]) for n, h in header.items()}
    return len(raw).to_bytes(8, "little") + raw, ranges


def _views(buf, spec: dict, ranges: dict) -> dict[str, np.ndarray]:
    from dynaexq_jax.io.loader import np_dtype

    return {n: np.frombuffer(buf, np_dtype(spec[n][1]), count=int(np.prod(spec[n][0], dtype=np.int64)),
                             offset=ranges[n][0]).reshape(spec[n][0]) for n in spec}


def _spec_of(desc: dict) -> dict:
    return {n: (tuple(d["shape"]), d["dtype"]) for n, d in _leaves_desc(desc).items()}


def _leaves_desc(desc, prefix: str = "") -> dict:
    if isinstance(desc.get("shape"), list):
        return {prefix.rstrip("/"): desc}
    return {k: v for name, sub in desc.items() for k, v in _leaves_desc(sub, f"{prefix}{name}/").items()}


def _describe(tree):
    """Shapes and dtypes of a nested dict of arrays, JSON-serialisable (reading needs them)."""
    if isinstance(tree, dict):
        return {k: _describe(v) for k, v in tree.items()}
    return {"shape": list(tree.shape), "dtype": str(tree.dtype)}


def _map(path: Path):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


VERIFIED = ENTRY_FILES[2]


def _verified_stamp(arrays_file: Path, meta_text: str) -> dict:
    """What `verified.json` holds: the array file's stat key and its meta.json's hash."""
    return {"file": _stat_key(arrays_file), "meta": hashlib.sha256(meta_text.encode()).hexdigest()}


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while len(data):  # a write may take fewer bytes than asked (Linux: at most ~2 GB a call)
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _chunk_hash(a: np.ndarray, start: int, end: int) -> str:
    return _array_hash(a if a.ndim == 0 else a[start:end])


def read_arrays(entry: Path) -> dict[str, np.ndarray]:
    """Entry `entry`'s arrays as read-only views of its mapped file (flat: {"a/b/c": array}),
    checked against the SHA-256s in its `meta.json` (row blocks of each array, in parallel
    threads) the first time they are mapped after any change to the file: a check that passed is
    remembered (`verified.json`) under the file's size, mtime, ctime and inode, as the source
    checkpoint's hashes are, so a later run maps the entry without reading it. Raises on any
    damage (OSError, ValueError, KeyError)."""
    meta_text = (entry / "meta.json").read_text()
    meta = json.loads(meta_text)
    spec = _spec_of(meta["tree"])
    head, ranges = _layout(spec)
    path = entry / ARRAYS
    end = max((e for _, e in ranges.values()), default=len(head))
    if path.stat().st_size != end:
        raise ValueError(f"{ARRAYS} holds {path.stat().st_size} bytes, its arrays need {end}")
    buf = _map(path)
    if buf[: len(head)] != head:
        raise ValueError(f"the header of {ARRAYS} does not describe its arrays")
    arrays = _views(buf, spec, ranges)
    sums = meta["checksums"]
    if set(sums) != set(arrays):
        raise ValueError("its arrays do not match their checksums")
    stamp = _verified_stamp(path, meta_text)
    try:
        seen = json.loads((entry / VERIFIED).read_text())
    except (OSError, ValueError):
        seen = None
    if seen != stamp:
        chunks = [(n, c) for n, cs in sums.items() for c in cs]
        with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
            got = list(pool.map(lambda nc: _chunk_hash(arrays[nc[0]], nc[1][0], nc[1][1]), chunks))
        if any(g != c[2] for g, (_, c) in zip(got, chunks)):
            raise ValueError("its arrays do not match their checksums")
        _write_json_atomic(entry / VERIFIED, stamp)
    return arrays


class ArrayWriter:
    """Arrays `spec` written into a new entry's file, whole or in blocks of rows, then committed
    at once.

    `put` writes an array (or rows `start`.. of one) into its place in the file and hashes that
    block; `put_rows` writes rows in any order, and `written` hashes a block of them once it is
    whole. The writes are `pwrite`s from a thread of their own, at most `WRITE_AHEAD` bytes behind
    the caller (an array put must not change until `commit`), the hashes from a pool: on the
    2-core CPU machines a new mapped file's pages cost ~2 s a GB to fault in, `pwrite` ~0.4 s
    (`scripts/bench_host_memory.py`), and past the first GB the disk takes ~3 s a GB, time the
    caller spends converting the next experts instead. `commit` waits for them, checks every
    array was written whole, syncs the file, writes `meta.json` and the folder's marker and
    renames the temporary folder into the entry. Until then nothing at the entry's name exists,
    so an interrupted run leaves nothing a later run trusts. `replace`: a folder at the entry's
    name that the tool made is replaced (the files in it the tool did not write stay), any other
    is refused (`files.install_dir`); else the first entry made at a name stands.
    """

    def __init__(self, tmp: Path, final: Path, spec: dict, meta: dict, replace: bool = False):
        self.tmp, self.final, self.spec, self.meta, self.replace = tmp, final, spec, meta, replace
        head, self._ranges = _layout(spec)
        end = max((e for _, e in self._ranges.values()), default=len(head))
        fs = os.statvfs(tmp)
        if fs.f_bavail * fs.f_frsize < end:  # a full disk fails here, not inside a later write
            raise OSError(errno.ENOSPC, f"No space left on device: {end / 1e9:.2f} GB to write, "
                                        f"{fs.f_bavail * fs.f_frsize / 1e9:.2f} GB free")
        # Not posix_fallocate: rows written in blocks of a few MB into its unwritten extents cost
        # 1.4-3.1 s a GB the first time (ext4, the 2-core CPU machines), into a sparse file ~0.4 s.
        with open(tmp / ARRAYS, "wb") as f:
            f.write(head)
            f.truncate(end)
        self._fd = os.open(tmp / ARRAYS, os.O_RDWR)
        self._buf = _map(tmp / ARRAYS)
        self.arrays = _views(self._buf, spec, self._ranges)  # read-only: what the file holds
        self._pool = concurrent.futures.ThreadPoolExecutor(_THREADS)
        self._io = concurrent.futures.ThreadPoolExecutor(1)  # the writes, in order
        self._pending = collections.deque()  # (future, bytes) of writes not yet waited for
        self._ahead, self._last = 0, None  # bytes in self._pending; the last write submitted
        self._sums: dict[str, list] = {n: [] for n in spec}  # per array: (start, end, future hash)
        self.saved = False

    def put(self, name: str, array, start: int = 0) -> None:
        """Write `array` as array `name`'s rows `start`.. (all of it: a whole array, start 0)."""
        full = self.arrays[name]
        array = np.asarray(array)
        whole = full.ndim == 0 or array.shape == full.shape
        dst = full if whole else full[start : start + len(array)]
        if array.shape != dst.shape or array.dtype != dst.dtype:
            raise ValueError(f"{name}[{start}:]: {array.shape} {array.dtype}, "
                             f"the entry holds {full.shape} {full.dtype}")
        self._pwrite(name, array, 0 if whole else start)
        self.written(name, start, 1 if full.ndim == 0 else start + (len(full) if whole else len(array)))

    def put_rows(self, name: str, array, rows) -> None:
        """Write `array`'s rows as array `name`'s rows `rows` (ascending; a row repeated is the
        same row again, written once). `written` hashes them once their block is whole."""
        full, array, rows = self.arrays[name], np.asarray(array), np.asarray(rows, np.int64)
        if array.shape[1:] != full.shape[1:] or array.dtype != full.dtype or len(rows) != len(array) \
                or (len(rows) and (rows.min() < 0 or rows.max() >= len(full) or np.any(np.diff(rows) < 0))):
            raise ValueError(f"{name}: rows {rows.tolist()[:8]} of {array.shape} {array.dtype}, "
                             f"the entry holds {full.shape} {full.dtype}")
        first = np.flatnonzero(np.r_[True, np.diff(rows) != 0])  # each row's first occurrence
        for run in np.split(first, np.flatnonzero(np.diff(rows[first]) != 1) + 1):
            if len(run):
                contiguous = run[-1] - run[0] == len(run) - 1
                self._pwrite(name, array[run[0] : run[-1] + 1] if contiguous else array[run], int(rows[run[0]]))

    def _pwrite(self, name: str, rows: np.ndarray, start: int) -> None:
        full = self.arrays[name]
        data = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))  # bf16 has no buffer format
        offset = self._ranges[name][0] + start * (full.strides[0] if full.ndim else 0)  # C order: a row's bytes
        try:
            self._last = self._io.submit(_write_at, self._fd, data, offset)
        except RuntimeError:  # the interpreter is exiting (a cache written behind a run that ended): write here
            self._drain()
            _write_at(self._fd, data, offset)
            return
        self._pending.append((self._last, len(data)))
        self._ahead += len(data)
        while self._ahead > WRITE_AHEAD:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        done, n = self._pending.popleft()
        self._ahead -= n
        done.result()  # a failed write raises here

    def _drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def written(self, name: str, start: int, stop: int) -> None:
        """Rows `start`..`stop` of array `name` are written (or on their way): hash them once
        they are in the file."""
        full, last = self.arrays[name], self._last

        def digest():
            if last is not None:
                last.result()  # the writes run in order: every earlier one is in the file too
            return _chunk_hash(full, start, stop)

        try:
            future = self._pool.submit(digest)
        except RuntimeError:  # the interpreter is exiting: hash here
            self._drain()
            future = concurrent.futures.Future()
            future.set_result(_chunk_hash(full, start, stop))
        self._sums[name].append((start, stop, future))

    def _checksums(self) -> dict:
        out = {}
        for name, chunks in self._sums.items():
            rows = 1 if self.arrays[name].ndim == 0 else len(self.arrays[name])
            chunks = sorted(chunks, key=lambda c: c[0])
            edges = [0] + [c[1] for c in chunks]
            if [c[0] for c in chunks] != edges[:-1] or edges[-1] != rows:
                raise ValueError(f"{name} was not written whole")
            out[name] = [[a, b, f.result()] for a, b, f in chunks]
        return out

    def commit(self) -> dict[str, np.ndarray]:
        """Make the entry; its arrays as read-only mapped views. If the entry cannot be made
        (warned, `saved` False), the arrays are still returned, mapped from the removed
        temporary file: valid for this run, gone with it."""
        try:
            self._drain()
        except BaseException:  # a write failed: the file is not what was put, for this run either
            self.abort()
            raise
        try:
            meta = {**self.meta, "tree": _describe(_nest(self.arrays)), "checksums": self._checksums()}
            os.fdatasync(self._fd)
            meta_text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
            (self.tmp / "meta.json").write_text(meta_text)
            # The checksums were taken of these very bytes: the first read need not hash them
            # again (a rename keeps the file's inode and times, so the stamp holds after it).
            _write_json_atomic(self.tmp / VERIFIED, _verified_stamp(self.tmp / ARRAYS, meta_text))
            files.mark(self.tmp, ENTRY_FILES)
            if self.replace:
                files.install_dir(self.tmp, self.final)
            else:
                try:
                    os.rename(self.tmp, self.final)
                except OSError:  # another process finished the same entry first: theirs is as good
                    if files.own_files(self.final) is None or not (self.final / "meta.json").is_file():
                        raise
                    shutil.rmtree(self.tmp)
        except UserError:  # a folder at the entry's name that is not the tool's: refused, left as it is
            self.abort()
            raise
        except Exception as e:  # a full disk surfaces as OSError (a failed sync)
            views = self.arrays
            self._io.shutdown(wait=True)
            self._pool.shutdown(wait=True)
            self._close_file()
            shutil.rmtree(self.tmp, ignore_errors=True)
            _warn(f"cannot write the expert cache at {self.final.parent} ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]}); running without it (free space there, or set "
                  "DYNAEXQ_CACHE_DIR or DYNAEXQ_CACHE=0)")
            return views
        except BaseException:
            self.abort()
            raise
        self.saved = True
        views = _views(_map(self.final / ARRAYS), self.spec, _layout(self.spec)[1])
        self._close()
        return views

    def _close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True)
        self.arrays = {}
        self._close_file()
        try:
            self._buf.close()
        except BufferError:  # a view of the mapping is still held: it closes when dropped
            pass

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- entries


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


def _why(e: Exception) -> str:
    """What is wrong with an entry that failed to read with `e` (it fails in many ways: missing
    files, bad JSON, short files, changed bytes)."""
    return "its arrays do not match their checksums" if "checksums" in str(e) else \
        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def read_entry(entry: Path) -> dict:
    """An entry's arrays (a nested dict of mapped views), or a ValueError saying why they cannot
    be read. Nothing is removed: for a folder a user named (a FloE calibration)."""
    try:
        return _nest(read_arrays(entry))
    except Exception as e:
        raise ValueError(_why(e)) from None


def _load_verified(entry: Path):
    """A cache entry's arrays (a nested dict of mapped views) if they match their checksums;
    else None, with a warning, and what the tool wrote of the entry removed."""
    try:
        return read_entry(entry)
    except ValueError as e:
        why = str(e)
    _warn(f"the cache entry {entry} is damaged ({why}); rebuilding it")
    files.remove_own_dir(entry)
    return None


def _writer(home: Path, name: str, spec: dict, meta: dict, replace: bool = False) -> ArrayWriter | None:
    """A writer for entry `home/name`, or None (with a warning) if the cache cannot take it."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=f".tmp-{name}-{_HOST}-{os.getpid()}-"))
    except OSError as e:
        _warn(f"cannot write the expert cache at {home} ({e}); running without it "
              "(set DYNAEXQ_CACHE_DIR to a writable folder, or DYNAEXQ_CACHE=0)")
        return None
    try:
        return ArrayWriter(tmp, home / name, spec, meta, replace)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _warn(f"cannot write the expert cache at {home} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
              "running without it (free space there, or set DYNAEXQ_CACHE_DIR or DYNAEXQ_CACHE=0)")
        return None


def _spec(flat: dict) -> dict:
    return {n: (a.shape, a.dtype) for n, a in flat.items()}


def _write_all(writer: ArrayWriter, flat: dict) -> dict:
    """Every array of `flat` through `writer`, committed: the mapped views."""
    try:
        for n, a in flat.items():
            writer.put(n, a)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def _save_atomic(home: Path, name: str, tree, meta: dict, replace: bool = False) -> bool:
    """Write nested dict `tree` as entry `home/name` with `meta` (`replace`: see `ArrayWriter`);
    False (warned) if impossible."""
    flat = _leaves(tree)
    writer = _writer(home, name, _spec(flat), meta, replace)
    if writer is None:
        return False
    _write_all(writer, flat)
    if writer.saved:
        _flush_memo(home)
    return writer.saved


@dataclasses.dataclass
class Entry:
    """One converted piece of one source: read it, or write it once."""

    home: Path
    name: str
    slug: str
    meta: dict

    @property
    def path(self) -> Path:
        return self.home / self.name

    def read(self) -> dict | None:
        """The entry's arrays (nested dict of read-only mapped views), or None: absent, or
        damaged (then removed, with a warning)."""
        if self.home.is_dir():
            _remove_dead_temporaries(self.home)
        return _load_verified(self.path) if self.path.is_dir() else None

    def writer(self, spec: dict) -> ArrayWriter | None:
        """A writer of arrays `spec` {"a/b": (shape, dtype)}; its commit also removes this
        source's stale entries of the same settings. None (warned) if the cache cannot be written."""
        w = _writer(self.home, self.name, spec, self.meta)
        if w is not None:
            commit = w.commit

            def commit_and_tidy():
                views = commit()
                if w.saved:
                    _flush_memo(self.home)
                    for stale in self.home.glob(f"{self.slug}-*"):  # same settings, older source
                        if stale.name != self.name:
                            files.remove_own_dir(stale)
                return views

            w.commit = commit_and_tidy
        return w


def entry(source, kind: str, settings: dict) -> Entry | None:
    """The cache entry of `source` (a checkpoint folder or a `Generated` source) for `kind` and
    `settings` (JSON-serialisable: everything besides the source that changes the result), or
    None when `source` has no cache (no folder, or the cache is off)."""
    where = _where(source)
    if where is None:
        return None
    home, fingerprint = where
    slug = _settings_slug(kind, settings)
    meta = {"kind": kind, "settings": settings, "source": str(source), "version": FORMAT_VERSION}
    return Entry(home, f"{slug}-{fingerprint}", slug, meta)


def cached(source, kind: str, settings: dict, build: Callable[[], dict]):
    """`build()` (a nested dict of numpy arrays) through the cache: read back (mapped) when an
    entry exists, else built, written and returned."""
    e = entry(source, kind, settings)
    if e is None:
        return build()
    tree = e.read()
    if tree is not None:
        return tree
    tree = build()
    flat = _leaves(tree)
    writer = e.writer(_spec(flat))
    return tree if writer is None else _nest(_write_all(writer, flat))


def profile_path(source) -> Path | None:
    """Where the hotness profile of checkpoint folder `source` is saved between runs (beside its
    converted experts), or None when there is no folder or the cache is off (`DYNAEXQ_CACHE=0`).
    A generated source has none: its routing depends on more than its experts' recipe."""
    where = None if isinstance(source, Generated) else _where(source)
    if where is None:
        return None
    home, fingerprint = where
    return home / f"hotness-{fingerprint}.json"
