"""Memory budgets: parsing and printing sizes.

Sizes are written the way Hugging Face accelerate's `convert_file_size_to_int` reads them
(`max_memory={"cuda:0": "20GB"}`), so a budget string means the same here as there:
GB/MB/KB are powers of 1000, GiB/MiB/KiB powers of 1024, decimals allowed, units
case-insensitive. Two deliberate differences, both to keep a hard budget from being misread:

- accelerate reads a decimal unit whose final letter is a lowercase "b" ("20gb", "20Gb") as
  bits, i.e. an eighth of the bytes. Most people typing "20gb" mean bytes, and either silent
  reading is wrong for someone, so such strings are rejected with the spelling to use
  ("20GB", or "20gB"). Binary units carry no such rule there and are accepted in any case.
- Only plain decimal numbers are accepted ("1e3GB", "inf", "nan" are refused), and plain
  whole bytes ("123456") are accepted, which accelerate only takes as an int.

Fractional results are rounded down to whole bytes, as accelerate does.
"""

from __future__ import annotations

import numbers
import re
from fractions import Fraction

from dynaexq_jax.errors import UserError


class BudgetError(UserError):
    """A memory budget that cannot be parsed or cannot be met."""


_UNITS = {
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Surrounding whitespace is ignored (values read from files); only spaces may separate number and unit.
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+) *([kmgt]i?b)?\s*", re.IGNORECASE)
_EXAMPLE = "expected a size like 20GB, 20GiB, 5.5GB, 512MiB or plain bytes"


def _bad(text, why: str) -> BudgetError:
    # repr() keeps the message on one line whatever the input holds.
    return BudgetError(f"bad memory size {text!r} ({why}); {_EXAMPLE}")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "20GB", "20 GiB", "5.5GB", "512MiB", "123456", or a positive int."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        if text <= 0:
            raise _bad(text, "must be positive")
        return int(text)
    if not isinstance(text, str):
        raise _bad(text, f"not a string or int but {type(text).__name__}")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise _bad(text, "not a number followed by an optional unit")
    number, unit = m.groups()
    if unit is None:
        if "." in number:
            raise _bad(text, "plain bytes must be a whole number")
        nbytes = int(number)
    else:
        if unit[-1] == "b" and "i" not in unit.lower():
            raise _bad(text, f"a lowercase 'b' means bits to accelerate; write {unit[:-1].upper()}B for bytes")
        nbytes = int(Fraction(number) * _UNITS[unit.lower()])  # exact, then floor
    if nbytes <= 0:
        raise _bad(text, "must be at least one byte")
    return nbytes


def format_size(nbytes: float) -> str:
    """Human-readable size in powers of 1000, e.g. "19.87 GB", the units `parse_size` reads back."""
    sign = "-" if nbytes < 0 else ""
    value = abs(nbytes)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if value >= scale:
            return f"{sign}{value / scale:.2f} {unit}"
    return f"{sign}{value:.0f} B"
