"""transfer.engine and transfer.experiment: the shared schedule, loop, results header and collapse checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from transfer.engine import Schedule, TrainState, make_optimizer, train_one_epoch
from transfer.experiment import FinetuneConfig, check_writable, setup, write_results
from transfer.metrics import ConfusionMatrix, classification_collapse, detection_collapse, segmentation_collapse


def test_schedule_warms_up_then_decays_to_zero_and_caps_the_warmup():
    cfg = FinetuneConfig(epochs=10, lr=0.1, warmup_epochs=1.0)
    s = Schedule.for_run(cfg, steps_per_epoch=10)
    assert (s.total_steps, s.warmup_steps) == (100, 10)
    assert s(0) == pytest.approx(0.001) and s(10) == pytest.approx(0.1) and s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(55) == pytest.approx(0.05)  # half-way through the cosine
    short = Schedule.for_run(FinetuneConfig(epochs=1, warmup_epochs=5.0), steps_per_epoch=10)
    assert short.warmup_steps == 2  # a fifth of the run, not five epochs


def test_weight_decay_applies_to_weights_not_biases():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = make_optimizer(model, FinetuneConfig(weight_decay=0.5), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def _batches(n: int, skip_at: int | None = None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * 8, 5, generator=g)
    y = (x[:, 0] > 0).float()
    for i in range(n):
        yield (None, 8) if i == skip_at else ((x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]), 0)


def _bce(model, batch, device):
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1).float(), y)


def test_train_one_epoch_lowers_the_loss_counts_skips_and_follows_the_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    cfg = FinetuneConfig(epochs=4, lr=0.1, warmup_epochs=0.0, amp="none", clip_grad=1.0)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    schedule, state = Schedule.for_run(cfg, steps_per_epoch=10), TrainState()
    losses = [train_one_epoch(model, list(_batches(10, skip_at=3)), opt, schedule, _bce, state, cfg,
                              torch.device("cpu"), e) for e in range(cfg.epochs)]
    assert losses[-1] < 0.5 * losses[0]
    assert state.step == 4 * 9 and state.skipped_images == 4 * 8  # the unreadable batch is skipped, and counted
    assert opt.param_groups[0]["lr"] == pytest.approx(schedule(state.step - 1))


def test_a_non_finite_loss_stops_the_loop():
    model = nn.Linear(5, 1)
    cfg = FinetuneConfig(epochs=1, amp="none")

    def nan_loss(m, batch, device):
        return m(batch[0]).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="step 1"):
        train_one_epoch(model, list(_batches(2)), make_optimizer(model, cfg, torch.device("cpu")),
                        Schedule(0.1, 2, 0), nan_loss, TrainState(), cfg, torch.device("cpu"), 0)


def test_results_carry_the_common_header(tmp_path):
    cfg = FinetuneConfig(init="random", seed=3, out=str(tmp_path / "run"))
    exp = setup(cfg, "classify")
    metrics = write_results(exp, {"mAP_11point": 0.5}, {"extra": [1.0, float("nan")]})
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("task", "init", "init_label", "seed", "data", "commit", "config_hash", "versions", "wall_seconds",
                "checkpoint", "status", "collapse_reason", "scores"):
        assert key in saved, key
    assert saved["task"] == "classify" and saved["seed"] == 3 and saved["status"] == "ok"
    assert saved["extra"] == [1.0, None] and metrics["scores"] == {"mAP_11point": 0.5}
    assert set(saved["versions"]) >= {"torch", "torchvision", "python"}
    # the hash depends on what is computed, not on where it is written
    other = setup(FinetuneConfig(init="random", seed=3, out=str(tmp_path / "elsewhere")), "classify")
    assert write_results(other, {})["config_hash"] == saved["config_hash"]
    changed = setup(FinetuneConfig(init="random", seed=3, lr=0.5, out=str(tmp_path / "lr")), "classify")
    assert write_results(changed, {})["config_hash"] != saved["config_hash"]


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="--out"):
        check_writable(blocker / "run")


def test_constant_classification_scores_are_collapsed():
    assert classification_collapse(np.tile([[0.3, 0.7]], (5, 1))) is not None
    assert classification_collapse(np.array([[0.3, 0.7], [0.31, 0.7]])) is None


def test_all_background_segmentation_is_collapsed():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(np.zeros_like(gt), gt)  # predicts background everywhere
    assert "class 0" in segmentation_collapse(cm)
    good = ConfusionMatrix(3)
    good.update(gt, gt)
    assert segmentation_collapse(good) is None
    # not one class everywhere, but no better than all-background: still collapsed
    near = ConfusionMatrix(3)
    near.matrix[:] = [[900, 100, 0], [86, 14, 0], [100, 0, 0]]  # 27.63% vs 27.78% all-background
    assert "background everywhere" in segmentation_collapse(near)
    # foreground predicted, but on the wrong pixels: below all-background (20.0% vs 27.78%) is collapsed too
    worse = ConfusionMatrix(3)
    worse.matrix[:] = [[600, 200, 200], [0, 0, 100], [0, 100, 0]]
    assert "background everywhere" in segmentation_collapse(worse)


def test_detection_without_any_box_is_collapsed():
    assert detection_collapse(0, 0.001) is not None and detection_collapse(3, 0.001) is None
