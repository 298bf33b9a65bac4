"""Context-encoder losses: masked, normalised L2 with a heavier overlap band, and adversarial BCE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_weights(mask: torch.Tensor, overlap: int = 7, overlap_weight: float = 10.0) -> torch.Tensor:
    """Per-pixel L2 weights: 1 in the hole, `overlap_weight` on a band of context `overlap` px wide around it.

    The band makes the prediction agree with the visible border it has to join (paper: 7 px, 10x).
    mask: (B, H, W) bool, True = dropped. Returns (B, 1, H, W) float; zero everywhere else, so no
    gradient reaches pixels outside the hole and band. An all-False mask (the autoencoder baseline,
    `--mask none`) gives weight 1 everywhere: reconstruct the whole image.
    """
    hole = mask.unsqueeze(1).float()  # (B, 1, H, W)
    if overlap > 0:
        k = 2 * overlap + 1  # square dilation as two 1-D max-pools: 2k comparisons per pixel instead of k^2
        grown = F.max_pool2d(hole, (1, k), stride=1, padding=(0, overlap))  # (B, 1, H, W)
        grown = F.max_pool2d(grown, (k, 1), stride=1, padding=(overlap, 0))  # (B, 1, H, W) dilated hole
        weights = hole + overlap_weight * (grown - hole)
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
