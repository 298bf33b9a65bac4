"""Keep memory that tensors free inside the process, so each training step does not page-fault it back in.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
gives it back on free. A training step allocates and frees the same large tensors every step (activations,
gradients, autocast's bf16 weight copies), so on the CPU each step re-faults hundreds of MB of zeroed
pages: 1.5 M minor faults in 7 steps of the inpainting network. Telling malloc to never use mmap and never
trim its heap makes freed blocks reusable, the effect Intel's PyTorch CPU tuning guide gets by preloading
jemalloc or tcmalloc, without LD_PRELOAD. Measured on the training step of benchmarks/bench_pretrain.py
(batch 64, bf16, channels_last, 2 cores, each setting in its own process): the inpainting network 62-68 ->
79-82 img/s, the AlexNet context encoder 52 -> 55; the resident memory stays flat from the second step on.
The cost: the process keeps its peak heap until it exits. `CTXENC_SYSTEM_MALLOC=1` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Apply the setting for the rest of the process (and the workers it forks). True if applied; False off
    Linux/glibc or when CTXENC_SYSTEM_MALLOC=1, where nothing changes."""
    if not sys.platform.startswith("linux") or os.environ.get("CTXENC_SYSTEM_MALLOC") == "1":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
