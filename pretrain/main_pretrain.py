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
import time
from contextlib import ExitStack
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
    remove_temporary_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from pretrain.config import field
from pretrain.data import (
    OBJECT_CONTEXT,
    check_images_readable,
    image_paths,
    open_labelled_images,
    open_pretraining_images,
    skip_none_collate,
)
from pretrain.dataset import InpaintingDataset, StreamSampler
from pretrain.distributed import all_reduce_mean, broadcast_from_main, init_distributed, is_main_process
from pretrain.engine import evaluate, save_sample_grid, train_step
from pretrain.errors import UserError, run_cli
from pretrain.health import context_encoder_health, format_health
from pretrain.hub import build_generator
from pretrain.masks import MASK_TYPES, shapes_from_segmentations
from pretrain.models import Discriminator, build_encoder
from pretrain.precision import AMP_CHOICES, AMP_HELP, resolve_amp
from pretrain.run_folder import claim_run_folder, config_changes
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
    lambda_adv: float = field(0.0, "weight of the adversarial loss; 0, the paper's recipe for AlexNet features: "
                                   "reconstruction only, no discriminator (the paper's inpainting runs use 0.001)")
    lr: float = field(1e-3, "Adam learning rate of the generator (the context encoder)")
    supervised_crops: bool = field(True, "--objective supervised on a VOC-layout set ('builtin' included): every "
                                         "object's box (with some context) is an image labelled with its class, an "
                                         "object-centric set as ImageNet is; false: whole images with their image labels")
    supervised_max_context: float = field(OBJECT_CONTEXT, "with --supervised-crops, each training crop's side is drawn "
                                               "log-uniformly from 1.3 to this many times the object's longer side, "
                                               "the object placed at random inside it (1.3: every crop centred at "
                                               "1.3x; held-out crops stay centred at 1.3x)")
    supervised_centred_steps: int = field(0, "with --supervised-max-context: train on centred 1.3x crops for "
                                             "about this many steps first (rounded up to whole passes over the "
                                             "crops), then on drawn ones")
    supervised_lr: float = field(1e-4, "Adam learning rate of --objective supervised (--lr is the context "
                                       "encoder's)")
    lr_d_ratio: float = field(0.1, "discriminator lr = lr x this (paper: generator 10x the discriminator)")
    lr_schedule: str = field("constant", "constant (the paper's) or cosine (both lrs decay to 0 over --steps)",
                             choices=("constant", "cosine"))
    beta1: float = field(0.5, "Adam beta1")
    batch_size: int = field(64, "global batch size (split evenly over DDP processes)")
    steps: int = field(380, "optimiser steps in total (a resumed run continues up to this)")
    stop_at: int = field(0, "end this invocation after this many steps (0: --steps) without changing the lr schedule, "
                            "so a later --resume continues exactly the same run (e.g. in time-limited job slots)")
    dropout: float = field(0.5, "dropout on the channel-wise FC layer")
    crop_size: int = field(227, "training crop (227 for alexnet; inpaint128 always uses 128)")
    resize: int = field(256, "short side the images are resized to before cropping (aspect kept)")
    amp: str = field("auto", AMP_HELP + ", or fp16 (CUDA, with a grad scaler)", choices=(*AMP_CHOICES, "fp16"))
    channels_last: bool = field(True, "NHWC memory layout (faster convolutions with oneDNN and cuDNN)")
    workers: int = field(2, "data loader processes")
    seed: int = field(0, "seed for weights, data order, crops and masks")
    device: str = field("auto", "auto, cpu or cuda")
    log_every: int = field(10, "steps between metrics.csv rows")
    ckpt_every: int = field(100, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = field(3, "how many checkpoints to keep")
    eval_images: int = field(256, "held-out images used for L1/L2/PSNR (0: the whole held-out split)")
    resume: bool = field(False, "continue from the newest readable checkpoint in the run folder, with the options it "
                                "was started with; only --steps (not with --lr-schedule cosine), --stop-at, --log-every, "
                                "--ckpt-every, --keep-checkpoints, --workers, --device, --channels-last, --eval-images, "
                                "--strict-images, --data-cache and --output-dir may differ")
    overwrite: bool = field(False, "start over in a run folder that holds an earlier run, after moving that run "
                                   "aside to <name>.replaced-<date>-<time>")
    strict_images: bool = field(False, "stop at the first unreadable training image instead of skipping and counting "
                                       "it (held-out images are always checked before the first step)")


# Options a --resume may change (--resume's help lists them too): when to stop, how often to log and save, how
# the data is loaded, where and how fast it runs, how much is evaluated. Any other option changes what the
# continued steps compute, so the result would match neither the old options nor the new ones. With the cosine
# schedule --steps sets every step's lr.
RESUMABLE_CHANGES = frozenset({
    "name", "output_dir", "data_cache", "steps", "stop_at", "log_every", "ckpt_every", "keep_checkpoints",
    "workers", "device", "channels_last", "eval_images", "strict_images", "resume", "overwrite",
})


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss, the weights or the held-out metrics became NaN or infinite; the last good checkpoint is kept."""


def build_models(cfg: PretrainConfig) -> tuple[nn.Module, nn.Module | None]:
    """The generator and, when the adversarial loss is on, its discriminator; for the supervised objective, the
    classifier (no discriminator)."""
    if cfg.objective == "supervised":
        classes = open_labelled_images(cfg.data, cfg.data_cache or None, cfg.builtin_images,
                                       object_crops=cfg.supervised_crops).classes
        return SupervisedClassifier(build_encoder(cfg.encoder), classes, cfg.crop_size, cfg.dropout), None
    generator = build_generator(dataclasses.asdict(cfg))  # the one builder checkpoints are loaded back with
    # built even when unused (lambda_adv 0): the RNG stream after it, hence dropout masks, does not depend on lambda_adv
    if cfg.model == "inpaint128":
        discriminator = Discriminator()  # four 4x4/2 convs, then the 4x4 conv to one logit, on the 64x64 patch
    else:
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
                                    strict=cfg.strict_images, object_crops=cfg.supervised_crops,
                                    max_context=cfg.supervised_max_context)
    _check_held_out(cfg, labelled.held_out)
    common = {"crop_size": cfg.crop_size, "resize": max(cfg.resize, cfg.crop_size), "seed": cfg.seed}
    centred_epochs = math.ceil(cfg.supervised_centred_steps * cfg.batch_size / len(labelled.train))
    return (LabelledCropDataset(labelled.train, train=True, centred_epochs=centred_epochs, **common),
            LabelledCropDataset(labelled.held_out, train=False, **common))


def _check_held_out(cfg: PretrainConfig, val_images) -> None:
    """Training skips an unreadable image and counts it; evaluation may not: every evaluation of a run (and of
    the runs it is compared with) must score the same images."""
    n_eval = min(cfg.eval_images, len(val_images)) if cfg.eval_images else len(val_images)
    check_images_readable(image_paths(val_images)[:n_eval], "held-out images",
                          "re-encode or replace them, or remove them from the held-out split (the val list of a "
                          "VOC root; for an image folder, every 20th file); held-out images are never skipped.")


def _inpainting_sets(cfg: PretrainConfig) -> tuple[InpaintingDataset, InpaintingDataset]:
    train_images, val_images, label_maps = open_pretraining_images(
        cfg.data, cache_dir=cfg.data_cache or None, builtin_images=cfg.builtin_images, strict=cfg.strict_images)
    _check_held_out(cfg, val_images)
    crop, mask, fraction = effective_masking(cfg)
    # Random regions take object silhouettes from the data's own masks when it has them (paper: VOC shapes).
    shapes = shapes_from_segmentations(label_maps) if mask == "random_region" and label_maps else None
    common = {"crop_size": crop, "resize": max(cfg.resize, crop), "mask": mask, "fraction": fraction, "seed": cfg.seed,
              "shapes": shapes}
    return InpaintingDataset(train_images, train=True, **common), InpaintingDataset(val_images, train=False, **common)


def main(cfg: PretrainConfig) -> dict[str, float]:
    if cfg.batch_size <= 0 or cfg.steps < 0:
        raise UserError("--batch-size must be positive and --steps non-negative")
    retain_freed_memory()  # each step reuses the last step's freed tensors instead of page-faulting new ones
    rank, world_size, device = init_distributed()
    if cfg.device != "auto" and torch.device(cfg.device).type != device.type:
        device = torch.device(cfg.device)  # a type change only: under torchrun each rank keeps its own GPU index
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
    if cfg.objective == "supervised" and cfg.model != "alexnet":
        raise UserError(f"--objective supervised trains --model alexnet's trunk, not {cfg.model}; "
                        f"drop --model or pass --model alexnet")
    if cfg.supervised_centred_steps < 0:
        raise UserError(f"--supervised-centred-steps {cfg.supervised_centred_steps} is negative; pass 0 or more")
    if cfg.supervised_max_context < OBJECT_CONTEXT:
        raise UserError(f"--supervised-max-context {cfg.supervised_max_context} is below the fixed crops' "
                        f"{OBJECT_CONTEXT}; pass {OBJECT_CONTEXT} (centred crops) or more")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on a CPU use --amp auto, bf16 or none")
    # before the resume check: a run folder records what was computed, never 'auto'
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, device))
    run_dir = Path(cfg.output_dir) / cfg.name
    main_proc = is_main_process()
    with ExitStack() as run_folder:
        failure = None
        if main_proc:  # only rank 0 writes the run folder, so only it owns it
            try:
                moved_to = run_folder.enter_context(claim_run_folder(run_dir, cfg.resume, cfg.overwrite))
                if moved_to is not None:
                    print(f"moved the earlier run in {run_dir} to {moved_to}")
                for path in remove_temporary_checkpoints(run_dir):
                    print(f"removed {path.name}, left by a checkpoint write that was killed midway")
                stored = run_dir / "config.json"
                if cfg.resume and stored.is_file():
                    check_resumable(cfg, _read_config(stored), stored)
            except UserError as err:
                failure = err
        # The other ranks stop too, instead of waiting for rank 0 in the first collective.
        message = broadcast_from_main(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise UserError(message)
        return _train(cfg, run_dir, rank, world_size, device)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err}); --resume compares the options with it. Restore it from a backup, "
                        f"or start a new run (another --name, or --overwrite).") from err


def check_resumable(cfg: PretrainConfig, stored: dict, source: Path) -> None:
    """UserError listing every option that differs from the stored run's (`source`: its config.json or
    checkpoint), except those a resume may change (RESUMABLE_CHANGES)."""
    allowed = RESUMABLE_CHANGES - ({"steps"} if cfg.lr_schedule == "cosine" else set())
    changes = config_changes(stored, dataclasses.asdict(cfg), allowed, dataclasses.asdict(PretrainConfig()))
    if changes:
        why = " (with --lr-schedule cosine, --steps sets every step's lr)" if any(
            c.startswith("steps:") for c in changes) else ""
        raise UserError(f"--resume with other options than the run was made with ({source}): {'; '.join(changes)}"
                        f"{why}. Continue it with its own options, or start a new run: another --name, or --overwrite.")


START_AGAIN = "Start a new run (another --name, or --overwrite) with a lower --lr, or with --amp none."


def _diverged(what: str, last_good: Path | None) -> TrainingDivergedError:
    kept = f"the last good checkpoint, {last_good}, is kept" if last_good else "there is no earlier checkpoint"
    return TrainingDivergedError(f"{what}. Stopped; {kept}. {START_AGAIN}")


def _non_finite_parameters(*modules: nn.Module | None) -> list[str]:
    return [name for m in modules if m is not None for name, p in _unwrap(m).named_parameters()
            if not torch.isfinite(p).all()]


def _train(cfg: PretrainConfig, run_dir: Path, rank: int, world_size: int, device: torch.device) -> dict[str, float]:
    main_proc = is_main_process()
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

    start_step, skipped, last_good = 0, 0, None
    if cfg.resume:
        found = load_latest_checkpoint(run_dir)  # a UserError when there are checkpoints but none is readable
        if found is None:
            if main_proc:
                print(f"--resume: no checkpoint in {run_dir} yet, starting at step 0")
        else:
            ckpt, path = found
            check_resumable(cfg, ckpt.get("config", {}), path)
            last_good = path
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
    try:
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
                raise _diverged(f"step {step + 1}: {err}", last_good) from err
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
                # A finite loss can still leave non-finite weights (an lr so large the update overflows). Every
                # rank checks, as DDP keeps their weights equal, so all ranks stop together.
                diverged = _non_finite_parameters(model, disc)
                if diverged:
                    raise _diverged(f"after step {done} the weights are not finite ({', '.join(diverged[:3])}"
                                    f"{', ...' if len(diverged) > 3 else ''}), so no checkpoint was written for it",
                                    last_good)
                last_good = checkpoint(done) or last_good
    finally:
        progress.close()  # the bar's last line comes before an error message, not after it
    if start_step >= end_step and main_proc:
        print(f"nothing to train: the run is already at step {start_step} of {cfg.steps} (raise --steps to go on)")

    results: dict[str, float] = {}
    if main_proc and cfg.objective == "supervised":
        results = evaluate_classifier(model, val_loader, device, cfg.amp)
        results.update(step=max(start_step, end_step), train_minutes=(time.time() - start) / 60, skipped_images=skipped)
        held_out = next(b for b, _ in val_loader if b is not None)
        health = context_encoder_health(model, held_out["input"].to(device), seed=cfg.seed)
        (run_dir / "eval.json").write_text(json.dumps({**results, "feature_health": health}, indent=2))
        print(f"held-out ({results['images']} images): mAP {100 * results['map']:.1f}% "
              f"(chance {100 * results['chance_map']:.1f}%), loss {results['loss']:.3f}")
        print(format_health(health))
    elif main_proc:
        results = evaluate(model, val_loader, device, cfg.amp)
        results.update(step=max(start_step, end_step), train_minutes=(time.time() - start) / 60, skipped_images=skipped)
        overflowed = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
        if overflowed:  # JSON has no NaN or infinity; a reader would choke on the file or average a NaN in
            raise TrainingDivergedError(f"after step {results['step']} the held-out {', '.join(overflowed)} are not "
                                        f"finite (the model's outputs overflow); eval.json was not written. {START_AGAIN}")
        held_out = next(b for b, _ in val_loader if b is not None)
        health = context_encoder_health(model, held_out["target"].to(device), seed=cfg.seed)  # unmasked images
        (run_dir / "eval.json").write_text(json.dumps({**results, "feature_health": health} if health else results,
                                                      indent=2, allow_nan=False))
        sample = {k: v[:8] for k, v in held_out.items()}
        save_sample_grid(model, sample, run_dir / "samples" / f"step-{results['step']:08d}.png", device, cfg.amp)
        print(f"held-out ({n_val if not cfg.eval_images else min(n_val, cfg.eval_images)} images, over the hole): "
              f"L1 {100 * results['l1']:.2f}%  L2 {100 * results['l2']:.2f}%  PSNR {results['psnr']:.2f} dB | "
              f"mean-colour fill: L1 {100 * results['mean_fill_l1']:.2f}%  L2 {100 * results['mean_fill_l2']:.2f}%  "
              f"PSNR {results['mean_fill_psnr']:.2f} dB")
        print(format_health(health) if health else f"feature health: AlexNet trunks only, skipped for {cfg.model}/{cfg.encoder}")
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
    return run_cli(main, PretrainConfig, argv, description=__doc__ or "")
