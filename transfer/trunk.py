"""Every transfer task's starting point: an AlexNet trunk (conv1..pool5) from any `--init`.

- a context-encoder run folder (`runs/<name>/`, newest readable checkpoint) or checkpoint file; an
  autoencoder is the same thing pretrained with `--mask none`;
- `random`: Gaussian N(0, 0.01^2) weights, zero biases, as Caffe-era papers initialised;
- `rescaled`: Krähenbühl et al. 2016 data-dependent init: Gaussian weights rescaled layer by layer so
  each channel's pre-activation has zero mean and unit variance on a batch of real training images;
- `torchvision:PATH`: a local torchvision AlexNet state dict (e.g. ImageNet weights the user already
  has). Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pretrain.checkpoint import load_state_dict_checked
from pretrain.hub import load_encoder
from pretrain.models import AlexNetEncoder
from transfer.experiment import print0

CONV_KEYS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# torchvision.models.alexnet().features indices of its five convolutions
TORCHVISION_CONV_INDEX = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}


def init_label(init: str) -> str:
    """A short name for tables: the run folder's name for checkpoints, the keyword otherwise."""
    if init in ("random", "rescaled"):
        return init
    if init.startswith("torchvision:"):
        return "torchvision"
    path = Path(init)
    return path.parent.name if path.suffix == ".pth" else path.name


def gaussian_init_(trunk: nn.Module, std: float = 0.01) -> None:
    """Every conv weight ~ N(0, std^2), biases 0 (the 'random Gaussian' row of the paper's Table 2)."""
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def rescale_init_(trunk: AlexNetEncoder, images: torch.Tensor, eps: float = 1e-8) -> dict[str, tuple[float, float]]:
    """Krähenbühl et al. (2016) within-layer data-dependent init, applied in depth order.

    For each conv (and each pool-free downsampling conv), its output channel c on `images` has mean
    m_c and std s_c; setting w_c <- w_c / s_c and b_c <- (b_c - m_c) / s_c makes every pre-activation
    channel zero-mean and unit-variance on the batch. Layers are done in order because each layer's
    statistics depend on the rescaled layers before it. Returns {layer: (mean, std)} after rescaling.
    """
    convs = [(name, m) for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]
    # Depth order is the order the forward pass calls them, not registration order (a pool-free trunk
    # registers its pool1/pool2 convs after conv5).
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: called.append(m)) for _, m in convs]
    trunk(images)
    for h in hooks:
        h.remove()
    convs.sort(key=lambda item: called.index(item[1]))
    stats: dict[str, tuple[float, float]] = {}
    for name, conv in convs:
        captured: list[torch.Tensor] = []
        hook = conv.register_forward_hook(lambda _m, _i, out, keep=captured: keep.append(out.detach().clone()))
        trunk(images)  # (B, 256, 6, 6); the hook keeps this conv's pre-activation
        hook.remove()
        out = captured[0]  # (B, C, H, W)
        mean = out.mean(dim=(0, 2, 3))  # (C,)
        std = out.std(dim=(0, 2, 3)).clamp_min(eps)  # (C,)
        conv.weight.div_(std.view(-1, 1, 1, 1))
        conv.bias.sub_(mean).div_(std)
        out = (out - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        stats[name] = (out.mean().item(), out.std().item())
    return stats


def load_torchvision_trunk(path: str | Path) -> AlexNetEncoder:
    """conv1..conv5 of a local torchvision AlexNet state dict (`torch.save(alexnet().state_dict(), PATH)`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torchvision:{path}: no such file; save one with "
                                f"torch.save(torchvision.models.alexnet(weights=...).state_dict(), '{path}')")
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = AlexNetEncoder("torchvision")
    mapped = {}
    for key, idx in TORCHVISION_CONV_INDEX.items():
        for p in ("weight", "bias"):
            src = f"features.{idx}.{p}"
            if src not in state:
                raise ValueError(f"{path} is not a torchvision AlexNet state dict (missing {src})")
            mapped[f"{key}.{p}"] = state[src]
    load_state_dict_checked(trunk, mapped, str(path))
    return trunk


@torch.no_grad()
def normalize_layer_scales_(trunk: nn.Module, images: torch.Tensor, eps: float = 1e-12) -> dict[str, float]:
    """Divide each conv's weight and bias by one positive scalar so its pre-activation has unit RMS on `images`.

    ReLU and max-pooling are positively homogeneous, so every feature map keeps its exact pattern and only
    its overall scale changes: what the trunk computes is preserved, while SGD sees layers of comparable
    scale (Krähenbühl et al. 2016 rescale pretrained nets between layers for the same reason). Convs are
    done in forward order, each measured after the ones before it. Returns {conv name: the divisor}.
    """
    convs = {m: name for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d)}
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: order.append(m)) for m in convs]
    trunk(images)
    for h in hooks:
        h.remove()
    divisors: dict[str, float] = {}
    for conv in dict.fromkeys(order):  # forward order, each conv once
        captured: list[torch.Tensor] = []
        # measured inside the hook: the trunk applies its ReLU in place right after
        hook = conv.register_forward_hook(lambda _m, _i, out, keep=captured: keep.append(out.float().pow(2).mean().sqrt()))
        trunk(images)  # the hook keeps the RMS of this conv's (B, C, H, W) pre-activation
        hook.remove()
        rms = captured[0].clamp_min(eps)
        conv.weight.div_(rms)
        conv.bias.div_(rms)
        divisors[convs[conv]] = rms.item()
    return divisors


def build_trunk(init: str, seed: int = 0, calib_images: torch.Tensor | None = None,
                arch: str = "caffe", normalize: bool = False) -> AlexNetEncoder:
    """The AlexNet trunk for `--init`; `calib_images` (B, 3, 227, 227), normalised, are needed for `rescaled`
    and for `normalize` (each conv then divided to unit-RMS pre-activations: `normalize_layer_scales_`)."""
    torch.manual_seed(seed)
    if init in ("random", "rescaled"):
        trunk = AlexNetEncoder(arch)
        gaussian_init_(trunk)
        if init == "rescaled":
            if calib_images is None:
                raise ValueError("--init rescaled needs a batch of training images to calibrate on")
            rescale_init_(trunk, calib_images)
    elif init.startswith("torchvision:"):
        trunk = load_torchvision_trunk(init.split(":", 1)[1])
    elif not Path(init).exists():
        raise FileNotFoundError(f"--init {init}: no such file or folder. Use random, rescaled, "
                                f"torchvision:PATH, a runs/<name>/ folder or a checkpoint .pth file")
    else:
        trunk, _ = load_encoder(init)
    if normalize:
        if calib_images is None:
            raise ValueError("normalizing the trunk's layer scales needs a batch of training images")
        divisors = normalize_layer_scales_(trunk, calib_images)
        print0("trunk layers divided by " + ", ".join(f"{k} {v:.3g}" for k, v in divisors.items()), flush=True)
    return trunk
