"""The fine-tuning loop every task shares (after MAE's engine_finetune.py): one optimiser, one lr schedule, one
epoch loop with autocast, clipping and DDP loss averaging. A task gives only its model and a `loss_fn`.

Within a task every start gets exactly this treatment; only the task's config (epochs, lr, ...) sets it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pretrain.distributed import all_reduce_mean
from transfer.experiment import FinetuneConfig, every_rank, global_count, print0

# loss_fn(model, batch, device) -> the batch's scalar loss, or None when the batch holds nothing to learn from
# (e.g. a segmentation crop with no labelled pixel). It runs under the engine's autocast.
LossFn = Callable[[nn.Module, Any, torch.device], "torch.Tensor | None"]


def autocast(device: torch.device, amp: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def make_optimizer(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weights, not on biases (one rule for every layer of every task)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum,
                           fused=device.type in ("cpu", "cuda"))  # one kernel per step instead of a loop


@dataclass
class Schedule:
    """Linear warm-up from lr/100 (at most a fifth of the run, so short runs reach the full rate), then cosine
    decay to 0: a pure function of the global step."""

    lr: float
    total_steps: int
    warmup_steps: int

    @classmethod
    def for_run(cls, cfg: FinetuneConfig, steps_per_epoch: int) -> Schedule:
        total = cfg.epochs * steps_per_epoch
        return cls(cfg.lr, total, min(round(cfg.warmup_epochs * steps_per_epoch), total // 5))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (0.01 + 0.99 * step / self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    """Where the loop stands: the global step, and per-epoch (loss, images/s) history."""

    step: int = 0
    skipped_images: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, schedule: Schedule,
                    loss_fn: LossFn, state: TrainState, cfg: FinetuneConfig, device: torch.device, epoch: int) -> float:
    """One pass over `loader` (batches from `skip_none_collate`: `(batch or None, n_skipped)`); returns the mean
    loss over every rank's steps and appends it to `state.history`.

    Ranks skip a step together (a rank with no readable image, or no labelled pixel, would otherwise leave the
    others waiting in the gradient all-reduce). A non-finite loss stops the run.
    """
    model.train()
    loss_sum, loss_n, seen, skipped = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for batch, n_skipped in loader:
        skipped += n_skipped
        if not every_rank(batch is not None, device):
            continue
        for group in optimizer.param_groups:
            group["lr"] = schedule(state.step)
        with autocast(device, cfg.amp):
            loss = loss_fn(model, batch, device)
        if not every_rank(loss is not None, device):
            state.step += 1
            continue
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {state.step + 1}: the training loss is {loss.item()}; lower --lr "
                                     f"(now {cfg.lr}) or use --amp none")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        state.step += 1
        loss_sum += loss.item()
        loss_n += 1
        seen += len(batch[0])
    mean_loss = all_reduce_mean(loss_sum / max(loss_n, 1), device)  # identities without torchrun
    seen, skipped = global_count(seen, device), global_count(skipped, device)
    state.skipped_images += skipped
    rate = seen / max(time.perf_counter() - t0, 1e-9)
    state.history.append({"epoch": epoch + 1, "loss": mean_loss, "images_per_s": round(rate, 1)})
    print0(f"epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f} ({rate:.0f} img/s)", flush=True)
    return mean_loss


def fit(model: nn.Module, train_model: nn.Module, loader: DataLoader, loss_fn: LossFn, cfg: FinetuneConfig,
        device: torch.device, set_epoch: Callable[[int], None] | None = None) -> TrainState:
    """The whole fine-tuning: `cfg.epochs` epochs of `train_one_epoch` on `train_model` (the model, or its DDP
    wrapper), optimising `model`'s parameters. `set_epoch(epoch)` re-seeds samplers and augmentation."""
    optimizer = make_optimizer(model, cfg, device)
    schedule = Schedule.for_run(cfg, len(loader))
    state = TrainState()
    for epoch in range(cfg.epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        train_one_epoch(train_model, loader, optimizer, schedule, loss_fn, state, cfg, device, epoch)
    return state
