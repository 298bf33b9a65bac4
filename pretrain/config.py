"""Typed configuration: one dataclass per command, every field a CLI flag.

No config files and no inheritance chains: a run is fully described by the dataclass, which is
written to `runs/<name>/config.json` and can be rebuilt from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one `--field` flag per dataclass field, typed and defaulted from the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats every help string: a literal % (in the text or the default) must be doubled
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default, help=help_text)
        elif origin in (tuple, list):
            inner = typing.get_args(kind)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=default, help=help_text)
        elif origin is typing.Union:  # Optional[X]
            inner = next(a for a in typing.get_args(kind) if a is not type(None))
            parser.add_argument(flag, type=inner, default=default, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=help_text)
    return parser


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the dataclass back from parsed flags (tuples stay tuples)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is tuple and value is not None:
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


class _ShortErrorParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: the full usage of forty flags would bury the message."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists every option)\n")


def _command_name() -> str | None:
    """`python -m <module>` when the running program was started that way (argparse would say `__main__.py`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.name:
        return None
    return f"python -m {spec.name.removesuffix('.__main__')}"


def build_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """The command-line parser of a dataclass config: one flag per field; errors in one line."""
    # Each flag's help already ends with its default (add_dataclass_args), so no ArgumentDefaultsHelpFormatter.
    parser = _ShortErrorParser(prog=_command_name(), description=description,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_dataclass_args(parser, cls)


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse `argv` into a `cls` instance; `--help` lists every field."""
    return dataclass_from_args(cls, build_parser(cls, description).parse_args(argv))


def field(default: Any, help: str = "", choices: tuple | None = None) -> Any:  # noqa: A002
    """A dataclass field with CLI help text (and optional choices)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
