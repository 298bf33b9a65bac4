"""transfer.rescale: Krähenbühl et al.'s within-layer init and between-layer gradient-ratio calibration."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transfer.rescale import (
    between_layer_rescale_,
    krahenbuhl_rescale_,
    ratio_spread,
    within_layer_init_,
)


class TinyNet(nn.Module):
    """A conv trunk and a dense head in separate submodules (as a trunk + classifier model has them), with
    in-place ReLUs, max-pooling, a grouped conv and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 8, 8, 8)
            nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B, 16, 4, 4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(32, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))  # (B, 3, 16, 16) -> (B, 5)

    def weight_layers(self) -> list[nn.Module]:
        return [self.trunk[0], self.trunk[3], self.head[1], self.head[4]]


def _net_and_run(seed: int = 0):
    torch.manual_seed(seed)
    net = TinyNet().eval()  # eval: dropout off while calibrating
    images = torch.randn(16, 3, 16, 16) * 3 + 1

    def run() -> torch.Tensor:
        return net(images)
    return net, net.weight_layers(), run


def _preactivations(layers, run) -> list[torch.Tensor]:
    """Each layer's output, copied in a forward hook before the in-place ReLU after it overwrites it."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outs.append(out.detach().clone())) for layer in layers]
    with torch.no_grad():
        run()
    for hook in hooks:
        hook.remove()
    return outs


def _ratios(layers, run, output_grad) -> list[float]:
    """sqrt(mean(dL/dW^2) / mean(W^2)) per layer for L = <output_grad, run()>."""
    weights = [layer.weight for layer in layers]
    grads = torch.autograd.grad(run(), weights, grad_outputs=output_grad)
    return [math.sqrt(g.pow(2).mean().item() / w.detach().pow(2).mean().item()) for w, g in zip(weights, grads)]


def _unbalance_(layers) -> None:
    """Scale layers by very different factors (weights and biases together), as a pretrained trunk may be."""
    with torch.no_grad():
        for layer, factor in zip(layers, (7.0, 0.3, 2.0, 0.05)):
            layer.weight.mul_(factor)
            layer.bias.mul_(factor)


def test_within_layer_gives_every_fresh_channel_mean_b0_and_std_1_and_leaves_the_others_alone():
    net, layers, run = _net_and_run()
    within_layer_init_(layers, run, fresh=layers, b0=0.1)
    for index, (layer, out) in enumerate(zip(layers, _preactivations(layers, run))):
        dims = (0, 2, 3) if isinstance(layer, nn.Conv2d) else (0,)
        mean, std = out.mean(dims), out.std(dims, correction=0)  # (C,), (C,)
        assert torch.allclose(mean, torch.full_like(mean, 0.1), atol=1e-4), index
        assert torch.allclose(std, torch.ones_like(std), atol=1e-4), index

    net, layers, run = _net_and_run()
    kept = layers[1]
    kept_weight, kept_bias = kept.weight.clone(), kept.bias.clone()
    stats = within_layer_init_(layers, run, fresh=[layers[0], layers[2], layers[3]], b0=0.1)
    assert torch.equal(kept.weight, kept_weight) and torch.equal(kept.bias, kept_bias)
    assert [s.fresh for s in stats] == [True, False, True, True]
    assert abs(stats[1].std - 1) > 0.1  # the kept layer is not normalised ...
    for s in (stats[0], stats[2], stats[3]):  # ... but the fresh ones above it are, on its actual output
        assert abs(s.mean - 0.1) < 1e-4 and abs(s.std - 1) < 1e-4 and abs(s.std_min - 1) < 1e-4


def test_between_layer_makes_every_layer_gradient_ratio_equal():
    net, layers, run = _net_and_run()
    within_layer_init_(layers, run, fresh=layers)
    _unbalance_(layers)
    output_grad = torch.randn(16, 5, generator=torch.Generator().manual_seed(3))
    assert ratio_spread(_ratios(layers, run, output_grad)) > 1.0  # far apart before
    result = between_layer_rescale_(layers, run, output_grad=output_grad)
    measured = _ratios(layers, run, output_grad)
    assert ratio_spread(measured) < 0.01
    assert result.updates >= 1 and result.spread_before > 1.0
    assert result.ratios_after == pytest.approx(measured, rel=1e-4)
    assert all(layer.weight.grad is None for layer in layers)  # .grad untouched


def test_between_layer_changes_a_relu_maxpool_network_only_by_a_positive_factor():
    net, layers, run = _net_and_run()
    within_layer_init_(layers, run, fresh=layers)  # biases far from zero: a wrong bias scaling would show
    _unbalance_(layers)
    with torch.no_grad():
        before = run()
    weights_before = [layer.weight.clone() for layer in layers]
    layers[0].weight.requires_grad_(False)  # a frozen layer is rescaled too, and stays frozen
    between_layer_rescale_(layers, run)
    assert [layer.weight.requires_grad for layer in layers] == [False, True, True, True]
    with torch.no_grad():
        after = run()
    factors = [(layer.weight / w).mean().item() for layer, w in zip(layers, weights_before)]
    assert max(factors) / min(factors) > 10  # the layers were rescaled by very different factors
    c = (after * before).sum() / (before * before).sum()  # least-squares factor
    assert c > 0
    assert torch.allclose(after, c * before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_full_protocol_is_deterministic_for_a_seed():
    weights = []
    for _ in range(2):
        net, layers, run = _net_and_run(seed=5)
        report = krahenbuhl_rescale_(layers, run, fresh=layers[2:])
        weights.append({k: v.clone() for k, v in net.state_dict().items()})
        assert report.between.spread_after < 0.01
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    net, layers, run = _net_and_run(seed=6)
    krahenbuhl_rescale_(layers, run, fresh=layers[2:])
    assert not torch.equal(net.head[1].weight, weights[0]["head.1.weight"])  # and the seed matters


def test_bad_input_is_refused():
    net, layers, run = _net_and_run()
    net.train()  # dropout on: the calibration would be noise
    with pytest.raises(ValueError, match="eval mode"):
        krahenbuhl_rescale_(layers, run, fresh=layers)
    net.eval()
    with pytest.raises(ValueError, match="order"):
        within_layer_init_(layers[::-1], run, fresh=layers)
    with pytest.raises(ValueError, match="order"):
        between_layer_rescale_(layers[::-1], run)
    with pytest.raises(ValueError, match="not among"):
        within_layer_init_(layers[:2], run, fresh=[layers[3]])
    nn.init.zeros_(layers[3].weight)  # a zero-initialised classifier has no ratio
    with pytest.raises(ValueError, match="zero"):
        between_layer_rescale_(layers, run)
    with pytest.raises(TypeError, match="ReLU"):
        within_layer_init_([nn.ReLU()], run, fresh=[])
    with_batchnorm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with pytest.raises(ValueError, match="BatchNorm"):
        within_layer_init_([with_batchnorm[0]], lambda: with_batchnorm(torch.randn(8, 4)), fresh=[with_batchnorm[0]])
