"""Which mixed precision a run uses: `--amp auto` picks bf16 only where the device computes it natively.

On a CPU, oneDNN has bf16 convolution and matmul kernels only with AVX-512 (AMX makes them faster still); on an
AVX2-only CPU it emulates bf16, and a context-encoder step runs an order of magnitude slower than in fp32. So
`auto` means bf16 on a CUDA GPU that supports it and on a CPU with native bf16, fp32 elsewhere. The resolved
value, not `auto`, is what a run records in its config, so two runs that computed differently never share a
config.
"""
from __future__ import annotations

import warnings

import torch

from pretrain.errors import BadOptionError

AMP_CHOICES = ("auto", "none", "bf16")
AMP_HELP = ("mixed precision: auto (bf16 where the device has it natively: a CUDA GPU with bf16, a CPU with "
            "AVX-512 or AMX; else none), none (fp32) or bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 convolutions natively (not emulated, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN's own test: AVX-512 core or better
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """`amp` with `auto` replaced by what this device should use. An explicit bf16 that a CPU can only emulate is
    kept (the user asked for it) with a warning; on a GPU without bf16 it is refused."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp != "bf16" or native_bf16(device):
        return amp
    if device.type == "cuda":
        raise BadOptionError("--amp bf16: this GPU has no bfloat16 support; use --amp auto or none")
    warnings.warn("--amp bf16 on this CPU is emulated (it has no AVX-512 or AMX) and runs several times slower than "
                  "--amp none; --amp auto picks for you", stacklevel=2)
    return amp
