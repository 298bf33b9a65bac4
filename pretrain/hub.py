"""Pretrained networks from a run folder or a checkpoint file, for everything downstream of pretraining.

`load_encoder` gives the AlexNet trunk (any pretraining objective stores it as `encoder.*`), `load_generator`
the whole inpainting network (encoder + bottleneck + decoder), both rebuilt from the config stored in the
checkpoint. The training loop builds its generator with the same `build_generator`, so a checkpoint and the
network it is loaded into always come from one builder. This module never imports `pretrain.main_pretrain`:
transfer code gets pretrained weights without pulling in the training loop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pretrain.checkpoint import load_checkpoint_file, load_latest_checkpoint, load_state_dict_checked
from pretrain.errors import BadOptionError, MissingFileError
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


def checkpoint_step(ckpt: dict[str, Any], path: Path) -> int:
    """The optimiser step a checkpoint was saved at (its 'step' entry, else the number in its file name, else 0)."""
    if isinstance(ckpt.get("step"), int):
        return ckpt["step"]
    match = _STEP_IN_NAME.search(Path(path).name)
    return int(match.group(1)) if match else 0


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(checkpoint dict, the file it was read from) for a run folder or a checkpoint .pth file.

    A folder gives its newest readable checkpoint-*.pth (pretrain.checkpoint: when newer ones are damaged, a
    warning names them and the file and step used instead). Errors name the path and say what to pass.
    """
    path = Path(path)
    if path.is_file():
        return load_checkpoint_file(path), path
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such file or folder; pass a runs/<name>/ folder or a checkpoint-*.pth "
                               f"file written by python -m pretrain")
    found = load_latest_checkpoint(path)
    if found is None:
        raise MissingFileError(f"no checkpoint-*.pth in {path}: pretrain first with python -m pretrain --name "
                               f"{path.name}, or pass a checkpoint file")
    return found


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
        raise BadOptionError(f"{source} is a {model} checkpoint; transfer needs an AlexNet trunk "
                         f"(python -m pretrain --model alexnet)")
    trunk = build_encoder(config.get("encoder", GENERATOR_DEFAULTS["encoder"]))
    if not isinstance(trunk, AlexNetEncoder):
        raise BadOptionError(f"{source} has a {config.get('encoder')} trunk; transfer tasks use AlexNet trunks "
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
