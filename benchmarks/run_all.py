"""Run every (start x task x seed) comparison and collect pandas tables and plots in results/.

    python benchmarks/run_all.py                       # the full preset on the built-in data
    python benchmarks/run_all.py --quick               # a small preset (< 5 min here), used by a test
    python benchmarks/run_all.py --data ../shared/data/camvid-voc --out results/camvid
    python benchmarks/run_all.py --only variants=ce-l2,autoencoder tasks=classify,probe seeds=0
    python benchmarks/run_all.py --torchvision /weights/alexnet.pth   # adds an ImageNet-supervised row

Shape (after lightly's benchmarks/imagenet/resnet50/main.py): `VARIANTS` is a plain dict of pretraining
variants, `TASKS` a plain dict of evaluations, each a short function that calls the task's own `main`
and returns a dict of numbers. Every finished cell (one pretraining run, or one task x start x seed) is
stored as JSON under <out>/cells/ the moment it finishes; a rerun skips finished cells, so a killed run
loses at most the cell in progress (and pretraining cells resume from their last checkpoint). A
failing cell is recorded with its error and the rest go on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain.main_pretrain import PretrainConfig  # noqa: E402
from pretrain.main_pretrain import main as pretrain_main  # noqa: E402
from transfer import classify, detect, probe, retrieve, segment  # noqa: E402

# Pretraining variants: name -> PretrainConfig overrides (on top of the preset's pretraining budget).
VARIANTS: dict[str, dict[str, Any]] = {
    "ce-l2": {"mask": "random_region", "lambda_adv": 0.0},  # the paper's setting for AlexNet features
    "ce-l2-adv": {"mask": "random_region", "lambda_adv": 0.001},
    "ce-center": {"mask": "center", "lambda_adv": 0.0},
    "ce-poolfree": {"mask": "random_region", "lambda_adv": 0.0, "encoder": "alexnet-poolfree"},
    "autoencoder": {"mask": "none", "lambda_adv": 0.0},
}
BASELINES = ("random", "rescaled")

# Per-preset budgets: overrides of each command's config. On 2 CPU cores one "full" cell takes 1-10 min
# (pretraining ~8, detection ~5, the others ~1); results/summary.md gives the measured minutes per task.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "data": {"builtin_images": 60},
        "pretrain": {"steps": 3, "batch_size": 8, "workers": 0, "eval_images": 8, "ckpt_every": 3},
        "classify": {"epochs": 1, "batch_size": 16, "fc_width": 128, "ten_crop": False, "workers": 0},
        "probe": {"workers": 0, "cv_folds": 2, "knn_k": 5},
        "detect": {"epochs": 1, "batch_size": 4, "min_size": 128, "max_size": 160, "representation_size": 128,
                   "workers": 0, "warmup_steps": 2, "vis_images": 2},
        "segment": {"epochs": 1, "batch_size": 8, "fc_width": 64, "crop_size": 128, "workers": 0},
        "retrieve": {"queries": 8, "gallery": 2, "max_images": 40},
    },
    "full": {  # sized for 2 CPU cores: short schedules, so the comparison between starts is what it measures
        "data": {},
        "pretrain": {},  # the default `python -m pretrain` budget (380 steps)
        "classify": {"epochs": 3, "fc_width": 1024, "ten_crop": True},
        "probe": {},
        "detect": {"epochs": 2},
        "segment": {"epochs": 3},
        "retrieve": {"queries": 200, "gallery": 12},
    },
}


# ----------------------------------------------------------------------------------------------- tasks
def _task_cfg(cls: type, run: dict[str, Any], task: str, init: str, seed: int, out: Path):
    fields = {**run["preset"][task], "init": init, "seed": seed, "out": str(out), "data": run["data"]}
    if "data_cache" in cls.__dataclass_fields__:
        fields["data_cache"] = run["data_cache"]
    if "builtin_images" in cls.__dataclass_fields__ and "builtin_images" in run["preset"]["data"]:
        fields["builtin_images"] = run["preset"]["data"]["builtin_images"]
    return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


def eval_classify(run, init, seed, out) -> dict[str, float]:
    m = classify.main(_task_cfg(classify.ClassifyConfig, run, "classify", init, seed, out))
    return {"mAP_11point": m["mAP_11point"], "mAP_all_point": m["mAP_all_point"]}


def eval_probe(run, init, seed, out) -> dict[str, float]:
    m = probe.main(_task_cfg(probe.ProbeConfig, run, "probe", init, seed, out))
    row: dict[str, float] = {}
    for layer, v in m.get("layers", m).items():
        if isinstance(v, dict) and "svm_mAP_11point" in v:
            row[f"{layer}/svm_mAP_11point"] = v["svm_mAP_11point"]
            row[f"{layer}/knn_mAP_11point"] = v["knn_mAP_11point"]
    return row


def eval_detect(run, init, seed, out) -> dict[str, float]:
    m = detect.main(_task_cfg(detect.DetectConfig, run, "detect", init, seed, out))
    return {"mAP_11point": m["mAP_11point"], "mAP_all_point": m["mAP_all_point"]}


def eval_segment(run, init, seed, out) -> dict[str, float]:
    m = segment.main(_task_cfg(segment.SegmentConfig, run, "segment", init, seed, out))
    return {"mIoU": m["mIoU"], "pixel_accuracy": m["pixel_accuracy"]}


def eval_retrieve(run, init, seed, out) -> dict[str, float]:
    m = retrieve.main(_task_cfg(retrieve.RetrieveConfig, run, "retrieve", init, seed, out))
    return _flatten_numbers(m)


TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "classify": eval_classify,
    "probe": eval_probe,
    "detect": eval_detect,
    "segment": eval_segment,
    "retrieve": eval_retrieve,
}


def _flatten_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
        elif v == "inf":
            out[key] = math.inf
    return out


# ----------------------------------------------------------------------------------------------- cells
def _write_json(path: Path, obj: Any) -> None:
    """Atomic: a killed run never leaves a half-written cell that a rerun would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def run_cell(path: Path, fn: Callable[[], dict[str, float]], meta: dict[str, Any], rerun_failed: bool) -> dict[str, Any]:
    """Run `fn` unless `path` already holds a finished cell; store the result (or the error) at once."""
    label = f"{meta['task']} {meta['start']} seed {meta['seed']}"
    if path.exists():
        cell = json.loads(path.read_text())
        if cell["status"] == "ok" or not rerun_failed:
            print(f"[skip] {label}: already {cell['status']}", flush=True)
            return cell
    print(f"[run ] {label}", flush=True)
    start = time.time()
    try:
        cell = {"status": "ok", "metrics": fn()}
    except Exception as err:  # noqa: BLE001 - one failing cell must not stop the others
        cell = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(f"[fail] {label}: {cell['error']}", flush=True)
    cell.update(meta, seconds=round(time.time() - start, 1))
    _write_json(path, cell)
    return cell


def pretrain_variant(run: dict[str, Any], variant: str, seed: int) -> dict[str, float]:
    cfg = PretrainConfig(**{**run["preset"]["pretrain"], **VARIANTS[variant]}, name=f"{variant}-seed{seed}",
                         output_dir=str(run["work"] / "pretrain"), data=run["data"], data_cache=run["data_cache"],
                         seed=seed, resume=True,
                         **({"builtin_images": run["preset"]["data"]["builtin_images"]}
                            if "builtin_images" in run["preset"]["data"] else {}))
    results = pretrain_main(cfg)
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}


# ----------------------------------------------------------------------------------------------- tables
PAPER_TABLE2 = [  # Pathak et al. 2016, Table 2: ImageNet-scale pretraining, VOC2007 cls/det, VOC2012 seg
    ("ImageNet labels [published]", 78.2, 56.8, 48.0),
    ("random Gaussian [published]", 53.3, 43.4, 19.8),
    ("autoencoder [published]", 53.8, 41.9, 25.2),
    ("context encoder [published]", 56.5, 44.5, 30.0),
]
PAPER_TABLE1 = [  # Pathak et al. 2016, Table 1: Paris StreetView, centre hole
    ("NN-inpainting, HOG features [published]", 19.92, 6.92, 12.79),
    ("NN-inpainting, context-encoder features [published]", 15.10, 4.30, 14.70),
    ("context encoder, L2+adversarial [published]", 9.37, 1.96, 18.58),
]


def _mean_std(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}"


def _save_table(df: pd.DataFrame, path: Path, title: str, note: str) -> None:
    df.to_csv(path.with_suffix(".csv"))
    path.with_suffix(".md").write_text(f"# {title}\n\n{note}\n\n{df.to_markdown()}\n")


def build_tables(cells: list[dict[str, Any]], starts: list[str], out: Path, data_label: str) -> dict[str, Path]:
    """results/transfer.*, probes.* (+ png), inpainting.* from the stored cells."""
    ok = [c for c in cells if c.get("status") == "ok"]

    def values(task: str, start: str, key: str) -> list[float]:
        return [c["metrics"].get(key) for c in ok if c["task"] == task and c["start"] == start and key in c["metrics"]]

    def has(tasks: tuple[str, ...], start: str) -> bool:
        return any(c["start"] == start and c["task"] in tasks for c in ok)

    written: dict[str, Path] = {}
    rows = {s: {"classification mAP (VOC07 11-pt)": _mean_std(values("classify", s, "mAP_11point")),
                "detection mAP@0.5 (VOC07 11-pt)": _mean_std(values("detect", s, "mAP_11point")),
                "segmentation mIoU": _mean_std(values("segment", s, "mIoU")),
                "seeds": max((len(values(t, s, k)) for t, k in (("classify", "mAP_11point"), ("detect", "mAP_11point"),
                                                                 ("segment", "mIoU"))), default=0)}
            for s in starts if has(("classify", "detect", "segment"), s)}
    for name, cls_, det, seg in PAPER_TABLE2:
        rows[name] = {"classification mAP (VOC07 11-pt)": f"{cls_:.1f}", "detection mAP@0.5 (VOC07 11-pt)": f"{det:.1f}",
                      "segmentation mIoU": f"{seg:.1f}", "seeds": "–"}
    transfer_df = pd.DataFrame.from_dict(rows, orient="index")
    transfer_df.index.name = "start"
    _save_table(transfer_df, out / "transfer", f"Transfer (Table 2 layout) on {data_label}",
                "Mean ± sample std over seeds, in %. Rows marked [published] are the paper's ImageNet-scale AlexNet "
                "numbers on VOC2007/2012, for reference only: they are not comparable to this data's scale.")
    written["transfer"] = out / "transfer.md"

    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
    probe_rows = {s: {layer: _mean_std(values("probe", s, f"{layer}/svm_mAP_11point")) for layer in layers}
                  for s in starts if has(("probe",), s)}
    probe_df = pd.DataFrame.from_dict(probe_rows, orient="index")
    probe_df.index.name = "start"
    _save_table(probe_df, out / "probes", f"Frozen linear-SVM probes per layer on {data_label}",
                "VOC07 11-point mAP (%) of per-class linear SVMs on average-pooled frozen features (Goyal et al. 2019 "
                "settings), mean ± std over seeds.")
    written["probes"] = out / "probes.md"
    _plot_probes(starts, layers, values, out / "probes.png", data_label)

    inp_rows: dict[str, dict[str, str]] = {}

    def inpainting_row(start: str, prefix: str = "") -> dict[str, str] | None:
        l1, l2, psnr = (values("retrieve", start, prefix + k) for k in ("l1", "l2", "psnr"))
        if not l1:
            return None
        return {"mean L1 (%)": _mean_std(l1), "mean L2 (%)": _mean_std(l2), "PSNR (dB)": _mean_std(psnr, 1.0),
                "patch precision@k (%)": _mean_std(values("retrieve", start, "precision_at_k"))}

    for s in starts:
        row = inpainting_row(s)
        if row:
            inp_rows["NN-inpainting, HOG features" if s == "hog" else f"NN-inpainting, {s} features"] = row
    for s in starts:
        row = inpainting_row(s, "ce_")
        if row:
            inp_rows[f"context encoder {s}, own fill (centre hole)"] = {**row, "patch precision@k (%)": "–"}
    for s in starts:  # the same for every start: the mean colour of the same queries' contexts
        row = inpainting_row(s, "mean_fill_")
        if row:
            inp_rows["mean-colour fill (centre hole)"] = {**row, "patch precision@k (%)": "–"}
            break
    holes = {"random_region": "random-region holes", "random_block": "random blocks", "center": "centre hole",
             "none": "whole image"}  # what each variant's held-out pretraining evaluation scores
    for c in ok:
        if c["task"] == "pretrain":
            m = c["metrics"]
            hole = holes.get(VARIANTS.get(c["start"], {}).get("mask", "random_region"), "holes")
            inp_rows[f"context encoder {c['start']}, own fill ({hole}, held out)"] = {
                "mean L1 (%)": _mean_std([m["l1"]]), "mean L2 (%)": _mean_std([m["l2"]]),
                "PSNR (dB)": _mean_std([m["psnr"]], 1.0), "patch precision@k (%)": "–"}
            inp_rows.setdefault(f"mean-colour fill ({hole}, held out)", {
                "mean L1 (%)": _mean_std([m["mean_fill_l1"]]), "mean L2 (%)": _mean_std([m["mean_fill_l2"]]),
                "PSNR (dB)": _mean_std([m["mean_fill_psnr"]], 1.0), "patch precision@k (%)": "–"})
    for name, l1, l2, psnr in PAPER_TABLE1:
        inp_rows[name] = {"mean L1 (%)": f"{l1:.2f}", "mean L2 (%)": f"{l2:.2f}", "PSNR (dB)": f"{psnr:.2f}",
                          "patch precision@k (%)": "–"}
    inp_df = pd.DataFrame.from_dict(inp_rows, orient="index")
    inp_df.index.name = "method"
    _save_table(inp_df, out / "inpainting", f"Inpainting (Table 1 layout) on {data_label}",
                "Pixels in [0, 1], over the hole. NN-inpainting rows use a centre hole of 1/4 of the image; the "
                "context encoders' own rows are their held-out pretraining evaluation. [published] rows are "
                "Paris StreetView numbers from the paper, for reference only.")
    written["inpainting"] = out / "inpainting.md"
    return written


def _plot_probes(starts, layers, values, path: Path, data_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in starts:
        means = [np.mean(v) * 100 if (v := [x for x in values("probe", s, f"{layer}/svm_mAP_11point") if x is not None])
                 else np.nan for layer in layers]
        if not all(np.isnan(means)):
            ax.plot(layers, means, marker="o", label=s)
    ax.set_xlabel("layer")
    ax.set_ylabel("linear-SVM mAP (%)")
    ax.set_title(f"Frozen probes per layer ({data_label})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict[str, str]:
    import torch
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "machine": platform.machine(), "git commit": commit + (" (with uncommitted changes)" if dirty else "")}


# ----------------------------------------------------------------------------------------------- main
def parse_only(items: list[str]) -> dict[str, list[str]]:
    only: dict[str, list[str]] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in ("variants", "tasks", "seeds", "starts") or not value:
            raise SystemExit(f"--only {item!r}: use variants=a,b tasks=classify,probe seeds=0,1 starts=random")
        only[key] = value.split(",")
    return only


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin", help="'builtin' or a VOC-layout root")
    parser.add_argument("--data-cache", default="", help="where the built-in data is generated")
    parser.add_argument("--out", default="results", help="folder for tables, plots and cells/ (small files)")
    parser.add_argument("--work", default="", help="folder for checkpoints and task outputs (default runs/benchmark/<out>)")
    parser.add_argument("--quick", action="store_true", help="small preset (< 5 min), for smoke tests")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (start, task)")
    parser.add_argument("--only", nargs="*", default=[], help="variants=.. tasks=.. seeds=.. starts=.. filters")
    parser.add_argument("--torchvision", default="", help="a local torchvision AlexNet state dict: adds that start")
    parser.add_argument("--rerun-failed", action="store_true", help="retry cells stored as errors")
    args = parser.parse_args(argv)

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset_name = "quick" if args.quick else "full"
    only = parse_only(args.only)
    variants = [v for v in VARIANTS if v in only.get("variants", VARIANTS)]
    tasks = [t for t in TASKS if t in only.get("tasks", TASKS)]
    seeds = [int(s) for s in only.get("seeds", range(args.seeds))]
    work = Path(args.work) if args.work else Path("runs") / "benchmark" / out.name
    run = {"preset": PRESETS[preset_name], "data": args.data, "data_cache": args.data_cache, "out": out, "work": work}
    baselines = list(BASELINES) + ([f"torchvision:{args.torchvision}"] if args.torchvision else [])

    starts: dict[str, str] = {}  # table name -> --init value
    for variant in variants:
        # One pretraining per variant (seed 0); the transfer seeds vary the fine-tuning, as in the paper.
        cell = run_cell(out / "cells" / "pretrain" / f"{variant}.json", lambda v=variant: pretrain_variant(run, v, 0),
                        {"task": "pretrain", "start": variant, "seed": 0}, args.rerun_failed)
        if cell["status"] == "ok":
            starts[variant] = str(run["work"] / "pretrain" / f"{variant}-seed0")
    for b in baselines:
        starts["torchvision" if b.startswith("torchvision:") else b] = b
    if "starts" in only:
        starts = {k: v for k, v in starts.items() if k in only["starts"]}
    for task in tasks:
        task_starts = dict(starts)
        if task == "retrieve":
            task_starts["hog"] = "hog"  # the non-learned baseline of Table 1
        for name, init in task_starts.items():
            for seed in seeds if task != "retrieve" else seeds[:1]:  # retrieval is deterministic given the init
                path = out / "cells" / task / name / f"seed{seed}.json"
                work = run["work"] / task / name / f"seed{seed}"  # checkpoints, indexes, galleries: not in results/
                run_cell(path, lambda t=task, i=init, s=seed, w=work: TASKS[t](run, i, s, w),
                         {"task": task, "start": name, "seed": seed}, args.rerun_failed)

    # Tables come from every cell on disk, so separate invocations (e.g. --only variants=...) add up.
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/*.json")) + sorted(out.glob("cells/*/*/*.json"))]
    data_label = "the built-in data" if args.data == "builtin" else Path(args.data).name
    order = list(VARIANTS) + ["random", "rescaled", "torchvision", "hog"]
    table_starts = sorted({c["start"] for c in cells}, key=lambda s: order.index(s) if s in order else len(order))
    written = build_tables(cells, table_starts, out, data_label)
    failed = [c for c in cells if c.get("status") != "ok"]
    wall = time.time() - t0
    write_summary(out, written, cells, failed, wall, args, preset_name, data_label,
                  None if argv is None else "python benchmarks/run_all.py " + " ".join(argv))
    for name in ("transfer", "probes", "inpainting"):
        print((out / f"{name}.md").read_text())
    print(f"{len(cells)} cells ({len(failed)} failed) in {wall / 60:.1f} min -> {out}/summary.md")
    return {"cells": cells, "failed": failed, "wall_seconds": wall}


def compute_by_task(cells: list[dict[str, Any]], seeds: int) -> list[str]:
    """Measured minutes per task, and what a run of every cell from scratch costs at those rates."""
    lines = ["## Compute", "", "| task | cells timed | minutes | minutes per cell | cells in a full run | "
             "full run, minutes (estimate) |", "|---|--:|--:|--:|--:|--:|"]
    n_starts = len(VARIANTS) + len(BASELINES)
    full_cells = {"pretrain": len(VARIANTS), "retrieve": n_starts + 1}  # retrieval: one seed, plus HOG
    total_estimate = 0.0
    for task in ["pretrain", *TASKS]:
        # the median, so a cell that only re-evaluated a reused pretraining run does not skew the rate
        secs = [c["seconds"] for c in cells if c["task"] == task and c.get("status") == "ok" and "seconds" in c]
        if not secs:
            continue
        per_cell = float(np.median(secs)) / 60
        n_full = full_cells.get(task, n_starts * seeds)
        total_estimate += per_cell * n_full
        lines.append(f"| {task} | {len(secs)} | {sum(secs) / 60:.1f} | {per_cell:.1f} | {n_full} | {per_cell * n_full:.0f} |")
    lines += ["", f"A run of every cell from scratch ({len(VARIANTS)} variants, {len(BASELINES)} baselines, {seeds} "
              f"seeds) would take about **{total_estimate:.0f} min** on this machine at the median rates above."]
    return lines


def write_summary(out: Path, written: dict[str, Path], cells, failed, wall: float, args, preset: str,
                  data_label: str, argv_used: str | None = None) -> None:
    env = environment()
    command = "python benchmarks/run_all.py " + " ".join(sys.argv[1:]) if argv_used is None else argv_used
    log_path = out / "cells" / "invocations.jsonl"  # every invocation that added cells, in order
    with open(log_path, "a") as log:
        log.write(json.dumps({"command": command.strip(), "preset": preset, "minutes": round(wall / 60, 1),
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    invocations = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    total = sum(c.get("seconds", 0) for c in cells) / 60
    lines = [f"# ctxenc results on {data_label}", "",
             f"Produced by these invocations (each reuses the cells the earlier ones finished); the cells' own "
             f"compute adds up to {total:.1f} min:", ""]
    lines += [f"- `{i['command']}` (preset `{i['preset']}`, {i['minutes']} min, finished {i['finished']})"
              for i in invocations]
    lines += ["", *compute_by_task(cells, args.seeds), "", "## Tables", ""]
    lines += [f"- [{name}]({p.name}) ([csv]({p.with_suffix('.csv').name}))" for name, p in written.items()]
    if (out / "probes.png").exists():
        lines += ["", "![probes](probes.png)"]
    lines += ["", "## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += [f"| data | {args.data} |", "", "## Cells", "",
              f"{len(cells)} cells, {len(failed)} failed. Each cell's numbers are in `cells/<task>/<start>/seed<k>.json`; "
              "its full outputs (config.json, metrics.json, per-class CSV, pictures, checkpoints) were written under "
              "`runs/benchmark/` on the machine that ran it.", ""]
    lines += ["| task | start | seed | status | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {c['task']} | {c['start']} | {c['seed']} | {c['status']}"
              f"{': ' + c['error'][:120] if c.get('status') != 'ok' else ''} | {c.get('seconds', '')} |" for c in cells]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
