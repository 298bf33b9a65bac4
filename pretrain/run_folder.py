"""One owner per run folder: a lock held for the run's life, and the checks before a run writes into a folder.

Two processes writing one folder would interleave metrics.csv rows and rotate away each other's checkpoints;
a new run in an old run's folder would erase its metrics; a resume with other options would continue a
trajectory that is no longer the one its config.json describes. Each of these stops with a message instead.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pretrain.checkpoint import CHECKPOINT_GLOB
from pretrain.errors import UserError

LOCK_FILE = "run.lock"  # kept between runs: deleting a flock'ed file lets two processes lock two inodes
RUN_OUTPUTS = ("config.json", "metrics.csv", "eval.json")  # with checkpoint-*.pth: what makes a folder a run's


class RunFolderBusyError(UserError):
    """Another process holds the run folder's lock."""


def _holder_pid(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[Path]:
    """Create `run_dir` if needed and hold its lock (an exclusive flock on `run_dir/run.lock`, which holds this
    process's PID) until the block ends; yields `run_dir`. RunFolderBusyError naming the holder's PID at once
    when another process holds it. The lock goes with the process: a killed run leaves nothing to clean up."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusyError(
                f"{run_dir} is in use by another run (PID {_holder_pid(lock_path)}, holding {lock_path}). "
                f"Wait for it to end, stop it, or choose another --name.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield run_dir
        finally:
            os.ftruncate(fd, 0)  # a PID in the file then always belongs to a live holder
    finally:
        os.close(fd)  # releases the lock


def holds_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a run's outputs (config.json, metrics.csv, eval.json or a checkpoint)."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in RUN_OUTPUTS) or any(run_dir.glob(CHECKPOINT_GLOB))


def move_aside(run_dir: Path) -> Path:
    """Rename `run_dir` to an unused sibling `<name>.replaced-<YYYYmmdd-HHMMSS>[-<k>]` and return that path."""
    run_dir = Path(run_dir)
    stem = f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    target, k = run_dir.with_name(stem), 1
    while target.exists():
        k += 1
        target = run_dir.with_name(f"{stem}-{k}")
    run_dir.rename(target)
    return target


@contextmanager
def claim_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> Iterator[Path | None]:
    """Hold `run_dir` for a run (see hold_run_folder); yields where an old run was moved by `overwrite`, or None.

    A folder that holds an earlier run's outputs is only continued with `resume`, or moved aside first with
    `overwrite` (under its lock, so no running process is moved); otherwise a UserError says to choose."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run in the folder, or "
                        "move it aside and start over, not both.")
    run_dir = Path(run_dir)
    with ExitStack() as stack:
        stack.enter_context(hold_run_folder(run_dir))
        moved_to = None
        if holds_run(run_dir) and not resume:
            if not overwrite:
                raise UserError(
                    f"{run_dir} already holds a run (its config.json, metrics.csv or checkpoints). Choose --resume "
                    f"to continue it, another --name, or --overwrite to move it aside and start over.")
            moved_to = move_aside(run_dir)
            # The new folder gets its own lock before the old one is released: no one slips in between.
            with hold_run_folder(run_dir):
                stack.close()
                yield moved_to
            return
        yield moved_to


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any], allowed: Collection[str],
                   defaults: Mapping[str, Any] | None = None) -> list[str]:
    """`name: old -> new` for each option of `current` that differs from `stored`, leaving out `allowed` ones.

    An option absent from `stored` (added to the code after that run was made) is compared with its value in
    `defaults`, which is how that run behaved; without one it counts as unchanged. Options only in `stored`
    (removed since) are ignored."""
    changes = []
    for name, value in current.items():
        if name in allowed or (name not in stored and (defaults is None or name not in defaults)):
            continue
        old = stored[name] if name in stored else defaults[name]  # type: ignore[index]
        if _as_json(old) != _as_json(value):
            changes.append(f"{name}: {old!r} -> {value!r}")
    return changes


def _as_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # config.json stores tuples as lists
