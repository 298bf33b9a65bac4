"""How much pretraining does a context encoder need before its features beat random ones?

    python benchmarks/learning_curve.py                          # rungs 0, 100, 300, 1000, 3000 steps -> results/
    python benchmarks/learning_curve.py --max-steps 300          # only the rungs up to 300; a later call goes on
    python benchmarks/learning_curve.py --last-rung-seeds 2      # two more pretraining seeds at the last rung
    python benchmarks/learning_curve.py --objectives ce-l2 ce-l2-lr1e-4 --classify-epochs 2
    python benchmarks/learning_curve.py --quick --out runs/curve-smoke   # tiny, for tests

Each objective (`OBJECTIVES`: the context encoder with the paper's recipe, the autoencoder, the supervised
control) is pretrained once per pretraining seed, with a constant learning rate, and stopped at every rung of
a geometric ladder of steps; rung 0 is the untrained network. The checkpoint of each rung is kept and evaluated as
run_all evaluates a start: frozen linear-SVM probes on every layer of whole images and on conv5 and pool5 of the
annotated objects (`transfer.object_probe`), fine-tuned classification (run_all's preset recipes) and, for the
inpainting objectives, the run's own held-out inpainting L1 at that step. The random trunk, with and without
Krähenbühl et al.'s rescaling, over the transfer seeds, gives the bands a pretrained trunk has to clear. A
checkpoint of pretraining seed k is evaluated with transfer seed k.

Every evaluation, and every advance of a pretraining run to a rung, is a cell stored as JSON with its
provenance (run_all's `run_cell`: git commit, config and code hashes) under <out>/learning_curve/cells/, so
a rerun skips finished cells and recomputes stale ones, and a run stopped by `--max-steps` or a kill goes on
from its last checkpoint instead of starting over. Outputs: <out>/learning_curve.csv (one row per objective,
seed, rung and measure, plus the band rows), learning_curve.md (a table per measure and the rung at which
each objective's mean clears the random band) and learning_curve.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_all sits beside this file

from run_all import (  # noqa: E402
    BASELINES,
    PRESETS,
    VARIANTS,
    _read_cell,
    cell_identity,
    prepare_work_dir,
    pretrain_config,
    pretrain_variant,
    pretrained_start,
    read_invocations,
    record_invocation,
    run_cell,
    run_task,
    table_entry,
    task_config,
)

from pretrain.checkpoint import atomic_torch_save  # noqa: E402
from pretrain.main_pretrain import PretrainConfig, build_models  # noqa: E402
from transfer.probe import PROBE_LAYERS  # noqa: E402

# Pretraining objectives: name -> PretrainConfig overrides, as run_all's VARIANTS (whose entries they reuse).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "ce-l2": VARIANTS["ce-l2"],  # the paper's recipe for AlexNet features: L2 only, random regions
    "ce-l2-lr1e-4": {**VARIANTS["ce-l2"], "lr": 1e-4},  # the same at a tenth of the learning rate
    "autoencoder": VARIANTS["autoencoder"],
    "supervised": VARIANTS["supervised"],  # the positive control
}
DEFAULT_OBJECTIVES = ("ce-l2", "autoencoder", "supervised")
TASKS = ("probe", "object_probe", "classify")
# run_all's presets (data, pretraining batch, task recipes) with the ladder of rungs: optimiser steps at which
# each run's checkpoint is evaluated, rung 0 being the untrained network. The quick one also calibrates the
# rescaling on 8 images instead of 32, the most of a tiny cell's time.
CURVE_PRESETS: dict[str, dict[str, Any]] = {
    "default": {**PRESETS["default"], "rungs": (0, 100, 300, 1000, 3000)},
    "quick": {**PRESETS["quick"], "rungs": (0, 2, 4), **{task: {**PRESETS["quick"][task], "calib_images": 8}
                                                        for task in TASKS}},
}
RUNG_CHECKPOINT = "checkpoint.pth"  # in each rung's folder: the network after that many steps


@dataclass(frozen=True)
class Measure:
    """One curve: a score of one task's cells."""

    name: str  # in the csv and the headings
    task: str  # the cells it comes from: probe, classify or pretrain (the run's own held-out evaluation)
    score: str  # key in those cells' scores
    label: str  # axis label
    higher_is_better: bool = True


MEASURES: tuple[Measure, ...] = (
    *(Measure(f"probe {layer}", "probe", f"{layer}/svm_mAP_11point", f"linear-SVM probe mAP, {layer} (%)")
      for layer in PROBE_LAYERS),
    *(Measure(f"object probe {layer}", "object_probe", f"{layer}/svm_mAP_11point",
              f"linear-SVM probe mAP on objects, {layer} (%)") for layer in ("conv5", "pool5")),
    Measure("classify", "classify", "mAP_11point", "fine-tuned classification mAP (%)"),
    Measure("inpainting L1", "pretrain", "l1", "held-out inpainting L1 over the hole (%)", higher_is_better=False),
)
REFERENCE_BAND = "random"  # the band each transfer measure's crossing is judged against (mean + std)
FILL_BAND = "mean-colour fill"  # inpainting L1's band: the hole filled with the mean colour of its context
SCALE = 100.0  # every measure is a fraction, shown in %


# ----------------------------------------------------------------------------------------------- pretraining
def objective_config(run: dict[str, Any], objective: str, seed: int, top_rung: int) -> PretrainConfig:
    """The one pretraining run of `objective` with `seed`: up to the ladder's top rung, at a constant lr (so a
    rung's network does not depend on how far the ladder goes), resumed from its newest checkpoint."""
    return dataclasses.replace(pretrain_config(run, objective, seed, OBJECTIVES[objective]), steps=top_rung,
                               stop_at=0, lr_schedule="constant")


def run_identity(cfg: PretrainConfig) -> dict[str, Any]:
    """What decides the run folder's checkpoints: every option but where the run stops (steps, stop_at)."""
    return cell_identity("pretrain", {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("steps", "stop_at")})


def rung_identity(cfg: PretrainConfig, rung: int) -> dict[str, Any]:
    """A rung's cell is what a run of exactly `rung` steps at the same constant lr computes."""
    return cell_identity("pretrain", dataclasses.replace(cfg, steps=rung, stop_at=0))


def rung_folder(cfg: PretrainConfig, rung: int) -> Path:
    return Path(cfg.output_dir) / cfg.name / f"rung-{rung:08d}"


def save_initial_weights(cfg: PretrainConfig, path: Path) -> None:
    """The network a pretraining run with `cfg` starts from, as a step-0 checkpoint that pretrain.hub loads like
    any other: pretrain's own seeding and builder, in the order its training loop starts with."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, _ = build_models(cfg)
    atomic_torch_save({"model": model.state_dict(), "step": 0, "config": dataclasses.asdict(cfg)}, path)


def keep_checkpoint(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes from now on, whatever the run's checkpoint rotation deletes later: a hard
    link (no copy of the file), or a copy where the file system has none."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def pretrain_to_rung(cfg: PretrainConfig, rung: int) -> tuple[str, dict[str, float], dict[str, Any]]:
    """Advance the run to `rung` steps and keep that checkpoint in the rung's folder; the scores are the run's
    held-out evaluation at that step. Rung 0 is a run of 0 steps in the rung's own folder (which evaluates the
    untrained network) and the network it starts from."""
    folder = rung_folder(cfg, rung)
    if rung == 0:
        result = pretrain_variant(dataclasses.replace(cfg, steps=0, output_dir=str(folder.parent), name=folder.name))
        save_initial_weights(cfg, folder / RUNG_CHECKPOINT)
        return result
    status, scores, extra = pretrain_variant(dataclasses.replace(cfg, stop_at=rung))
    run_dir = Path(cfg.output_dir) / cfg.name
    if scores.get("step") != rung:
        raise ValueError(f"{run_dir} is already at step {scores.get('step')}, past rung {rung}, so that rung's "
                         f"network is gone; delete {run_dir} to pretrain it again from the start")
    keep_checkpoint(run_dir / f"checkpoint-{rung:08d}.pth", folder / RUNG_CHECKPOINT)
    return status, scores, extra


# ----------------------------------------------------------------------------------------------- cells
def rung_start(objective: str, rung: int) -> str:
    """How a rung's cells name their start (their `start` field): the objective and the rung."""
    return f"{objective} rung {rung}"


def evaluate_rung(run: dict[str, Any], cells_dir: Path, objective: str, seed: int, rung: int, top_rung: int,
                  rerun_failed: bool) -> list[dict[str, Any]]:
    """The cells of one (objective, pretraining seed, rung): the pretraining up to that rung, then each transfer
    task on its checkpoint (transfer seed = pretraining seed); computed only where not stored fresh."""
    cfg = objective_config(run, objective, seed, top_rung)
    # A run folder left by other options or code is emptied, so no stale checkpoint is resumed.
    prepare_work_dir(Path(cfg.output_dir) / cfg.name, run_identity(cfg))
    start, identity, folder = rung_start(objective, rung), rung_identity(cfg, rung), rung_folder(cfg, rung)
    meta = {"start": start, "seed": seed, "objective": objective, "rung": rung}
    pretrain_cell = cells_dir / "pretrain" / objective / f"seed{seed}-rung{rung}.json"
    stored = _read_cell(pretrain_cell) if pretrain_cell.is_file() else None
    if stored and stored["status"] == "ok" and not (folder / RUNG_CHECKPOINT).is_file():
        pretrain_cell.unlink()  # its checkpoint is gone (a deleted work folder), and the transfer cells need it
    pretrained = run_cell(pretrain_cell, {"task": "pretrain", **meta}, identity, folder,
                          lambda: pretrain_to_rung(cfg, rung), False, rerun_failed)
    cells = [{**pretrained, **meta}]
    if pretrained["status"] != "ok":
        return cells
    init_id = pretrained_start(objective, identity)
    for task in TASKS:
        task_dir = run["work"] / task / objective / f"seed{seed}-rung{rung}"
        task_cfg = task_config(run, task, objective, str(folder / RUNG_CHECKPOINT), seed, task_dir)
        cell = run_cell(cells_dir / task / objective / f"seed{seed}-rung{rung}.json", {"task": task, **meta},
                        cell_identity(task, task_cfg, init_id), task_dir, lambda t=task, c=task_cfg: run_task(t, c),
                        False, rerun_failed)
        cells.append({**cell, **meta})
    return cells


def evaluate_baselines(run: dict[str, Any], cells_dir: Path, transfer_seeds: int, rerun_failed: bool) -> list[dict[str, Any]]:
    """run_all's random baselines (rescaled and raw) on every transfer task and transfer seed. A cell run_all
    stored under <out>/cells/ for the same task, start and seed is taken over when missing here: it is the same
    computation (same config and code hashes, output folders aside), and run_cell recomputes it if it is not."""
    cells = []
    for task in TASKS:
        for name, options in BASELINES.items():
            for seed in range(transfer_seeds):
                task_dir = run["work"] / task / name / f"seed{seed}"
                cfg = task_config(run, task, name, options["init"], seed, task_dir)
                meta = {"task": task, "start": name, "seed": seed}
                path = cells_dir / task / name / f"seed{seed}.json"
                run_all_cell = Path(run["out"]) / "cells" / task / name / f"seed{seed}.json"
                if not path.exists() and run_all_cell.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(run_all_cell, path)
                cell = run_cell(path, meta, cell_identity(task, cfg), task_dir,
                                lambda t=task, c=cfg: run_task(t, c), False, rerun_failed)
                cells.append({**cell, **meta})
    return cells


# ----------------------------------------------------------------------------------------------- numbers
def _values(cells: list[dict[str, Any]], task: str, start: str, key: str) -> list[float]:
    """The score `key` of every (task, start) cell that holds a result, NaN for a collapsed one."""
    return [math.nan if c["status"] == "collapsed" else c["scores"][key] for c in cells
            if c["task"] == task and c["start"] == start and c["status"] in ("ok", "collapsed")
            and (c["status"] == "collapsed" or key in c["scores"])]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value); NaN for none, or when one is NaN (a collapsed seed must not
    be averaged away)."""
    if not values or any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def has_holes(objective: str) -> bool:
    """An inpainting objective that drops part of the image (the autoencoder's "hole" is the whole image, so its
    held-out L1 is another quantity)."""
    options = OBJECTIVES[objective]
    return options.get("objective", "inpainting") == "inpainting" and options.get("mask", "random_region") != "none"


def measure_objectives(measure: Measure, objectives: list[str]) -> list[str]:
    """The objectives a measure has a curve for: every one, but inpainting L1 only for those with holes."""
    return [o for o in objectives if measure.task != "pretrain" or has_holes(o)]


def measure_bands(measure: Measure, objectives: list[str], rungs: list[int]) -> dict[str, tuple[str, str, str]]:
    """The bands drawn with `measure`, the reference band first: name -> (task, start, score key) of the cells
    its values come from. The mean-colour fill is the same for every rung and every objective with the same
    holes: its values are the first objective with holes' at the first rung."""
    if measure.task != "pretrain":
        return {name: (measure.task, name, measure.score) for name in BASELINES}
    holed = measure_objectives(measure, objectives)
    return {FILL_BAND: ("pretrain", rung_start(holed[0], rungs[0]), "mean_fill_l1")} if holed else {}


def crossing_rung(means: dict[int, float], threshold: float, higher_is_better: bool = True) -> int | None:
    """The first rung from which every later rung's mean is strictly beyond `threshold` (above it, or below it
    when lower is better); None when the last rung's is not (a NaN mean, e.g. a collapsed seed, never is)."""
    found = None
    for rung in sorted(means):
        m = means[rung]
        beyond = math.isfinite(m) and (m > threshold if higher_is_better else m < threshold)
        if not beyond:
            found = None
        elif found is None:
            found = rung
    return found


def crossing_sentence(measure: Measure, curves: dict[str, dict[int, float]], band_name: str, band: tuple[float, float],
                      batch_size: int) -> str:
    """One sentence: for each objective, the rung from which its mean clears the band's mean + std (mean - std
    when lower is better), computed from `curves` (objective -> {rung: mean, in %})."""
    band_mean, band_std = band
    if not math.isfinite(band_mean):
        return f"{measure.name}: no {band_name} band yet, so no crossing can be judged."
    sign, word = ("+", "above") if measure.higher_is_better else ("-", "below")
    threshold = band_mean + band_std if measure.higher_is_better else band_mean - band_std
    parts = []
    for objective, means in curves.items():
        rungs = [r for r, m in sorted(means.items()) if math.isfinite(m)]
        if not rungs:
            parts.append(f"{objective} has no result yet")
            continue
        rung = crossing_rung(means, threshold, measure.higher_is_better)
        if rung is None:
            parts.append(f"{objective} is not {word} it at the last rung measured ({max(means)})")
        else:
            since = "the untrained network" if rung == 0 else f"{rung * batch_size:,} images seen"
            parts.append(f"{objective} is {word} it from rung {rung} on ({since})")
    return (f"{measure.name}: against {band_name}'s mean {sign} std ({band_mean:.1f} {sign} {band_std:.1f} = "
            f"{threshold:.1f}), " + "; ".join(parts) + ".")


# ----------------------------------------------------------------------------------------------- outputs
def curve_table(cells: list[dict[str, Any]], objectives: list[str], rungs: list[int], batch_size: int) -> pd.DataFrame:
    """One row per objective, seed, rung and measure (kind "curve"), then one per band value (kind "band").
    value is in %; NaN with status "collapsed" for a seed the task judged collapsed."""
    rows = []
    for measure in MEASURES:
        for objective in measure_objectives(measure, objectives):
            for rung in rungs:
                for c in cells:
                    if c["task"] == measure.task and c["start"] == rung_start(objective, rung) and (
                            c["status"] == "collapsed" or (c["status"] == "ok" and measure.score in c["scores"])):
                        value = math.nan if c["status"] == "collapsed" else c["scores"][measure.score] * SCALE
                        rows.append({"kind": "curve", "objective": objective, "seed": c["seed"], "rung": rung,
                                     "images_seen": rung * batch_size, "measure": measure.name, "value": value,
                                     "status": c["status"]})
        for band, (task, start, key) in measure_bands(measure, objectives, rungs).items():
            for c in cells:
                if c["task"] == task and c["start"] == start and (
                        c["status"] == "collapsed" or (c["status"] == "ok" and key in c["scores"])):
                    rows.append({"kind": "band", "objective": band, "seed": c["seed"], "rung": None, "images_seen": None,
                                 "measure": measure.name,
                                 "value": math.nan if c["status"] == "collapsed" else c["scores"][key] * SCALE,
                                 "status": c["status"]})
    columns = ["kind", "objective", "seed", "rung", "images_seen", "measure", "value", "status"]
    df = pd.DataFrame(rows, columns=columns)
    return df.astype({"rung": "Int64", "images_seen": "Int64"})


def _curve_means(cells: list[dict[str, Any]], measure: Measure, objectives: list[str], rungs: list[int]
                 ) -> dict[str, dict[int, float]]:
    """objective -> {rung: mean over seeds, in %} for the rungs with a result."""
    curves: dict[str, dict[int, float]] = {}
    for objective in measure_objectives(measure, objectives):
        means = {}
        for rung in rungs:
            values = _values(cells, measure.task, rung_start(objective, rung), measure.score)
            if values:
                means[rung] = mean_std(values)[0] * SCALE
        curves[objective] = means
    return curves


def _band_stats(cells: list[dict[str, Any]], band: tuple[str, str, str]) -> tuple[float, float]:
    mean, std = mean_std(_values(cells, *band))
    return mean * SCALE, std * SCALE


def write_markdown(cells: list[dict[str, Any]], objectives: list[str], rungs: list[int], batch_size: int,
                   header: list[str], path: Path) -> list[str]:
    """learning_curve.md: a table per measure (rows objectives and bands, columns rungs) and its crossing
    sentence; returns the sentences."""
    lines = ["# Learning curve: pretraining steps against the random baselines", "", *header, ""]
    sentences = []
    for measure in MEASURES:
        bands = measure_bands(measure, objectives, rungs)
        rows = {}
        for objective in measure_objectives(measure, objectives):
            rows[objective] = {str(r): table_entry(cells, measure.task, rung_start(objective, r), measure.score)
                               for r in rungs}
        for band, (task, start, key) in bands.items():
            entry = table_entry(cells, task, start, key)
            rows[f"{band} (band)"] = {str(r): entry for r in rungs}
        table = pd.DataFrame.from_dict(rows, orient="index", columns=[str(r) for r in rungs])
        table.index.name = f"{measure.name} \\ rung"
        curves = _curve_means(cells, measure, objectives, rungs)
        reference = REFERENCE_BAND if measure.task != "pretrain" else FILL_BAND
        sentence = (crossing_sentence(measure, curves, reference, _band_stats(cells, bands[reference]), batch_size)
                    if reference in bands else f"{measure.name}: no band to judge against.")
        sentences.append(sentence)
        lines += [f"## {measure.name}: {measure.label}", "", table.to_markdown(), "", sentence, ""]
    path.write_text("\n".join(lines))
    return sentences


def plot_curves(cells: list[dict[str, Any]], objectives: list[str], rungs: list[int], batch_size: int,
                path: Path) -> dict[str, list[str]]:
    """One panel per measure: the mean over seeds (± std bars where there are several) against images seen on a
    log axis, rung 0 at the left edge; the bands as mean ± std stripes. Returns each panel's legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [r * batch_size for r in rungs if r > 0]
    zero_x = min(positive) / 4 if positive else 1.0  # where rung 0 sits on the log axis

    def x_of(rung: int) -> float:
        return rung * batch_size if rung > 0 else zero_x

    ncols = 4
    nrows = math.ceil(len(MEASURES) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    band_colours = {"random": "0.35", "random-raw": "tab:red", FILL_BAND: "0.35"}
    drawn: dict[str, list[str]] = {}
    for ax, measure in zip(axes.flat, MEASURES):
        labels = drawn[measure.name] = []
        for k, objective in enumerate(measure_objectives(measure, objectives)):
            points = [(x_of(r), *mean_std(v)) for r in rungs
                      if (v := _values(cells, measure.task, rung_start(objective, r), measure.score))]
            points = [(x, m * SCALE, s * SCALE) for x, m, s in points if math.isfinite(m)]
            if points:
                xs, ms, ss = zip(*points)
                ax.errorbar(xs, ms, yerr=ss, marker="o", ms=4, capsize=2, color=colours[k % len(colours)], label=objective)
                labels.append(objective)
        for band, source in measure_bands(measure, objectives, rungs).items():
            mean, std = _band_stats(cells, source)
            if math.isfinite(mean):
                colour = band_colours.get(band, "0.5")
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.15, lw=0)
                ax.axhline(mean, color=colour, lw=1, ls="--", label=f"{band} (mean ± std)")
                labels.append(f"{band} (mean ± std)")
        ax.set_xscale("log")
        ticks = [x_of(r) for r in rungs]
        ax.set_xticks(ticks, [f"{int(t):,}" if r > 0 else "0" for t, r in zip(ticks, rungs)], fontsize=7)
        ax.minorticks_off()
        ax.set_title(measure.name, fontsize=9)
        ax.set_xlabel("images seen in pretraining", fontsize=8)
        ax.set_ylabel(measure.label, fontsize=8)
        ax.grid(alpha=0.3)
        if labels:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(MEASURES):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------------- main
def parse_rungs(text: str) -> list[int]:
    try:
        rungs = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--rungs {text!r}: give optimiser steps as integers separated by commas, e.g. 0,100,300") from None
    if not rungs or any(r < 0 for r in rungs) or rungs != sorted(set(rungs)):
        raise SystemExit(f"--rungs {text!r}: give distinct non-negative steps in increasing order, e.g. 0,100,300")
    return rungs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES), choices=list(OBJECTIVES),
                        help="pretraining objectives to draw a curve for; ce-l2-lr1e-4 is ce-l2 at a tenth of its "
                             f"learning rate (default: {' '.join(DEFAULT_OBJECTIVES)})")
    parser.add_argument("--rungs", default="",
                        help="optimiser steps at which each run's checkpoint is evaluated, comma-separated and increasing; "
                             "0 is the untrained network (default: 0,100,300,1000,3000; with --quick 0,2,4)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="leave out the rungs above this many steps (0: none); a later call with a higher limit goes "
                             "on from the checkpoints this one leaves")
    parser.add_argument("--seeds", type=int, default=1, help="pretraining seeds evaluated at every rung (default: 1)")
    parser.add_argument("--last-rung-seeds", type=int, default=0,
                        help="this many more pretraining seeds, pretrained to the last rung reached and evaluated there "
                             "only (default: 0)")
    parser.add_argument("--transfer-seeds", type=int, default=2,
                        help="seeds of the random baselines' transfer runs, for the bands' mean ± std (default: 2)")
    parser.add_argument("--classify-epochs", type=int, default=0,
                        help="fine-tuning epochs of the classification task (0: the preset's recipe)")
    parser.add_argument("--preset", default="default", choices=["default", "quick"],
                        help="run_all's preset whose data, precision (fp32), pretraining batch and probe and classification "
                             "recipes are used: default (Table 2's recipes) or quick (tiny budgets, for tests)")
    parser.add_argument("--quick", action="store_true",
                        help="the same as --preset quick: rungs 0,2,4, 60 built-in images, batches of 8, tiny probe and "
                             "classification budgets")
    parser.add_argument("--data", default="builtin", help="'builtin' or a VOC-layout root")
    parser.add_argument("--data-cache", default="", help="where the built-in data is generated")
    parser.add_argument("--out", default="results",
                        help="folder for learning_curve.csv/.md/.png, with the cells under learning_curve/cells/")
    parser.add_argument("--work", default="",
                        help="folder for checkpoints and task outputs (default: runs/learning_curve/<name of --out>)")
    parser.add_argument("--rerun-failed", action="store_true", help="retry cells stored as errors")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    preset_name = "quick" if args.quick else args.preset
    preset = {**CURVE_PRESETS[preset_name]}
    if args.classify_epochs:
        preset["classify"] = {**preset["classify"], "epochs": args.classify_epochs}
    ladder = parse_rungs(args.rungs) if args.rungs else list(preset["rungs"])
    if args.seeds < 1 or args.last_rung_seeds < 0 or args.transfer_seeds < 1 or args.max_steps < 0:
        raise SystemExit("--seeds and --transfer-seeds must be at least 1, --last-rung-seeds and --max-steps at least 0")
    rungs = [r for r in ladder if not args.max_steps or r <= args.max_steps]
    if not rungs:
        raise SystemExit(f"--max-steps {args.max_steps} is below every rung ({', '.join(map(str, ladder))})")
    objectives = [o for o in OBJECTIVES if o in args.objectives]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own = out / "learning_curve"  # the cells and the invocation log; beside run_all's cells/, never among them
    cells_dir = own / "cells"
    work = Path(args.work) if args.work else Path("runs") / "learning_curve" / out.name
    run = {"preset": preset, "data": args.data, "data_cache": args.data_cache, "out": out, "work": work}
    top = ladder[-1]

    cells = evaluate_baselines(run, cells_dir, args.transfer_seeds, args.rerun_failed)
    seeds = list(range(args.seeds))
    for rung in rungs:  # rung by rung over every objective: a stopped invocation leaves whole early rungs
        for objective in objectives:
            for seed in seeds:
                cells += evaluate_rung(run, cells_dir, objective, seed, rung, top, args.rerun_failed)
    for objective in objectives:
        for seed in range(args.seeds, args.seeds + args.last_rung_seeds):
            cells += evaluate_rung(run, cells_dir, objective, seed, rungs[-1], top, args.rerun_failed)
    for c in cells:
        c["stale"] = None  # run_cell recomputed every stale cell; run_all's table_entry reads the verdict

    batch_size = objective_config(run, objectives[0], 0, top).batch_size
    wall = time.time() - t0
    record_invocation(own, argv_used, preset_name, wall)
    invocations = [f"- `{shlex.join(['python', 'benchmarks/learning_curve.py', *i['argv']])}` ({i['minutes']} min, "
                   f"finished {i['finished']})" for i in read_invocations(own)]
    failed = [c for c in cells if c["status"] == "error"]
    header = [f"Preset `{preset_name}` ({'built-in data' if args.data == 'builtin' else Path(args.data).name}): each "
              f"objective pretrained at a constant lr in batches of {batch_size}, so rung r is r steps = {batch_size}·r "
              f"images seen; rung 0 is the untrained network. Entries: mean ± sample std over pretraining seeds "
              f"({args.seeds}, plus {args.last_rung_seeds} more at the last rung), in %; a checkpoint of pretraining "
              f"seed k is fine-tuned and probed with transfer seed k. Band rows: {', '.join(BASELINES)} over "
              f"{args.transfer_seeds} transfer seeds (random: Krähenbühl et al.'s rescaling, as every start; "
              f"random-raw: none), repeated in every column. \"collapsed\": the task judged a seed's model collapsed.",
              "", "Produced by these invocations (each reuses the cells the earlier ones finished):", "", *invocations]
    if failed:
        header += ["", f"{len(failed)} cell(s) failed and are left out (their files under learning_curve/cells/ hold the "
                   "error; --rerun-failed retries them):", "",
                   *[f"- {c['task']} {c['start']} seed {c['seed']}: {c['error'][:160]}" for c in failed]]
    table = curve_table(cells, objectives, rungs, batch_size)
    table.to_csv(out / "learning_curve.csv", index=False)
    sentences = write_markdown(cells, objectives, rungs, batch_size, header, out / "learning_curve.md")
    drawn = plot_curves(cells, objectives, rungs, batch_size, out / "learning_curve.png")
    print((out / "learning_curve.md").read_text())
    print(f"{len(cells)} cells ({len(failed)} failed) in {wall / 60:.1f} min -> {out}/learning_curve.md")
    return {"cells": cells, "failed": failed, "table": table, "sentences": sentences, "plotted": drawn, "rungs": rungs,
            "wall_seconds": wall}


if __name__ == "__main__":
    main()
