"""Save, keep, load and resume: atomic checkpoints with every RNG, and a fallback when the newest is damaged."""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import UserError, list_problems

CHECKPOINT_GLOB = "checkpoint-*.pth"
TEMPORARY_INFIX = ".tmp-"  # .checkpoint-<step>.pth.tmp-<pid>: a write in progress, or one killed midway
TEMPORARY_GLOB = f".checkpoint-*.pth{TEMPORARY_INFIX}*"


class UnreadableCheckpointError(UserError, ValueError):
    """A checkpoint file that is damaged (truncated, corrupt) or not a ctxenc checkpoint at all."""


class CheckpointMismatchError(UserError, ValueError):
    """A readable checkpoint whose weights do not fit the model built from the current options."""


class CheckpointWriteError(UserError):
    """A checkpoint that could not be written (a full or unwritable disk); earlier checkpoints are intact."""


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file.

    A failed write (a full disk: OSError ENOSPC, or torch's "enforce fail ... unexpected pos" when the file
    stops short) removes the temporary file and raises CheckpointWriteError; the file at `path`, if any, is
    untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMPORARY_INFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a Ctrl-C mid-write must not leave the temporary file either
        tmp.unlink(missing_ok=True)
        reason = _write_failure(err)
        if reason is None:
            raise
        free_mb = shutil.disk_usage(path.parent).free / 2 ** 20
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {reason} ({free_mb:.0f} MB free there). The partial file was removed "
            f"and the earlier checkpoints are intact: free space, then continue with --resume.") from err


def _write_failure(err: BaseException) -> str | None:
    """Why a write failed, in plain words, when the cause is the disk rather than the code; else None."""
    if isinstance(err, OSError):
        return "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    if isinstance(err, RuntimeError) and any(s in str(err) for s in ("unexpected pos", "file write failed")):
        return "the write stopped short, as it does when the disk is full"  # torch's writer checks each write's offset
    return None


def remove_temporary_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed midway; returns what was removed.

    Call it only while holding the run folder's lock (run_folder.hold_run_folder): then no write is under way."""
    removed = sorted(Path(run_dir).glob(TEMPORARY_GLOB))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int = 3) -> Path:
    """Write `checkpoint-<step>.pth` atomically and delete all but the newest `keep`."""
    path = Path(run_dir) / f"checkpoint-{step:08d}.pth"
    atomic_torch_save(state, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints oldest first (the step is zero-padded, so names sort by step)."""
    return sorted(Path(run_dir).glob(CHECKPOINT_GLOB))


def _load_failure(err: BaseException) -> str:
    """What is wrong with a checkpoint file that torch.load refused, in plain words."""
    text = str(err)
    # torch reads a non-zip file with its legacy pickle reader, which fails with whatever the bytes trigger
    if isinstance(err, (pickle.UnpicklingError, ValueError)) or any(
            s in text for s in ("Invalid magic number", "not a ZIP archive")):
        return "not a checkpoint file"
    if isinstance(err, EOFError) or "zip archive" in text:
        return "truncated or corrupt"
    return f"{type(err).__name__}: {text.splitlines()[0][:120] if text else ''}"


def _numpy_globals() -> list[Any]:
    """The numpy objects a checkpoint's RNG state pickles as (array reconstruction, ndarray, dtypes).

    Checkpoints are read with `weights_only=True`, so a file from elsewhere cannot run code when loaded;
    these are the only non-tensor objects a ctxenc checkpoint holds.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    return [_reconstruct, scalar, np.ndarray, np.dtype, *(getattr(np.dtypes, name) for name in np.dtypes.__all__)]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load a ctxenc checkpoint (weights_only: a file from elsewhere cannot run code when loaded); ValueError
    with a plain reason when it is not one or is damaged."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: say what it looks like
        raise ValueError(_load_failure(err)) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError("not a ctxenc checkpoint: no 'model' entry")
    return ckpt


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """One checkpoint written by `python -m pretrain`; UnreadableCheckpointError naming the file when it is
    damaged or not such a checkpoint."""
    try:
        return _read_checkpoint(Path(path))
    except ValueError as err:
        raise UnreadableCheckpointError(
            f"{path} is not a readable ctxenc checkpoint ({err}). Fix: pass a checkpoint-*.pth written by "
            f"python -m pretrain, or its run folder.") from err


def load_latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in `run_dir` and its path; None when the folder holds no checkpoint file.

    A damaged one is skipped for the one before it, with a warning naming the file and the step used instead.
    When there are checkpoint files but none can be read, raises UnreadableCheckpointError listing each."""
    damaged: list[str] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = _read_checkpoint(path)
        except ValueError as err:
            damaged.append(f"{path.name} ({err})")
            continue
        if damaged:
            warnings.warn(f"{run_dir}: {', '.join(damaged)} damaged; using {path.name} (step {ckpt.get('step', '?')}) instead",
                          stacklevel=2)
        return ckpt, path
    if damaged:
        raise UnreadableCheckpointError(
            f"no readable checkpoint in {run_dir}: {list_problems(damaged)}. Nothing was changed. Fix: restore a "
            f"checkpoint from a backup, or pretrain again (python -m pretrain ... --overwrite moves this folder aside).")
    return None


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with an error that says which file and what to do."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        config = Path(source).parent / "config.json"
        listed = f" (see {config})" if config.is_file() else ""  # a checkpoint copied out of its run folder has none
        raise CheckpointMismatchError(
            f"{source} does not fit this model ({type(module).__name__}): it was saved for another architecture "
            f"or options (e.g. --model, --encoder alexnet-poolfree). Use the options it was trained with{listed}. "
            f"Details: {str(err).splitlines()[0]}") from err
