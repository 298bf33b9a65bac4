"""Feature health of an AlexNet trunk: is it degenerate, before any transfer run says so?

Per conv layer (a pool-free trunk's learned downsampling convs are the layers named pool1, pool2, pool5):
- dead_fraction: output channels that are never positive after their ReLU on the given images;
- mean_abs_cos: mean |cosine| between the layer's flattened filters over all off-diagonal pairs of filters
  that read the same inputs (the same group of a grouped conv); redundant filters raise it;
- mean_alignment: mean over filters of |sum of weights| / L2 norm, i.e. how strongly a filter answers a
  constant input. A constant filter of n weights scores sqrt(n), a zero-sum one 0, a Gaussian one about
  sqrt(2/pi) = 0.8; filters that mostly measure their input's mean colour score high.

Each figure sits beside the same figure for the project's random start of the same architecture
(pretrain.models.gaussian_init_: N(0, 0.01^2) weights, zero biases), measured on the same images. (Its
rescaled version is no extra reference: cosines and alignments do not change when a filter is scaled by a
positive number, and after Krähenbühl's per-channel init no channel is dead by construction.)
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.models import FEATURE_KEYS, AlexNetEncoder, gaussian_init_

HEALTH_METRICS = ("dead_fraction", "mean_abs_cos", "mean_alignment")


def layer_convs(encoder: AlexNetEncoder) -> dict[str, nn.Conv2d]:
    """{feature key: its conv} in forward order; max-pools have no weights and are left out."""
    convs: dict[str, nn.Conv2d] = {}
    for key in FEATURE_KEYS:
        layer = getattr(encoder, key)
        if isinstance(layer, nn.Sequential):  # a pool-free trunk's pool: Sequential(Conv2d, ReLU)
            layer = layer[0]
        if isinstance(layer, nn.Conv2d):
            convs[key] = layer
    return convs


def mean_abs_cos(conv: nn.Conv2d, eps: float = 1e-12) -> float:
    """Mean |cos| over ordered pairs i != j of filters in the same group (a zero filter counts as cos 0)."""
    per_group = conv.out_channels // conv.groups
    if per_group < 2:
        return 0.0
    w = conv.weight.detach().float().flatten(1)  # (C_out, C_in/groups * k * k)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)  # (C_out, D), unit rows
    w = w.view(conv.groups, per_group, -1)  # (G, M, D)
    cos = torch.bmm(w, w.transpose(1, 2)).abs()  # (G, M, M)
    off_diagonal = cos.sum() - cos.diagonal(dim1=1, dim2=2).sum()  # (); groups are equal-sized, so pooled = mean
    return (off_diagonal / (conv.groups * per_group * (per_group - 1))).item()


def mean_alignment(conv: nn.Conv2d, eps: float = 1e-12) -> float:
    """Mean over filters of |sum(w)| / ||w|| (a zero filter counts as 0)."""
    w = conv.weight.detach().float().flatten(1)  # (C_out, D)
    return (w.sum(dim=1).abs() / w.norm(dim=1).clamp_min(eps)).mean().item()  # (C_out,) -> ()


@torch.no_grad()
def dead_fractions(encoder: AlexNetEncoder, images: torch.Tensor) -> dict[str, float]:
    """{conv key: fraction of its channels whose post-ReLU output is 0 at every position of every image}."""
    keys = list(layer_convs(encoder))
    feats = encoder(images, out_feat_keys=keys)  # conv features are post-ReLU: [(B, C_k, H_k, W_k)]
    return {k: (f.amax(dim=(0, 2, 3)) <= 0).float().mean().item() for k, f in zip(keys, feats)}  # (C_k,) -> ()


def layer_health(encoder: AlexNetEncoder, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """{conv key: {dead_fraction, mean_abs_cos, mean_alignment}} of one trunk, no references."""
    dead = dead_fractions(encoder, images)
    return {key: {"dead_fraction": dead[key], "mean_abs_cos": mean_abs_cos(conv), "mean_alignment": mean_alignment(conv)}
            for key, conv in layer_convs(encoder).items()}


def random_reference(encoder: AlexNetEncoder, seed: int = 0) -> AlexNetEncoder:
    """The same architecture with the project's random start, seeded; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = AlexNetEncoder(encoder.arch, pool_free=encoder.pool_free)
        gaussian_init_(trunk)
    return trunk


@torch.no_grad()
def feature_health(encoder: AlexNetEncoder, images: torch.Tensor, seed: int = 0) -> dict[str, dict]:
    """{conv key: {dead_fraction, mean_abs_cos, mean_alignment, random: {...}}}, JSON-ready.

    `images` (B, 3, H, W) are held-out, unmasked and normalised as the encoder's training input.
    """
    if not isinstance(encoder, AlexNetEncoder):
        raise TypeError(f"feature_health covers AlexNet trunks (pretrain.models.AlexNetEncoder), not {type(encoder).__name__}")
    images = images.float()  # (B, 3, H, W)
    was_training = encoder.training
    encoder.eval()
    trained = layer_health(encoder, images)
    encoder.train(was_training)
    random_trunk = random_reference(encoder, seed).to(images.device).eval()
    random = layer_health(random_trunk, images)
    return {key: {**trained[key], "random": random[key]} for key in trained}


def context_encoder_health(model: nn.Module, images: torch.Tensor, seed: int = 0) -> dict[str, dict] | None:
    """feature_health of a context encoder's trunk, or None when it is not an AlexNet (inpaint128, timm)."""
    encoder = getattr(model, "encoder", None)
    return feature_health(encoder, images, seed) if isinstance(encoder, AlexNetEncoder) else None


def format_health(report: dict[str, dict]) -> str:
    """An aligned terminal table: each metric for the trunk beside the random start's."""
    header = (f"{'layer':<7} {'dead fraction':^15}   {'mean |cos| of filters':^21}   {'|sum w| / ||w||':^15}\n"
              f"{'':<7} " + "   ".join([f"{'trunk':>7}{'random':>8}"] * 3))
    rows = [header]
    for key, m in report.items():
        cells = [f"{m[name]:>7.3f}{m['random'][name]:>8.3f}" for name in HEALTH_METRICS]
        rows.append(f"{key:<7} " + "   ".join(cells))
    return "\n".join(rows)
