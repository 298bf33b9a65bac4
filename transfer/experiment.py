"""What every transfer command shares: its config fields, `setup` (seeding, device and DDP, output folder,
data root), the calibration batch, and one results writer whose `metrics.json` starts with a common header.

Each task module (classify, probe, detect, segment, retrieve) owns its model, data transforms and scoring;
`transfer.engine` owns the fine-tuning loop. This module holds what would otherwise be copied into each.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from pretrain.config import field
from pretrain.data import resolve_voc_root, validate_voc_split
from pretrain.dataset import normalize, resize_short_side
from pretrain.distributed import all_reduce_mean, init_distributed, is_main_process
from pretrain.errors import BadOptionError
from pretrain.precision import AMP_CHOICES, AMP_HELP, resolve_amp
from pretrain.provenance import OUTPUT_FIELDS, provenance


@dataclass
class TransferConfig:
    """The options every transfer task has; each task's config adds its own (one level, no deeper)."""

    init: str = field("random", "trunk: random (Gaussian N(0, 0.01^2)), torchvision:PATH, a runs/<name>/ folder or a "
                                "checkpoint .pth written by python -m pretrain")
    rescale: bool = field(True, "Krähenbühl et al. 2016 rescaling before use: data-dependent init of every layer that "
                                "starts fresh, then between-layer gradient-ratio calibration of the whole network "
                                "(false: the start's weights as they are)")
    data: str = field("builtin", "'builtin' (generated VOC-layout scenes) or a VOC root (e.g. ../shared/data/camvid-voc)")
    data_cache: str = field("", "where the built-in data is generated (default: $CTXENC_DATA_CACHE or ~/.cache/ctxenc)")
    builtin_images: int = field(2000, "size of the built-in dataset")
    calib_images: int = field(32, "training images the rescaling is calibrated on")
    seed: int = field(0, "seed for the random trunk, new layers' weights, data order, augmentation and dropout")
    device: str = field("auto", "auto, cpu or cuda")
    out: str = field("", "output folder (default: runs/transfer/<task>/<init label>-seed<seed>)")


@dataclass
class FinetuneConfig(TransferConfig):
    """The fine-tuning recipe (classify, detect, segment): one SGD recipe, the same for every start of a task."""

    train_split: str = field("train", "split to train on (real VOC2007: trainval)")
    test_split: str = field("test", "split to score (VOC2012 segmentation: val)")
    epochs: int = field(8, "passes over the training split")
    batch_size: int = field(64, "global training batch size (under torchrun split evenly over the processes)")
    lr: float = field(0.01, "SGD learning rate for the global batch: linear warm-up from lr/100, then cosine decay to 0")
    momentum: float = field(0.9, "SGD momentum")
    weight_decay: float = field(5e-4, "SGD weight decay on weights (not biases)")
    warmup_epochs: float = field(1.0, "epochs of linear lr warm-up (at most a fifth of the run)")
    clip_grad: float = field(10.0, "max global gradient norm (0: off)")
    amp: str = field("auto", AMP_HELP, choices=AMP_CHOICES)
    channels_last: bool = field(True, "NHWC memory layout (faster convolutions with oneDNN and cuDNN)")
    workers: int = field(2, "data loader processes")
    strict_images: bool = field(False, "stop at the first unreadable image instead of skipping it")


@dataclass
class Experiment:
    """One transfer run: its config, where it runs (`run`), where it writes, and when it started."""

    cfg: TransferConfig
    task: str
    run: DistributedRun
    out: Path
    root: Path
    started: float

    @property
    def device(self) -> torch.device:
        return self.run.device


def init_label(init: str) -> str:
    """A short name for tables: the run folder's name for checkpoints, the keyword otherwise."""
    if init in ("random", "hog"):
        return init
    if init.startswith("torchvision:"):
        return "torchvision"
    path = Path(init)
    return path.parent.name if path.suffix == ".pth" else path.name


def default_out(task: str, cfg: TransferConfig) -> Path:
    return Path("runs") / "transfer" / task / f"{init_label(cfg.init)}{'' if cfg.rescale else '-raw'}-seed{cfg.seed}"


def check_writable(out: Path) -> None:
    """Create `out` and prove a file can be written there, before any training is spent."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"--out {out}: cannot write there ({err.strerror}); choose a writable folder") from err


def setup(cfg: TransferConfig, task: str, batch_size: int = 1, voc_task: str | None = None,
          splits: tuple[str, ...] = ()) -> Experiment:
    """Seed, join torchrun's group if any, resolve the output folder (checked writable on rank 0) and the data.

    With `voc_task`, every annotation or mask of each split in `splits` is read now (pretrain.data's
    validate_voc_split), so a malformed file stops the run before any training, naming the file.
    """
    started = time.time()
    seed_everything(cfg.seed)
    run = start_distributed(cfg.device, batch_size)
    if hasattr(cfg, "amp"):  # in place, so the config a task writes says what it computed in, never "auto"
        cfg.amp = resolve_amp(cfg.amp, run.device)
    out = Path(cfg.out) if cfg.out else default_out(task, cfg)
    if run.is_main:
        check_writable(out)
    root = resolve_voc_root(cfg.data, cfg.data_cache or None, cfg.builtin_images)
    if voc_task is not None:
        for split in dict.fromkeys(splits):
            validate_voc_split(root, split, voc_task)
    return Experiment(cfg, task, run, out, root, started)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def calibration_batch(images, n: int = 32, size: int = 227, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) normalised centre crops of random training images, for `--init rescaled`.

    `images[i]` may be a PIL image or an (image, target) pair; unreadable items (None) are skipped.
    """
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    batch = []
    for i in order:
        item = images[i]
        image = item[0] if isinstance(item, tuple) else item
        if image is None:
            continue
        image = TF.center_crop(resize_short_side(image, size), [size, size])
        batch.append(normalize(TF.to_tensor(image)))
        if len(batch) == n:
            break
    if not batch:
        raise BadOptionError("no readable training image to calibrate the rescaling on (--rescale): check the training "
                             "split's images")
    return torch.stack(batch)  # (n, 3, size, size)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(exp: Experiment, scores: dict[str, float], details: dict[str, Any] | None = None,
                  per_class: list[dict[str, Any]] | None = None, collapse_reason: str | None = None,
                  checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `metrics.json` (the common header, then the task's details), `per_class.csv` and `config.json`
    into the run's folder; returns the metrics.

    Header: task, init, init_label, seed, data, commit, config_hash, versions, wall_seconds, checkpoint (the
    file and step a pretrained start was loaded from), status (`ok`, or `collapsed` when the predictions are
    degenerate: then `collapse_reason` says how, and the scores must not be read as a result), and `scores`,
    the flat {name: number} the benchmark tables use. NaN is written as JSON null, never as a bare NaN.
    """
    cfg = exp.cfg
    metrics = {"task": exp.task, "init": cfg.init, "init_label": init_label(cfg.init), "rescale": cfg.rescale,
               "seed": cfg.seed, "data": cfg.data, **provenance(cfg, ignore=OUTPUT_FIELDS),
               "wall_seconds": round(time.time() - exp.started, 1), "checkpoint": checkpoint,
               "status": "collapsed" if collapse_reason else "ok", "collapse_reason": collapse_reason,
               "scores": scores, **(details or {})}
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_jsonable(dataclasses.asdict(cfg)), indent=2))
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    if per_class:
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_class[0].keys()))
            writer.writeheader()
            writer.writerows(per_class)
    if collapse_reason:
        print(f"COLLAPSED: {collapse_reason}; the scores of {out} are not a result", flush=True)
    return metrics


# ------------------------------------------------------------------------------------------ torchrun (DDP)
#
# `torchrun --nproc_per_node=N -m transfer.<task>` trains one DDP replica per process on a 1/N share of each
# global batch; rank 0 alone evaluates (the whole test split, with the unwrapped model, as one process would),
# writes and prints, then hands its metrics to the other ranks. Without torchrun every helper below is the
# identity (or a no-op), so the single-process path is unchanged.


@dataclass(frozen=True)
class DistributedRun:
    """Where this process stands: rank `rank` of `world_size`, on `device`."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this command joined the process group, so it also leaves it (`finish_distributed`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Each process's share of the global `--batch-size`; it must split evenly."""
    if batch_size % world_size:
        raise BadOptionError(f"--batch-size {batch_size} is the global batch: it must be divisible by the {world_size} "
                         f"torchrun processes")
    return batch_size // world_size


def start_distributed(device: str, batch_size: int) -> DistributedRun:
    """Join torchrun's process group if there is one (pretrain.distributed: gloo on CPUs, NCCL on GPUs).

    Without torchrun: rank 0 of 1 on `select_device(device)`, exactly as before. Under torchrun each process
    takes its own GPU (LOCAL_RANK) or the CPU, so `--device` may only be auto or that device type.
    """
    owns_group = not dist.is_initialized()
    rank, world_size, ddp_device = init_distributed()
    owns_group = owns_group and dist.is_initialized()
    if world_size == 1:
        return DistributedRun(rank, 1, select_device(device), owns_group)
    try:
        per_rank_batch(batch_size, world_size)
        if device not in ("auto", ddp_device.type):
            hint = ("hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPUs" if ddp_device.type == "cuda"
                    else "no GPU is visible")
            raise BadOptionError(f"--device {device} under torchrun: each process uses its own {ddp_device.type} device "
                             f"(use --device auto); {hint}")
    except ValueError:
        if owns_group:
            dist.destroy_process_group()
        raise
    return DistributedRun(rank, world_size, ddp_device, owns_group)


def finish_distributed(run: DistributedRun) -> None:
    """Leave the process group if `start_distributed` joined it."""
    if run.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, run: DistributedRun, find_unused_parameters: bool = False) -> nn.Module:
    """The model in DistributedDataParallel when there are several processes (its gradients are averaged
    over them in backward), else the model itself. Keep the unwrapped model for evaluation and saving."""
    if run.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                               find_unused_parameters=find_unused_parameters)


def train_sampler(dataset: Dataset, run: DistributedRun, seed: int, drop_last: bool) -> DistributedSampler | None:
    """Each rank's share of one seeded permutation per epoch (call `set_epoch`), or None without torchrun
    (the loader then shuffles as it always did).

    With `drop_last` the tail that does not fill a rank is dropped, so N ranks x B/N per-rank batches make
    exactly the single process's floor(len / B) global batches; without it, the last images are repeated to
    fill every rank. Either way every rank runs the same number of steps, as DDP needs.
    """
    if run.world_size == 1:
        return None
    return DistributedSampler(dataset, num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=seed,
                              drop_last=drop_last)


def every_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (just `flag` without torchrun). Ranks skip a step together:
    one rank skipping alone would leave the others waiting in the gradient all-reduce."""
    if not dist.is_initialized():
        return flag
    return all_reduce_mean(float(flag), device) == 1.0


def global_count(count: int, device: torch.device) -> int:
    """A per-rank count summed over the ranks (the count itself without torchrun)."""
    if not dist.is_initialized():
        return count
    return round(all_reduce_mean(float(count), device) * dist.get_world_size())


def share_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (the value itself without torchrun); the other ranks wait here while
    rank 0 evaluates, which must end within the process group's timeout (torch's defaults: 30 min
    for gloo, 10 min for NCCL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (always without torchrun): one copy of each log line."""
    if is_main_process():
        print(*args, **kwargs)
