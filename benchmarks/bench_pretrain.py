"""Pretraining-step throughput: images/s and achieved GFLOP/s against this machine's measured matmul peak.

    python benchmarks/bench_pretrain.py [--batch 64] [--steps 9] [--out results/bench_pretrain.md]

Times the real training step (pretrain.engine.train_step: forward, masked L2, adversarial loss,
both optimisers) on synthetic tensors, so data loading is not measured; images/s is batch / the median
of the timed steps. FLOPs are counted once with torch.utils.flop_counter (forward + backward of every
network in the step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.allocator import retain_freed_memory
from pretrain.engine import train_step
from pretrain.inpaint128 import Inpaint128Generator
from pretrain.main_pretrain import PretrainConfig, build_models, effective_masking
from pretrain.masks import make_mask
from pretrain.models import Discriminator
from pretrain.precision import native_bf16


class StraightforwardPortGenerator(Inpaint128Generator):
    """The inpainting generator as a direct port of the official Lua code writes it, kept only as this
    benchmark's baseline: the bottleneck is `Conv2d(512, 4000, 4)` on the 4x4 map and
    `ConvTranspose2d(4000, 512, 4)` back (ours: the same maps as `nn.Linear`; same parameter count)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_code = nn.Conv2d(512, 4000, 4, bias=False)  # (B, 512, 4, 4) -> (B, 4000, 1, 1)
        self.code_act = nn.Sequential(nn.BatchNorm2d(4000), nn.LeakyReLU(0.2, inplace=True))
        self.from_code = nn.ConvTranspose2d(4000, 512, 4, bias=False)  # (B, 4000, 1, 1) -> (B, 512, 4, 4)

    def predict_patch(self, x_masked: torch.Tensor) -> torch.Tensor:
        code = self.code_act(self.to_code(self.encoder(x_masked)))  # (B, 4000, 1, 1)
        return self.output_scale * self.decoder(self.from_code_act(self.from_code(code)))  # (B, 3, 64, 64)


def cpu_name() -> str:
    """Model name, family/model and whether AVX-512 BF16 is there (it sets what bf16 can gain)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    bf16 = "avx512_bf16" in info.get("flags", "").split()
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}, "
            f"avx512_bf16 {'yes' if bf16 else 'no'})")


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def conv_peak_gflops(dtype: torch.dtype, reps: int = 5) -> float:
    """A large 3x3 convolution in channels_last (oneDNN's best case): on this kind of CPU convolutions run
    well above MKL's matmul peak, so both are reported."""
    x = torch.randn(64, 256, 27, 27).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(memory_format=torch.channels_last)
    flops = 2 * 64 * 27 * 27 * 256 * 256 * 9
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        conv(x)
        start = time.perf_counter()
        for _ in range(reps):
            conv(x)
    return flops * reps / (time.perf_counter() - start) / 1e9


def make_batch(cfg: PretrainConfig, batch: int, channels_last: bool) -> dict[str, torch.Tensor]:
    size, kind, fraction = effective_masking(cfg)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(batch, 3, size, size)
    mask = torch.stack([make_mask(kind, size, fraction, g) for _ in range(batch)])
    x = target.masked_fill(mask.unsqueeze(1), 0.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return {"input": x, "mask": mask, "target": target}


def time_step(cfg: PretrainConfig, batch: int, steps: int, straightforward_port: bool = False) -> dict[str, float]:
    """Images/s of the full training step and its FLOPs per image (forward + backward, G and D).

    `straightforward_port`: the inpainting family as a direct port runs it (conv bottleneck, PyTorch's
    default Adam, which on CPU tensors is the per-parameter for-loop implementation)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, disc = (StraightforwardPortGenerator(), Discriminator()) if straightforward_port else build_models(cfg)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if disc is not None:
            disc.to(memory_format=torch.channels_last)
    fused = None if straightforward_port else True
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr * cfg.lr_d_ratio, fused=fused) if disc is not None else None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = make_batch(cfg, batch, cfg.channels_last)

    def step() -> None:
        train_step(model, disc, data, opt_g, opt_d, scaler, cfg.lambda_rec, cfg.lambda_adv, cfg.overlap,
                   cfg.overlap_weight, cfg.amp, device)

    step()  # warm-up: oneDNN picks its kernels on the first call
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    ips = batch / statistics.median(times)  # the median step: on a shared VM other tenants slow some steps
    return {"images_per_s": ips, "gflop_per_image": flops / 1e9, "gflop_per_s": ips * flops / 1e9}


def _times(speedup: float | None) -> str:
    return f"{speedup:.2f}x" if speedup else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per setting; the median counts")
    parser.add_argument("--out", default="results/bench_pretrain.md")
    args = parser.parse_args()
    retained = retain_freed_memory()  # as `python -m pretrain` does

    # Without native bf16 (an AVX2-only CPU) oneDNN emulates it many times slower than fp32: those rows would
    # take hours and measure the emulation, so they are left out and the table says so.
    bf16 = native_bf16(torch.device("cpu"))
    peak32, conv32 = matmul_peak_gflops(torch.float32), conv_peak_gflops(torch.float32)
    peak16, conv16 = (matmul_peak_gflops(torch.bfloat16), conv_peak_gflops(torch.bfloat16)) if bf16 else (math.nan,) * 2
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s; 3x3 conv: fp32 {conv32:.0f}, "
          f"bf16 {conv16:.0f} ({torch.get_num_threads()} threads)", flush=True)
    # (model, setting, PretrainConfig overrides, straightforward port?)
    settings = [
        ("alexnet", "fp32", dict(model="alexnet", amp="none", channels_last=False), False),
        ("alexnet", "channels_last", dict(model="alexnet", amp="none", channels_last=True), False),
        ("alexnet", "bf16", dict(model="alexnet", amp="bf16", channels_last=False), False),
        ("alexnet", "channels_last+bf16", dict(model="alexnet", amp="bf16", channels_last=True), False),
        ("alexnet (L2 only)", "fp32", dict(model="alexnet", amp="none", channels_last=False, lambda_adv=0.0), False),
        ("alexnet (L2 only)", "channels_last+bf16", dict(model="alexnet", amp="bf16", channels_last=True, lambda_adv=0.0), False),
        ("inpaint128 G+D", "straightforward port", dict(model="inpaint128", amp="none", channels_last=False), True),
        ("inpaint128 G+D", "fp32", dict(model="inpaint128", amp="none", channels_last=False), False),
        ("inpaint128 G+D", "channels_last+bf16", dict(model="inpaint128", amp="bf16", channels_last=True), False),
    ]
    rows = []
    for name, label, overrides, port in settings:
        cfg = PretrainConfig(**overrides)
        if cfg.amp == "bf16" and not bf16:
            print(f"{name:20s} {label:20s} left out: this CPU has no native bf16", flush=True)
            continue
        r = time_step(cfg, args.batch, args.steps, straightforward_port=port)
        fp32_rate = next((x["images_per_s"] for x in rows if x["model"] == name and x["setting"] == "fp32"), None)
        port_rate = next((x["images_per_s"] for x in rows if x["model"] == name and x["straightforward_port"]), None)
        r.update(model=name, setting=label,
                 pct_of_matmul_peak=100 * r["gflop_per_s"] / (peak16 if cfg.amp == "bf16" else peak32),
                 pct_of_conv_peak=100 * r["gflop_per_s"] / (conv16 if cfg.amp == "bf16" else conv32),
                 speedup_vs_fp32=r["images_per_s"] / fp32_rate if fp32_rate else None,  # None: no fp32 row yet
                 speedup_vs_port=r["images_per_s"] / port_rate if port_rate else None, straightforward_port=port)
        rows.append(r)
        print(f"{name:20s} {label:20s} {r['images_per_s']:7.1f} img/s  {_times(r['speedup_vs_fp32']):>6s}  "
              f"{_times(r['speedup_vs_port']):>6s} vs port  "
              f"{r['gflop_per_image']:.2f} GFLOP/img  {r['gflop_per_s']:6.0f} GFLOP/s  "
              f"({r['pct_of_matmul_peak']:.0f}% of matmul peak, {r['pct_of_conv_peak']:.0f}% of conv peak)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Pretraining step throughput (batch {args.batch}, CPU, {torch.get_num_threads()} threads)", "",
             f"Machine: {cpu_name()}, torch {torch.__version__}, "
             f"malloc keeps freed memory: {'yes' if retained else 'no (CTXENC_SYSTEM_MALLOC=1)'}. "
             f"Measured peaks: matmul fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f}; a large 3x3 convolution "
             f"(channels_last) fp32 {conv32:.0f}, bf16 {conv16:.0f}. Load average over the last 5 minutes: "
             f"{os.getloadavg()[1]:.1f} on {os.cpu_count()} cores, of which the benchmark's own "
             f"{torch.get_num_threads()} threads are ~{torch.get_num_threads()}; more means other work shared the CPU. "
             f"images/s is the batch over the median of {args.steps} timed steps (after a warm-up step)."
             + ("" if bf16 else " This CPU has no native bf16 (oneDNN would emulate it, many times slower than "
                                "fp32), so the bf16 settings are left out."), "",
             "The straightforward port is the inpainting family as a direct port of the official code runs it "
             "(bottleneck as a 4x4 conv and up-conv, PyTorch's default for-loop Adam, fp32); it runs in this process, "
             "so it too gets the malloc setting above, which makes its 'vs port' multiples conservative.", "",
             "| model | setting | images/s | vs fp32 | vs port | GFLOP/image | GFLOP/s | % of matmul peak | "
             "% of conv peak |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['model']} | {r['setting']} | {r['images_per_s']:.1f} | {_times(r['speedup_vs_fp32'])} | "
              f"{_times(r['speedup_vs_port'])} | "
              f"{r['gflop_per_image']:.2f} | {r['gflop_per_s']:.0f} | {r['pct_of_matmul_peak']:.0f}% | "
              f"{r['pct_of_conv_peak']:.0f}% |" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"peak_fp32": peak32, "peak_bf16": peak16, "conv_peak_fp32": conv32,
                                                          "conv_peak_bf16": conv16, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
