"""Pretrained networks from a run folder or a checkpoint file, for everything downstream of pretraining.

`load_encoder` gives the AlexNet trunk (any pretraining objective stores it as `encoder.*`), `load_generator`
the whole inpainting network (encoder + bottleneck + decoder), both rebuilt from the config stored in the
checkpoint. The training loop builds its generator with the same `build_generator`, so a checkpoint and the
network it is loaded into always come from one builder. This module never imports `pretrain.main_pretrain`:
transfer code gets pretrained weights without pulling in the training loop.
"""
from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain.checkpoint import list_checkpoints, load_state_dict_checked
from pretrain.inpaint128 import Inpaint128Generator
from pretrain.models import AlexNetEncoder, ContextEncoder, build_encoder

# What build_generator needs from a stored config, with PretrainConfig's defaults for a config written before
# the key existed (tests/test_hub.py checks they still equal PretrainConfig's).
GENERATOR_DEFAULTS: dict[str, Any] = {"model": "alexnet", "encoder": "alexnet", "crop_size": 227, "dropout": 0.5}
# The objective whose network is an inpainting generator; a config without the key predates other objectives.
INPAINTING_OBJECTIVE = "inpainting"
_STEP_IN_NAME = re.compile(r"checkpoint-(\d+)\.pth$")


class NotAnInpainterError(ValueError):
    """The checkpoint was pretrained with an objective that has no decoder, so it cannot fill holes."""


@dataclass
class Pretrained:
    """A pretrained network in eval mode, the config it was trained with, and which checkpoint it came from."""

    model: nn.Module
    config: dict[str, Any]
    path: Path
    step: int


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


def _read(path: Path) -> dict[str, Any]:
    """One checkpoint file as a dict with 'model' and 'config'; ValueError naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        # torch's own text for a refused object recommends weights_only=False, which is never the fix here
        reason = ("it holds Python objects a ctxenc checkpoint never contains"
                  if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err)
                  else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}")
        raise ValueError(f"{path} cannot be read as a checkpoint: it is damaged (e.g. cut short) or not a ctxenc "
                         f"checkpoint ({reason}). Pass a runs/<name>/ folder or a checkpoint-*.pth file written by "
                         f"python -m pretrain") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path} is not a ctxenc pretraining checkpoint: it is not a dict with 'model' and 'config' "
                         f"entries. Pass a runs/<name>/ folder or a checkpoint-*.pth file written by python -m pretrain")
    return ckpt


def checkpoint_step(ckpt: dict[str, Any], path: Path) -> int:
    """The optimiser step a checkpoint was saved at (its 'step' entry, else the number in its file name, else 0)."""
    if isinstance(ckpt.get("step"), int):
        return ckpt["step"]
    match = _STEP_IN_NAME.search(Path(path).name)
    return int(match.group(1)) if match else 0


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(checkpoint dict, the file it was read from) for a run folder or a checkpoint .pth file.

    A folder gives its newest readable checkpoint-*.pth; when newer ones are damaged, a warning names them and
    the file and step used instead. Errors name the path and say what to pass.
    """
    path = Path(path)
    if path.is_file():
        return _read(path), path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a runs/<name>/ folder or a checkpoint-*.pth "
                                f"file written by python -m pretrain")
    candidates = list_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint-*.pth in {path}: pretrain first with python -m pretrain --name "
                                f"{path.name}, or pass a checkpoint file")
    damaged: list[str] = []
    for candidate in reversed(candidates):  # newest first
        try:
            ckpt = _read(candidate)
        except ValueError:
            damaged.append(candidate.name)
            continue
        if damaged:
            warnings.warn(f"{path}: {', '.join(damaged)} cannot be read (damaged, e.g. cut short, or not a ctxenc "
                          f"checkpoint); using {candidate.name} (step {checkpoint_step(ckpt, candidate)}) instead",
                          stacklevel=2)
        return ckpt, candidate
    raise ValueError(f"{path}: none of its {len(candidates)} checkpoints can be read ({', '.join(damaged)}); they are "
                     f"damaged or not ctxenc checkpoints. Pretrain again with python -m pretrain --name {path.name}")


def build_generator(config: dict[str, Any]) -> nn.Module:
    """The whole inpainting network of a stored config (no discriminator), with fresh weights.

    Keys this builder does not use are ignored (configs of newer or older versions load alike); missing ones
    take GENERATOR_DEFAULTS.
    """
    cfg = {**GENERATOR_DEFAULTS, **{k: v for k, v in config.items() if k in GENERATOR_DEFAULTS}}
    if cfg["model"] == "inpaint128":
        return Inpaint128Generator()
    if cfg["model"] == "alexnet":
        return ContextEncoder(build_encoder(cfg["encoder"]), cfg["crop_size"], cfg["dropout"])
    raise ValueError(f"unknown model {cfg['model']!r} in the config; this version builds alexnet or inpaint128")


def load_encoder(path: str | Path) -> tuple[AlexNetEncoder, dict[str, Any]]:
    """The AlexNet trunk of a pretraining checkpoint (any objective), weights as saved, and
    {"path": the checkpoint file, "step": its step}."""
    ckpt, source = load_checkpoint(path)
    config = ckpt["config"]
    model = config.get("model", GENERATOR_DEFAULTS["model"])
    if model != "alexnet":
        raise ValueError(f"{source} is a {model} checkpoint; transfer needs an AlexNet trunk "
                         f"(python -m pretrain --model alexnet)")
    trunk = build_encoder(config.get("encoder", GENERATOR_DEFAULTS["encoder"]))
    if not isinstance(trunk, AlexNetEncoder):
        raise ValueError(f"{source} has a {config.get('encoder')} trunk; transfer tasks use AlexNet trunks "
                         f"(--encoder alexnet, alexnet-poolfree or alexnet-torchvision)")
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    load_state_dict_checked(trunk, state, str(source))
    return trunk, {"path": str(source), "step": checkpoint_step(ckpt, source)}


def load_generator(path: str | Path) -> Pretrained:
    """The whole inpainting network of a checkpoint (eval mode), to fill holes with.

    Raises NotAnInpainterError for a checkpoint of another objective (e.g. supervised), which has no decoder.
    """
    ckpt, source = load_checkpoint(path)
    config = ckpt["config"]
    objective = config.get("objective", INPAINTING_OBJECTIVE)
    if objective != INPAINTING_OBJECTIVE:
        raise NotAnInpainterError(f"{source} was pretrained with objective {objective!r}, which has no decoder to "
                                  f"fill holes with; only an {INPAINTING_OBJECTIVE} checkpoint has one")
    model = build_generator(config)
    load_state_dict_checked(model, ckpt["model"], str(source))
    return Pretrained(model.eval(), config, source, checkpoint_step(ckpt, source))
