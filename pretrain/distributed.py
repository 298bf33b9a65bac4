"""DDP set up from torchrun's environment variables; one process (rank 0) writes logs and checkpoints."""
from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_distributed() -> tuple[int, int, torch.device]:
    """Return (rank, world_size, device). Under torchrun (RANK/WORLD_SIZE set) joins the process group:
    NCCL on GPUs, gloo on CPUs. Without torchrun: rank 0 of 1, no process group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return rank, world_size, device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a logged scalar over ranks (identity without DDP)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(value, device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` (any picklable object) on every rank (identity without DDP): a decision only rank 0
    can take, e.g. that the run folder is taken, reaches the ranks that would otherwise wait for it."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
