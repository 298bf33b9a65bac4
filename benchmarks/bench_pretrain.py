"""Pretraining-step throughput: images/s and achieved GFLOP/s against this machine's measured matmul peak.

    python benchmarks/bench_pretrain.py [--batch 64] [--steps 5] [--out results/bench_pretrain.md]

Times the real training step (pretrain.engine.train_step: forward, masked L2, adversarial loss,
both optimisers) on synthetic tensors, so data loading is not measured. FLOPs are counted once with
torch.utils.flop_counter (forward + backward of every network in the step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.engine import train_step
from pretrain.main_pretrain import PretrainConfig, build_models, effective_masking
from pretrain.masks import make_mask


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


def time_step(cfg: PretrainConfig, batch: int, steps: int) -> dict[str, float]:
    """Images/s of the full training step and its FLOPs per image (forward + backward, G and D)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, disc = build_models(cfg)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if disc is not None:
            disc.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr * cfg.lr_d_ratio, fused=True) if disc is not None else None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = make_batch(cfg, batch, cfg.channels_last)

    def step() -> None:
        train_step(model, disc, data, opt_g, opt_d, scaler, cfg.lambda_rec, cfg.lambda_adv, cfg.overlap,
                   cfg.overlap_weight, cfg.amp, device)

    step()  # warm-up: oneDNN picks its kernels on the first call
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / batch
    start = time.perf_counter()
    for _ in range(steps):
        step()
    ips = batch * steps / (time.perf_counter() - start)
    return {"images_per_s": ips, "gflop_per_image": flops / 1e9, "gflop_per_s": ips * flops / 1e9}


def _times(speedup: float | None) -> str:
    return f"{speedup:.2f}x" if speedup else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="results/bench_pretrain.md")
    args = parser.parse_args()

    peak32, peak16 = matmul_peak_gflops(torch.float32), matmul_peak_gflops(torch.bfloat16)
    conv32, conv16 = conv_peak_gflops(torch.float32), conv_peak_gflops(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s; 3x3 conv: fp32 {conv32:.0f}, "
          f"bf16 {conv16:.0f} ({torch.get_num_threads()} threads)")
    settings = [
        ("alexnet", "fp32", dict(model="alexnet", amp="none", channels_last=False)),
        ("alexnet", "channels_last", dict(model="alexnet", amp="none", channels_last=True)),
        ("alexnet", "bf16", dict(model="alexnet", amp="bf16", channels_last=False)),
        ("alexnet", "channels_last+bf16", dict(model="alexnet", amp="bf16", channels_last=True)),
        ("alexnet (L2 only)", "channels_last+bf16", dict(model="alexnet", amp="bf16", channels_last=True, lambda_adv=0.0)),
        ("inpaint128 G+D", "fp32", dict(model="inpaint128", amp="none", channels_last=False)),
        ("inpaint128 G+D", "channels_last+bf16", dict(model="inpaint128", amp="bf16", channels_last=True)),
    ]
    rows = []
    for name, label, overrides in settings:
        cfg = PretrainConfig(**overrides)
        r = time_step(cfg, args.batch, args.steps)
        bf16 = cfg.amp == "bf16"
        fp32_rate = next((x["images_per_s"] for x in rows if x["model"] == name and x["setting"] == "fp32"), None)
        r.update(model=name, setting=label, pct_of_matmul_peak=100 * r["gflop_per_s"] / (peak16 if bf16 else peak32),
                 pct_of_conv_peak=100 * r["gflop_per_s"] / (conv16 if bf16 else conv32),
                 speedup_vs_fp32=r["images_per_s"] / fp32_rate if fp32_rate else None)  # None: no fp32 row to compare
        rows.append(r)
        print(f"{name:20s} {label:20s} {r['images_per_s']:7.1f} img/s  {_times(r['speedup_vs_fp32']):>6s}  "
              f"{r['gflop_per_image']:.2f} GFLOP/img  {r['gflop_per_s']:6.0f} GFLOP/s  "
              f"({r['pct_of_matmul_peak']:.0f}% of matmul peak, {r['pct_of_conv_peak']:.0f}% of conv peak)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Pretraining step throughput (batch {args.batch}, CPU, {torch.get_num_threads()} threads)", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}. "
             f"Measured peaks: matmul fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f}; a large 3x3 convolution "
             f"(channels_last) fp32 {conv32:.0f}, bf16 {conv16:.0f}. Load average during the "
             f"run: {os.getloadavg()[1]:.1f} (on {os.cpu_count()} cores; above ~1 the figures are shared with other "
             "work, peak and step alike).", "",
             "| model | setting | images/s | vs fp32 | GFLOP/image | GFLOP/s | % of matmul peak | % of conv peak |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['model']} | {r['setting']} | {r['images_per_s']:.1f} | {_times(r['speedup_vs_fp32'])} | "
              f"{r['gflop_per_image']:.2f} | {r['gflop_per_s']:.0f} | {r['pct_of_matmul_peak']:.0f}% | "
              f"{r['pct_of_conv_peak']:.0f}% |" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"peak_fp32": peak32, "peak_bf16": peak16, "conv_peak_fp32": conv32,
                                                          "conv_peak_bf16": conv16, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
