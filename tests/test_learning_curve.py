"""benchmarks/learning_curve.py: the crossing rung, rung 0's network, and a --quick ladder that goes on rung by
rung without recomputing what is stored."""
import dataclasses
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import learning_curve as lc  # noqa: E402

from pretrain.hub import load_checkpoint  # noqa: E402
from pretrain.main_pretrain import PretrainConfig  # noqa: E402
from pretrain.main_pretrain import main as pretrain_main  # noqa: E402

MEASURE = {m.name: m for m in lc.MEASURES}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tests share two cores with whatever else runs: one torch thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")  # the built-in images, generated once for the module


def test_crossing_rung_is_the_first_rung_from_which_the_mean_stays_beyond():
    means = {0: 40.0, 100: 44.0, 300: 46.0, 1000: 43.0, 3000: 47.0, 10000: 50.0}
    assert lc.crossing_rung(means, 44.0) == 3000  # 100 only reaches it; 300 is above but 1000 falls back
    assert lc.crossing_rung(means, 39.0) == 0
    assert lc.crossing_rung(means, 50.0) is None  # the last rung only equals it
    assert lc.crossing_rung({0: 50.0, 100: math.nan, 300: 51.0}, 40.0) == 300  # a collapsed rung (NaN) is not above
    assert lc.crossing_rung({0: 20.0, 2: 13.0, 4: 12.0}, 14.0, higher_is_better=False) == 2
    assert lc.crossing_rung({}, 1.0) is None


def _cell(task: str, start: str, seed: int, **scores: float) -> dict:
    return {"task": task, "start": start, "seed": seed, "status": "ok", "scores": scores, "stale": None}


def test_the_markdown_states_the_crossing_of_a_hand_made_table(tmp_path):
    # random: 35 and 37 -> mean 36, sample std sqrt(2) = 1.414, so the bar is 37.4 (%)
    cells = [_cell("classify", "random", 0, mAP_11point=0.35), _cell("classify", "random", 1, mAP_11point=0.37),
             _cell("classify", "random-raw", 0, mAP_11point=0.30), _cell("classify", "random-raw", 1, mAP_11point=0.31)]
    curves = {"ce-l2": (0.36, 0.374, 0.38, 0.40), "autoencoder": (0.36, 0.38, 0.37, 0.39), "supervised": (0.36, 0.35, 0.36, 0.37)}
    rungs = [0, 100, 300, 1000]
    for objective, values in curves.items():
        cells += [_cell("classify", lc.rung_start(objective, r), 0, mAP_11point=v) for r, v in zip(rungs, values)]
    cells.append({**_cell("classify", lc.rung_start("supervised", 1000), 1), "status": "collapsed"})

    sentences = lc.write_markdown(cells, list(curves), rungs, 64, ["header"], tmp_path / "curve.md")
    classify = next(s for s in sentences if s.startswith("classify:"))
    assert "random's mean + std (36.0 + 1.4 = 37.4)" in classify
    assert "ce-l2 is above it from rung 300 on (19,200 images seen)" in classify  # 37.4 at rung 100 is not above 37.41
    assert "autoencoder is above it from rung 1000 on (64,000 images seen)" in classify  # above at 100, below at 300
    assert "supervised is not above it at the last rung measured (1000)" in classify  # a collapsed seed is no number
    section = (tmp_path / "curve.md").read_text().split("## classify:")[1].split("## ")[0].splitlines()
    assert classify in section
    assert next(line for line in section if line.startswith("| supervised")).endswith("| collapsed in 1 of 2 seeds |")
    assert next(line for line in section if line.startswith("| random (band)")).count("36.0 ± 1.4") == 4
    # a probe layer without any cell: no band, said so rather than a crossing
    assert any(s.startswith("probe conv1: no random band yet") for s in sentences)

    lower = lc.crossing_sentence(MEASURE["inpainting L1"], {"ce-l2": {0: 20.0, 2: 11.0, 4: 10.0}}, lc.FILL_BAND,
                                 (12.0, 0.5), 8)
    assert "mean - std (12.0 - 0.5 = 11.5)" in lower and "ce-l2 is below it from rung 2 on (16 images seen)" in lower


def test_rung_zero_is_the_network_the_pretraining_starts_from(tmp_path, data_cache):
    # At lr 0 a step changes no weight, so the run's step-1 checkpoint holds the weights it started from.
    cfg = PretrainConfig(name="run", output_dir=str(tmp_path), data_cache=str(data_cache), builtin_images=60, steps=1,
                         batch_size=8, workers=0, eval_images=8, lr=0.0, lambda_adv=0.0, log_every=1)
    pretrain_main(cfg)
    started, _ = load_checkpoint(tmp_path / "run")
    lc.save_initial_weights(cfg, tmp_path / "init.pth")
    init, _ = load_checkpoint(tmp_path / "init.pth")
    assert init["step"] == 0 and init["model"].keys() == started["model"].keys()
    assert all(torch.equal(init["model"][k], started["model"][k]) for k in init["model"])
    lc.save_initial_weights(dataclasses.replace(cfg, seed=1), tmp_path / "other.pth")
    other, _ = load_checkpoint(tmp_path / "other.pth")
    assert not torch.equal(other["model"]["encoder.conv1.weight"], init["model"]["encoder.conv1.weight"])


def _cell_files(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((out / "learning_curve" / "cells").rglob("*.json"))}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_baseline_bands_take_over_run_alls_fresh_cells_and_recompute_its_stale_ones(tmp_path, monkeypatch):
    out, cells_dir = tmp_path / "results", tmp_path / "results" / "learning_curve" / "cells"
    run = {"preset": lc.CURVE_PRESETS["quick"], "data": "builtin", "data_cache": "", "out": out, "work": tmp_path / "w"}

    def run_all_cell(task: str, code_hash: str | None = None) -> None:
        cfg = lc.task_config(run, task, "random", lc.BASELINES["random"]["init"], 0, tmp_path / "elsewhere")
        identity = lc.cell_identity(task, cfg)
        cell = {"task": task, "start": "random", "seed": 0, "status": "ok", "scores": {"stored": 0.123}, "seconds": 1.0,
                "provenance": {"commit": "c0ffee", "config_hash": identity["config_hash"],
                               "code_hash": code_hash or identity["code_hash"], "versions": {}},
                "config": identity["config"]}
        path = out / "cells" / task / "random" / "seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))

    run_all_cell("classify")  # fresh: the same computation the curve would run
    run_all_cell("probe", code_hash="0" * 16)  # made by other code: stale
    computed = []

    def fake_task(task, cfg):
        computed.append((task, cfg.rescale))
        return "ok", {"computed": 1.0}, {}

    monkeypatch.setattr(lc, "run_task", fake_task)
    cells = lc.evaluate_baselines(run, cells_dir, 1, rerun_failed=False)
    by_key = {(c["task"], c["start"]): c for c in cells}
    assert by_key[("classify", "random")]["scores"] == {"stored": 0.123}  # taken over, not recomputed
    assert by_key[("probe", "random")]["scores"] == {"computed": 1.0}  # stale: recomputed
    # probe random (stale), object_probe random (run_all stored none) and random-raw (no rescaling) on every task
    assert sorted(computed) == [("classify", False), ("object_probe", False), ("object_probe", True), ("probe", False),
                                ("probe", True)]


def test_quick_ladder_resumes_rung_by_rung_and_recomputes_nothing(tmp_path, data_cache):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--quick", "--objectives", "ce-l2", "supervised", "--transfer-seeds", "2", "--out", str(out),
            "--work", str(work), "--data-cache", str(data_cache)]
    first = lc.main([*argv, "--max-steps", "2"])
    assert first["rungs"] == [0, 2] and not first["failed"], [c.get("error") for c in first["failed"]]
    stored = _cell_files(out)
    assert len(stored) == 3 * 2 * 2 + 2 * 2 * 4  # baselines: 3 tasks x 2 starts x 2 seeds; 2 objectives x 2 rungs x 4
    runs = {o: work / "pretrain" / f"{o}-seed0" for o in ("ce-l2", "supervised")}
    metrics = {o: (d / "metrics.csv").read_text() for o, d in runs.items()}
    rung2 = {o: _sha(d / "rung-00000002" / lc.RUNG_CHECKPOINT) for o, d in runs.items()}

    again = lc.main([*argv, "--max-steps", "2"])
    assert not again["failed"] and _cell_files(out) == stored  # nothing recomputed

    full = lc.main(argv)
    assert full["rungs"] == [0, 2, 4] and not full["failed"], [c.get("error") for c in full["failed"]]
    now = _cell_files(out)
    assert {p: now[p] for p in stored} == stored  # the rungs already done were not computed again
    assert len(now) == len(stored) + 2 * 4
    for objective, run_dir in runs.items():  # the run went on from its step-2 checkpoint instead of starting over
        text = (run_dir / "metrics.csv").read_text()
        assert text.startswith(metrics[objective]), (metrics[objective], text)  # images_per_s too: not re-measured
        assert text.splitlines()[-1].startswith("4,")
        assert _sha(run_dir / "rung-00000002" / lc.RUNG_CHECKPOINT) == rung2[objective]
        assert load_checkpoint(run_dir / "rung-00000004" / lc.RUNG_CHECKPOINT)[0]["step"] == 4
        assert load_checkpoint(run_dir / "rung-00000000" / lc.RUNG_CHECKPOINT)[0]["step"] == 0

    table = pd.read_csv(out / "learning_curve.csv")
    assert list(table.columns) == ["kind", "objective", "seed", "rung", "images_seen", "measure", "value", "status"]
    curve, bands = table[table.kind == "curve"], table[table.kind == "band"]
    for measure in lc.MEASURES:
        objectives = ["ce-l2"] if measure.task == "pretrain" else ["ce-l2", "supervised"]  # inpainting L1: holes only
        rows = curve[curve.measure == measure.name]
        assert sorted(set(rows.objective)) == objectives
        for objective in objectives:
            mine = rows[rows.objective == objective]
            assert sorted(mine.rung) == [0, 2, 4] and list(mine.images_seen) == [8 * r for r in mine.rung]
            assert mine.value.between(0, 100).all()
        expected_bands = {lc.FILL_BAND: [0]} if measure.task == "pretrain" else {"random": [0, 1], "random-raw": [0, 1]}
        got = bands[bands.measure == measure.name]
        assert {b: sorted(got[got.objective == b].seed) for b in expected_bands} == expected_bands

    # Every sentence is the crossing of the csv's own numbers against the random band's mean + std.
    text = (out / "learning_curve.md").read_text()
    for measure in lc.MEASURES[:-1]:
        rows = curve[curve.measure == measure.name]
        curves = {o: {int(r): v for r, v in rows[rows.objective == o].groupby("rung").value.mean().items()}
                  for o in ("ce-l2", "supervised")}
        random = bands[(bands.measure == measure.name) & (bands.objective == "random")].value
        sentence = lc.crossing_sentence(measure, curves, "random", (random.mean(), random.std()), 8)
        assert sentence in text, (sentence, text)
        assert f"## {measure.name}:" in text
    for name in ("| ce-l2", "| supervised", "| random (band)", "| random-raw (band)", "| mean-colour fill (band)"):
        assert name in text

    plotted = full["plotted"]
    assert set(plotted) == {m.name for m in lc.MEASURES}
    # the raw Gaussian trunk's activations vanish by pool5, so its classifier stays at the label prior it starts at:
    # constant scores, reported collapsed and left out of the plot
    raw = bands[(bands.measure == "classify") & (bands.objective == "random-raw")]
    assert len(raw) == 2 and (raw.status == "collapsed").all()
    classify_section = text.split("## classify:")[1].split("\n## ")[0]
    assert re.search(r"\| random-raw \(band\) +\| collapsed", classify_section)
    assert plotted["classify"] == ["ce-l2", "supervised", "random (mean ± std)"]
    assert plotted["inpainting L1"] == ["ce-l2", f"{lc.FILL_BAND} (mean ± std)"]
    assert (out / "learning_curve.png").stat().st_size > 20_000
