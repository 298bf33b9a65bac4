"""transfer.classify: crops, the model, and a complete (tiny) fine-tuning run."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import torch
from PIL import Image

from pretrain.data import VOCDataset
from pretrain.dataset import normalize, sample_generator
from transfer.classify import (
    ClassificationCrops,
    Classifier,
    ClassifyConfig,
    eval_targets,
    label_prior_init_,
    main,
    masked_bce,
    random_resized_crop_box,
    ten_crops,
    train_crop,
)
from transfer.trunk import build_trunk


def _gradient_image(w: int = 301, h: int = 256) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)  # (H, W, 3) left-right ramp
    return Image.fromarray(x)


def test_ten_crop_gives_corners_centre_and_mirrors():
    crops = ten_crops(_gradient_image(), size=227, resize=256)  # 301 - 227 even: the centre crop mirrors exactly
    assert crops.shape == (10, 3, 227, 227)
    # the last five are the five crops of the mirrored image: mirrored top-left = top-right flipped, etc.
    torch.testing.assert_close(crops[5:], crops[[1, 0, 3, 2, 4]].flip(-1))
    # top-left crop starts at the image's left edge (darkest), top-right ends at its right edge
    assert crops[0, 0, 0, 0] < crops[4, 0, 0, 0] < crops[1, 0, 0, 0]


def test_train_crops_are_seeded_and_in_range():
    image = _gradient_image()
    a = train_crop(image, sample_generator(0, 1, 5))
    b = train_crop(image, sample_generator(0, 1, 5))
    c = train_crop(image, sample_generator(0, 2, 5))
    assert a.shape == (3, 227, 227) and torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = normalize(torch.zeros(3, 1, 1)), normalize(torch.ones(3, 1, 1))
    assert (a >= lo - 1e-5).all() and (a <= hi + 1e-5).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(341, 256, (0.3, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 341
        assert 0.3 * 341 * 256 * 0.95 <= h * w <= 341 * 256


def test_classifier_head_shapes_and_masked_loss():
    model = Classifier(build_trunk("random")[0], num_classes=5, input_size=227, width=64)
    assert model.head[0].in_features == 256 * 6 * 6
    assert model(torch.randn(2, 3, 227, 227)).shape == (2, 5)
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    valid = torch.tensor([[True, True], [False, False]])  # second row: difficult-only, ignored
    assert masked_bce(logits, labels, valid).item() < 1e-4
    valid[1] = True  # both entries of row 2 count: 2 * log(2) summed over classes, / 2 images
    assert abs(masked_bce(logits, labels, valid).item() - math.log(2)) < 1e-4
    assert [m.out_features for m in model.new_layers()] == [64, 64, 5]


def test_label_prior_init_starts_at_the_prior_loss():
    # 4 images, 3 classes: class 0 positive in 1 of 4, class 1 in 3 of 3 known (one -1), class 2 never
    targets = np.array([[1, 1, 0], [0, 1, 0], [0, -1, 0], [0, 1, 0]])
    classifier = torch.nn.Linear(8, 3)
    bias = label_prior_init_(classifier, targets)
    prior = np.array([2 / 6, 4 / 5, 1 / 6])  # one pseudo-count each way
    assert np.allclose(torch.sigmoid(bias).numpy(), prior) and not classifier.weight.any()
    logits = classifier(torch.randn(4, 8))  # the same for every input: the prior
    assert torch.allclose(logits, bias.expand(4, 3))
    labels, valid = torch.tensor(targets.clip(0, 1), dtype=torch.float32), torch.tensor(targets >= 0)
    entropy = -((targets == 1) * np.log(prior) + (targets == 0) * np.log(1 - prior))  # (4, 3), 0 where ignored
    assert abs(masked_bce(logits, labels, valid).item() - entropy.sum() / 4) < 1e-5


def test_difficult_only_labels_are_ignored_in_loss_and_evaluation(tiny_voc):
    voc = VOCDataset(tiny_voc, "val", "classification")
    targets = eval_targets(voc)
    # img_005 holds only a difficult triangle: neither positive nor negative for "triangle"
    assert targets[voc.ids.index("img_005"), voc.classes.index("triangle")] == -1
    x, labels, valid, index = ClassificationCrops(voc, train=False, ten_crop=True)[voc.ids.index("img_005")]
    assert x.shape == (10, 3, 227, 227) and not valid[voc.classes.index("triangle")] and valid.sum() == 2


def test_tiny_run_writes_both_map_definitions(tiny_voc, tmp_path):
    cfg = ClassifyConfig(data=str(tiny_voc), test_split="val", epochs=1, batch_size=2, fc_width=32, workers=0,
                         out=str(tmp_path / "run"))
    metrics = main(cfg)
    for key in ("mAP_11point", "mAP_all_point"):
        assert math.isfinite(metrics["scores"][key]) and 0 <= metrics["scores"][key] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["scores"]["mAP_11point"] == metrics["scores"]["mAP_11point"] and saved["num_test_images"] == 2
    assert saved["task"] == "classify" and saved["status"] in ("ok", "collapsed") and saved["calibration"]
    assert saved["skipped_classes"] == ["circle"]  # no circle in the val split: skipped, and said
    with open(tmp_path / "run" / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["circle", "square", "triangle"]
    assert {"ap_11point", "ap_all_point"} <= set(rows[0])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fc_width"] == 32
