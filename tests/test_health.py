"""pretrain.health on trunks whose answers are known by hand, and its place in a pretraining run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.health import HEALTH_METRICS, feature_health, format_health, layer_health
from pretrain.main_pretrain import PretrainConfig, main
from pretrain.models import AlexNetEncoder, gaussian_init_

SMALL = 67  # the smallest input every caffe AlexNet layer maps to >= 1x1 (conv1 15x15 ... pool5 1x1)


def _trunk(pool_free: bool = False) -> AlexNetEncoder:
    torch.manual_seed(0)
    return AlexNetEncoder("caffe", pool_free=pool_free)


def _images(n: int = 8, size: int = SMALL) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))  # (N, 3, S, S)


def test_dead_channels_are_counted():
    trunk, images = _trunk(), _images()
    before = layer_health(trunk, images)
    assert before["conv1"]["dead_fraction"] == before["conv2"]["dead_fraction"] == 0  # Kaiming init: all alive
    with torch.no_grad():
        trunk.conv1.bias[5] = -1e6  # never positive
        trunk.conv2.weight[[3, 200]] = 0  # zero filters, zero bias: output exactly 0
        trunk.conv2.bias[[3, 200]] = 0
    report = layer_health(trunk, images)
    assert report["conv1"]["dead_fraction"] == pytest.approx(1 / 96)
    assert report["conv2"]["dead_fraction"] == pytest.approx(2 / 256)


def test_two_identical_filters_give_the_hand_computed_mean_abs_cos():
    trunk = _trunk()
    with torch.no_grad():
        trunk.conv1.weight.copy_(torch.eye(96, 363).view(96, 3, 11, 11))  # orthogonal one-hot filters: all cos 0
        trunk.conv1.weight[1] = 3 * trunk.conv1.weight[0]  # same direction: |cos| 1 for the pairs (0,1) and (1,0)
        # conv2 has 2 groups of 128 filters: a duplicate within group 0 counts in 2 of 2 * 128 * 127 ordered pairs
        trunk.conv2.weight.copy_(torch.eye(256, 48 * 25).view(256, 48, 5, 5))
        trunk.conv2.weight[7] = -trunk.conv2.weight[2]  # opposite sign: |cos| is still 1
    report = layer_health(trunk, _images(2))
    assert report["conv1"]["mean_abs_cos"] == pytest.approx(2 / (96 * 95))
    assert report["conv2"]["mean_abs_cos"] == pytest.approx(2 / (2 * 128 * 127))


def test_constant_filters_align_sqrt_n_and_zero_sum_filters_zero():
    trunk = _trunk()
    n = 3 * 11 * 11
    scales = torch.randn(96, 1, 1, 1, generator=torch.Generator().manual_seed(2))  # some negative
    with torch.no_grad():
        trunk.conv1.weight.copy_(scales.expand(96, 3, 11, 11))  # constant filters
    assert layer_health(trunk, _images(2))["conv1"]["mean_alignment"] == pytest.approx(math.sqrt(n), rel=1e-5)
    with torch.no_grad():
        w = torch.randn(96, n, generator=torch.Generator().manual_seed(3))  # (96, n)
        trunk.conv1.weight.copy_((w - w.mean(1, keepdim=True)).view(96, 3, 11, 11))  # zero-sum filters
    assert layer_health(trunk, _images(2))["conv1"]["mean_alignment"] == pytest.approx(0, abs=1e-4)
    with torch.no_grad():
        trunk.conv1.weight[:48] = scales[:48].expand(48, 3, 11, 11)  # half constant, half zero-sum
    assert layer_health(trunk, _images(2))["conv1"]["mean_alignment"] == pytest.approx(math.sqrt(n) / 2, rel=1e-4)


@pytest.mark.parametrize("pool_free", [False, True])
def test_random_reference_is_the_seeded_gaussian_start_of_the_same_architecture(pool_free):
    trunk, images = _trunk(pool_free), _images()  # a 3x3/2 conv shrinks a map as the 3x3/2 max-pool does
    report = feature_health(trunk, images, seed=4)
    layers = ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"] if pool_free else \
        ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert list(report) == layers
    torch.manual_seed(4)
    expected = AlexNetEncoder("caffe", pool_free=pool_free)
    gaussian_init_(expected)
    by_hand = layer_health(expected, images)
    for key, m in report.items():
        assert m["random"] == pytest.approx(by_hand[key]), key
        # Gaussian filters have E|sum w| / ||w|| = sqrt(2 / pi)
        assert m["random"]["mean_alignment"] == pytest.approx(math.sqrt(2 / math.pi), abs=0.15), key
    assert json.loads(json.dumps(report)) == report


def test_table_lists_every_layer_and_metric():
    report = feature_health(_trunk(), _images())
    table = format_health(report).splitlines()
    assert len(table) == 2 + 5 and [line.split()[0] for line in table[2:]] == list(report)
    for line, m in zip(table[2:], report.values()):
        values = [float(v) for v in line.split()[1:]]
        expected = [x for k in HEALTH_METRICS for x in (m[k], m["random"][k])]
        assert values == pytest.approx(expected, abs=5e-4)


def test_pretraining_writes_feature_health_to_eval_json(tmp_path, tiny_voc, capsys):
    main(PretrainConfig(output_dir=str(tmp_path), name="h", data=str(tiny_voc), batch_size=2, steps=1, workers=0,
                        eval_images=2, amp="none", channels_last=False, lambda_adv=0.0))
    health = json.loads((tmp_path / "h" / "eval.json").read_text())["feature_health"]
    assert list(health) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert set(health["conv2"]) == {*HEALTH_METRICS, "random"}
    assert "mean |cos|" in capsys.readouterr().out
