"""What every transfer command shares: device and seeding, the calibration batch, writing results, and
running under torchrun (DDP) for the fine-tuning commands (classify, segment, detect).

Each task module (classify, probe, detect, segment, retrieve) owns its model, data transforms and
loop; this module only holds the pieces that would otherwise be copied into each of them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
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

from pretrain.dataset import normalize, resize_short_side
from pretrain.distributed import all_reduce_mean, init_distributed, is_main_process


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
        raise ValueError("no readable training image to calibrate --init rescaled on")
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
    return value


def write_results(out_dir: str | Path, metrics: dict[str, Any], per_class: list[dict[str, Any]] | None = None,
                  config: Any = None) -> Path:
    """`metrics.json` (+ `per_class.csv`, + `config.json` from a dataclass) in `out_dir`; returns the folder.

    NaN (e.g. the AP of a class with no positives) is written as JSON null, never as a bare NaN.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        (out / "config.json").write_text(json.dumps(_jsonable(cfg), indent=2))
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    if per_class:
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_class[0].keys()))
            writer.writeheader()
            writer.writerows(per_class)
    return out


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
        raise ValueError(f"--batch-size {batch_size} is the global batch: it must be divisible by the {world_size} "
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
            raise ValueError(f"--device {device} under torchrun: each process uses its own {ddp_device.type} device "
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
