"""Run every (start x task x seed) comparison and collect pandas tables and plots in results/.

    python benchmarks/run_all.py                       # the default preset: Table 2's starts, 2 seeds (no retrieval)
    python benchmarks/run_all.py --preset full         # every variant and task, 3 seeds
    python benchmarks/run_all.py --quick               # a small preset (< 5 min), used by a test
    python benchmarks/run_all.py --data ../shared/data/camvid-voc --out results/camvid
    python benchmarks/run_all.py --only variants=ce-l2,autoencoder tasks=classify,probe seeds=0
    python benchmarks/run_all.py --torchvision /weights/alexnet.pth   # adds an ImageNet-supervised row

Shape (after lightly's benchmarks/imagenet/resnet50/main.py): `VARIANTS` is a plain dict of pretraining
variants, `TASKS` a plain dict of evaluations (task name -> its config class and its `main`, which writes
`metrics.json` with the common header that `read_task_result` reads). Every finished cell (one pretraining
run, or one task x start x seed) is stored as JSON under <out>/cells/ the moment it finishes, with its
provenance: the git commit, the hash of its resolved config, the hash of its task's code (`TASK_SOURCES`) and
the package versions. A rerun skips a cell whose config and code hashes are what they would be now, so a
killed run loses at most the cell in progress (pretraining cells resume from their last checkpoint); a
stored cell whose hashes differ is stale and is recomputed (`--keep-stale`: kept, and marked stale in the
tables and the summary); a cell file without provenance is never trusted. A failing cell is recorded with
its error and the rest go on; a collapsed one (the task's own verdict) shows as "collapsed", never as a number.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shlex
import shutil
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

from pretrain.data import OBJECT_CONTEXT  # noqa: E402
from pretrain.main_pretrain import PretrainConfig  # noqa: E402
from pretrain.main_pretrain import main as pretrain_main  # noqa: E402
from pretrain.precision import resolve_amp  # noqa: E402
from pretrain.provenance import (  # noqa: E402
    OUTPUT_FIELDS,
    config_dict,
    config_hash,
    git_commit,
    package_versions,
    project_sources,
    source_hash,
)
from transfer import classify, colour_histogram, detect, object_probe, probe, retrieve, segment  # noqa: E402
from transfer.experiment import select_device  # noqa: E402

# Pretraining variants: name -> PretrainConfig overrides (on top of the preset's pretraining budget).
VARIANTS: dict[str, dict[str, Any]] = {
    "ce-l2": {"mask": "random_region", "lambda_adv": 0.0},  # the paper's setting for AlexNet features (the default)
    "ce-l2-adv": {"mask": "random_region", "lambda_adv": 0.001},
    "ce-center": {"mask": "center", "lambda_adv": 0.0},
    "ce-poolfree": {"mask": "random_region", "lambda_adv": 0.0, "encoder": "alexnet-poolfree"},
    "autoencoder": {"mask": "none", "lambda_adv": 0.0},
    # the positive control: the same trunk trained on labelled object crops, centred ones and then crops with up to
    # 3x the object's size of context at random places (budget: CONTROL_STEPS_FACTOR below)
    "supervised": {"objective": "supervised", "supervised_max_context": 3.0},
}
# The supervised control trains on centred crops for the preset's pretraining budget (the context encoder's), then on
# drawn crops up to this many budgets in all. Trained on centred crops alone, at the context encoder's budget, its
# features did not carry over to whole scenes: its own classifier fell from 37.8 % top-1 on 1.3x crops to 9.0 % on
# 3x ones, and no whole-image measure told it from random filters. The drawn crops need the longer run.
CONTROL_STEPS_FACTOR = 4.5
# Baselines: name -> the task options that make them. Every start goes through the rescaling protocol
# (--rescale) except the raw Gaussian row, kept to show what the protocol is worth.
BASELINES: dict[str, dict[str, Any]] = {
    "random": {"init": "random"},  # Gaussian, then Krähenbühl et al.'s rescaling, as every start
    "random-raw": {"init": "random", "rescale": False},  # "random, no rescaling"
}

# Presets: which variants and how many seeds by default, each command's config overrides (the recipes), and the
# precision every cell computes in (`amp`, applied to pretraining and every task). The recipes are the same in
# "default" and "full"; "full" only adds variants and seeds. results/summary.md gives the measured minutes per task.
# fp32 by default: bf16 changes the numbers a little and only some machines have it, so a table computed in fp32
# holds the same cells whichever machine computed them, and a run interrupted on one machine goes on on another
# (`--amp auto` is faster on a bf16 CPU or a GPU, in cells of its own).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "variants": ["ce-l2", "autoencoder", "supervised"], "seeds": 1, "tasks": "all", "amp": "none",
        "data": {"builtin_images": 60},
        "pretrain": {"steps": 3, "batch_size": 8, "workers": 0, "eval_images": 8, "ckpt_every": 3},
        "classify": {"epochs": 1, "batch_size": 16, "fc_width": 128, "ten_crop": False, "workers": 0},
        "probe": {"workers": 0, "cv_folds": 2, "knn_k": 5},
        "object_probe": {"workers": 0, "cv_folds": 2, "knn_k": 5, "max_objects": 40},
        "detect": {"epochs": 1, "batch_size": 4, "min_size": 128, "max_size": 160, "representation_size": 128,
                   "workers": 0, "warmup_epochs": 0.0, "vis_images": 2},
        "segment": {"epochs": 1, "batch_size": 8, "fc_width": 64, "crop_size": 128, "workers": 0},
        "retrieve": {"queries": 8, "gallery": 2, "max_images": 40},
    },
    "default": {  # Table 2's starts: context encoder (paper's recipe), autoencoder, supervised, random with and without
        "variants": ["ce-l2", "autoencoder", "supervised"], "seeds": 2, "amp": "none",
        # Left out (`--preset full` or --only adds it): retrieval (deterministic, Table 1's measure, not Table 2's).
        "tasks": ["classify", "probe", "object_probe", "detect", "segment", "colour_histogram"],
        "data": {},
        "pretrain": {},  # the default `python -m pretrain` budget (380 steps)
        "classify": {"fc_width": 1024, "ten_crop": False},  # the task's 8 epochs; centre crop: a tenth of the test cost
        "probe": {},
        "object_probe": {},
        "detect": {},  # the task's 2 epochs
        "segment": {},  # the task's 10 epochs: with 3, every start, the supervised control included, collapsed
        "retrieve": {"queries": 200, "gallery": 12},
    },
}
PRESETS["full"] = {**PRESETS["default"], "variants": list(VARIANTS), "seeds": 3, "tasks": "all"}  # the same recipes


# ----------------------------------------------------------------------------------------------- tasks
# Each transfer task: its config dataclass and its `main(cfg)`, which writes <cfg.out>/metrics.json (the common
# header, see read_task_result) and returns the same dict.
TASKS: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "classify": (classify.ClassifyConfig, classify.main),
    "probe": (probe.ProbeConfig, probe.main),
    "object_probe": (object_probe.ObjectProbeConfig, object_probe.main),
    "detect": (detect.DetectConfig, detect.main),
    "segment": (segment.SegmentConfig, segment.main),
    "retrieve": (retrieve.RetrieveConfig, retrieve.main),
    "colour_histogram": (colour_histogram.ColourHistogramConfig, colour_histogram.main),
}
# Tasks that evaluate no trunk: their one "start" is the method itself, run once (it is deterministic).
STARTLESS_TASKS: dict[str, str] = {"colour_histogram": "colour-histogram"}
# Frozen-trunk tasks: deterministic SVMs and kNN on the features, so on a pretrained start (its trunk fixed by
# its one pretraining) the transfer seed changes nothing but rounding: one cell, shown without a ±, instead of
# seeds whose ± would be rounding passed off as spread. A random start keeps every seed: the seed draws its trunk.
FROZEN_TASKS = ("probe", "object_probe")


def runs_one_seed(task: str, start: str) -> bool:
    """Whether a (task, start) pair runs its first seed only: retrieval and start-free tasks (deterministic given
    the init), and a frozen-trunk task on a pretrained start."""
    return task == "retrieve" or task in STARTLESS_TASKS or (task in FROZEN_TASKS and start not in BASELINES)


def seeds_of(task: str, start: str, seeds: list[int]) -> list[int]:
    """The seeds a (task, start) pair runs (`runs_one_seed`: the first; else every one)."""
    return seeds[:1] if runs_one_seed(task, start) else seeds

# The files whose contents decide each task's numbers: its module and every project module it imports, directly
# or not. A stored cell whose files hash differently from now is stale.
TASK_SOURCES: dict[str, tuple[str, ...]] = {
    "pretrain": project_sources(inspect.getsourcefile(pretrain_main)),
    **{task: project_sources(inspect.getsourcefile(main)) for task, (_, main) in TASKS.items()},
}


# The common header every transfer task's metrics.json starts with (written by the task, read here).
HEADER_FIELDS = ("task", "init", "init_label", "seed", "data", "commit", "config_hash", "versions", "wall_seconds",
                 "checkpoint", "status", "collapse_reason", "scores")
RESULT_STATUSES = ("ok", "collapsed")


def read_task_result(path: Path) -> tuple[str, dict[str, float], dict[str, Any]]:
    """(status, scores, provenance) from a transfer task's metrics.json.

    status is "ok" or "collapsed"; scores the flat {name: float} the tables use (JSON "inf"/"-inf" and null
    read as inf/-inf/NaN); provenance the other header fields (task, init, init_label, seed, data, commit,
    config_hash, versions, wall_seconds, checkpoint, collapse_reason). Raises ValueError naming the file when
    the header is missing or malformed.
    """
    try:
        metrics = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no metrics.json; the task's main must write it into its --out folder") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun the task") from None
    missing = [k for k in HEADER_FIELDS if k not in metrics] if isinstance(metrics, dict) else list(HEADER_FIELDS)
    if missing:
        raise ValueError(f"{path}: metrics.json lacks the common header field(s) {', '.join(missing)}; it was written "
                         "by a task that does not write the header: rerun it with the current code")
    status = metrics["status"]
    if status not in RESULT_STATUSES:
        raise ValueError(f"{path}: status {status!r} is not one of {', '.join(RESULT_STATUSES)}")
    if status == "collapsed" and not metrics["collapse_reason"]:
        raise ValueError(f"{path}: status 'collapsed' needs a collapse_reason saying what collapsed")
    if not isinstance(metrics["scores"], dict):
        raise ValueError(f"{path}: scores must be a flat {{name: number}} object, got {type(metrics['scores']).__name__}")
    scores: dict[str, float] = {}
    for name, value in metrics["scores"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[name] = float(value)
        elif value is None:  # NaN, as the tasks write it
            scores[name] = math.nan
        elif value in ("inf", "-inf"):
            scores[name] = float(value)
        else:
            raise ValueError(f"{path}: score {name!r} is {value!r}, not a number (scores must be flat {{name: number}})")
    provenance = {k: metrics[k] for k in HEADER_FIELDS if k not in ("status", "scores")}
    return status, scores, provenance


def task_config(run: dict[str, Any], task: str, start: str, init: str, seed: int, out: Path) -> Any:
    """The task's config for one cell: the preset's precision and overrides, this cell's start (and a baseline's
    own options), seed and output folder."""
    cls = TASKS[task][0]
    fields = {"amp": run["preset"]["amp"], **run["preset"].get(task, {}), **BASELINES.get(start, {}), "init": init,
              "seed": seed, "out": str(out), "data": run["data"], "data_cache": run["data_cache"],
              **run["preset"]["data"]}
    return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


def pretrain_config(run: dict[str, Any], variant: str, seed: int,
                    overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """The pretraining of `variant` with `seed` under the run's preset; `overrides` replaces VARIANTS[variant] for a
    runner with pretraining variants of its own (benchmarks/learning_curve.py)."""
    fields = {"amp": run["preset"]["amp"], **run["preset"]["pretrain"],
              **(VARIANTS[variant] if overrides is None else overrides), **run["preset"]["data"]}
    if fields.get("objective") == "supervised" and fields.get("supervised_max_context", OBJECT_CONTEXT) > OBJECT_CONTEXT:
        budget = fields.get("steps", PretrainConfig.steps)  # the preset's budget, or the pretraining default
        fields = {**fields, "supervised_centred_steps": budget, "steps": math.ceil(budget * CONTROL_STEPS_FACTOR)}
    return PretrainConfig(**fields, name=f"{variant}-seed{seed}", output_dir=str(run["work"] / "pretrain"), data=run["data"],
                          data_cache=run["data_cache"], seed=seed, resume=True)


def pretrain_variant(cfg: PretrainConfig) -> tuple[str, dict[str, float], dict[str, Any]]:
    results = pretrain_main(cfg)
    return "ok", {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}, {}


def run_task(task: str, cfg: Any) -> tuple[str, dict[str, float], dict[str, Any]]:
    """Run one transfer task and read what it wrote: (status, scores, fields for the cell)."""
    metrics_path = Path(cfg.out) / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # a result left by an earlier run must never pass for this one's
    TASKS[task][1](cfg)
    status, scores, provenance = read_task_result(metrics_path)
    if provenance["task"] != task:
        raise ValueError(f"{metrics_path}: written by task {provenance['task']!r}, expected {task!r}")
    checkpoint = provenance["checkpoint"]
    if isinstance(checkpoint, dict) and "path" in checkpoint:
        checkpoint = {**checkpoint, "path": _portable(str(checkpoint["path"]))}
    extra: dict[str, Any] = {"task_result": {**provenance, "init": _portable(str(provenance["init"])),
                                             "data": _portable(str(provenance["data"])), "checkpoint": checkpoint}}
    if status == "collapsed":
        extra["collapse_reason"] = provenance["collapse_reason"]
    return status, scores, extra


# ----------------------------------------------------------------------------------------------- provenance
def code_hash(task: str) -> str:
    return source_hash(*TASK_SOURCES[task])


def _portable(value: Any) -> Any:
    """An absolute path (also after `torchvision:`) as one relative to the working directory, so that cells,
    logs and the summary in results/ name no machine paths; anything else unchanged."""
    if not isinstance(value, str):
        return value
    prefix, path = ("torchvision:", value[len("torchvision:"):]) if value.startswith("torchvision:") else ("", value)
    return prefix + os.path.relpath(path) if os.path.isabs(path) else value


def cell_identity(task: str, config: Any, init: dict[str, str] | None = None) -> dict[str, Any]:
    """What decides a cell's numbers: its resolved config (output fields left out, paths relative; a pretrained
    start named by its pretraining cell's hashes instead of a folder), that config's hash, and its code's hash."""
    cfg = {k: _portable(v) for k, v in config_dict(config).items() if k not in OUTPUT_FIELDS}
    if cfg.get("amp") == "auto":  # as the run will resolve it here: fp32 and bf16 cells never share a hash
        cfg["amp"] = resolve_amp("auto", select_device(cfg.get("device", "auto")))
    if init is not None:
        cfg["init"] = init
    cfg = json.loads(json.dumps(cfg, default=str))  # tuples as lists: as the stored cell holds it
    return {"config": cfg, "config_hash": config_hash(cfg), "code_hash": code_hash(task)}


def pretrained_start(variant: str, pretrain_identity: dict[str, Any]) -> dict[str, str]:
    """How a transfer cell names a pretrained start in its config: the pretraining cell's variant and hashes."""
    return {"pretrain": variant, "config_hash": pretrain_identity["config_hash"],
            "code_hash": pretrain_identity["code_hash"]}


PROVENANCE_FIELDS = ("commit", "config_hash", "code_hash", "versions")
NO_PROVENANCE = "has no provenance (commit, config and code hashes), so nothing says what computed its numbers"


def has_provenance(cell: Any) -> bool:
    return (isinstance(cell, dict) and isinstance(cell.get("provenance"), dict)
            and all(k in cell["provenance"] for k in PROVENANCE_FIELDS) and "config" in cell)


def stale_reason(cell: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """Why a stored cell is not what computing it now would give (None: it is)."""
    reasons = []
    if cell["provenance"]["config_hash"] != identity["config_hash"]:
        old, new = cell["config"], identity["config"]
        changed = [f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
        reasons.append(f"config changed ({'; '.join(changed)})" if changed else "config hash changed")
    if cell["provenance"]["code_hash"] != identity["code_hash"]:
        reasons.append(f"code changed (hash {cell['provenance']['code_hash']} -> {identity['code_hash']})")
    return ", ".join(reasons) or None


def _read_cell(path: Path) -> dict[str, Any] | None:
    """The stored cell, or None when the file cannot be trusted (unreadable, or without provenance)."""
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cell if has_provenance(cell) else None


def prepare_work_dir(folder: Path, identity: dict[str, Any]) -> None:
    """Make `folder` (checkpoints a killed cell resumes from) belong to this cell: a folder left by a cell with
    other hashes, or of unknown origin, is emptied first, so a stale checkpoint is never resumed."""
    marker = folder / "cell-identity.json"
    key = {"config_hash": identity["config_hash"], "code_hash": identity["code_hash"]}
    if folder.exists():
        try:
            same = json.loads(marker.read_text()) == key
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(key))


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


def run_cell(path: Path, meta: dict[str, Any], identity: dict[str, Any], work: Path,
             compute: Callable[[], tuple[str, dict[str, float], dict[str, Any]]], keep_stale: bool,
             rerun_failed: bool, redo: bool = False) -> dict[str, Any]:
    """The cell at `path` as computing it now would give: the stored one when its hashes match `identity`
    (unless it failed and `rerun_failed`, or `redo`), else `compute()` run in `work` and stored at once, with its
    provenance (or its error). With `keep_stale` a stale stored cell is returned instead of recomputed."""
    label = f"{meta['task']} {meta['start']} seed {meta['seed']}"
    if path.exists() and not redo:
        cell = _read_cell(path)
        if cell is None:
            if keep_stale:
                raise SystemExit(f"{path} {NO_PROVENANCE}: it cannot be kept. Delete it, or run without --keep-stale "
                                 f"to recompute it.")
            print(f"[redo] {label}: {path} {NO_PROVENANCE}", flush=True)
        elif (why := stale_reason(cell, identity)) is None:
            if cell["status"] != "error" or not rerun_failed:
                print(f"[skip] {label}: already {cell['status']}", flush=True)
                return cell
        elif keep_stale:
            print(f"[keep] {label}: stale ({why}), kept (--keep-stale)", flush=True)
            return cell
        else:
            print(f"[redo] {label}: stale ({why})", flush=True)
    print(f"[run ] {label}", flush=True)
    start = time.time()
    try:
        prepare_work_dir(work, identity)
        status, scores, extra = compute()
        cell = {"status": status, "scores": scores, **extra}
    except Exception as err:  # noqa: BLE001 - one failing cell must not stop the others
        cell = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(f"[fail] {label}: {cell['error']}", flush=True)
    cell = {**meta, **cell, "seconds": round(time.time() - start, 1),
            "provenance": {"commit": git_commit(), "config_hash": identity["config_hash"],
                           "code_hash": identity["code_hash"], "versions": package_versions()},
            "config": identity["config"]}
    _write_json(path, cell)
    return cell


def _cell_files(out: Path) -> list[Path]:
    """cells/pretrain/<variant>.json and cells/<task>/<start>/seed<k>.json."""
    return sorted(out.glob("cells/*/*.json")) + sorted(out.glob("cells/*/*/*.json"))


def cell_work(run: dict[str, Any], task: str, start: str, seed: int) -> Path:
    """Where a cell's full outputs go (checkpoints, indexes, galleries): under --work, never in results/."""
    if task == "pretrain":
        return run["work"] / "pretrain" / f"{start}-seed{seed}"
    return run["work"] / task / start / f"seed{seed}"


def known_starts(run: dict[str, Any], pretrain_ids: dict[str, dict[str, Any]], torchvision: str,
                 task: str) -> dict[str, tuple[str, dict[str, str] | None]]:
    """Every start of `task` this run knows: table name -> (--init value, the init a cell's identity names;
    for a pretrained start, the pretraining cell's hashes as it would be now)."""
    if task in STARTLESS_TASKS:
        return {STARTLESS_TASKS[task]: (STARTLESS_TASKS[task], None)}
    starts: dict[str, tuple[str, dict[str, str] | None]] = {
        v: (str(cell_work(run, "pretrain", v, 0)), pretrained_start(v, pretrain_ids[v])) for v in VARIANTS}
    starts.update({name: (options["init"], None) for name, options in BASELINES.items()})
    if torchvision:
        starts["torchvision"] = (f"torchvision:{torchvision}", None)
    if task == "retrieve":
        starts["hog"] = ("hog", None)  # the non-learned baseline of Table 1
    return starts


def judge_cells(out: Path, identity_of: Callable[[str, str, int], dict[str, Any] | None]
                ) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every stored cell, each with "stale" (why it is not what computing it now would give; None when it is)
    and "path" (under `out`) added; and the cell files refused because they carry no provenance."""
    cells, refused = [], []
    for path in _cell_files(out):
        cell = _read_cell(path)
        if cell is None:
            refused.append(path)
            continue
        identity = identity_of(cell["task"], cell["start"], cell["seed"])
        cell["stale"] = ("this run cannot rebuild its config (its task or start is not part of this run)"
                         if identity is None else stale_reason(cell, identity))
        cell["path"] = path.relative_to(out).as_posix()
        cells.append(cell)
    return cells, refused


def one_cell_per_seedless_pair(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells for the tables: of a (task, start) pair that runs one seed (`runs_one_seed`), only its lowest
    stored seed; cells of other seeds (e.g. a frozen probe of a pretrained start computed per seed before) stay
    on disk but would repeat that number as if it were a spread."""
    lowest: dict[tuple[str, str], int] = {}
    for c in cells:
        if runs_one_seed(c["task"], c["start"]):
            key = (c["task"], c["start"])
            lowest[key] = min(lowest.get(key, c["seed"]), c["seed"])
    return [c for c in cells if lowest.get((c["task"], c["start"]), c["seed"]) == c["seed"]]


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


def _results(cells: list[dict[str, Any]], task: str, start: str) -> list[dict[str, Any]]:
    """The cells of (task, start) that hold a result: every seed, ok or collapsed (not the failed ones)."""
    return [c for c in cells if c["task"] == task and c["start"] == start and c["status"] in RESULT_STATUSES]


def table_entry(cells: list[dict[str, Any]], task: str, start: str, key: str, scale: float = 100.0) -> str:
    """Mean ± sample std over the seeds of score `key`. When a seed collapsed, "collapsed" (in k of n seeds), never
    a number: a mean over the other seeds would hide it. " (stale)" when a seed's cell is stale (--keep-stale)."""
    group = [c for c in _results(cells, task, start) if c["status"] == "collapsed" or key in c["scores"]]
    if not group:
        return "–"
    collapsed = sum(c["status"] == "collapsed" for c in group)
    if collapsed:
        text = "collapsed" if collapsed == len(group) else f"collapsed in {collapsed} of {len(group)} seeds"
    else:
        text = _mean_std([c["scores"][key] for c in group], scale)
    return text + (" (stale)" if any(c["stale"] for c in group) else "")


# The positive control: a start known to be good must beat the random (rescaled) start on a measure, or the
# measure cannot see features and its rows cannot be read.
CONTROL, CONTROL_AGAINST = "supervised", "random"


def control_verdict(cells: list[dict[str, Any]], task: str, key: str) -> str:
    """Whether `task`'s score `key` tells the supervised start from the random one: "passes" when the supervised
    mean beats the random mean by more than two standard deviations (the larger of the two starts' sample std
    over seeds), else "NOT DISCRIMINATING" (also when a seed of either collapsed); "–" while either has fewer
    than two finished seeds. A start that runs one seed of this task (`runs_one_seed`: a frozen probe of the
    pretrained supervised start) needs one; the spread is then the other start's."""
    values = {}
    for start in (CONTROL, CONTROL_AGAINST):
        group = [c for c in _results(cells, task, start) if not c["stale"]]
        if any(c["status"] == "collapsed" for c in group):
            return f"NOT DISCRIMINATING: {start} collapsed"
        vals = [100 * c["scores"][key] for c in group if key in c["scores"]]
        if len(vals) < (1 if runs_one_seed(task, start) else 2):
            return "–"
        values[start] = vals
    good, rand = values[CONTROL], values[CONTROL_AGAINST]
    spreads = [np.std(v, ddof=1) for v in (good, rand) if len(v) > 1]
    if not spreads:
        return "–"
    gap, spread = np.mean(good) - np.mean(rand), max(spreads)
    verdict = "passes" if gap > 2 * spread else "NOT DISCRIMINATING"
    return f"{verdict}: {gap:+.1f} (2 std = {2 * spread:.1f})"


def build_tables(cells: list[dict[str, Any]], starts: list[str], out: Path, data_label: str) -> dict[str, Path]:
    """results/transfer.*, probes.* (+ png), inpainting.* from the stored cells (each with its "stale" verdict)."""
    written: dict[str, Path] = {}
    # (column, task, score): Table 2's three tasks, then the object probe's pool5 (the measure whose control passes)
    columns = [("classification mAP (VOC07 11-pt)", "classify", "mAP_11point"),
               ("detection mAP@0.5 (VOC07 11-pt)", "detect", "mAP_11point"),
               ("segmentation mIoU", "segment", "mIoU"),
               ("object probe, pool5 SVM mAP (VOC07 11-pt)", "object_probe", "pool5/svm_mAP_11point")]
    tasks = [task for _, task, _ in columns]
    rows = {s: {**{col: table_entry(cells, task, s, key) for col, task, key in columns},
                "seeds": max(len(_results(cells, t, s)) for t in tasks)}
            for s in starts if any(_results(cells, t, s) for t in tasks)}
    if _results(cells, "colour_histogram", "colour-histogram"):  # the trivial baseline: colour statistics only
        rows["colour histogram + logistic regression (trivial)"] = {
            **{col: "–" for col, _, _ in columns}, "seeds": "–",
            "classification mAP (VOC07 11-pt)": table_entry(cells, "colour_histogram", "colour-histogram", "mAP_11point")}
    rows[f"positive control ({CONTROL} - {CONTROL_AGAINST})"] = {
        **{col: control_verdict(cells, task, key) for col, task, key in columns}, "seeds": "–"}
    for name, cls_, det, seg in PAPER_TABLE2:
        rows[name] = {"classification mAP (VOC07 11-pt)": f"{cls_:.1f}", "detection mAP@0.5 (VOC07 11-pt)": f"{det:.1f}",
                      "segmentation mIoU": f"{seg:.1f}", "object probe, pool5 SVM mAP (VOC07 11-pt)": "–", "seeds": "–"}
    transfer_df = pd.DataFrame.from_dict(rows, orient="index")
    transfer_df.index.name = "start"
    _save_table(transfer_df, out / "transfer", f"Transfer (Table 2 layout) on {data_label}",
                "Mean ± sample std over seeds, in %; \"collapsed\": the task judged a seed's model collapsed (the "
                "summary names each), \"(stale)\": computed by other code or options than the current ones. The "
                "positive-control row says whether each measure tells the supervised start from the random one (by "
                "more than two standard deviations); a column marked NOT DISCRIMINATING cannot rank the other starts. Rows "
                "marked [published] are the paper's ImageNet-scale AlexNet numbers on VOC2007/2012, for reference "
                "only: they are not comparable to this data's scale.")
    written["transfer"] = out / "transfer.md"

    for task, name, what in (("probe", "probes", "whole images (centre crop, image labels)"),
                             ("object_probe", "object_probes", "objects (each annotated object's crop, its class)")):
        if any(c["task"] == task for c in cells):
            written[name] = _probe_table(cells, starts, task, out / name, f"{data_label}, {what}")

    inp_rows: dict[str, dict[str, str]] = {}

    def inpainting_row(start: str, prefix: str = "") -> dict[str, str] | None:
        if not any(prefix + "l1" in c["scores"] or c["status"] == "collapsed" for c in _results(cells, "retrieve", start)):
            return None
        return {"mean L1 (%)": table_entry(cells, "retrieve", start, prefix + "l1"),
                "mean L2 (%)": table_entry(cells, "retrieve", start, prefix + "l2"),
                "PSNR (dB)": table_entry(cells, "retrieve", start, prefix + "psnr", 1.0),
                "patch precision@k (%)": table_entry(cells, "retrieve", start, "precision_at_k") if not prefix else "–"}

    for s in starts:
        row = inpainting_row(s)
        if row:
            inp_rows["NN-inpainting, HOG features" if s == "hog" else f"NN-inpainting, {s} features"] = row
    for s in starts:
        row = inpainting_row(s, "ce_")
        if row:
            inp_rows[f"context encoder {s}, own fill (centre hole)"] = row
    for s in starts:  # the same for every start: the mean colour of the same queries' contexts
        row = inpainting_row(s, "mean_fill_")
        if row:
            inp_rows["mean-colour fill (centre hole)"] = row
            break
    holes = {"random_region": "random-region holes", "random_block": "random blocks", "center": "centre hole",
             "none": "whole image"}  # what each variant's held-out pretraining evaluation scores
    for c in cells:
        if c["task"] == "pretrain" and c["status"] == "ok" and "l1" in c["scores"]:  # supervised fills no hole
            hole = holes.get(VARIANTS.get(c["start"], {}).get("mask", "random_region"), "holes")
            own = {"mean L1 (%)": table_entry([c], "pretrain", c["start"], "l1"),
                   "mean L2 (%)": table_entry([c], "pretrain", c["start"], "l2"),
                   "PSNR (dB)": table_entry([c], "pretrain", c["start"], "psnr", 1.0), "patch precision@k (%)": "–"}
            inp_rows[f"context encoder {c['start']}, own fill ({hole}, held out)"] = own
            inp_rows.setdefault(f"mean-colour fill ({hole}, held out)", {
                "mean L1 (%)": table_entry([c], "pretrain", c["start"], "mean_fill_l1"),
                "mean L2 (%)": table_entry([c], "pretrain", c["start"], "mean_fill_l2"),
                "PSNR (dB)": table_entry([c], "pretrain", c["start"], "mean_fill_psnr", 1.0), "patch precision@k (%)": "–"})
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


PROBE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")


def _probe_table(cells: list[dict[str, Any]], starts: list[str], task: str, path: Path, label: str) -> Path:
    """<path>.md/.csv (per start and layer, mean ± std of the SVM mAP, and the positive-control row) and <path>.png."""
    layers = list(PROBE_LAYERS)
    rows = {s: {layer: table_entry(cells, task, s, f"{layer}/svm_mAP_11point") for layer in layers}
            for s in starts if _results(cells, task, s)}
    rows[f"positive control ({CONTROL} - {CONTROL_AGAINST})"] = {
        layer: control_verdict(cells, task, f"{layer}/svm_mAP_11point") for layer in layers}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "start"
    _save_table(df, path, f"Frozen linear-SVM probes per layer on {label}",
                "VOC07 11-point mAP (%) of per-class linear SVMs on average-pooled frozen features (Goyal et al. 2019 "
                "settings), mean ± std over seeds. The positive-control row as in transfer.md.")
    _plot_probes(cells, starts, task, layers, path.with_suffix(".png"), label)
    return path.with_suffix(".md")


def _plot_probes(cells: list[dict[str, Any]], starts: list[str], task: str, layers: list[str], path: Path,
                 label: str) -> None:
    """Mean SVM probe mAP per layer for each start (collapsed seeds left out; a stale start's label says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in starts:
        ok = [c for c in _results(cells, task, s) if c["status"] == "ok"]
        means = [np.mean(v) * 100 if (v := [c["scores"][f"{layer}/svm_mAP_11point"] for c in ok
                                             if f"{layer}/svm_mAP_11point" in c["scores"]]) else np.nan
                 for layer in layers]
        if not all(np.isnan(means)):
            ax.plot(layers, means, marker="o", label=s + (" (stale)" if any(c["stale"] for c in ok) else ""))
    ax.set_xlabel("layer")
    ax.set_ylabel("linear-SVM mAP (%)")
    ax.set_title(f"Frozen probes per layer\n({label})", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    import torch

    return {**package_versions(), "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "cpu": cpu_model(), "machine": platform.machine(), "git commit": git_commit()}


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
    parser.add_argument("--preset", default="default", choices=list(PRESETS),
                        help="default: the context encoder, autoencoder and supervised starts plus the random baselines, "
                             "2 seeds, every task but retrieval; full: every variant and "
                             "task, 3 seeds, the same recipes; quick: tiny budgets, for smoke tests")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    parser.add_argument("--amp", choices=("none", "auto", "bf16"),
                        help="precision of every cell (default: the preset's, none = fp32, the same on every machine); "
                             "auto: bf16 where the CPU or GPU has it, faster, in cells of their own")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per (start, task) (default: the preset's)")
    parser.add_argument("--only", nargs="*", default=[], help="variants=.. tasks=.. seeds=.. starts=.. filters")
    parser.add_argument("--torchvision", default="", help="a local torchvision AlexNet state dict: adds that start")
    parser.add_argument("--rerun-failed", action="store_true", help="retry cells stored as errors")
    parser.add_argument("--keep-stale", action="store_true",
                        help="keep stored cells computed by other code or options than now (stale) instead of recomputing "
                             "them; the tables mark them and the summary lists them")
    args = parser.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset_name = args.preset = "quick" if args.quick else args.preset
    preset = {**PRESETS[preset_name], "amp": args.amp or PRESETS[preset_name]["amp"]}
    args.seeds = args.seeds or preset["seeds"]
    only = parse_only(args.only)
    unknown = [v for v in only.get("variants", []) if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only variants={','.join(unknown)}: not a variant; the variants are {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in only.get("variants", preset["variants"])
                and v in only.get("starts", VARIANTS)]  # a start left out needs no pretraining
    tasks = [t for t in TASKS if t in only.get("tasks", preset_tasks(preset))]
    seeds = [int(s) for s in only.get("seeds", range(args.seeds))]
    work = Path(args.work) if args.work else Path("runs") / "benchmark" / out.name
    run = {"preset": preset, "data": args.data, "data_cache": args.data_cache, "out": out, "work": work}
    # What each pretraining cell would be now; transfer cells on a pretrained start name it by these hashes.
    pretrain_ids = {v: cell_identity("pretrain", pretrain_config(run, v, 0)) for v in VARIANTS}

    def pretrain(variant: str, redo: bool = False) -> dict[str, Any]:
        # One pretraining per variant (seed 0); the transfer seeds vary the fine-tuning, as in the paper.
        cfg = pretrain_config(run, variant, 0)
        return run_cell(out / "cells" / "pretrain" / f"{variant}.json", {"task": "pretrain", "start": variant, "seed": 0},
                        pretrain_ids[variant], cell_work(run, "pretrain", variant, 0), lambda: pretrain_variant(cfg),
                        args.keep_stale, args.rerun_failed, redo=redo)

    def with_weights(variant: str | None, compute: Callable[[], Any]) -> Any:
        # A stored pretraining cell whose run folder is gone (results/ cloned without runs/, or another --work) is
        # pretrained again when a transfer cell first needs its weights, not before: re-rendering the tables of
        # finished cells needs none. Same config and code, so its transfer cells keep their identity.
        folder = cell_work(run, "pretrain", variant, 0) if variant else None
        if folder is not None and not any(folder.glob("checkpoint-*.pth")):
            print(f"[redo] pretrain {variant}: {folder} holds no checkpoint, and a transfer cell needs one", flush=True)
            if pretrain(variant, redo=True)["status"] != "ok":
                raise RuntimeError(f"the pretraining of {variant} failed; see cells/pretrain/{variant}.json")
        return compute()

    starts: dict[str, tuple[str, dict[str, str] | None]] = {}  # name -> (--init value, init in the cell identity)
    for variant in variants:
        cell = pretrain(variant)
        if cell["status"] == "ok":  # a kept stale pretraining: its transfer cells name it, so they show as stale too
            starts[variant] = (str(cell_work(run, "pretrain", variant, 0)), pretrained_start(variant, cell["provenance"]))
    for task in tasks:
        known = known_starts(run, pretrain_ids, args.torchvision, task)
        # pretrained starts as this run's pretraining cells are; baselines (and retrieval's HOG) as known
        task_starts = known if task in STARTLESS_TASKS else {
            **starts, **{name: v for name, v in known.items() if name not in VARIANTS}}
        if "starts" in only:
            task_starts = {k: v for k, v in task_starts.items() if k in only["starts"]}
        for name, (init, init_id) in task_starts.items():
            for seed in seeds_of(task, name, seeds):
                folder = cell_work(run, task, name, seed)
                cfg = task_config(run, task, name, init, seed, folder)
                run_cell(out / "cells" / task / name / f"seed{seed}.json", {"task": task, "start": name, "seed": seed},
                         cell_identity(task, cfg, init_id), folder,
                         lambda t=task, c=cfg, v=name if name in starts else None: with_weights(v, lambda: run_task(t, c)),
                         args.keep_stale, args.rerun_failed)

    # Tables come from every cell on disk, so separate invocations (e.g. --only variants=...) add up; each is
    # judged against what it would be now.
    def identity_now(task: str, start: str, seed: int) -> dict[str, Any] | None:
        if task == "pretrain":
            return pretrain_ids.get(start)
        known = known_starts(run, pretrain_ids, args.torchvision, task) if task in TASKS else {}
        if start not in known:
            return None
        init, init_id = known[start]
        return cell_identity(task, task_config(run, task, start, init, seed, cell_work(run, task, start, seed)), init_id)

    cells, refused = judge_cells(out, identity_now)
    cells = one_cell_per_seedless_pair(cells)
    data_label = "the built-in data" if args.data == "builtin" else Path(args.data).name
    order = [*VARIANTS, *BASELINES, "torchvision", "hog", *STARTLESS_TASKS.values()]
    table_starts = sorted({c["start"] for c in cells}, key=lambda s: order.index(s) if s in order else len(order))
    written = build_tables(cells, table_starts, out, data_label)
    wall = time.time() - t0
    record_invocation(out, argv_used, preset_name, wall)
    write_summary(out, written, cells, refused, args)
    for path in written.values():
        print(path.read_text())
    failed = [c for c in cells if c["status"] == "error"]
    stale = [c for c in cells if c["stale"]]
    collapsed = [c for c in cells if c["status"] == "collapsed"]
    print(f"{len(cells)} cells ({len(failed)} failed, {len(collapsed)} collapsed, {len(stale)} stale, "
          f"{len(refused)} files refused) in {wall / 60:.1f} min -> {out}/summary.md")
    return {"cells": cells, "failed": failed, "stale": stale, "collapsed": collapsed, "refused": refused,
            "wall_seconds": wall}


# ----------------------------------------------------------------------------------------------- summary
def preset_tasks(preset: dict[str, Any]) -> list[str]:
    """The tasks a preset runs, in TASKS order (every task when it names none, or "all")."""
    tasks = preset.get("tasks", "all")
    return list(TASKS) if tasks == "all" else [t for t in TASKS if t in tasks]


def compute_by_task(cells: list[dict[str, Any]], seeds: int, n_variants: int, tasks: list[str]) -> list[str]:
    """Measured minutes per task of the current (not stale) cells, and what a run of the preset's cells (its
    variants, `tasks` and `seeds`) from scratch costs at those rates."""
    lines = ["## Compute", "", "Current (not stale) cells only.", "",
             "| task | cells timed | minutes | minutes per cell | cells in a full run | full run, minutes (estimate) |",
             "|---|--:|--:|--:|--:|--:|"]
    n_starts = n_variants + len(BASELINES)
    full_cells = {"pretrain": n_variants, "retrieve": n_starts + 1,  # retrieval: one seed, plus HOG
                  **{task: 1 for task in STARTLESS_TASKS},
                  **{task: n_variants + len(BASELINES) * seeds for task in FROZEN_TASKS}}  # runs_one_seed
    total_estimate = 0.0
    for task in ["pretrain", *tasks]:
        # the median, so a cell that only re-evaluated a reused pretraining run does not skew the rate; stale cells
        # left out, since other code or precision (often on another machine) ran at other rates
        secs = [c["seconds"] for c in cells if c["task"] == task and c["status"] in RESULT_STATUSES and "seconds" in c
                and not c["stale"]]
        if not secs:
            continue
        per_cell = float(np.median(secs)) / 60
        n_full = full_cells.get(task, n_starts * seeds)
        total_estimate += per_cell * n_full
        lines.append(f"| {task} | {len(secs)} | {sum(secs) / 60:.1f} | {per_cell:.1f} | {n_full} | {per_cell * n_full:.0f} |")
    lines += ["", f"A run of every cell from scratch ({n_variants} variants, {len(BASELINES)} baselines, {seeds} "
              f"seeds; tasks {', '.join(tasks)}) would take about **{total_estimate:.0f} min** at the "
              f"median rates above (on the machine that computed those cells)."]
    return lines


def _portable_arg(arg: str) -> str:
    """A command-line word with an absolute path in it (`/x`, `--flag=/x`) rewritten relative to the working directory."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    return flag + eq + _portable(value)


def record_invocation(out: Path, argv: list[str], preset: str, wall: float) -> None:
    """Append this invocation to <out>/cells/invocations.jsonl: the log of the runs that made the cells."""
    log_path = out / "cells" / "invocations.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(json.dumps({"argv": [_portable_arg(a) for a in argv], "preset": preset, "minutes": round(wall / 60, 1),
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def read_invocations(out: Path) -> list[dict[str, Any]]:
    """The runner's own records in <out>/cells/invocations.jsonl; lines it did not write are left out."""
    log_path = out / "cells" / "invocations.jsonl"
    records = []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (isinstance(entry, dict) and isinstance(entry.get("argv"), list) and all(isinstance(a, str) for a in entry["argv"])
                and {"preset", "minutes", "finished"} <= set(entry)):
            records.append(entry)
    return records


def _cell_name(c: dict[str, Any]) -> str:
    return f"{c['task']} {c['start']}" + ("" if c["task"] == "pretrain" else f" seed {c['seed']}")


def write_summary(out: Path, written: dict[str, Path], cells: list[dict[str, Any]], refused: list[Path], args) -> None:
    env = environment()
    invocations = read_invocations(out)
    total = sum(c.get("seconds", 0) for c in cells) / 60
    lines = [f"# ctxenc results on {'the built-in data' if args.data == 'builtin' else Path(args.data).name}", "",
             f"Produced by these invocations (each reuses the cells the earlier ones finished); the cells' own "
             f"compute adds up to {total:.1f} min:", ""]
    lines += [f"- `{shlex.join(['python', 'benchmarks/run_all.py', *i['argv']])}` (preset `{i['preset']}`, "
              f"{i['minutes']} min, finished {i['finished']})" for i in invocations]
    preset = PRESETS[args.preset]
    lines += ["", *compute_by_task(cells, args.seeds, len(preset["variants"]), preset_tasks(preset)), "", "## Tables", ""]
    lines += [f"- [{name}]({p.name}) ([csv]({p.with_suffix('.csv').name}))" for name, p in written.items()]
    for name in ("probes", "object_probes"):
        if name in written and (out / f"{name}.png").exists():
            lines += ["", f"![{name}]({name}.png)"]
    lines += ["", "## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += [f"| data | {_portable(args.data)} |"]

    failed = [c for c in cells if c["status"] == "error"]
    collapsed = [c for c in cells if c["status"] == "collapsed"]
    stale = [c for c in cells if c["stale"]]
    lines += ["", "## Cells", "",
              f"{len(cells)} cells: {len(cells) - len(failed) - len(collapsed)} ok, {len(collapsed)} collapsed, "
              f"{len(failed)} failed; {len(stale)} of them stale; {len(refused)} cell files refused. Each cell's "
              "numbers and provenance (git commit, config and code hashes, package versions) are in "
              "`cells/<task>/<start>/seed<k>.json`; its full outputs (metrics.json, per-class CSV, pictures, "
              "checkpoints) were written under `runs/benchmark/` on the machine that ran it.", ""]
    if collapsed:
        lines += ["Collapsed (shown as \"collapsed\" in the tables, never as a number):", ""]
        lines += [f"- {_cell_name(c)}: {c.get('collapse_reason', '')}" for c in collapsed] + [""]
    if stale:
        lines += ["Stale: computed by other code or options than now (marked \"(stale)\" in the tables). Rerun "
                  "without --keep-stale, with an --only that includes them, to recompute them:", ""]
        lines += [f"- {_cell_name(c)} (`{c['path']}`): {c['stale']}" for c in stale] + [""]
    if refused:
        lines += [f"Refused: these files {NO_PROVENANCE}; they are left out of the tables. Rerun without "
                  "--keep-stale, with an --only that includes them, to recompute them, or delete them:", ""]
        lines += [f"- `{p.relative_to(out).as_posix()}`" for p in refused] + [""]
    lines += ["| task | start | seed | status | seconds | commit |", "|---|---|---|---|---|---|"]
    for c in cells:
        status = c["status"] + (": " + c["error"][:120] if c["status"] == "error" else "") + (" (stale)" if c["stale"] else "")
        lines.append(f"| {c['task']} | {c['start']} | {c['seed']} | {status} | {c.get('seconds', '')} | "
                     f"{c['provenance']['commit'][:12]}{'+dirty' if c['provenance']['commit'].endswith('+dirty') else ''} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
