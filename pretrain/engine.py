"""One training step and the held-out evaluation of a context encoder (the loop lives in main_pretrain.py)."""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from pretrain.dataset import denormalize
from pretrain.errors import UserError
from pretrain.losses import discriminator_loss, generator_adversarial_loss, masked_l2_loss, reconstruction_weights


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CPU or CUDA, fp16 on CUDA (with a GradScaler), or nothing."""
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: nn.Module, discriminator: nn.Module | None, batch: dict[str, torch.Tensor],
               opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler,
               lambda_rec: float, lambda_adv: float, overlap: int, overlap_weight: float,
               amp: str, device: torch.device) -> dict[str, float]:
    """Generator update on L = λrec·Lrec + λadv·Ladv, then (if adversarial) one discriminator update.

    The discriminator looks at the fill once per step and both losses use that one pass, as the official
    code does: the generator's backward computes gradients for the generator's parameters only, the
    discriminator's for its own only. The updates are those of a separate, detached pass for the
    discriminator (tests/test_engine.py), without that pass's cost.
    """
    x_in, mask, target = batch["input"], batch["mask"], batch["target"]  # (B,3,H,W), (B,H,W), (B,3,H,W)
    weights = reconstruction_weights(mask, overlap, overlap_weight)  # (B, 1, H, W)
    adversarial = discriminator is not None and lambda_adv > 0
    disc_view = model.module.discriminator_input if hasattr(model, "module") else model.discriminator_input

    with autocast(device, amp):
        pred = model(x_in)  # (B, 3, H, W)
    loss_rec = masked_l2_loss(pred, target, weights)
    loss_adv = loss_d = torch.zeros((), device=device)
    if adversarial:
        with autocast(device, amp):
            fake_logits = discriminator(disc_view(pred, mask))  # (B,); D sees the fill only, never the context
            real_logits = discriminator(disc_view(target, mask))  # (B,)
        loss_adv = generator_adversarial_loss(fake_logits)
        loss_d = discriminator_loss(real_logits, fake_logits)
    loss = lambda_rec * loss_rec + lambda_adv * loss_adv
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} (rec {loss_rec.item()}, adv {loss_adv.item()})")
    opt_g.zero_grad(set_to_none=True)
    # inputs=: no weight gradients are computed for D here; D's graph is kept for its own backward below.
    scaler.scale(loss).backward(inputs=_trainable(model), retain_graph=adversarial)
    scaler.step(opt_g)
    if adversarial:
        opt_d.zero_grad(set_to_none=True)
        # inputs=: this backward must stop at the fill; the generator's weights it used were just updated.
        scaler.scale(loss_d).backward(inputs=_trainable(discriminator))
        scaler.step(opt_d)
    scaler.update()
    return {"loss": loss.item(), "loss_rec": loss_rec.item(), "loss_adv": loss_adv.item(), "loss_d": loss_d.item()}


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def hole_errors(pred01: torch.Tensor, target01: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """Sums of |e| and e^2 over the hole's pixels (3 channels each), and the number of values summed."""
    m = mask.unsqueeze(1).expand_as(pred01)  # (B, 3, H, W)
    if not m.any():  # autoencoder baseline: the "hole" is the whole image
        m = torch.ones_like(m)
    err = (pred01 - target01)[m]
    return err.abs().sum().item(), err.pow(2).sum().item(), float(err.numel())


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none") -> dict[str, float]:
    """Mean L1, mean L2 (pixels in [0, 1], over the hole) and PSNR on a held-out split.

    PSNR is 10·log10(1 / mean L2) of the split's pooled mean L2 (inf if it is exactly 0). The same
    figures are given for filling the hole with the mean colour of each image's visible context, the
    baseline any inpainting model must beat.
    """
    model.eval()
    sums = {"model": [0.0, 0.0], "mean_fill": [0.0, 0.0]}
    count = 0.0
    for batch, _ in loader:
        if batch is None:
            continue
        x_in, mask, target = (batch[k].to(device) for k in ("input", "mask", "target"))
        with autocast(device, amp):
            pred = model(x_in)
        target01 = denormalize(target)  # (B, 3, H, W)
        pred01 = denormalize(pred.float())
        visible = (~mask).unsqueeze(1).float()  # (B, 1, H, W)
        context_mean = (target01 * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1)
        mean_fill = context_mean.expand_as(target01)  # (B, 3, H, W)
        for name, p in (("model", pred01), ("mean_fill", mean_fill)):
            l1, l2, n = hole_errors(p, target01, mask)
            sums[name][0] += l1
            sums[name][1] += l2
        count += n
    model.train()
    if count == 0:  # every batch was skipped: metrics of 0 error and infinite PSNR would be a lie
        raise UserError("no held-out image could be read, so nothing was evaluated (see the warnings above)")
    out: dict[str, float] = {}
    for name, (l1, l2) in sums.items():
        mse = l2 / max(count, 1.0)
        prefix = "" if name == "model" else "mean_fill_"
        out[prefix + "l1"] = l1 / max(count, 1.0)
        out[prefix + "l2"] = mse
        out[prefix + "psnr"] = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    return out


@torch.no_grad()
def save_sample_grid(model: nn.Module, batch: dict[str, torch.Tensor], path: Path, device: torch.device,
                     amp: str = "none") -> None:
    """Rows of (input with hole | prediction pasted into the hole | original)."""
    model.eval()
    x_in, mask, target = (batch[k].to(device) for k in ("input", "mask", "target"))
    with autocast(device, amp):
        pred = model(x_in).float()
    m = mask.unsqueeze(1)  # (B, 1, H, W)
    holes = denormalize(x_in).masked_fill(m, 1.0)  # white holes so they are visible
    filled = denormalize(torch.where(m, pred, target)) if m.any() else denormalize(pred)
    rows = torch.stack([holes, filled, denormalize(target)], dim=1).flatten(0, 1)  # (3B, 3, H, W)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, path, nrow=3, padding=2, pad_value=1.0)
    model.train()
