"""Context-encoder losses: masked, normalised L2 with a heavier overlap band, and adversarial BCE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation of a (B, H, W) bool mask by `radius` px (a (2r+1)^2 structuring element).

    By doubling: a mask already dilated by c, OR-ed with itself shifted by ±s (s <= c+1), is dilated by
    c+s, so radius 7 takes 3 steps per axis (shifts 1, 2, 4) of cheap bool ops on slices. This replaces
    two 15-wide max-pools that cost 3-4% of a bf16 training step.
    """
    out = mask.clone()
    for dim in (-2, -1):
        covered = 0
        while covered < radius:
            s = min(covered + 1, radius - covered)
            n = out.shape[dim]
            if s >= n:  # the shift moves everything out of the image: nothing more to add along this axis
                break
            grown = out.clone()
            grown.narrow(dim, s, n - s).logical_or_(out.narrow(dim, 0, n - s))  # pull from -s
            grown.narrow(dim, 0, n - s).logical_or_(out.narrow(dim, s, n - s))  # pull from +s
            out, covered = grown, covered + s
    return out


def reconstruction_weights(mask: torch.Tensor, overlap: int = 7, overlap_weight: float = 10.0) -> torch.Tensor:
    """Per-pixel L2 weights: 1 in the hole, `overlap_weight` on a band of context `overlap` px wide around it.

    The band makes the prediction agree with the visible border it has to join (paper: 7 px, 10x).
    mask: (B, H, W) bool, True = dropped. Returns (B, 1, H, W) float; zero everywhere else, so no
    gradient reaches pixels outside the hole and band. An all-False mask (the autoencoder baseline,
    `--mask none`) gives weight 1 everywhere: reconstruct the whole image.
    """
    hole = mask.unsqueeze(1).float()  # (B, 1, H, W)
    if overlap > 0:
        band = (dilate(mask, overlap) & ~mask).unsqueeze(1).float()  # (B, 1, H, W) context within `overlap` px
        weights = hole + overlap_weight * band
    else:
        weights = hole
    empty = hole.flatten(1).sum(1) == 0  # (B,)
    return torch.where(empty[:, None, None, None], torch.ones_like(weights), weights)


def masked_l2_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per image sum(w * (pred - target)^2) / (3 * sum(w)), averaged over the batch.

    A weighted mean, so the loss does not depend on the hole's size; normalised per image (not per
    batch) so that the mean over DDP ranks of their batch losses is exactly the global batch's loss.
    """
    sq = (pred.float() - target.float()).pow(2)  # (B, 3, H, W)
    per_image = (weights * sq).sum((1, 2, 3)) / (weights.sum((1, 2, 3)) * pred.shape[1]).clamp_min(1.0)  # (B,)
    return per_image.mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss: the generator wants its fills classified as real."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE on real regions (label 1) and predicted ones (label 0), averaged."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float))
    return 0.5 * (real + fake)
