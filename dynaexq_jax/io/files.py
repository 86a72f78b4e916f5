"""Files a command writes for its user: whole or not at all, and never over anything the tool
did not write (what it reads goes through `dynaexq_jax.inputs`).

What the tool writes carries its mark, so a later run can tell its own outputs (which it may
replace) from the user's (which it never touches):
- a folder it makes holds `MARKER`, a JSON file listing the names the tool wrote in it;
- a JSON output is an object whose `written_by` is `WRITTEN_BY`;
- a Markdown output starts with `MARKDOWN_MARK`; a PNG carries a `Software` text chunk of `WRITTEN_BY`.
An output path is taken when it is new, empty, or the tool's own (`check_output_file`,
`check_output_dir`); anything else is refused before any work, and nothing of it is changed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from dynaexq_jax.errors import UserError

WRITTEN_BY = "dynaexq-jax"
MARKER = ".dynaexq"  # in a folder the tool made: {"written_by": WRITTEN_BY, "files": [names it wrote there]}
MARKDOWN_MARK = f"<!-- written by {WRITTEN_BY} -->"
_PNG = b"\x89PNG\r\n\x1a\n"
_OWN_JSON_LIMIT = 1 << 26  # bytes: a larger file is no output of ours


# ----------------------------------------------------------------------------- writing files


def write_atomic(path: Path, data: str | bytes) -> None:
    """All of `data` or nothing at `path`: a reader (or a crash) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, doc: dict, indent: int | None = 1) -> None:
    """`doc` as a JSON output the tool can later tell as its own (`written_by` first), atomically."""
    write_atomic(path, json.dumps({"written_by": WRITTEN_BY, **doc}, indent=indent) + "\n")


def write_markdown(path: Path, text: str) -> None:
    """`text` as a Markdown output the tool can later tell as its own, atomically."""
    write_atomic(path, f"{MARKDOWN_MARK}\n{text}")


def png_metadata() -> dict:
    """matplotlib's `savefig(metadata=...)` for a PNG the tool can later tell as its own."""
    return {"Software": WRITTEN_BY}


def _png_software(path: Path) -> str | None:
    """The `Software` tEXt chunk of a PNG (before its image data), or None."""
    with open(path, "rb") as f:
        f.seek(len(_PNG))
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            size, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                return None
            body = f.read(size)
            f.seek(4, os.SEEK_CUR)  # the chunk's CRC
            if kind == b"tEXt" and body.startswith(b"Software\0"):
                return body[len(b"Software\0"):].decode("latin-1")


def is_own_file(path) -> bool:
    """Whether the file at `path` is an output the tool wrote (its mark, per format)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _OWN_JSON_LIMIT:
            return False
        data = path.read_bytes()
        if data.startswith(_PNG):
            return _png_software(path) == WRITTEN_BY
        if data.startswith(MARKDOWN_MARK.encode()):
            return True
        doc = json.loads(data)
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(doc, dict) and doc.get("written_by") == WRITTEN_BY


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` exists and takes new files."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; name a path in a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); name a writable folder") from None


def check_output_file(path, flag: str) -> None:
    """Refuse now, before the work whose result `path` (given with `flag`) is to hold, a path the
    result cannot be written to, or that holds a file the tool did not write."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file (in it, or elsewhere)")
    if not target.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {target.parent} does not exist; create it first")
    if target.exists() and target.stat().st_size and not is_own_file(target):
        raise UserError(f"{flag} {path} exists and was not written by this tool; name a new file, or remove it "
                        "first (it was left as it is)")
    _writable_parent(target, flag)


def check_append_file(path, flag: str) -> None:
    """Refuse now a file a command cannot append its report to (appending keeps what is there)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file to append to")
    if not target.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {target.parent} does not exist; create it first")
    _writable_parent(target, flag)


# ----------------------------------------------------------------------------- folders


def own_files(folder) -> list[str] | None:
    """The names the tool wrote in `folder` (its marker's list), or None when the folder is not
    the tool's (no marker, or one that is not the tool's)."""
    try:
        doc = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    names = doc.get("files") if isinstance(doc, dict) and doc.get("written_by") == WRITTEN_BY else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else None


def mark(folder, names) -> None:
    """Record `names` (with any recorded before) as written by the tool in `folder`."""
    folder = Path(folder)
    listed = sorted(set(own_files(folder) or ()) | set(names))
    write_atomic(folder / MARKER, json.dumps({"written_by": WRITTEN_BY, "files": listed}) + "\n")


def check_output_dir(path, flag: str) -> None:
    """Refuse now, before the work, a folder the tool may not write into: one that exists and is
    neither empty nor the tool's own, a file, or a place no folder can be made."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path} is a file; name a folder")
    if target.is_dir():
        if any(target.iterdir()) and own_files(target) is None:
            raise UserError(f"{flag} {path} holds files this tool did not write; name a new or empty folder "
                            "(nothing in it was changed)")
        try:
            with tempfile.TemporaryFile(dir=target):
                pass
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot write in it ({e.strerror}); name a writable folder") from None
        return
    _writable_parent(target, flag)


class OutputDir:
    """A folder a command writes its files into, checked before the work (`check_output_dir`):
    made when the first file is written, each file written whole and recorded in its marker."""

    def __init__(self, path, flag: str):
        self.path, self.flag = Path(path), flag
        check_output_dir(self.path, flag)

    def __truediv__(self, name: str) -> Path:
        """The path of `name` in the folder, recorded as the tool's (for files written by others)."""
        self.path.mkdir(parents=True, exist_ok=True)
        mark(self.path, [name])
        return self.path / name

    def write(self, name: str, data: str | bytes) -> Path:
        target = self / name
        write_atomic(target, data)
        return target


def remove_own_dir(folder) -> None:
    """Remove what the tool wrote in `folder`, and the folder if nothing else is left in it."""
    folder = Path(folder)
    names = own_files(folder)
    if names is None:
        return
    for name in [*names, MARKER]:
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    try:
        folder.rmdir()
    except OSError:  # the user's files are in it: they stay
        pass


def install_dir(new: Path, path: Path) -> None:
    """Put folder `new` (complete, marked) at `path`, which is absent, empty or the tool's own.

    A folder of the tool's own is swapped out whole, then whatever in it the tool did not write
    (the user's files, another command's output) is moved into the new folder: only the names
    its marker lists go. Refused (`UserError`), and left as it is, when it is any other folder or
    holds files the tool did not write under names the new folder has."""
    new, path = Path(new), Path(path)
    if not (path.exists() or path.is_symlink()):
        os.rename(new, path)
        return
    if path.is_dir() and not any(path.iterdir()):
        os.rename(new, path)  # over an empty folder
        return
    listed = own_files(path) if path.is_dir() else None
    if listed is None:
        raise UserError(f"{path} exists and holds files this tool did not write; name a new or empty folder "
                        "(nothing in it was changed)")
    keep = set(listed) | {MARKER}
    clash = sorted(e.name for e in path.iterdir() if e.name not in keep and (new / e.name).exists())
    if clash:
        raise UserError(f"{path} holds {', '.join(clash)}, which this tool did not write and would replace; move "
                        "them, or name a new folder (nothing in it was changed)")
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / "dir")
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old / "dir", path)  # put the previous folder back
        shutil.rmtree(old, ignore_errors=True)
        raise
    for entry in (old / "dir").iterdir():
        if entry.name not in keep:
            os.rename(entry, path / entry.name)
    shutil.rmtree(old, ignore_errors=True)
