import pytest
import torch

from pretrain.masks import (
    apply_mask,
    central_square_mask,
    make_mask,
    random_block_mask,
    random_region_mask,
    shapes_from_segmentations,
)


@pytest.mark.parametrize("kind", ["center", "random_block", "random_region"])
@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_masks_cover_the_configured_fraction(kind, fraction):
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        mask = make_mask(kind, 227, fraction, g)
        assert mask.dtype == torch.bool and mask.shape == (227, 227)
        assert abs(mask.float().mean().item() - fraction) <= 0.05 * fraction + 1e-3


def test_center_mask_is_centred_square_of_half_side():
    mask = central_square_mask(128, 0.25)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (32, 95, 32, 95)


def _is_rectangle(mask: torch.Tensor) -> bool:
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return bool(box.all())


def test_random_regions_are_not_rectangles_and_differ_by_seed():
    a = random_region_mask(227, 0.25, torch.Generator().manual_seed(0))
    b = random_region_mask(227, 0.25, torch.Generator().manual_seed(1))
    assert not _is_rectangle(a) and not _is_rectangle(b)
    assert (a != b).any()
    again = random_region_mask(227, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(a, again)


def test_random_regions_from_segmentation_shapes():
    labels = torch.zeros(64, 64, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    labels[(yy - 32) ** 2 + (xx - 20) ** 2 < 15 ** 2] = 3  # a disc
    labels[0:3] = 255
    shapes = shapes_from_segmentations([labels])
    assert len(shapes) == 1 and shapes[0].shape == (29, 29)
    mask = random_region_mask(227, 0.25, torch.Generator().manual_seed(0), shapes=shapes)
    assert abs(mask.float().mean().item() - 0.25) <= 0.0125
    assert not _is_rectangle(mask)


def test_random_blocks_are_several_squares():
    mask = random_block_mask(227, 0.25, torch.Generator().manual_seed(0))
    assert not _is_rectangle(mask)  # one square would be a rectangle


def test_apply_mask_zeroes_only_dropped_pixels():
    x = torch.randn(3, 8, 8) + 5
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = True
    out = apply_mask(x, mask)
    assert (out[:, mask] == 0).all() and torch.equal(out[:, ~mask], x[:, ~mask])
