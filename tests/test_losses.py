import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import dilate, discriminator_loss, masked_l2_loss, reconstruction_weights


def _square_mask(size=32, lo=10, hi=20):
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, lo:hi, lo:hi] = True
    return mask


def test_weights_hole_one_band_ten_elsewhere_zero():
    w = reconstruction_weights(_square_mask(), overlap=3, overlap_weight=10.0)[0, 0]
    assert w[15, 15] == 1 and w[10, 10] == 1
    assert w[8, 15] == 10 and w[7, 15] == 10 and w[6, 15] == 0  # band of 3 px above the hole
    assert w[0, 0] == 0


def test_masked_l2_has_no_gradient_outside_hole_and_band():
    mask = _square_mask()
    w = reconstruction_weights(mask, overlap=3)
    pred = torch.randn(1, 3, 32, 32, requires_grad=True)
    masked_l2_loss(pred, torch.zeros(1, 3, 32, 32), w).backward()
    inside = (w[0, 0] > 0)
    assert (pred.grad[0][:, ~inside] == 0).all()
    assert (pred.grad[0][:, inside] != 0).all()


def test_masked_l2_is_a_normalised_weighted_mean():
    mask = _square_mask()
    w = reconstruction_weights(mask, overlap=0)
    pred = torch.full((1, 3, 32, 32), 2.0)
    assert torch.isclose(masked_l2_loss(pred, torch.zeros_like(pred), w), torch.tensor(4.0))
    # doubling the hole size does not change a uniform error: the loss is normalised by the weights
    big = reconstruction_weights(_square_mask(lo=4, hi=28), overlap=0)
    assert torch.isclose(masked_l2_loss(pred, torch.zeros_like(pred), big), torch.tensor(4.0))


def test_empty_mask_is_the_autoencoder_loss_over_the_whole_image():
    w = reconstruction_weights(torch.zeros(2, 8, 8, dtype=torch.bool))
    assert (w == 1).all()


def test_discriminator_loss_is_low_when_it_separates():
    good = discriminator_loss(torch.full((4,), 10.0), torch.full((4,), -10.0))
    bad = discriminator_loss(torch.full((4,), -10.0), torch.full((4,), 10.0))
    assert good < 1e-3 < 5 < bad


@pytest.mark.parametrize("radius", [0, 1, 3, 4, 7, 12, 40])
def test_dilate_equals_a_square_max_pool(radius):
    g = torch.Generator().manual_seed(radius)
    mask = torch.rand(3, 37, 52, generator=g) > 0.97  # scattered pixels, some at the borders
    mask[0, 0, 0] = mask[1, -1, -1] = True
    reference = F.max_pool2d(mask.float().unsqueeze(1), 2 * radius + 1, stride=1, padding=radius).squeeze(1) > 0
    assert torch.equal(dilate(mask, radius), reference)
