"""pretrain.hub: pretrained encoders and generators from run folders and checkpoint files, with clear errors."""
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import list_checkpoints
from pretrain.hub import (
    GENERATOR_DEFAULTS,
    NotAnInpainterError,
    Pretrained,
    build_generator,
    load_checkpoint,
    load_encoder,
    load_generator,
)
from pretrain.inpaint128 import Inpaint128Generator
from pretrain.models import AlexNetEncoder, ContextEncoder


def _copy_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny run (checkpoints at steps 1 and 2), safe to damage."""
    return Path(shutil.copytree(run, tmp_path / run.name))


def test_generator_defaults_are_pretrain_configs():
    from pretrain.main_pretrain import PretrainConfig  # the test may import the training loop; hub may not

    defaults = PretrainConfig()
    assert GENERATOR_DEFAULTS == {key: getattr(defaults, key) for key in GENERATOR_DEFAULTS}


def test_build_generator_ignores_unknown_keys_and_defaults_missing_ones():
    net = build_generator({"a_key_from_another_version": 1})
    assert isinstance(net, ContextEncoder) and isinstance(net.encoder, AlexNetEncoder)
    assert net.encoder.arch == "caffe" and not net.encoder.pool_free
    assert net.bottleneck.dropout.p == 0.5
    assert build_generator({"encoder": "alexnet-poolfree", "dropout": 0.1}).encoder.pool_free
    assert isinstance(build_generator({"model": "inpaint128", "crop_size": 227}), Inpaint128Generator)
    with pytest.raises(ValueError, match="resnet"):
        build_generator({"model": "resnet"})


def test_training_loop_builds_its_generator_with_the_hub():
    from pretrain.main_pretrain import PretrainConfig, build_models

    cfg = PretrainConfig(encoder="alexnet-torchvision", lambda_adv=0.0)
    generator, disc = build_models(cfg)
    hub_net = build_generator(dataclasses.asdict(cfg))
    assert disc is None
    assert {k: v.shape for k, v in generator.state_dict().items()} == {k: v.shape for k, v in hub_net.state_dict().items()}


def test_load_from_folder_and_from_file(tiny_pretrain_run):
    newest, older = list_checkpoints(tiny_pretrain_run)[-1], list_checkpoints(tiny_pretrain_run)[0]
    ckpt, source = load_checkpoint(tiny_pretrain_run)
    assert source == newest and ckpt["step"] == 2

    trunk, info = load_encoder(tiny_pretrain_run)
    assert info == {"path": str(newest), "step": 2}
    assert isinstance(trunk, AlexNetEncoder)
    assert torch.equal(trunk.conv1.weight, ckpt["model"]["encoder.conv1.weight"])
    assert torch.equal(trunk.conv5.bias, ckpt["model"]["encoder.conv5.bias"])

    trunk1, info1 = load_encoder(older)
    assert info1 == {"path": str(older), "step": 1}
    assert not torch.equal(trunk1.conv1.weight, trunk.conv1.weight)  # a step of training changed it


def test_damaged_newest_falls_back_naming_the_file_and_step_used(tiny_pretrain_run, tmp_path):
    run = _copy_run(tiny_pretrain_run, tmp_path)
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.warns(UserWarning, match=r"checkpoint-00000002\.pth .*damaged; using checkpoint-00000001\.pth "
                                         r"\(step 1\) instead"):
        _, info = load_encoder(run)
    assert info["step"] == 1 and info["path"].endswith("checkpoint-00000001.pth")

    list_checkpoints(run)[0].write_text("not a checkpoint")
    with pytest.raises(ValueError, match="no readable checkpoint in"):
        load_checkpoint(run)


def test_bad_paths_and_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_checkpoint(tmp_path / "missing.pth")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="pretrain first with python -m pretrain --name empty-run"):
        load_checkpoint(empty)

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth is not a readable ctxenc checkpoint"):
        load_checkpoint(text)
    foreign = tmp_path / "foreign.pth"  # a pickled object no checkpoint holds: refused, without running anything
    torch.save({"model": {}, "config": {}, "where": Path("x")}, foreign)
    with pytest.raises(ValueError, match="foreign.pth") as err:
        load_checkpoint(foreign)
    assert "weights_only" not in str(err.value)  # never advise loading untrusted pickles
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"plain\.pth is not a readable ctxenc checkpoint.*'model'"):
        load_checkpoint(plain)


def test_load_generator_fills_an_image_of_the_input_size(tiny_pretrain_run):
    pretrained = load_generator(tiny_pretrain_run)
    assert isinstance(pretrained, Pretrained) and isinstance(pretrained.model, ContextEncoder)
    assert not pretrained.model.training and pretrained.step == 2
    assert pretrained.path == list_checkpoints(tiny_pretrain_run)[-1] and pretrained.config["steps"] == 2
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        out = pretrained.model(x)  # (2, 3, 227, 227)
        again = pretrained.model(x)
    assert out.shape == (2, 3, 227, 227)
    torch.testing.assert_close(out, again)  # eval mode: no dropout, the same fill twice


def test_inpaint128_generator_round_trips(tmp_path):
    torch.manual_seed(0)
    net = Inpaint128Generator().eval()
    path = tmp_path / "checkpoint-00000007.pth"
    torch.save({"model": net.state_dict(), "config": {"model": "inpaint128"}}, path)  # no step entry: from the name
    pretrained = load_generator(path)
    assert pretrained.step == 7
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(pretrained.model(x), net(x))
    with pytest.raises(ValueError, match="inpaint128 checkpoint"):
        load_encoder(path)


def test_a_supervised_checkpoint_gives_its_trunk_but_no_generator(tmp_path):
    trunk = AlexNetEncoder("caffe")
    state = {f"encoder.{k}": v for k, v in trunk.state_dict().items()}
    state["classifier.weight"] = torch.zeros(20, 256 * 6 * 6)  # the supervised head: not part of the trunk
    path = tmp_path / "supervised.pth"
    torch.save({"model": state, "config": {"objective": "supervised", "model": "alexnet", "encoder": "alexnet"},
                "step": 5}, path)
    loaded, info = load_encoder(path)
    assert info["step"] == 5 and torch.equal(loaded.conv3.weight, trunk.conv3.weight)
    with pytest.raises(NotAnInpainterError, match="objective 'supervised'"):
        load_generator(path)
