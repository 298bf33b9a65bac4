"""torchrun for the transfer fine-tuning commands: 2 gloo processes on CPU.

classify: its crops are seeded by (seed, epoch, image index), so with dropout 0 a 2-process run must give the
weights and metrics of one process with the same global batch. segment, detect: the torchrun run completes, rank 0
alone writes and prints, and every rank returns the same finite metrics.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfer.experiment import per_rank_batch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs a transfer command like `-m transfer.<task>` would, and also keeps what a test cannot see from outside:
# the weights rank 0 tests (the unwrapped model, caught at the evaluation call) and each rank's returned metrics.
RUNNER = '''
import json, os, sys
import torch
from pretrain.config import parse_config
import transfer.classify as classify

out_dir, argv = sys.argv[1], sys.argv[2:]
predict = classify.predict

def keep_weights(model, *args, **kwargs):
    torch.save(model.state_dict(), os.path.join(out_dir, "weights.pth"))
    return predict(model, *args, **kwargs)

classify.predict = keep_weights
metrics = classify.main(parse_config(classify.ClassifyConfig, argv))
with open(os.path.join(out_dir, "returned-rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(metrics, f, sort_keys=True)  # NaN (AP of an absent class) is written as NaN: compared as text
'''


def _run(target: list[str], args: list[str], nproc: int | None = None) -> str:
    """Run `python <target> args` (or under torchrun with `nproc` processes); returns stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run(launcher + target + args, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_global_batch_must_split_evenly():
    assert per_rank_batch(8, 2) == 4 and per_rank_batch(3, 1) == 3
    with pytest.raises(ValueError, match="divisible by the 2 torchrun processes"):
        per_rank_batch(5, 2)


def test_classify_two_processes_match_one(tmp_path, tiny_voc):
    # No warm-up and no clipping: full-size steps whose size depends on the gradient's scale, so a wrong
    # average over the processes (or a wrong share of the batch) moves the weights far beyond the tolerance.
    runner = tmp_path / "run_classify.py"
    runner.write_text(RUNNER)
    common = ["--data", str(tiny_voc), "--test-split", "val", "--epochs", "3", "--batch-size", "4", "--fc-width", "16",
              "--workers", "0", "--dropout", "0", "--amp", "none", "--calib-images", "4", "--warmup-epochs", "0",
              "--lr", "0.0002",
              "--clip-grad", "0"]
    runs = {}
    for name, nproc in (("single", None), ("ddp", 2)):
        out = tmp_path / name
        out.mkdir()
        stdout = _run([str(runner), str(out)], common + ["--out", str(out)], nproc)
        assert stdout.count("classify init=random seed=0: mAP") == 1, stdout  # rank 0 alone prints
        runs[name] = out

    single, ddp = (torch.load(runs[k] / "weights.pth") for k in ("single", "ddp"))
    assert single.keys() == ddp.keys()  # also: rank 0 tested the unwrapped model (no "module." prefix)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-5, msg=f"{k} differs")

    returned = [(runs["ddp"] / f"returned-rank{r}.json").read_text() for r in (0, 1)]
    assert returned[0] == returned[1]  # every rank returns rank 0's metrics
    m_single = json.loads((runs["single"] / "returned-rank0.json").read_text())
    m_ddp = json.loads(returned[0])
    losses = [[h["loss"] for h in m["train_history"]] for m in (m_single, m_ddp)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert abs(losses[0][-1] - losses[0][0]) > 1e-2  # the steps were large enough for the comparison to mean something
    for key in ("mAP_11point", "mAP_all_point"):
        assert m_ddp["scores"][key] == pytest.approx(m_single["scores"][key], abs=1e-6)
    assert json.loads((runs["ddp"] / "metrics.json").read_text())["scores"] == m_ddp["scores"]


def _check_smoke_run(out: Path, stdout: str, summary: str, metric: str) -> None:
    assert stdout.count(summary) == 1, stdout  # rank 0 alone prints (and writes, in the same block)
    saved = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(saved["scores"][metric]) and 0 <= saved["scores"][metric] <= 1
    assert (out / "config.json").exists() and (out / "per_class.csv").exists()


def test_segment_under_torchrun(tmp_path, tiny_voc):
    out = tmp_path / "segment"
    args = ["--data", str(tiny_voc), "--test-split", "val", "--epochs", "1", "--batch-size", "2", "--crop-size", "72",
            "--fc-width", "16", "--workers", "0", "--amp", "none", "--warmup-epochs", "0", "--num-predictions", "2",
            "--out", str(out)]
    stdout = _run(["-m", "transfer.segment"], args, nproc=2)
    _check_smoke_run(out, stdout, "segment random seed 0 on", "mIoU")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 2 and math.isfinite(saved["train_history"][-1]["loss"])  # 4 images, 2 per global batch
    assert (out / "predictions.png").exists()


def test_detect_under_torchrun(tmp_path, tiny_voc):
    out = tmp_path / "detect"
    args = ["--data", str(tiny_voc), "--test-split", "val", "--epochs", "1", "--batch-size", "2", "--min-size", "96",
            "--max-size", "128", "--anchor-sizes", "16", "32", "64", "--representation-size", "64",
            "--rpn-post-nms-train", "50", "--rpn-post-nms-test", "20", "--box-batch-size", "16", "--workers", "0",
            "--vis-images", "2", "--out", str(out)]
    stdout = _run(["-m", "transfer.detect"], args, nproc=2)
    _check_smoke_run(out, stdout, "detect random seed 0 on", "mAP_11point")
    saved = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in saved["train_history"][0].values())
    assert (out / "detections.png").exists()
