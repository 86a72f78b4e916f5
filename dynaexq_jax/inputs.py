"""The one reader of the text files a user hands the tool: config.json and the tokenizer's
files, chat templates, hotness profiles, task and calibration text. Each is read whole and
decoded as UTF-8; a file that is missing, a folder, unreadable or not UTF-8 is one `UserError`
line naming the file, the first bad byte and its offset, and the fix.

It sits at the bottom with `errors`: every layer reads through it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynaexq_jax.errors import UserError


def read_text(path, fix: str, what: str = "", error: type[UserError] = UserError) -> str:
    """All of the text file at `path`, decoded as UTF-8; anything else (no such file, a folder,
    unreadable, bytes that are not UTF-8) is one `error` line naming the file (as `what`), the
    byte offset of the first bad byte, and `fix`."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not path.exists():
        raise error(f"{name} does not exist; {fix}")
    if path.is_dir():
        raise error(f"{name} is a folder, not a text file; {fix}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {name} ({e.strerror}); {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{name} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); {fix}") from None


def read_json(path, fix: str, what: str = "", error: type[UserError] = UserError):
    """The JSON document in the text file at `path` (`read_text`), or one `error` line."""
    text = read_text(path, fix, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        name = f"{what} {path}" if what else str(path)
        raise error(f"{name} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
