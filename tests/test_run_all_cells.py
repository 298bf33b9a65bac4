"""benchmarks/run_all.py's cells: provenance, stale cells recomputed or kept, refused files, collapsed results,
the task-result reader, the invocation log. Fast: the tasks are stand-ins that write the common metrics.json."""
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import run_all  # noqa: E402

from pretrain.provenance import config_hash, git_commit, package_versions  # noqa: E402

CLASSIFY_COLUMN = "classification mAP (VOC07 11-pt)"


@dataclass
class FakeConfig:
    init: str = "random"
    data: str = "builtin"
    data_cache: str = ""
    seed: int = 0
    lr: float = 0.1  # the stand-in's score; above 1 it reports a collapse
    out: str = ""


def header(task: str = "classify", status: str = "ok", scores: dict | None = None, **fields) -> dict:
    return {"task": task, "init": "random", "init_label": "random", "seed": 0, "data": "builtin", "commit": "abc",
            "config_hash": "0123", "versions": {"python": "3"}, "wall_seconds": 1.0, "checkpoint": None,
            "status": status, "collapse_reason": "one class takes 99% of predicted pixels" if status == "collapsed" else None,
            "scores": {"mAP_11point": 0.41, "mAP_all_point": 0.43} if scores is None else scores, **fields}


class Bench:
    """run_all with a stand-in classify task (and a stand-in pretraining), counting what each run computed."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp, self.calls, self.pretrainings = tmp_path, [], []
        self.code = tmp_path / "fake_task.py"  # the stand-in task's "code": editing it changes its code hash
        self.code.write_text("version = 1\n")
        monkeypatch.setattr(run_all, "TASKS", {"classify": (FakeConfig, self.classify_main)})
        monkeypatch.setattr(run_all, "TASK_SOURCES", {"classify": (str(self.code),), "pretrain": (str(self.code),)})
        monkeypatch.setattr(run_all, "VARIANTS", {"ce-fake": {"mask": "center", "lambda_adv": 0.0}})
        monkeypatch.setattr(run_all, "pretrain_main", self.pretrain_main)
        monkeypatch.setitem(run_all.PRESETS, "quick", {"variants": ["ce-fake"], "seeds": 1, "amp": "none", "data": {},
                                                     "pretrain": {"steps": 3},
                                                     "classify": {"lr": 0.1}})
        self.out = tmp_path / "results"

    def classify_main(self, cfg: FakeConfig) -> dict:
        self.calls.append((cfg.init, cfg.seed))
        status = "collapsed" if cfg.lr > 1 else "ok"
        metrics = header(status=status, scores={"mAP_11point": cfg.lr, "mAP_all_point": cfg.lr}, init=cfg.init,
                         seed=cfg.seed, commit=git_commit(), config_hash=config_hash(cfg, ("out",)),
                         versions=package_versions())
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    def pretrain_main(self, cfg) -> dict:
        self.pretrainings.append(cfg.mask)
        run_folder = Path(cfg.output_dir) / cfg.name
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / "checkpoint-00000003.pth").write_text(cfg.mask)
        return {"l1": 0.1, "l2": 0.02, "psnr": 16.0, "mean_fill_l1": 0.12, "mean_fill_l2": 0.03, "mean_fill_psnr": 15.0}

    def run(self, *extra: str, starts: str = "random") -> dict:
        return run_all.main(["--quick", "--seeds", "1", "--out", str(self.out), "--work", str(self.tmp / "work"),
                             "--only", "tasks=classify", f"starts={starts}", *extra])

    def cell(self, start: str = "random") -> dict:
        return json.loads((self.out / "cells" / "classify" / start / "seed0.json").read_text())

    def classify_entry(self, start: str = "random") -> str:
        return str(pd.read_csv(self.out / "transfer.csv", index_col=0).loc[start, CLASSIFY_COLUMN])


@pytest.fixture
def bench(tmp_path, monkeypatch) -> Bench:
    return Bench(tmp_path, monkeypatch)


def test_a_cell_carries_its_provenance_and_a_rerun_reuses_it(bench):
    bench.run()
    cell = bench.cell()
    assert cell["status"] == "ok" and cell["scores"] == {"mAP_11point": 0.1, "mAP_all_point": 0.1}
    assert cell["provenance"]["commit"] == git_commit()
    assert cell["provenance"]["code_hash"] == run_all.code_hash("classify")
    assert cell["provenance"]["versions"] == package_versions()
    assert cell["config"]["lr"] == 0.1 and "out" not in cell["config"]  # output paths are not part of the config hash
    bench.run()
    assert bench.calls == [("random", 0)]  # the second run computed nothing
    assert bench.classify_entry() == "10.0"


def test_a_changed_config_makes_the_cell_stale_and_it_is_recomputed(bench, monkeypatch):
    bench.run()
    monkeypatch.setitem(run_all.PRESETS["quick"], "classify", {"lr": 0.2})
    result = bench.run()
    assert len(bench.calls) == 2
    assert bench.cell()["scores"]["mAP_11point"] == 0.2 and bench.cell()["config"]["lr"] == 0.2
    assert not result["stale"] and bench.classify_entry() == "20.0"


def test_a_changed_code_hash_makes_the_cell_stale_and_it_is_recomputed(bench):
    bench.run()
    old_hash = bench.cell()["provenance"]["code_hash"]
    bench.code.write_text("version = 2\n")
    bench.run()
    assert len(bench.calls) == 2
    assert bench.cell()["provenance"]["code_hash"] == run_all.code_hash("classify") != old_hash


def test_keep_stale_keeps_the_cell_and_marks_it_in_the_tables_and_the_summary(bench, monkeypatch):
    bench.run()
    monkeypatch.setitem(run_all.PRESETS["quick"], "classify", {"lr": 0.2})
    result = bench.run("--keep-stale")
    assert len(bench.calls) == 1 and bench.cell()["scores"]["mAP_11point"] == 0.1
    assert [c["path"] for c in result["stale"]] == ["cells/classify/random/seed0.json"]
    assert bench.classify_entry() == "10.0 (stale)"
    summary = (bench.out / "summary.md").read_text()
    assert "- classify random seed 0 (`cells/classify/random/seed0.json`): config changed (lr: 0.1 -> 0.2)" in summary


def test_a_changed_pretraining_is_recomputed_from_scratch_and_so_is_every_cell_on_it(bench, monkeypatch):
    bench.run(starts="ce-fake")
    assert bench.pretrainings == ["center"] and len(bench.calls) == 1
    run_folder = bench.tmp / "work" / "pretrain" / "ce-fake-seed0"
    (run_folder / "checkpoint-00000003.pth").write_bytes(b"from the old pretraining")
    monkeypatch.setitem(run_all.VARIANTS, "ce-fake", {"mask": "random_block", "lambda_adv": 0.0})
    bench.run(starts="ce-fake")
    assert bench.pretrainings == ["center", "random_block"]
    assert (run_folder / "checkpoint-00000003.pth").read_text() == "random_block"  # the stale one was not resumed
    assert len(bench.calls) == 2  # the transfer cell names its pretraining's hashes, so it was stale too
    assert bench.cell("ce-fake")["config"]["init"]["pretrain"] == "ce-fake"


def test_a_pretraining_whose_run_folder_is_gone_is_redone_only_when_a_new_cell_needs_its_weights(bench):
    bench.run(starts="ce-fake")
    shutil.rmtree(bench.tmp / "work")  # results/ kept, runs/ not (a fresh clone)
    bench.run(starts="ce-fake")  # every cell finished: the tables are rendered without weights
    assert bench.pretrainings == ["center"] and len(bench.calls) == 1
    bench.run("--seeds", "2", starts="ce-fake")  # a new seed needs the weights: one pretraining, then the cell
    assert bench.pretrainings == ["center", "center"] and [seed for _, seed in bench.calls] == [0, 1]
    assert (bench.tmp / "work" / "pretrain" / "ce-fake-seed0" / "checkpoint-00000003.pth").exists()
    assert bench.cell("ce-fake")["provenance"]["code_hash"] == run_all.code_hash("classify")


def test_a_cell_file_without_provenance_is_refused(bench):
    old = {"status": "ok", "metrics": {"mAP_11point": 0.9}, "task": "classify", "start": "random", "seed": 0}
    for start in ("random", "random-raw"):
        (bench.out / "cells" / "classify" / start).mkdir(parents=True)
        (bench.out / "cells" / "classify" / start / "seed0.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match=r"cells/classify/random/seed0.json has no provenance.*Delete it, or run without "
                                         r"--keep-stale"):
        bench.run("--keep-stale")
    assert bench.calls == []
    result = bench.run()  # planned (starts=random): recomputed; random-raw is not planned: refused, out of the tables
    assert bench.calls == [("random", 0)] and "provenance" in bench.cell()
    assert [p.name for p in result["refused"]] == ["seed0.json"] and result["refused"][0].parent.name == "random-raw"
    assert "random-raw" not in pd.read_csv(bench.out / "transfer.csv", index_col=0).index
    assert "- `cells/classify/random-raw/seed0.json`" in (bench.out / "summary.md").read_text()


def test_a_collapsed_result_is_shown_as_collapsed_never_as_a_number(bench, monkeypatch):
    monkeypatch.setitem(run_all.PRESETS["quick"], "classify", {"lr": 2.0})
    result = bench.run()
    assert bench.cell()["status"] == "collapsed" and len(result["collapsed"]) == 1
    assert bench.classify_entry() == "collapsed"
    assert "- classify random seed 0: one class takes 99% of predicted pixels" in (bench.out / "summary.md").read_text()


def test_one_collapsed_seed_of_several_hides_the_mean():
    cells = [{"task": "segment", "start": "random", "status": s, "scores": {"mIoU": 0.3}, "stale": None}
             for s in ("ok", "collapsed", "ok")]
    assert run_all.table_entry(cells, "segment", "random", "mIoU") == "collapsed in 1 of 3 seeds"
    assert run_all.table_entry([cells[0], cells[2]], "segment", "random", "mIoU") == "30.0 ± 0.0"


def _cells(task: str, start: str, key: str, values: list[float]) -> list[dict]:
    return [{"task": task, "start": start, "status": "ok", "stale": None, "scores": {key: v}} for v in values]


def test_the_positive_control_passes_only_beyond_two_standard_deviations():
    random = _cells("classify", "random", "mAP_11point", [0.30, 0.32, 0.31])  # 31 +- 1
    clear = random + _cells("classify", "supervised", "mAP_11point", [0.40, 0.41, 0.42])  # +10, 2 std = 2
    close = random + _cells("classify", "supervised", "mAP_11point", [0.32, 0.34, 0.33])  # +2 <= 2 std = 2
    assert run_all.control_verdict(clear, "classify", "mAP_11point") == "passes: +10.0 (2 std = 2.0)"
    assert run_all.control_verdict(close, "classify", "mAP_11point").startswith("NOT DISCRIMINATING: +2.0")
    worse = random + _cells("classify", "supervised", "mAP_11point", [0.20, 0.21])
    assert run_all.control_verdict(worse, "classify", "mAP_11point").startswith("NOT DISCRIMINATING: -10.5")
    one_seed = random + _cells("classify", "supervised", "mAP_11point", [0.9])
    assert run_all.control_verdict(one_seed, "classify", "mAP_11point") == "–"  # no spread from one seed
    collapsed = clear[:-1] + [{**clear[-1], "status": "collapsed"}]
    assert run_all.control_verdict(collapsed, "classify", "mAP_11point") == "NOT DISCRIMINATING: supervised collapsed"


def test_the_supervised_control_trains_centred_crops_for_the_budget_then_drawn_ones_up_to_its_factor(tmp_path):
    for preset, budget in (("quick", 3), ("default", run_all.PretrainConfig.steps)):
        run = {"preset": run_all.PRESETS[preset], "work": tmp_path, "data": "builtin", "data_cache": ""}
        control = run_all.pretrain_config(run, "supervised", 0)
        assert run_all.pretrain_config(run, "ce-l2", 0).steps == budget  # the context encoder's budget
        assert control.supervised_centred_steps == budget and control.supervised_max_context == 3.0
        assert control.steps == math.ceil(budget * run_all.CONTROL_STEPS_FACTOR)
    # a runner's own supervised variant without drawn crops (the learning curve's) keeps its budget
    centred = run_all.pretrain_config(run, "supervised", 0, overrides={"objective": "supervised"})
    assert centred.steps == run_all.PretrainConfig.steps and centred.supervised_centred_steps == 0


def test_cells_are_fp32_by_default_so_every_machine_computes_the_same_cell(tmp_path, monkeypatch):
    run = {"preset": run_all.PRESETS["default"], "work": tmp_path, "data": "builtin", "data_cache": ""}
    auto = {**run, "preset": {**run["preset"], "amp": "auto"}}  # `--amp auto`
    fp32, by_machine = {}, {}
    for machine in ("none", "bf16"):  # what `auto` picks on an AVX2-only CPU and on a bf16 CPU or GPU
        monkeypatch.setattr(run_all, "resolve_amp", lambda amp, device, m=machine: m if amp == "auto" else amp)
        cfg = run_all.task_config(run, "classify", "random", "random", 0, tmp_path)
        assert cfg.amp == "none" and run_all.pretrain_config(run, "ce-l2", 0).amp == "none"
        fp32[machine] = run_all.cell_identity("classify", cfg)["config_hash"]
        cfg = run_all.task_config(auto, "classify", "random", "random", 0, tmp_path)
        by_machine[machine] = run_all.cell_identity("classify", cfg)["config_hash"]
    assert fp32["none"] == fp32["bf16"]  # a cell computed on either machine is the other's too
    assert by_machine["none"] == fp32["none"] != by_machine["bf16"]  # bf16 cells are cells of their own


def test_a_frozen_probe_of_a_pretrained_start_runs_one_seed_and_its_control_takes_randoms_spread():
    assert run_all.seeds_of("object_probe", "supervised", [0, 1, 2]) == [0]  # deterministic given the trunk
    assert run_all.seeds_of("object_probe", "random", [0, 1, 2]) == [0, 1, 2]  # the seed draws the trunk
    assert run_all.seeds_of("classify", "supervised", [0, 1, 2]) == [0, 1, 2]  # fine-tuning: seeds vary it
    random = _cells("object_probe", "random", "pool5/svm", [0.30, 0.32, 0.31])  # 31 +- 1
    one_run = random + _cells("object_probe", "supervised", "pool5/svm", [0.50])
    assert run_all.control_verdict(one_run, "object_probe", "pool5/svm") == "passes: +19.0 (2 std = 2.0)"
    # a fine-tuned start still needs two seeds of its own
    fine_tuned = _cells("classify", "random", "m", [0.30, 0.32]) + _cells("classify", "supervised", "m", [0.5])
    assert run_all.control_verdict(fine_tuned, "classify", "m") == "–"
    # cells of further seeds stored before (every seed used to run) stay out of the tables: they repeat seed 0
    repeats = _cells("object_probe", "supervised", "pool5/svm", [0.5, 0.5, 0.5])
    stored = [{**c, "seed": k} for k, c in enumerate(repeats)]
    random_seeds = [{**c, "seed": k} for k, c in enumerate(random)]
    kept = run_all.one_cell_per_seedless_pair(stored + random_seeds)
    assert [(c["start"], c["seed"]) for c in kept] == [("supervised", 0), ("random", 0), ("random", 1), ("random", 2)]
    assert run_all.table_entry(kept, "object_probe", "supervised", "pool5/svm") == "50.0"  # no ± 0.0 from repeats


def test_the_summary_renders_only_the_invocations_the_runner_recorded(bench):
    log = bench.out / "cells" / "invocations.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"command": "cp -r runs/default runs/elsewhere", "preset": "full", "minutes": 0.0,
                               "finished": "2026-01-01 00:00:00"}) + "\n# a note\n")
    bench.run()
    records = run_all.read_invocations(bench.out)
    assert len(records) == 1 and records[0]["argv"][:3] == ["--quick", "--seeds", "1"]
    assert not any(a.startswith("/") for a in records[0]["argv"])  # --out and --work were absolute: now relative
    summary = (bench.out / "summary.md").read_text()
    assert "cp -r" not in summary and "a note" not in summary
    assert "- `python benchmarks/run_all.py --quick --seeds 1 --out " in summary


def test_read_task_result_reads_the_common_header(tmp_path):
    path = tmp_path / "metrics.json"
    scores = {"conv1/svm_mAP_11point": 0.2, "conv1/knn_mAP_11point": 0.1, "psnr": "inf", "recall": None}
    path.write_text(json.dumps(header("probe", scores=scores, checkpoint={"path": "runs/x", "step": 380}, layers={})))
    status, got, provenance = run_all.read_task_result(path)
    assert status == "ok"
    assert got["conv1/svm_mAP_11point"] == 0.2 and got["psnr"] == math.inf and math.isnan(got["recall"])
    assert provenance["task"] == "probe" and provenance["checkpoint"] == {"path": "runs/x", "step": 380}
    assert "scores" not in provenance and "layers" not in provenance

    path.write_text(json.dumps(header("segment", status="collapsed")))
    assert run_all.read_task_result(path)[0] == "collapsed"


@pytest.mark.parametrize("bad, message", [
    ({"mAP_11point": 0.4}, "lacks the common header field"),  # a metrics.json from before the header
    (header(status="diverged"), "status 'diverged'"),
    (header(status="collapsed", collapse_reason=None), "needs a collapse_reason"),
    (header(scores={"per_class": {"cat": 0.1}}), "score 'per_class'"),
])
def test_read_task_result_refuses_a_bad_metrics_file_naming_it(tmp_path, bad, message):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message) as err:
        run_all.read_task_result(path)
    assert str(path) in str(err.value)


def test_task_sources_follow_imports_through_the_engine_and_not_into_pretraining():
    classify = set(run_all.TASK_SOURCES["classify"])
    assert {"transfer/classify.py", "transfer/engine.py", "transfer/rescale.py", "transfer/metrics.py",
            "pretrain/models.py", "pretrain/hub.py", "pretrain/data/synthetic.py"} <= classify
    assert "pretrain/main_pretrain.py" not in classify and "transfer/detect.py" not in classify
    assert "pretrain/main_pretrain.py" in run_all.TASK_SOURCES["pretrain"]


# An absolute path starts a word (`runs/x/work/` is a relative one).
ABSOLUTE_PATH = re.compile(rb"""(?:^|[\s"'`(=:,\[])(/(?:work|tmp|root|home)/[^\s"'`)]*)""", re.MULTILINE)


def test_the_absolute_path_pattern_finds_paths_and_only_absolute_ones():
    found = ABSOLUTE_PATH.findall(b'of /work/shared/data photos, "init": "/tmp/x", `--out=/home/me/r`, runs/e/work/pretrain')
    assert found == [b"/work/shared/data", b"/tmp/x", b"/home/me/r"]


def test_results_hold_no_absolute_machine_path():
    offenders = [f"{p.relative_to(REPO)}: {m.decode()}" for p in sorted((REPO / "results").rglob("*")) if p.is_file()
                 for m in ABSOLUTE_PATH.findall(p.read_bytes())]
    assert not offenders, offenders
