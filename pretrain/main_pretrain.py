"""Pretrain a context encoder: `python -m pretrain [--flag value ...]` (`--help` lists every option).

Writes `runs/<name>/`: config.json, checkpoint-*.pth, metrics.csv, samples/*.png, eval.json.
`--objective supervised` trains the same trunk on image labels instead (the positive control; no samples/).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pretrain.allocator import retain_freed_memory
from pretrain.checkpoint import (
    capture_rng_state,
    load_latest_checkpoint,
    load_state_dict_checked,
    restore_rng_state,
    save_checkpoint,
)
from pretrain.config import field, parse_config
from pretrain.data import open_labelled_images, open_pretraining_images, skip_none_collate
from pretrain.dataset import InpaintingDataset, StreamSampler
from pretrain.distributed import all_reduce_mean, init_distributed, is_main_process
from pretrain.engine import evaluate, save_sample_grid, train_step
from pretrain.inpaint128 import build_inpaint128
from pretrain.masks import MASK_TYPES, shapes_from_segmentations
from pretrain.models import ContextEncoder, Discriminator, build_encoder
from pretrain.supervised import LabelledCropDataset, SupervisedClassifier, evaluate_classifier, supervised_train_step


@dataclass
class PretrainConfig:
    """Every option of a pretraining run; written to runs/<name>/config.json."""

    name: str = field("default", "run name: outputs go to <output_dir>/<name>/")
    objective: str = field("inpainting", "inpainting: the context encoder; supervised: the same trunk + fc6/fc7 (4096, "
                                         "ReLU, dropout) + a linear head, trained with binary cross-entropy on image "
                                         "labels (the positive control). Supervised data: 'builtin' is a second "
                                         "generated set with no image in common with the evaluation set; a VOC root "
                                         "gives its classification labels; an image folder, its subfolder names",
                           choices=("inpainting", "supervised"))
    output_dir: str = field("runs", "parent folder of run folders")
    data: str = field("builtin", "'builtin' (generated VOC-layout scenes), a VOC root, or a folder of images")
    data_cache: str = field("", "where the built-in data is generated (default: $CTXENC_DATA_CACHE or ~/.cache/ctxenc)")
    builtin_images: int = field(2000, "size of the built-in dataset")
    model: str = field("alexnet", "alexnet: feature-learning net (227 px); inpaint128: semantic inpainting (128 px)",
                       choices=("alexnet", "inpaint128"))
    encoder: str = field("alexnet", "trunk for model=alexnet: alexnet, alexnet-poolfree, alexnet-torchvision, timm:<name>")
    mask: str = field("random_region", "which pixels to drop", choices=MASK_TYPES)
    mask_fraction: float = field(0.25, "fraction of the image dropped (paper: at most 1/4)")
    overlap: int = field(7, "width in px of the context band around the hole that the loss also scores")
    overlap_weight: float = field(10.0, "L2 weight of that band relative to the hole")
    lambda_rec: float = field(0.999, "weight of the reconstruction loss")
    lambda_adv: float = field(0.001, "weight of the adversarial loss (0: reconstruction only, no discriminator)")
    lr: float = field(1e-3, "Adam learning rate of the generator (the context encoder)")
    supervised_lr: float = field(1e-4, "Adam learning rate of --objective supervised (at 1e-3 the classifier's loss "
                                       "jumped above its starting value within 10 steps and never left the class-prior "
                                       "level in 160)")
    lr_d_ratio: float = field(0.1, "discriminator lr = lr x this (paper: generator 10x the discriminator)")
    lr_schedule: str = field("constant", "constant (the paper's) or cosine (both lrs decay to 0 over --steps; on the "
                                         "default 2-CPU budget it ended worse: held-out L1 13.3% at step 330, the "
                                         "constant lr 12.5% at 300)",
                             choices=("constant", "cosine"))
    beta1: float = field(0.5, "Adam beta1")
    batch_size: int = field(64, "global batch size (split evenly over DDP processes)")
    steps: int = field(380, "optimiser steps in total (a resumed run continues up to this)")
    stop_at: int = field(0, "end this invocation after this many steps (0: --steps) without changing the lr schedule, "
                            "so a later --resume continues exactly the same run (e.g. in time-limited job slots)")
    dropout: float = field(0.5, "dropout on the channel-wise FC layer")
    crop_size: int = field(227, "training crop (227 for alexnet; inpaint128 always uses 128)")
    resize: int = field(256, "short side the images are resized to before cropping (aspect kept)")
    amp: str = field("bf16", "mixed precision: none, bf16 (CPU or CUDA) or fp16 (CUDA, with a grad scaler)",
                     choices=("none", "bf16", "fp16"))
    channels_last: bool = field(True, "NHWC memory layout (faster convolutions with oneDNN and cuDNN)")
    workers: int = field(2, "data loader processes")
    seed: int = field(0, "seed for weights, data order, crops and masks")
    device: str = field("auto", "auto, cpu or cuda")
    log_every: int = field(10, "steps between metrics.csv rows")
    ckpt_every: int = field(100, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = field(3, "how many checkpoints to keep")
    eval_images: int = field(256, "held-out images used for L1/L2/PSNR (0: the whole held-out split)")
    resume: bool = field(False, "continue from the newest readable checkpoint in the run folder")
    strict_images: bool = field(False, "stop at the first unreadable image instead of skipping and counting it")


def build_models(cfg: PretrainConfig) -> tuple[nn.Module, nn.Module | None]:
    """The generator and, when the adversarial loss is on, its discriminator; for the supervised objective, the
    classifier (no discriminator)."""
    if cfg.objective == "supervised":
        if cfg.model != "alexnet":
            raise ValueError(f"--objective supervised trains --model alexnet's trunk, not {cfg.model}")
        classes = open_labelled_images(cfg.data, cfg.data_cache or None, cfg.builtin_images).classes
        return SupervisedClassifier(build_encoder(cfg.encoder), classes, cfg.crop_size, cfg.dropout), None
    if cfg.model == "inpaint128":
        generator, discriminator = build_inpaint128()
    else:
        generator = ContextEncoder(build_encoder(cfg.encoder), cfg.crop_size, cfg.dropout)
        discriminator = Discriminator((32, 64, 128, 256))  # half the paper's widths: a 0.001-weighted loss
    return generator, (discriminator if cfg.lambda_adv > 0 else None)


def effective_masking(cfg: PretrainConfig) -> tuple[int, str, float]:
    """(crop size, mask kind, fraction): inpaint128 predicts the centre 64x64 of 128x128, so its dropped hole
    is that patch minus the overlap band, and the band is the rest of the predicted patch."""
    if cfg.model == "inpaint128":
        return 128, "center", ((64 - 2 * cfg.overlap) / 128) ** 2
    return cfg.crop_size, cfg.mask, cfg.mask_fraction


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """The learning rate of the generator (or, for the supervised objective, the classifier) for optimiser step
    `step` (0-based): a pure function of the step, so a resumed run follows the same schedule."""
    base = cfg.supervised_lr if cfg.objective == "supervised" else cfg.lr
    if cfg.lr_schedule == "constant" or cfg.steps <= 0:
        return base
    return 0.5 * base * (1 + math.cos(math.pi * step / cfg.steps))


def build_data(cfg: PretrainConfig, rank: int, world_size: int, start_step: int):
    if cfg.objective == "supervised":
        train_set, val_set = _labelled_sets(cfg)
    else:
        train_set, val_set = _inpainting_sets(cfg)
    if cfg.eval_images and len(val_set) > cfg.eval_images:
        val_set = torch.utils.data.Subset(val_set, range(cfg.eval_images))
    per_rank = cfg.batch_size // world_size
    sampler = StreamSampler(len(train_set), seed=cfg.seed, start=start_step * cfg.batch_size, rank=rank,
                            world_size=world_size)
    # The loader's own generator keeps its worker seeding off the global RNG, which dropout uses:
    # otherwise creating the iterator after a resume would shift every later dropout mask.
    train_loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                              collate_fn=skip_none_collate, persistent_workers=cfg.workers > 0, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed), prefetch_factor=4 if cfg.workers else None)
    val_loader = DataLoader(val_set, batch_size=min(64, per_rank), shuffle=False, num_workers=0,
                            collate_fn=skip_none_collate)
    return train_loader, val_loader, len(train_set), len(val_set)


def _labelled_sets(cfg: PretrainConfig) -> tuple[LabelledCropDataset, LabelledCropDataset]:
    labelled = open_labelled_images(cfg.data, cache_dir=cfg.data_cache or None, builtin_images=cfg.builtin_images,
                                    strict=cfg.strict_images)
    common = {"crop_size": cfg.crop_size, "resize": max(cfg.resize, cfg.crop_size), "seed": cfg.seed}
    return (LabelledCropDataset(labelled.train, train=True, **common),
            LabelledCropDataset(labelled.held_out, train=False, **common))


def _inpainting_sets(cfg: PretrainConfig) -> tuple[InpaintingDataset, InpaintingDataset]:
    train_images, val_images, label_maps = open_pretraining_images(
        cfg.data, cache_dir=cfg.data_cache or None, builtin_images=cfg.builtin_images, strict=cfg.strict_images)
    crop, mask, fraction = effective_masking(cfg)
    # Random regions take object silhouettes from the data's own masks when it has them (paper: VOC shapes).
    shapes = shapes_from_segmentations(label_maps) if mask == "random_region" and label_maps else None
    common = {"crop_size": crop, "resize": max(cfg.resize, crop), "mask": mask, "fraction": fraction, "seed": cfg.seed,
              "shapes": shapes}
    return InpaintingDataset(train_images, train=True, **common), InpaintingDataset(val_images, train=False, **common)


def main(cfg: PretrainConfig) -> dict[str, float]:
    if cfg.batch_size <= 0 or cfg.steps < 0:
        raise ValueError("--batch-size must be positive and --steps non-negative")
    retain_freed_memory()  # each step reuses the last step's freed tensors instead of page-faulting new ones
    rank, world_size, device = init_distributed()
    if cfg.device != "auto" and torch.device(cfg.device).type != device.type:
        device = torch.device(cfg.device)  # a type change only: under torchrun each rank keeps its own GPU index
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on a CPU use --amp bf16 or none")
    run_dir = Path(cfg.output_dir) / cfg.name
    main_proc = is_main_process()
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, disc = build_models(cfg)
    model.to(device)
    if disc is not None:
        disc.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if disc is not None:
            disc.to(memory_format=torch.channels_last)
    fused = device.type in ("cpu", "cuda")  # one fused kernel per step instead of a loop over 71M params
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=fused)
    opt_d = (torch.optim.Adam(disc.parameters(), lr=cfg.lr * cfg.lr_d_ratio, betas=(cfg.beta1, 0.999), fused=fused)
             if disc is not None else None)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_step, skipped = 0, 0
    if cfg.resume:
        found = load_latest_checkpoint(run_dir)
        if found is None:
            print(f"--resume: no checkpoint in {run_dir}, starting from scratch", file=sys.stderr)
        else:
            ckpt, path = found
            load_state_dict_checked(model, ckpt["model"], str(path))
            if disc is not None and ckpt.get("discriminator") is not None:
                load_state_dict_checked(disc, ckpt["discriminator"], str(path))
            opt_g.load_state_dict(ckpt["opt_g"])
            if opt_d is not None and ckpt.get("opt_d") is not None:
                opt_d.load_state_dict(ckpt["opt_d"])
            scaler.load_state_dict(ckpt["scaler"])
            restore_rng_state(ckpt["rng"])
            start_step, skipped = ckpt["step"], ckpt.get("skipped_images", 0)
            if main_proc:
                print(f"resumed from {path} at step {start_step}")

    train_loader, val_loader, n_train, n_val = build_data(cfg, rank, world_size, start_step)
    ddp_model = model
    if world_size > 1 and device.type == "cuda":  # BatchNorm in D and inpaint128 sees the global batch
        model, disc = (nn.SyncBatchNorm.convert_sync_batchnorm(m) if m is not None else None for m in (model, disc))
        ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if disc is not None:
            disc = nn.parallel.DistributedDataParallel(disc, device_ids=[device.index] if device.type == "cuda" else None)
    if main_proc:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"pretraining {cfg.model}/{cfg.encoder} ({cfg.objective}) on {cfg.data}: {n_train} train / {n_val} "
              f"held-out images, {cfg.steps} steps of {cfg.batch_size}, device {device}, amp {cfg.amp}, {world_size} process(es)")
    metrics_path = run_dir / "metrics.csv"
    loss_fields = ["loss"] if cfg.objective == "supervised" else ["loss", "loss_rec", "loss_adv", "loss_d"]
    fields = ["step", *loss_fields, "images_per_s", "skipped_images"]
    if main_proc:
        _truncate_metrics(metrics_path, fields, start_step)

    def checkpoint(step: int) -> Path | None:
        if not main_proc:
            return None
        state = {"model": model.state_dict(), "discriminator": _unwrap(disc).state_dict() if disc is not None else None,
                 "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict() if opt_d is not None else None,
                 "scaler": scaler.state_dict(), "step": step, "rng": capture_rng_state(),
                 "skipped_images": skipped, "config": dataclasses.asdict(cfg)}
        return save_checkpoint(run_dir, state, step, keep=cfg.keep_checkpoints)

    start = time.time()
    window_images, window_start, window_losses = 0, time.perf_counter(), []
    batches = iter(train_loader)
    end_step = min(cfg.stop_at, cfg.steps) if cfg.stop_at > 0 else cfg.steps
    progress = tqdm(range(start_step, end_step), initial=start_step, total=cfg.steps, disable=not main_proc,
                    dynamic_ncols=True, desc="pretrain")
    last_good = None
    for step in progress:
        batch, n_skipped = next(batches)
        skipped += n_skipped
        if n_skipped and main_proc:
            progress.write(f"skipped {n_skipped} unreadable image(s) at step {step + 1} ({skipped} so far)")
        if batch is None:
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = lr_at(cfg, step)
        for group in opt_g.param_groups:
            group["lr"] = lr
        for group in opt_d.param_groups if opt_d is not None else ():
            group["lr"] = lr * cfg.lr_d_ratio
        if cfg.channels_last:
            batch["input"] = batch["input"].contiguous(memory_format=torch.channels_last)
        try:
            if cfg.objective == "supervised":
                losses = supervised_train_step(ddp_model, batch, opt_g, scaler, cfg.amp, device)
            else:
                losses = train_step(ddp_model, disc, batch, opt_g, opt_d, scaler, cfg.lambda_rec, cfg.lambda_adv,
                                    cfg.overlap, cfg.overlap_weight, cfg.amp, device)
        except FloatingPointError as err:
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise FloatingPointError(f"step {step + 1}: {err}. Stopping; {kept}. Lower --lr or use --amp none.") from err
        window_images += batch["input"].shape[0] * world_size
        window_losses.append(losses)
        done = step + 1
        if done % cfg.log_every == 0 or done == end_step:
            rate = window_images / (time.perf_counter() - window_start)
            row = {k: all_reduce_mean(float(np.mean([w[k] for w in window_losses])), device) for k in loss_fields}
            row.update(step=done, images_per_s=round(rate, 1), skipped_images=skipped)
            if main_proc:
                _append_csv(metrics_path, fields, row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
            window_images, window_start, window_losses = 0, time.perf_counter(), []
        if done % cfg.ckpt_every == 0 or done == end_step:
            last_good = checkpoint(done) or last_good
    progress.close()
    if start_step >= end_step and main_proc:
        print(f"nothing to train: the run is already at step {start_step} of {cfg.steps} (raise --steps to go on)")

    results: dict[str, float] = {}
    if main_proc and cfg.objective == "supervised":
        results = evaluate_classifier(model, val_loader, device, cfg.amp)
        results.update(step=max(start_step, end_step), train_minutes=(time.time() - start) / 60, skipped_images=skipped)
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        print(f"held-out ({results['images']} images): mAP {100 * results['map']:.1f}% "
              f"(chance {100 * results['chance_map']:.1f}%), loss {results['loss']:.3f}")
    elif main_proc:
        results = evaluate(model, val_loader, device, cfg.amp)
        results.update(step=max(start_step, end_step), train_minutes=(time.time() - start) / 60, skipped_images=skipped)
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        sample = next(b for b, _ in val_loader if b is not None)
        sample = {k: v[:8] for k, v in sample.items()}
        save_sample_grid(model, sample, run_dir / "samples" / f"step-{results['step']:08d}.png", device, cfg.amp)
        print(f"held-out ({n_val if not cfg.eval_images else min(n_val, cfg.eval_images)} images, over the hole): "
              f"L1 {100 * results['l1']:.2f}%  L2 {100 * results['l2']:.2f}%  PSNR {results['psnr']:.2f} dB | "
              f"mean-colour fill: L1 {100 * results['mean_fill_l1']:.2f}%  L2 {100 * results['mean_fill_l2']:.2f}%  "
              f"PSNR {results['mean_fill_psnr']:.2f} dB")
    if main_proc:
        if skipped:
            print(f"{skipped} unreadable image(s) were skipped (see the warnings above; --strict-images makes them fatal)")
        print(f"outputs in {run_dir}/")
    return results


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def _append_csv(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})


def _truncate_metrics(path: Path, fields: list[str], step: int) -> None:
    """On resume, drop rows logged after the checkpoint: they will be logged again."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    path.unlink()
    for r in rows:
        _append_csv(path, fields, r)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    return main(parse_config(PretrainConfig, argv, description=__doc__ or ""))
