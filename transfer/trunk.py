"""Every transfer task's starting point: an AlexNet trunk (conv1..pool5) from any `--init`.

- a context-encoder run folder (`runs/<name>/`, newest readable checkpoint) or checkpoint file; an
  autoencoder is the same thing pretrained with `--mask none`;
- `random`: Gaussian N(0, 0.01^2) weights, zero biases, as Caffe-era papers initialised;
- `torchvision:PATH`: a local torchvision AlexNet state dict (e.g. ImageNet weights the user already
  has). Nothing is ever downloaded.

`calibrate_network_` then applies the paper's transfer protocol, identically to every start: Krähenbühl et
al. 2016's data-dependent init of every layer that starts fresh (the task's new layers; every layer of the
random start) and their between-layer rescaling of the whole network (transfer.rescale).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import load_state_dict_checked
from pretrain.errors import BadOptionError, MissingFileError
from pretrain.hub import load_encoder
from pretrain.models import AlexNetEncoder, gaussian_init_
from transfer.rescale import krahenbuhl_rescale_

CONV_KEYS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# torchvision.models.alexnet().features indices of its five convolutions
TORCHVISION_CONV_INDEX = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}


def load_torchvision_trunk(path: str | Path) -> AlexNetEncoder:
    """conv1..conv5 of a local torchvision AlexNet state dict (`torch.save(alexnet().state_dict(), PATH)`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"torchvision:{path}: no such file; save one with "
                                f"torch.save(torchvision.models.alexnet(weights=...).state_dict(), '{path}')")
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = AlexNetEncoder("torchvision")
    mapped = {}
    for key, idx in TORCHVISION_CONV_INDEX.items():
        for p in ("weight", "bias"):
            src = f"features.{idx}.{p}"
            if src not in state:
                raise BadOptionError(f"{path} is not a torchvision AlexNet state dict (missing {src})")
            mapped[f"{key}.{p}"] = state[src]
    load_state_dict_checked(trunk, mapped, str(path))
    return trunk


def build_trunk(init: str, seed: int = 0, arch: str = "caffe") -> tuple[AlexNetEncoder, dict[str, Any] | None]:
    """The AlexNet trunk for `--init`, and where a pretrained one came from ({"path", "step"}, else None)."""
    torch.manual_seed(seed)
    if init == "rescaled":
        raise BadOptionError("--init rescaled is now --init random: the Krähenbühl rescaling is applied to every start "
                         "(--rescale, on by default)")
    if init == "random":
        trunk = AlexNetEncoder(arch)
        gaussian_init_(trunk)
        return trunk, None
    if init.startswith("torchvision:"):
        return load_torchvision_trunk(init.split(":", 1)[1]), {"path": init.split(":", 1)[1], "step": None}
    if not Path(init).exists():
        raise MissingFileError(f"--init {init}: no such file or folder. Use random, torchvision:PATH, a runs/<name>/ "
                                f"folder or a checkpoint .pth file")
    return load_encoder(init)


def conv_layers(trunk: nn.Module, run: Callable[[], torch.Tensor]) -> list[nn.Module]:
    """The trunk's convolutions that `run()` uses, in the order it calls them (a pool-free trunk registers its
    downsampling convs after conv5; a detector reading conv5 never calls pool5's)."""
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: called.append(m)) for m in convs]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(called))


def calibrate_network_(model: nn.Module, trunk: nn.Module, new_layers: Sequence[nn.Module],
                       run: Callable[[], torch.Tensor], trunk_is_fresh: bool) -> dict[str, Any]:
    """The paper's protocol on a task network `model` (its trunk, then its `new_layers` in forward order):
    within-layer data-dependent init of every fresh layer, then the between-layer gradient-ratio calibration of
    all of them. `run()` is the network's forward on the calibration batch (evaluated in eval mode: no dropout).
    Returns a short report for metrics.json."""
    was_training = model.training
    model.eval()
    try:
        layers = [*conv_layers(trunk, run), *new_layers]
        fresh = set(new_layers) | (set(layers) if trunk_is_fresh else set())
        report = krahenbuhl_rescale_(layers, run, fresh)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    return {"layers": [names[m] for m in layers], "fresh": [names[m] for m in layers if m in fresh],
            "within_std": [round(s.std, 4) for s in report.within],
            "ratio_spread_before": report.between.spread_before, "ratio_spread_after": report.between.spread_after,
            "output_factor": report.between.output_factor}
