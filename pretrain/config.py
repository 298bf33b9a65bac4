"""Typed configuration: one dataclass per command, every field a CLI flag.

No config files and no inheritance chains: a run is fully described by the dataclass, which is
written to `runs/<name>/config.json` and can be rebuilt from it.
"""
from __future__ import annotations

import argparse
import dataclasses
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
        help_text = f.metadata.get("help", "")
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default,
                                help=f"{help_text} (default: {default})")
        elif origin in (tuple, list):
            inner = typing.get_args(kind)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=default,
                                help=f"{help_text} (default: {default})")
        elif origin is typing.Union:  # Optional[X]
            inner = next(a for a in typing.get_args(kind) if a is not type(None))
            parser.add_argument(flag, type=inner, default=default, help=f"{help_text} (default: {default})")
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=kind, default=default, choices=choices,
                                help=f"{help_text} (default: {default})")
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


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Parse `argv` into a `cls` instance; `--help` lists every field."""
    # Each flag's help already ends with its default (add_dataclass_args), so no ArgumentDefaultsHelpFormatter.
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, cls)
    return dataclass_from_args(cls, parser.parse_args(argv))


def field(default: Any, help: str = "", choices: tuple | None = None) -> Any:  # noqa: A002
    """A dataclass field with CLI help text (and optional choices)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
