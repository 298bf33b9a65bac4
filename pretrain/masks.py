"""Which pixels to drop: the paper's three mask strategies (Sec. 3.3), plus `none` for the autoencoder.

Every function returns a bool tensor (H, W), True where the pixel is dropped, and takes an explicit
`torch.Generator`, so a mask is a pure function of its seed: resumed runs and DDP ranks see exactly
the masks an uninterrupted single-process run would.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MASK_TYPES = ("random_region", "random_block", "center", "none")


def central_square_mask(size: int, fraction: float = 0.25) -> torch.Tensor:
    """A centred square covering `fraction` of the image (1/4 -> a square of half the side)."""
    side = round(size * fraction ** 0.5)
    start = (size - side) // 2
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[start:start + side, start:start + side] = True
    return mask


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _paste_until_covered(size: int, fraction: float, generator: torch.Generator,
                         shapes: Sequence[torch.Tensor], tolerance: float) -> torch.Tensor:
    """Paste randomly placed, scaled shapes until `fraction` of the image is covered.

    A shape that would push the coverage past `fraction * (1 + tolerance)` is shrunk until it fits, so the
    result lands in [fraction, fraction * (1 + tolerance)] while shapes still overlap freely.
    """
    mask = torch.zeros(size, size, dtype=torch.bool)
    target = fraction * size * size
    for _ in range(200):  # bounded: each accepted paste adds pixels, 200 is never reached in practice
        covered = mask.sum().item()
        if covered >= target:
            break
        shape = shapes[int(torch.randint(len(shapes), (), generator=generator))]
        side = _uniform(generator, 0.25, 0.5) * size * (fraction / 0.25) ** 0.5
        if torch.rand((), generator=generator).item() < 0.5:
            shape = shape.flip(-1)
        while True:
            h = max(2, min(size, round(side * _uniform(generator, 0.75, 1.33) ** 0.5)))
            w = max(2, min(size, round(side / _uniform(generator, 0.75, 1.33) ** 0.5)))
            piece = F.interpolate(shape[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5  # (h, w)
            y = int(torch.randint(size - h + 1, (), generator=generator))
            x = int(torch.randint(size - w + 1, (), generator=generator))
            candidate = mask.clone()
            candidate[y:y + h, x:x + w] |= piece
            if candidate.sum().item() <= target * (1 + tolerance) or side < 4:
                break
            side *= 0.8  # too big for what is left to cover: shrink and try again
        mask = candidate
    return mask


def random_block_mask(size: int, fraction: float = 0.25, generator: torch.Generator | None = None,
                      tolerance: float = 0.04) -> torch.Tensor:
    """Several smaller, possibly overlapping squares covering `fraction` (up to `tolerance` relative over)."""
    generator = generator or torch.Generator().manual_seed(0)
    return _paste_until_covered(size, fraction, generator, [torch.ones(8, 8, dtype=torch.bool)], tolerance)


def random_region_mask(size: int, fraction: float = 0.25, generator: torch.Generator | None = None,
                       shapes: Sequence[torch.Tensor] | None = None, tolerance: float = 0.04) -> torch.Tensor:
    """Arbitrary shapes covering `fraction` of the image.

    With `shapes` (binary object masks, e.g. from VOC `SegmentationClass`), pastes randomly scaled and
    flipped copies of them, as the paper does with PASCAL shapes. Without, thresholds bicubically
    upscaled noise as the official code does; the threshold is the noise's (1 - fraction) quantile,
    so the coverage is exact instead of rejection-sampled into 20-30%.
    """
    generator = generator or torch.Generator().manual_seed(0)
    if shapes:
        return _paste_until_covered(size, fraction, generator, shapes, tolerance)
    grid = int(torch.randint(3, 7, (), generator=generator))  # coarser grid -> bigger blobs
    noise = torch.rand(1, 1, grid, grid, generator=generator)  # (1, 1, g, g)
    smooth = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0]  # (H, W)
    threshold = torch.quantile(smooth.flatten(), 1.0 - fraction)
    return smooth > threshold


def make_mask(kind: str, size: int, fraction: float, generator: torch.Generator,
              shapes: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Dispatch on the `--mask` option; `none` drops nothing (the plain autoencoder baseline)."""
    if kind == "center":
        return central_square_mask(size, fraction)
    if kind == "random_block":
        return random_block_mask(size, fraction, generator)
    if kind == "random_region":
        return random_region_mask(size, fraction, generator, shapes)
    if kind == "none":
        return torch.zeros(size, size, dtype=torch.bool)
    raise ValueError(f"unknown mask {kind!r}; choose one of {MASK_TYPES}")


def apply_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the dropped pixels of a mean-centred image, i.e. fill them with the dataset mean colour."""
    return image.masked_fill(mask.unsqueeze(-3), 0.0)  # (..., 3, H, W)


def shapes_from_segmentations(label_maps: Sequence[torch.Tensor], min_pixels: int = 64,
                              max_shapes: int = 1000) -> list[torch.Tensor]:
    """Object silhouettes for `random_region_mask`: each class region of each map, cropped to its box.

    `label_maps` are (H, W) integer maps with 255 = ignore (VOC `SegmentationClass`); the background
    (value 0 when the dataset has one, passed in as-is) is kept out by the caller choosing which maps.
    """
    shapes: list[torch.Tensor] = []
    for labels in label_maps:
        for value in labels.unique().tolist():
            if value in (0, 255):
                continue
            region = labels == value  # (H, W)
            if region.sum() < min_pixels:
                continue
            rows, cols = region.any(1).nonzero(), region.any(0).nonzero()
            shapes.append(region[rows.min():rows.max() + 1, cols.min():cols.max() + 1].clone())
            if len(shapes) >= max_shapes:
                return shapes
    return shapes
