"""Save, keep, load and resume: atomic checkpoints with every RNG, and a fallback when the newest is damaged."""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_GLOB = "checkpoint-*.pth"


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
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def load_latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint; a damaged one is reported and the one before it is tried."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False), path
        except Exception as err:  # noqa: BLE001 - any unreadable file means: fall back
            warnings.warn(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); "
                          "falling back to the one before it", stacklevel=2)
    return None


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with an error that says which file and what to do."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{source} does not fit this model ({type(module).__name__}): it was saved for another "
            f"architecture or options (e.g. --encoder, --pool-free). Use the same options it was trained "
            f"with (see config.json beside it). Details: {str(err).splitlines()[0]}") from err
