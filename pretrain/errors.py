"""Errors a user can act on, and the command-line entry point that shows them as a few plain lines.

A `UserError` says what is wrong, which file or option, and what to do. `run_cli` prints it on stderr as
`<command>: error: <message>` and exits with status 2, without a traceback; an exception of any other type
is a bug and keeps its full traceback. `--debug` (a flag of every command) or CTXENC_DEBUG=1 shows the
traceback of user errors too.

Exception classes that predate UserError and are caught by their builtin type elsewhere inherit from both,
e.g. `DatasetNotFoundError(UserError, FileNotFoundError)`. Beyond UserError, only a full disk and a denied
or read-only file (OSError with ENOSPC, EDQUOT, EACCES, EPERM, EROFS) count as the user's to fix.
"""
from __future__ import annotations

import builtins
import errno
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from pretrain.config import build_parser, dataclass_from_args

C = TypeVar("C")
R = TypeVar("R")

USER_ERROR_EXIT_STATUS = 2  # the status argparse gives a bad flag
DEBUG_ENV = "CTXENC_DEBUG"
# operating-system failures the user fixes (free space, permissions), not the code
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# torch's DataLoader re-raises a worker's exception as "Caught <Type> in DataLoader worker process <n>.\n
# Original Traceback (most recent call last): ...": the original type and message end that traceback.
_WORKER_WRAPPER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class UserError(Exception):
    """An error the user can act on: the message says what is wrong, which file or option, and what to do.

    Keep it to one or two lines: `run_cli` prints it without a traceback."""


class BadOptionError(UserError, ValueError):
    """An option value (or a combination of options) that cannot work: names the flag and a value that does."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder an option names does not exist: names it and says how to make or choose one."""


def list_problems(problems: Sequence[str], limit: int = 5) -> str:
    """`a; b; c` for up to `limit` problems, then `... and N more`: an error names each bad file without
    burying the message under thousands of them."""
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def _resolve_type(name: str) -> type | None:
    """The exception class that `traceback` printed as `name` (`ValueError`, `pretrain.data.images.X`)."""
    module_name, _, qualname = name.rpartition(".")
    try:
        obj: object = importlib.import_module(module_name) if module_name else builtins
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def unwrap_worker_error(err: BaseException) -> tuple[type | None, str] | None:
    """For an exception torch re-raised from a DataLoader worker: (the original type, or None when it cannot
    be imported here; the original message). None for any other exception.

    torch sends only the type and the formatted traceback across processes, and re-raises `Type(text)` (or a
    RuntimeError when Type cannot be built from one string): the original message is the traceback's end.
    """
    text = err.args[0] if err.args and isinstance(err.args[0], str) else ""
    if not _WORKER_WRAPPER.match(text):
        return None
    last = text.split("Traceback (most recent call last):")[-1].splitlines()  # the final exception's block
    start = next((i for i, line in enumerate(last) if line and not line[0].isspace()), len(last))  # past frames
    exception_text = "\n".join(last[start:]).strip()
    name, _, message = exception_text.partition(": ")
    return _resolve_type(name), message.strip()


def user_message(err: BaseException) -> str | None:
    """The message to show for an error the user can act on, or None when `err` is a bug (show its traceback)."""
    if isinstance(err, UserError):
        unwrapped = unwrap_worker_error(err)  # a UserError subclass built from torch's wrapper text
        return unwrapped[1] if unwrapped else str(err)
    unwrapped = unwrap_worker_error(err)
    if unwrapped is not None:
        original, message = unwrapped
        return message if original is not None and issubclass(original, UserError) else None
    if isinstance(err, OSError) and err.errno in _USER_OS_ERRORS:
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk is full{where}: {err.strerror}. Free space on it or write the outputs elsewhere."
        return f"{err.strerror}{where}. Check the file's and its folder's permissions, or use another folder."
    return None


def run_cli(main: Callable[[C], R], config_cls: type[C], argv: Sequence[str] | None = None,
            description: str = "") -> R:
    """Parse `argv` (default: sys.argv[1:]) into `config_cls` (one flag per field, plus --debug), run
    `main(config)` and return its result.

    A UserError (also one raised inside a DataLoader worker), a full disk or a denied file is
    printed as `<command>: error: <message>` on stderr and ends the process with status 2; Ctrl-C ends it
    with status 130 and one line. With --debug or CTXENC_DEBUG=1 every error keeps its traceback.
    """
    parser = build_parser(config_cls, description)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    args = parser.parse_args(None if argv is None else list(argv))
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    config = dataclass_from_args(config_cls, args)
    try:
        return main(config)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        message = None if debug else user_message(err)
        if message is None:
            raise
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_STATUS) from None
