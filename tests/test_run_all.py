"""benchmarks/run_all.py --quick: every table, finite values, and a killed run resumes without recomputing."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import run_all  # noqa: E402


def _cell_files(out: Path) -> list[Path]:
    """cells/pretrain/<variant>.json and cells/<task>/<start>/seed<k>.json (not the task outputs beside them)."""
    return sorted(out.glob("cells/*/*.json")) + sorted(out.glob("cells/*/*/*.json"))


def _finite(cell: str) -> bool:
    try:
        return math.isfinite(float(str(cell).split(" ± ")[0]))
    except ValueError:
        return False


def _reported(cell: str) -> bool:
    """A number, or a result the task judged degenerate (1 epoch on 60 images may well collapse): never blank."""
    return _finite(cell) or str(cell).startswith("collapsed")


def test_quick_run_makes_every_table_and_resumes_after_a_kill(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["--quick", "--seeds", "1", "--out", str(out), "--work", str(tmp_path / "work"), "--data-cache", str(cache),
            "--only", "variants=ce-l2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "run_all.py"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(_cell_files(out)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in _cell_files(out)}
    assert len(finished) >= 2, "the run was killed before two cells finished"

    result = run_all.main(argv)
    assert not result["failed"], [c["error"] for c in result["failed"]]
    for p, mtime in finished.items():  # nothing finished before the kill was computed again
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed"

    transfer = pd.read_csv(out / "transfer.csv", index_col=0)
    assert {"ce-l2", "random", "random-raw", "context encoder [published]"} <= set(transfer.index)
    assert list(transfer.columns[:4]) == ["classification mAP (VOC07 11-pt)", "detection mAP@0.5 (VOC07 11-pt)",
                                         "segmentation mIoU", "object probe, pool5 SVM mAP (VOC07 11-pt)"]
    for start in ("ce-l2", "random", "random-raw"):
        assert all(_reported(v) for v in transfer.loc[start].iloc[:4]), transfer.loc[start]
    probes = pd.read_csv(out / "probes.csv", index_col=0)
    assert list(probes.columns) == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
    assert all(_finite(v) for v in probes.loc["ce-l2"])
    object_probes = pd.read_csv(out / "object_probes.csv", index_col=0)  # the same layers, on the annotated objects
    assert list(object_probes.columns) == list(probes.columns)
    assert all(_finite(v) for v in object_probes.loc["ce-l2"]) and not object_probes.equals(probes)
    assert (out / "object_probes.png").stat().st_size > 1000
    inpainting = pd.read_csv(out / "inpainting.csv", index_col=0)
    assert {"NN-inpainting, HOG features", "NN-inpainting, ce-l2 features", "NN-inpainting, random features"} <= set(
        inpainting.index)
    assert any(i.startswith("context encoder ce-l2, own fill") for i in inpainting.index)
    assert not any("supervised, own fill" in i for i in inpainting.index)  # a classifier fills no hole
    assert (out / "probes.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "torch" in summary and "git commit" in summary
    compute = [line for line in summary.splitlines() if line.startswith("| classify |")]
    assert compute and int(compute[0].split("|")[2]) == 3  # the compute table counts the 3 classify cells
    assert "from scratch" in summary
    cells = [json.loads(p.read_text()) for p in _cell_files(out)]
    assert all(c["status"] in ("ok", "collapsed") for c in cells)
    for c in cells:  # a collapsed cell is named in the summary with its reason, and shown as no number
        if c["status"] == "collapsed":
            assert c["collapse_reason"] and c["collapse_reason"] in summary
    assert not result["stale"] and not result["refused"]
    assert all(c["provenance"]["code_hash"] == run_all.code_hash(c["task"]) for c in cells)
