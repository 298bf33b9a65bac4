"""A pretraining run stops (with a message naming the step and what was kept) rather than write NaN metrics or
evaluate on fewer held-out images than asked."""
import json

import pytest
import torch

import pretrain.engine
from pretrain.checkpoint import list_checkpoints
from pretrain.errors import UserError
from pretrain.main_pretrain import PretrainConfig, TrainingDivergedError, main
from tests.conftest import write_tiny_voc


def _cfg(tmp_path, data, **kw):
    base = dict(output_dir=str(tmp_path / "runs"), name="run", data=str(data), batch_size=4, workers=0, eval_images=2,
                amp="none", channels_last=False, log_every=1, ckpt_every=1, lambda_adv=0.0)
    return PretrainConfig(**{**base, **kw})


def test_nan_loss_at_the_last_step_stops_naming_it_and_keeps_the_last_good_checkpoint(tmp_path, tiny_voc, monkeypatch):
    real_loss, calls = pretrain.engine.masked_l2_loss, []

    def nan_at_step_2(*args):
        calls.append(1)
        return real_loss(*args) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(pretrain.engine, "masked_l2_loss", nan_at_step_2)
    with pytest.raises(TrainingDivergedError, match=r"step 2: non-finite loss nan.*last good checkpoint, "
                                                    r".*checkpoint-00000001\.pth, is kept.*lower --lr"):
        main(_cfg(tmp_path, tiny_voc, steps=2))
    run = tmp_path / "runs" / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000001.pth"]
    assert not (run / "eval.json").exists()


def test_outputs_that_overflow_after_the_last_step_never_reach_eval_json(tmp_path, tiny_voc):
    # lr 1e30: the one update leaves finite but huge weights, whose outputs overflow to inf/NaN
    with pytest.raises(TrainingDivergedError, match=r"after step 1 the held-out l1, l2, psnr are not finite"):
        main(_cfg(tmp_path, tiny_voc, steps=1, lr=1e30))
    assert not (tmp_path / "runs" / "run" / "eval.json").exists()


def test_weights_that_overflow_are_not_checkpointed(tmp_path, tiny_voc):
    # lr 1e39 is infinite in float32: the first update makes the weights inf/NaN although the loss was finite
    with pytest.raises(TrainingDivergedError, match=r"after step 1 the weights are not finite \(encoder\.conv1\.weight"):
        main(_cfg(tmp_path, tiny_voc, steps=2, lr=1e39))
    run = tmp_path / "runs" / "run"
    assert list_checkpoints(run) == [] and not (run / "eval.json").exists()


def test_an_unreadable_held_out_image_stops_before_the_first_step(tmp_path, monkeypatch):
    voc = write_tiny_voc(tmp_path / "data")
    bad = voc / "VOC2007" / "JPEGImages" / "img_005.jpg"  # in the val split
    bad.write_bytes(b"not a jpeg")
    monkeypatch.setattr(pretrain.main_pretrain, "train_step", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(UserError, match=r"1 of the 2 held-out images cannot be read: .*img_005\.jpg"):
        main(_cfg(tmp_path, voc, steps=2))
    run = tmp_path / "runs" / "run"
    assert not (run / "metrics.csv").exists() and list_checkpoints(run) == []


def test_held_out_images_beyond_eval_images_are_not_required(tmp_path):
    voc = write_tiny_voc(tmp_path / "data")
    (voc / "VOC2007" / "JPEGImages" / "img_005.jpg").write_bytes(b"not a jpeg")  # the 2nd held-out image
    results = main(_cfg(tmp_path, voc, steps=1, eval_images=1))
    saved = json.loads((tmp_path / "runs" / "run" / "eval.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for v in saved.values() if not isinstance(v, dict))
    assert 0 < results["l1"] < 1
