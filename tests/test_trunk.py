"""Every `--init` of transfer.trunk.build_trunk loads, with the weights it promises, or fails naming the file."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pretrain.checkpoint import list_checkpoints
from pretrain.data import VOCDataset
from pretrain.models import AlexNetEncoder
from transfer.classify import Classifier
from transfer.experiment import calibration_batch, init_label
from transfer.trunk import CONV_KEYS, TORCHVISION_CONV_INDEX, build_trunk, calibrate_network_, conv_layers


def _pre_activation_stats(trunk: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{conv name: (C, 2) per-channel mean and std of its output} via forward hooks."""
    stats: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(
        lambda _m, _i, out, name=name: stats.__setitem__(name, torch.stack([out.mean((0, 2, 3)), out.std((0, 2, 3))], 1)))
        for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        trunk(images)
    for h in hooks:
        h.remove()
    return stats


def test_random_init_is_gaussian_001_with_zero_bias():
    trunk, source = build_trunk("random", seed=0)
    assert isinstance(trunk, AlexNetEncoder) and source is None and init_label("random") == "random"
    for key in CONV_KEYS:
        conv = getattr(trunk, key)
        assert abs(conv.weight.std().item() - 0.01) < 0.001, key
        assert abs(conv.weight.mean().item()) < 0.001, key
        assert torch.count_nonzero(conv.bias) == 0, key
    assert trunk(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)
    assert torch.equal(build_trunk("random", seed=0)[0].conv1.weight, trunk.conv1.weight)  # seeded
    assert not torch.equal(build_trunk("random", seed=1)[0].conv1.weight, trunk.conv1.weight)


def test_every_start_goes_through_the_same_calibration(tiny_voc, tiny_pretrain_run, tmp_path):
    """Random and pretrained starts: the same protocol, the same new layers, the same calibration images; the
    random start is re-initialised from data in every layer, a pretrained trunk only rescaled."""
    images = calibration_batch(VOCDataset(tiny_voc, "train", "images"), n=32)  # (4, 3, 227, 227): tiny_voc has 4
    reports = {}
    for init in ("random", str(tiny_pretrain_run)):
        trunk, _ = build_trunk(init, seed=0)
        torch.manual_seed(0)
        model = Classifier(trunk, num_classes=3, width=32)
        pretrained = {k: v.clone() for k, v in trunk.state_dict().items()}
        reports[init] = calibrate_network_(model, trunk, model.new_layers(), lambda m=model: m(images),
                                           trunk_is_fresh=init == "random")
        stats = _pre_activation_stats(trunk, images)
        if init == "random":  # within-layer init gave every channel std 1; between-layer scaled whole layers
            for name, s in stats.items():
                assert s[:, 1].max() / s[:, 1].min() - 1 < 1e-3, name
        else:  # between-layer only: each conv is its pretrained self times one positive scalar
            for key in CONV_KEYS:
                w, w0 = getattr(trunk, key).weight, pretrained[f"{key}.weight"]
                ratio = (w / w0)[w0.abs() > 1e-6]
                assert ratio.min() > 0 and (ratio.max() / ratio.min() - 1) < 1e-3, key
    assert reports["random"]["layers"] == reports[str(tiny_pretrain_run)]["layers"]  # same 8 layers, same order


def test_conv_layers_come_in_forward_order_for_a_pool_free_trunk():
    # the pool-free trunk registers pool1/pool2's convs after conv5; calibration must follow the forward order
    trunk = AlexNetEncoder(pool_free=True)
    names = {m: n for n, m in trunk.named_modules()}
    order = [names[m] for m in conv_layers(trunk, lambda: trunk(torch.randn(1, 3, 131, 131)))]
    assert order.index("conv1") < order.index("conv2") < order.index("conv5") and len(order) == 8
    assert order[1].startswith("pool1") and order[-1].startswith("pool5")


def test_context_encoder_run_folder_and_checkpoint_load_bit_identical(tiny_pretrain_run):
    ckpt_path = list_checkpoints(tiny_pretrain_run)[-1]
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)["model"]
    encoder = {k[len("encoder."):]: v for k, v in saved.items() if k.startswith("encoder.")}
    assert encoder
    for init in (str(tiny_pretrain_run), str(ckpt_path)):
        trunk, source = build_trunk(init, seed=123)
        state = trunk.state_dict()
        assert source["step"] == torch.load(ckpt_path, weights_only=False)["step"]
        assert state.keys() == encoder.keys()
        for k, v in encoder.items():
            assert torch.equal(state[k], v), (init, k)
    assert init_label(str(tiny_pretrain_run)) == init_label(str(ckpt_path)) == "tiny-ce"


def test_torchvision_state_dict_loads_its_convs(tmp_path):
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    trunk, _ = build_trunk(f"torchvision:{path}")
    assert trunk.arch == "torchvision" and init_label(f"torchvision:{path}") == "torchvision"
    for key, idx in TORCHVISION_CONV_INDEX.items():
        assert torch.equal(getattr(trunk, key).weight, state[f"features.{idx}.weight"]), key
        assert torch.equal(getattr(trunk, key).bias, state[f"features.{idx}.bias"]), key
    # ...and computes torchvision's features up to pool5
    tv = torchvision.models.alexnet(weights=None)
    tv.load_state_dict(state)
    x = torch.randn(1, 3, 227, 227)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), tv.features(x))


def test_bad_inits_fail_naming_the_file(tmp_path, tiny_pretrain_run):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_trunk(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_trunk(f"torchvision:{missing}")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-run"):
        build_trunk(str(empty_run))

    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_trunk(str(garbage))
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)  # a torch file, but not a pretraining checkpoint
    with pytest.raises(ValueError, match="plain.pth"):
        build_trunk(str(plain))

    ckpt = torch.load(list_checkpoints(tiny_pretrain_run)[-1], map_location="cpu", weights_only=False)
    other = tmp_path / "inpaint128.pth"
    torch.save({"model": {}, "config": dict(ckpt["config"], model="inpaint128")}, other)
    with pytest.raises(ValueError, match="inpaint128.pth"):
        build_trunk(str(other))
    mismatched = tmp_path / "poolfree.pth"  # config says pool-free, weights are the plain trunk's
    torch.save({"model": ckpt["model"], "config": dict(ckpt["config"], encoder="alexnet-poolfree")}, mismatched)
    with pytest.raises(ValueError, match="poolfree.pth"):
        build_trunk(str(mismatched))
    resnet = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    with pytest.raises(ValueError, match="resnet.pth"):
        build_trunk(f"torchvision:{resnet}")


def test_rescaled_keyword_points_to_the_protocol():
    with pytest.raises(ValueError, match="--init random"):
        build_trunk("rescaled")
