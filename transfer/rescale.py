"""Krähenbühl et al. (2016) data-dependent initialisation ("magic init"), for any network of Conv2d/Linear layers.

Two steps, each generic over `layers` (the network's weight layers, listed in the order its forward pass calls
them) and `run` (a callable that evaluates the whole network on one fixed calibration batch and returns its output):

- `within_layer_init_`: every layer that starts fresh gets Gaussian weights, rescaled so that each of its output
  channels' pre-activations has mean `b0` and std 1 on the calibration batch. Layers are done in forward order,
  each measured on the output of the already-initialised layers below it. Pretrained layers are left as they are.
- `between_layer_rescale_`: every layer's weights and bias are multiplied by one positive scalar so that the
  relative gradient ||dL/dW|| / ||W|| is the same for every layer; one learning rate then moves every layer at the
  same relative speed. With ReLU and max-pooling between the layers (positively homogeneous) this changes the
  network's function only by one positive factor.

`krahenbuhl_rescale_` does both, in that order, as the paper's fine-tuning protocol does before every start.

`run()` must evaluate the network deterministically: in eval mode, so that dropout is off (the reference runs
Caffe's TRAIN phase and warns against dropout; eval mode is how the same statistics come out in PyTorch), and
with no BatchNorm (BatchNorm in train mode would undo any rescaling; in eval mode it breaks homogeneity). Every
calibration call refuses a dropout module in train mode and any BatchNorm. Statistics are taken with forward hooks
on the given modules, so the layers may sit anywhere inside a larger model, and a pre-activation is read inside
the hook, before an in-place ReLU that follows the layer can overwrite it. Autocast is off during calibration.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class PreactivationStats:
    """One layer's pre-activations on the calibration batch, over its output channels."""

    mean: float  # the channels' means, averaged
    std: float  # the channels' standard deviations, averaged
    std_min: float  # the smallest channel std (a dead channel shows here)
    std_max: float
    fresh: bool  # whether `within_layer_init_` initialised this layer


@dataclass
class RatioCalibration:
    """What `between_layer_rescale_` measured: r = sqrt(mean(dW^2) / mean(W^2)) per layer, in `layers` order."""

    ratios_before: list[float]
    ratios_after: list[float]
    updates: int  # how many times the weights were rescaled (0: the ratios already agreed)
    output_factor: float  # the positive factor the network's output was multiplied by (output std after / before)

    @property
    def spread_before(self) -> float:
        return ratio_spread(self.ratios_before)

    @property
    def spread_after(self) -> float:
        return ratio_spread(self.ratios_after)


@dataclass
class RescaleReport:
    within: list[PreactivationStats]  # after the within-layer step, in `layers` order
    between: RatioCalibration


def ratio_spread(ratios: Sequence[float]) -> float:
    """max / min - 1: 0 when every layer's gradient/weight ratio is the same."""
    return max(ratios) / min(ratios) - 1.0


def _check_layers(layers: Sequence[nn.Module]) -> None:
    if not layers:
        raise ValueError("no layers given to rescale: pass the network's Conv2d/Linear layers in forward order")
    for i, layer in enumerate(layers):
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise TypeError(f"layer {i} is a {type(layer).__name__}; only nn.Conv2d and nn.Linear can be rescaled")
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("a layer is listed twice: list each weight layer once, in forward order")


def _channel_view(layer: nn.Module, per_channel: torch.Tensor) -> torch.Tensor:
    """(C,) -> a shape that broadcasts over `layer.weight` along its output channels."""
    return per_channel.view(-1, *([1] * (layer.weight.dim() - 1)))


def _channel_mean_std(out: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel mean and (population) std of a layer's output over batch and positions: (C,), (C,)."""
    channel_dim = 1 if isinstance(layer, nn.Conv2d) else -1  # Conv2d (B, C, H, W); Linear (..., C)
    flat = out.detach().movedim(channel_dim, -1).reshape(-1, out.shape[channel_dim])  # (N, C)
    var, mean = torch.var_mean(flat, dim=0, correction=0)  # (C,), (C,); np.std's definition, as the reference
    return mean, var.sqrt()


# Modules that make the calibration meaningless: dropout in train mode makes every run() different, and BatchNorm
# (train mode: renormalises whatever scale is set; eval mode: an affine shift) breaks the positive homogeneity.
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _refuse_dropout_and_batchnorm(module: nn.Module, _inputs) -> None:
    if isinstance(module, _DROPOUT) and module.training and module.p > 0:
        raise ValueError(f"run() applied {type(module).__name__} in train mode: call the model in eval mode inside "
                         "run() so that dropout is off while rescaling")
    if isinstance(module, _BATCHNORM):
        raise ValueError(f"run() applied {type(module).__name__}: the rescaling supports networks without BatchNorm only")


def _run_calibration(run: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """`run()` in fp32 (autocast off), refusing dropout in train mode and BatchNorm (a hook on every module)."""
    guard = register_module_forward_pre_hook(_refuse_dropout_and_batchnorm)
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            out = run()
    finally:
        guard.remove()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"run() returned a {type(out).__name__}; it must return the network's output tensor")
    return out


def _check_called_in_order(calls: list[int], count: int) -> None:
    if calls != list(range(count)):
        raise ValueError(f"run() called the layers in the order {calls}: list the layers in the order the forward pass "
                         "calls them, each once")


@torch.no_grad()
def within_layer_init_(layers: Sequence[nn.Module], run: Callable[[], torch.Tensor], fresh: Collection[nn.Module],
                       b0: float = 0.1, generator: torch.Generator | None = None,
                       eps: float = 1e-8) -> list[PreactivationStats]:
    """Data-dependent init of the layers in `fresh` (Krähenbühl et al.'s `initializeLayer`, Gaussian type).

    Every fresh layer gets weights ~ N(0, 1) (drawn in `layers` order from `generator`, else the global RNG) and
    bias 0. Then, in forward order, channel c's pre-activation mean m_c and std s_c on the calibration batch set
    w_c <- w_c / s_c and b_c <- b0 - m_c / s_c, so that the channel has mean b0 and std 1. A fresh layer without a
    bias only gets the std. All in one `run()`: a forward hook rescales the layer and hands the layers above it the
    output its new weights give, (out - m) / s + b0, so each layer is measured on the initialised layers below it.
    Returns every layer's pre-activation statistics after the step, in `layers` order.
    """
    _check_layers(layers)
    fresh_ids = {id(layer) for layer in fresh}
    unknown = fresh_ids - {id(layer) for layer in layers}
    if unknown:
        raise ValueError(f"{len(unknown)} module(s) in `fresh` are not among `layers`: every fresh layer must be listed")
    for layer in layers:
        if id(layer) in fresh_ids:
            weight = layer.weight
            weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype).to(weight.device))
            if layer.bias is not None:
                layer.bias.zero_()
    calls: list[int] = []
    stats: list[PreactivationStats | None] = [None] * len(layers)

    def make_hook(index: int):
        def init_and_measure(module, _inputs, out):
            calls.append(index)
            if stats[index] is not None:  # called twice: refused by _check_called_in_order after the run
                return None
            mean, std = _channel_mean_std(out, module)  # (C,), (C,): read before any in-place ReLU after the layer
            is_fresh = id(module) in fresh_ids
            if is_fresh:
                std = std.clamp_min(eps)
                module.weight.div_(_channel_view(module, std))
                channel_shape = (1, -1) + (1,) * (out.dim() - 2) if isinstance(module, nn.Conv2d) else (-1,)
                if module.bias is not None:
                    module.bias.copy_(b0 - mean / std)
                    out = (out - mean.view(channel_shape)) / std.view(channel_shape) + b0  # what the new weights give
                else:
                    out = out / std.view(channel_shape)
                mean, std = _channel_mean_std(out, module)
            stats[index] = PreactivationStats(mean=mean.mean().item(), std=std.mean().item(), std_min=std.min().item(),
                                              std_max=std.max().item(), fresh=is_fresh)
            return out if is_fresh else None
        return init_and_measure

    hooks = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        _run_calibration(run, layers[0].weight.device)
    finally:
        for hook in hooks:
            hook.remove()
    _check_called_in_order(calls, len(layers))
    return stats


def between_layer_rescale_(layers: Sequence[nn.Module], run: Callable[[], torch.Tensor], iterations: int = 10,
                           tol: float = 0.01, output_grad: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> RatioCalibration:
    """Equalise r_k = sqrt(mean(dL/dW_k ^2) / mean(W_k ^2)) over the layers (the reference's `calibrateGradientRatio`).

    The top signal is a fixed Gaussian output gradient: L = <g, run()> with g ~ N(0, 1) of the output's shape, drawn
    once (from `generator`, else the global RNG) unless `output_grad` gives it. (The reference draws a new g every
    iteration; holding it fixed makes r a deterministic function of the weights, so the iteration converges exactly.)
    Each iteration sets the target t = geometric mean of the r_k times the output std ^ (1 / number of layers), as the
    reference does, and multiplies layer k's weight and bias by s_k = sqrt(r_k / t); the bias is also multiplied by
    the change in the layer's input scale (mean |input|), which keeps a ReLU/max-pool network's function the same up
    to a positive factor. For such a network r_k becomes P t for every k after one update (P the product of the s_k);
    layers that are not positively homogeneous are corrected by the further iterations. Stops when
    max r / min r - 1 < `tol` or after `iterations` updates; the ratios returned are measured on the final weights.
    `dL/dW` is computed with `torch.autograd.grad`, so no parameter's `.grad` is touched.
    """
    _check_layers(layers)
    device = layers[0].weight.device
    weights = [layer.weight for layer in layers]
    requires_grad = [w.requires_grad for w in weights]
    pending: list[float] | None = None  # the s_k to apply during the next forward pass
    input_scale: list[float] = [math.nan] * len(layers)  # mean |input| of each layer at its last update
    calls: list[int] = []

    def make_pre_hook(index: int):
        def rescale_before_use(module, inputs):
            calls.append(index)
            if calls.count(index) > 1:  # a shared layer: refused by _check_called_in_order after the run
                return
            scale = torch.mean(inputs[0].detach().abs(), dtype=torch.float64).item()  # reference: mean |bottom|
            with torch.no_grad():
                if pending is not None:
                    module.weight.mul_(pending[index])
                    if module.bias is not None:  # the input changed by scale/input_scale: carry it into the bias
                        module.bias.mul_(pending[index] * scale / input_scale[index])
            input_scale[index] = scale
        return rescale_before_use

    hooks = [layer.register_forward_pre_hook(make_pre_hook(i)) for i, layer in enumerate(layers)]
    history: list[list[float]] = []
    output_stds: list[float] = []
    updates = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        while True:
            calls.clear()
            with torch.enable_grad():
                out = _run_calibration(run, device)  # applies `pending`, layer by layer, through the pre-hooks
                _check_called_in_order(calls, len(layers))
                if output_grad is None:
                    output_grad = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
                grads = torch.autograd.grad(out, weights, grad_outputs=output_grad)
            pending = None
            ratios = []
            for index, (w, g) in enumerate(zip(weights, grads)):
                w_sq, g_sq = w.detach().pow(2).mean().item(), g.pow(2).mean().item()
                if w_sq == 0 or g_sq == 0:
                    raise ValueError(f"layer {index} has {'zero weights' if w_sq == 0 else 'a zero gradient'}: "
                                     "give zero-initialised layers the within-layer init (list them in `fresh`) first")
                ratios.append(math.sqrt(g_sq / w_sq))
            history.append(ratios)
            flat = out.detach().movedim(1, -1).reshape(-1, out.shape[1]) if out.dim() > 1 else out.detach()[:, None]
            output_stds.append(flat.std(dim=0, correction=0).mean().item())  # (N, C) -> channel stds, averaged
            if ratio_spread(ratios) < tol or updates == iterations:
                break
            log_target = sum(map(math.log, ratios)) / len(ratios) + math.log(output_stds[-1]) / len(ratios)
            pending = [math.sqrt(r / math.exp(log_target)) for r in ratios]
            updates += 1
    finally:
        for hook in hooks:
            hook.remove()
        for w, flag in zip(weights, requires_grad):
            w.requires_grad_(flag)
    return RatioCalibration(ratios_before=history[0], ratios_after=history[-1], updates=updates,
                            output_factor=output_stds[-1] / output_stds[0])


def krahenbuhl_rescale_(layers: Sequence[nn.Module], run: Callable[[], torch.Tensor], fresh: Collection[nn.Module],
                        b0: float = 0.1, iterations: int = 10, tol: float = 0.01,
                        generator: torch.Generator | None = None) -> RescaleReport:
    """Krähenbühl et al.'s full protocol: the within-layer init of `fresh`, then the between-layer rescaling of all.

    `layers`: every Conv2d/Linear of the network in forward order; `run()`: the network's output on the calibration
    batch, evaluated in eval mode. Returns both steps' measurements.
    """
    within = within_layer_init_(layers, run, fresh, b0=b0, generator=generator)
    between = between_layer_rescale_(layers, run, iterations=iterations, tol=tol, generator=generator)
    return RescaleReport(within=within, between=between)
