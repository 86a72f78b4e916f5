"""Command-line flags declared once, on the fields of options dataclasses.

A field made by `flag(...)` carries its flag's help, how argparse reads it and its check; the
flag's name is the field's (`max_new_tokens` -> `--max-new-tokens`) and its default the
field's. An `Options` dataclass then puts its fields on a parser (`add_flags`, all or some of
them), reads them back from the parsed namespace (`from_args`) and checks every field, one
`FlagError` line naming the flag and the fix (`check`, which a class extends with the checks
between its fields). A check for a new flag, or a tighter one for an old flag, goes on its
field here: every command that takes the flag then refuses the same values with the same line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from typing import Any, Callable, ClassVar

from dynaexq_jax.errors import UserError


class FlagError(UserError):
    """Flags that do not go together, or a value a flag cannot take."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """How argparse reads one field, and what the field's values must satisfy."""

    help: str | None = None
    type: Callable | None = None
    choices: tuple | None = None
    action: Any = None  # "store_true", "append", argparse.BooleanOptionalAction
    group: str | None = ""  # the help section ("": the class's `GROUP`; None: the parser's main list)
    check: Callable[[str, Any], None] | None = None  # (flag, value) -> None, or raises FlagError


def flag(default=None, help: str | None = None, **how) -> Any:
    """A dataclass field that is a command-line flag (`Flag`'s keywords in `how`)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help=help, **how)})


def name(field: str) -> str:
    return "--" + field.replace("_", "-")


# ----------------------------------------------------------------------------- checks of one value


def at_least(low: int, unit: str = "") -> Callable[[str, Any], None]:
    """A number >= `low` (`unit` follows the bound in the message)."""
    def check(flag: str, value) -> None:
        if value < low:
            raise FlagError(f"{flag} must be >= {low}{' ' + unit if unit else ''}, got {value}")
    return check


def above_zero(what: str) -> Callable[[str, Any], None]:
    """A finite number > 0 (`what` names its unit in the message)."""
    def check(flag: str, value) -> None:
        if not (math.isfinite(value) and value > 0):
            raise FlagError(f"{flag} must be {what} > 0, got {value}")
    return check


def at_least_each(args: argparse.Namespace, **lows) -> None:
    """Each flag named (by its field: batch_size=1 is --batch-size) is at least its bound, when given."""
    for field, low in lows.items():
        value = getattr(args, field)
        if value is not None:
            at_least(low)(name(field), value)


def in_range(low: int, high: int, what: str = "") -> Callable[[str, Any], None]:
    """An integer from `low` to `high` (`what`: why those ends)."""
    def check(flag: str, value) -> None:
        if not low <= value <= high:
            raise FlagError(f"{flag} must be from {low} to {high}{' (' + what + ')' if what else ''}, got {value}")
    return check


def host_port(flag: str, value: str) -> None:
    """HOST:PORT with a host and a port from 1 to 65535."""
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise FlagError(f"{flag} {value!r}: expected HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:1234")


def comma_list(flag: str, text: str, choices=None, convert=str, low=None) -> list:
    """The items of a comma-separated flag value, each converted and one of `choices` (or at
    least `low`); an empty list, an item that does not convert, or one out of place is one
    FlagError."""
    try:
        items = [convert(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        items = None
    bad = [t for t in items or () if (choices is not None and t not in choices) or (low is not None and t < low)]
    if not items or bad:
        allowed = (f"choose from {', '.join(map(str, choices))}" if choices is not None else
                   f"give numbers of at least {low} separated by commas" if low is not None else
                   "give a comma-separated list")
        raise FlagError(f"{flag} {text!r}: {allowed}" + (f" ({', '.join(map(str, bad))} is not one)" if bad else ""))
    return items


def utf8(flag: str, value) -> None:
    """Text that is valid Unicode: Python passes non-UTF-8 bytes of argv on as lone surrogates."""
    for text in value if isinstance(value, list) else [value]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise FlagError(f"{flag} holds bytes that are not UTF-8 text; pass it in UTF-8") from None


# ----------------------------------------------------------------------------- values argparse reads


def none_or_int(text: str):
    """"none" -> None, else an integer (argparse then checks it against the choices)."""
    return None if text == "none" else int(text)


def int_or_word(text: str):
    """A width ("4") as an int, a word ("auto", "mxfp4") as it is (argparse checks the choices)."""
    return int(text) if text.isdigit() else text


# ----------------------------------------------------------------------------- options dataclasses


class Options:
    """What an options dataclass of flags offers (mixed into each `@dataclass`)."""

    GROUP: ClassVar[str | None] = None  # the help section of its flags (None: the parser's main list)

    @classmethod
    def flag_fields(cls, only=None) -> list[dataclasses.Field]:
        fields = [f for f in dataclasses.fields(cls) if "flag" in f.metadata]
        if only is not None:
            unknown = set(only) - {f.name for f in fields}
            if unknown:
                raise ValueError(f"{cls.__name__} has no flags {sorted(unknown)}")
            fields = [f for f in fields if f.name in only]
        return fields

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, only=None) -> None:
        """Put the flags of these fields (`only`: of these field names) on `parser`."""
        groups: dict[str | None, Any] = {None: parser}
        for f in cls.flag_fields(only):
            spec: Flag = f.metadata["flag"]
            title = cls.GROUP if spec.group == "" else spec.group
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            kw = {k: v for k, v in (("help", spec.help), ("type", spec.type), ("action", spec.action)) if v is not None}
            if spec.choices is not None:
                kw["choices"] = list(spec.choices)
            groups[title].add_argument(name(f.name), dest=f.name, default=f.default, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The options of a parsed command line; fields it has no flag for keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    def check(self) -> None:
        """Every field's own check (values other than None); a class adds the checks between fields."""
        for f in self.flag_fields():
            spec: Flag = f.metadata["flag"]
            value = getattr(self, f.name)
            if spec.check is not None and value is not None:
                spec.check(name(f.name), value)


class Parser(argparse.ArgumentParser):
    """argparse's parser with its own refusals (an unknown flag, a value that is not a number
    or not among the choices) as one `error:` line and exit status 2, like every other refusal,
    instead of the usage block over the message."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())}\n")


@contextlib.contextmanager
def one_line_errors():
    """argparse parsers made meanwhile (a library's own command line, lm-eval's) refuse in one line too."""
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = Parser.error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def command_parser(description: str | None) -> Parser:
    """A command's parser: its module docstring, as written, over the flags."""
    return Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
