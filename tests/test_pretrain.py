"""End-to-end behaviour of `python -m pretrain`: falling loss, exact resume, checkpoints, errors."""
import csv
import json

import pytest
import torch

import pretrain.engine
from pretrain.checkpoint import list_checkpoints, load_state_dict_checked
from pretrain.errors import UserError
from pretrain.main_pretrain import PretrainConfig, build_models, lr_at, main


def _cfg(tmp_path, data, **kw):
    base = dict(output_dir=str(tmp_path), data=str(data), batch_size=4, workers=0, eval_images=2, amp="none",
                channels_last=False, log_every=1, ckpt_every=2, dropout=0.5, lambda_adv=0.001)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["loss_d"])) for r in csv.DictReader(f)]


def _params(run_dir):
    ckpt = torch.load(list_checkpoints(run_dir)[-1], weights_only=False)
    return ckpt["model"], ckpt["discriminator"]


def test_run_writes_every_output(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="outputs", steps=2))
    run = tmp_path / "outputs"
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert len(_losses(run)) == 2 and list_checkpoints(run)
    ev = json.loads((run / "eval.json").read_text())
    assert {"l1", "l2", "psnr", "mean_fill_l1", "mean_fill_l2", "mean_fill_psnr"} <= ev.keys()
    assert list((run / "samples").glob("*.png"))


def test_resume_continues_the_same_trajectory(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="straight", steps=4))
    main(_cfg(tmp_path, tiny_voc, name="resumed", steps=4, stop_at=2))  # same cosine schedule, stopped halfway
    main(_cfg(tmp_path, tiny_voc, name="resumed", steps=4, resume=True))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4]  # no duplicated rows after the resume
    for (_, a, da), (_, b, db) in zip(straight, resumed):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7) and da == pytest.approx(db, rel=1e-6, abs=1e-7)
    (g1, d1), (g2, d2) = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-6, atol=1e-7)
    for k in d1:
        torch.testing.assert_close(d1[k], d2[k], rtol=1e-6, atol=1e-7)


def test_loss_falls_when_training(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="falls", steps=30, lambda_adv=0.0, mask="center", ckpt_every=100))
    losses = [loss for _, loss, _ in _losses(tmp_path / "falls")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="damaged", steps=4, keep_checkpoints=2))
    run = tmp_path / "damaged"
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="damaged"):
        main(_cfg(tmp_path, tiny_voc, name="damaged", steps=4, resume=True, keep_checkpoints=2))
    assert len(_losses(run)) == 4  # steps 3-4 were redone from the step-2 checkpoint


def test_checkpoint_of_another_architecture_is_refused_by_name(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="arch", steps=2))
    # --resume compares the options first: the changed encoder is named before any weights are loaded
    with pytest.raises(UserError, match=r"config\.json\): encoder: 'alexnet' -> 'alexnet-poolfree'"):
        main(_cfg(tmp_path, tiny_voc, name="arch", steps=4, resume=True, encoder="alexnet-poolfree"))
    ckpt = torch.load(list_checkpoints(tmp_path / "arch")[-1], weights_only=False)
    with pytest.raises(ValueError, match=r"checkpoint-00000002\.pth does not fit.*--encoder alexnet-poolfree.*"
                                         r"see .*arch/config\.json"):
        load_state_dict_checked(build_models(_cfg(tmp_path, tiny_voc, encoder="alexnet-poolfree"))[0], ckpt["model"],
                                str(list_checkpoints(tmp_path / "arch")[-1]))


def test_non_finite_loss_stops_naming_the_step(tmp_path, tiny_voc, monkeypatch):
    monkeypatch.setattr(pretrain.engine, "masked_l2_loss", lambda *a: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 1"):
        main(_cfg(tmp_path, tiny_voc, name="nan", steps=2))


def test_inpaint128_family_trains(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="i128", model="inpaint128", steps=2))
    assert len(_losses(tmp_path / "i128")) == 2


def test_missing_dataset_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        main(_cfg(tmp_path, tmp_path / "no-such-folder", name="missing", steps=1))


def test_cosine_schedule_decays_from_lr_to_zero_and_constant_stays():
    cfg = PretrainConfig(lr=1e-3, steps=100, lr_schedule="cosine")
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(5e-4) and 0 < lrs[-1] < 1e-6
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(PretrainConfig(lr=1e-3, steps=100, lr_schedule="constant"), 99) == 1e-3
    supervised = PretrainConfig(objective="supervised", lr=1e-3, supervised_lr=2e-4, steps=100, lr_schedule="cosine")
    assert lr_at(supervised, 0) == pytest.approx(2e-4) and lr_at(supervised, 50) == pytest.approx(1e-4)
