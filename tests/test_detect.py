import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from pretrain.config import parse_config
from pretrain.data import VOCDataset
from tests.conftest import TINY_VOC_CLASSES, TINY_VOC_SIZE
from transfer.detect import (
    DetectConfig,
    DetectionTransform,
    GatherRoIAlign,
    build_detector,
    calibrate_detector_,
    hflip_boxes,
    list_collate,
    main,
    score_detections,
    to_detections,
    to_ground_truth,
    training_target,
)
from transfer.experiment import calibration_batch
from transfer.trunk import build_trunk

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def tiny_config(**overrides) -> DetectConfig:
    """Sizes for 64x48 images: upscaled to 96 px so conv5 is a 4x6 grid, a narrow head, no workers."""
    values = dict(min_size=96, max_size=128, anchor_sizes=(16, 32, 64), representation_size=64, rpn_post_nms_train=50,
                  rpn_post_nms_test=20, box_batch_size=16, batch_size=2, workers=0, calib_images=4)
    values.update(overrides)
    return DetectConfig(**values)


def test_cli_parses_tuples_and_defaults():
    cfg = parse_config(DetectConfig, ["--anchor-sizes", "16", "32", "--rescale", "false", "--epochs", "2"])
    assert cfg.anchor_sizes == (16, 32) and cfg.rescale is False and cfg.epochs == 2
    assert cfg.feature == "conv5" and cfg.data == "builtin" and cfg.amp == "auto"
    assert (cfg.representation_size, cfg.rpn_post_nms_train, cfg.box_batch_size) == (512, 300, 32)


def test_training_target_drops_difficult_and_shifts_labels():
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 30]]), "labels": torch.tensor([0, 2]),
              "difficult": torch.tensor([False, True]), "image_id": "x"}
    out = training_target(target)
    assert out["labels"].tolist() == [1]  # class 0 -> 1: torchvision's 0 is background
    assert out["boxes"].tolist() == [[0.0, 0, 10, 10]]
    empty = training_target(dict(target, difficult=torch.tensor([True, True])))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_hflip_moves_boxes_with_the_pixels():
    image = torch.zeros(1, 10, 20)  # (C, H, W)
    box = torch.tensor([[3.0, 2, 8, 6]])  # x1, y1, x2, y2 continuous: columns 3..7, rows 2..5
    image[:, 2:6, 3:8] = 1
    flipped_image, flipped_box = image.flip(-1), hflip_boxes(box, 20)
    x1, y1, x2, y2 = flipped_box[0].int().tolist()
    assert flipped_image[0].nonzero()[:, 1].min() == x1 and flipped_image[0].nonzero()[:, 1].max() == x2 - 1
    assert (y1, y2) == (2, 6)
    assert torch.equal(hflip_boxes(flipped_box, 20), box)


def test_train_transform_flips_boxes_and_keeps_them_in_the_image(tiny_voc):
    torch.manual_seed(0)
    ds = VOCDataset(tiny_voc, split="train", task="detection", transform=DetectionTransform(train=True))
    raw = VOCDataset(tiny_voc, split="train", task="detection")
    height, width = TINY_VOC_SIZE
    seen = set()
    for _ in range(8):
        image, target = ds[0]
        assert image.shape == (3, height, width) and 0 <= image.min() and image.max() <= 1
        expected = raw.target(0)["boxes"]
        seen.add(torch.equal(target["boxes"], expected))
        if not torch.equal(target["boxes"], expected):
            assert torch.allclose(target["boxes"], hflip_boxes(expected, width))
    assert seen == {True, False}  # both flipped and unflipped draws happen


def test_detector_forward_backward_and_eval(tiny_voc):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_detector(build_trunk("random", seed=0)[0], len(TINY_VOC_CLASSES), cfg)
    ds = VOCDataset(tiny_voc, split="train", task="detection", transform=DetectionTransform(train=True))
    images, targets = list_collate([ds[0], ds[3]])
    # an image with only difficult boxes trains as a pure negative (empty target)
    negatives = VOCDataset(tiny_voc, split="val", task="detection", transform=DetectionTransform(train=True))
    neg_image, neg_target = negatives[1]
    assert neg_target["boxes"].shape == (0, 4)
    model.train()
    losses = model(images + [neg_image], targets + [neg_target])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.trunk.conv1.weight.grad is not None
    assert model.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    height, width = TINY_VOC_SIZE
    for out in outputs:
        assert set(out) == {"boxes", "labels", "scores"}
        assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["labels"]) == len(out["scores"])
        # boxes come back in the input image's pixels, although the model resized it to 96 px
        assert (out["boxes"][:, 2] <= width + 1e-3).all() and (out["boxes"][:, 3] <= height + 1e-3).all()
        assert ((out["labels"] >= 1) & (out["labels"] <= len(TINY_VOC_CLASSES))).all()


@pytest.mark.parametrize("init", ["random", "run"])
def test_every_init_loads_into_the_detector(init, tiny_voc, tiny_pretrain_run):
    spec = str(tiny_pretrain_run) if init == "run" else init
    trunk, _ = build_trunk(spec, seed=3)
    reference = {k: v.clone() for k, v in build_trunk(spec, seed=3)[0].state_dict().items()}
    model = build_detector(trunk, len(TINY_VOC_CLASSES), tiny_config())
    inside = model.backbone.trunk.state_dict()
    assert inside.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(inside[key], value), key
    assert model.backbone.out_channels == 256
    assert model.roi_heads.box_predictor.cls_score.out_features == len(TINY_VOC_CLASSES) + 1


def test_ground_truth_as_detections_scores_ap_one(tiny_voc):
    """The glue around transfer.metrics: label offsets and box conventions must round-trip exactly."""
    ds = VOCDataset(tiny_voc, split="trainval", task="detection", transform=DetectionTransform(train=False))
    targets = [ds[i][1] for i in range(len(ds))]
    # what torchvision returns for a perfect detector: labels 1..C, score 1, boxes in image pixels
    outputs = [{"boxes": t["boxes"], "labels": t["labels"] + 1, "scores": torch.ones(len(t["labels"]))} for t in targets]
    report = score_detections(to_detections(outputs), [to_ground_truth(t) for t in targets], ds.classes)
    assert report["mAP_11point"] == pytest.approx(1.0) and report["mAP_all_point"] == pytest.approx(1.0)
    assert report["skipped"] == []
    # a detector that forgot the background offset is scored against the wrong classes
    shifted = [dict(o, labels=o["labels"] % len(ds.classes) + 1) for o in outputs]
    assert score_detections(to_detections(shifted), [to_ground_truth(t) for t in targets], ds.classes)["mAP_11point"] < 0.5
    # and boxes mirrored (a flip left in at test time) miss the off-centre objects
    mirrored = [dict(o, boxes=hflip_boxes(o["boxes"], TINY_VOC_SIZE[1])) for o in outputs]
    assert score_detections(to_detections(mirrored), [to_ground_truth(t) for t in targets], ds.classes)["mAP_11point"] < 1


def test_tiny_end_to_end_run_writes_metrics_and_picture(tiny_voc, tmp_path):
    out = tmp_path / "detect"
    metrics = main(tiny_config(data=str(tiny_voc), test_split="val", epochs=1, out=str(out), vis_images=2))
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("skipped_classes", "ap_11point", "train_history", "calibration"):
        assert key in saved
    assert saved["task"] == "detect" and set(saved["scores"]) == {"mAP_11point", "mAP_all_point"}
    assert saved["skipped_classes"] == ["circle"]  # the val split has no circle
    assert saved["ap_11point"]["circle"] is None  # nan is written as null
    assert np.isfinite(metrics["scores"]["mAP_11point"]) and 0 <= metrics["scores"]["mAP_11point"] <= 1
    assert (out / "detections.png").stat().st_size > 0
    assert (out / "per_class.csv").read_text().splitlines()[0].startswith("class,ap_11point,ap_all_point")
    assert json.loads((out / "config.json").read_text())["test_split"] == "val"


def test_pool5_feature_option_builds_a_working_detector():
    torch.manual_seed(0)
    model = build_detector(build_trunk("random", seed=0)[0], 2, tiny_config(feature="pool5", min_size=160, max_size=200))
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 120, 160)])
    assert out["boxes"].shape[1] == 4


def test_calibration_rescales_the_box_chain_and_zeroes_the_regressors(tiny_voc):
    calib = calibration_batch(VOCDataset(tiny_voc, split="train", task="detection"), n=4)
    trunk, _ = build_trunk("random", seed=0)
    torch.manual_seed(0)
    model = build_detector(trunk, len(TINY_VOC_CLASSES), tiny_config())
    report = calibrate_detector_(model, trunk, calib, trunk_is_fresh=True)
    assert report["layers"][-3:] == ["roi_heads.box_head.fc6", "roi_heads.box_head.fc7",
                                     "roi_heads.box_predictor.cls_score"]
    assert report["ratio_spread_after"] < 0.01 < report["ratio_spread_before"]
    for regressor in (model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred):
        assert torch.count_nonzero(regressor.weight) == 0
    assert model.training


@pytest.mark.parametrize("feature_hw, image_shapes", [((16, 16), [(256, 256), (256, 256)]),
                                                      ((15, 20), [(240, 320), (200, 300)])])
def test_gather_roi_align_equals_torchvision_values_and_gradients(feature_hw, image_shapes):
    torch.manual_seed(0)
    features = torch.randn(2, 8, *feature_hw, requires_grad=True)  # (B, C, H, W)
    proposals = []
    for h, w in image_shapes:
        corner = torch.rand(20, 2) * torch.tensor([w, h]) - 10
        boxes = torch.cat([corner, corner + torch.rand(20, 2) * 150 + 0.2], 1)  # some tiny, some past the border
        boxes[:3] = torch.tensor([[0.0, 0, w, h], [w - 3, h - 3, w, h], [-30, -30, 2, 2]])
        proposals.append(boxes)
    reference = MultiScaleRoIAlign(["0"], 6, 2)({"0": features}, proposals, image_shapes)  # (40, 8, 6, 6)
    upstream = torch.randn_like(reference)
    (expected_grad,) = torch.autograd.grad(reference, features, upstream)
    pooled = GatherRoIAlign(6, 2)({"0": features}, proposals, image_shapes)
    (grad,) = torch.autograd.grad(pooled, features, upstream)
    assert pooled.shape == reference.shape
    assert torch.allclose(pooled, reference, atol=1e-5) and torch.allclose(grad, expected_grad, atol=1e-5)
    # an NHWC feature map (what a channels_last trunk gives) pools the same
    nhwc = features.detach().contiguous(memory_format=torch.channels_last)
    assert torch.allclose(GatherRoIAlign(6, 2)({"0": nhwc}, proposals, image_shapes), reference, atol=1e-5)
    empty = GatherRoIAlign(6, 2)({"0": features}, [torch.zeros(0, 4), torch.zeros(0, 4)], image_shapes)
    assert empty.shape == (0, 8, 6, 6)


def output_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """A forward hook on every conv and linear layer of `model`: {layer name: its last output's dtype}."""
    dtypes = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(lambda _m, _i, out, name=name: dtypes.__setitem__(name, out.dtype))
    return dtypes


def test_bf16_autocast_computes_the_heavy_layers_in_bf16_and_every_box_in_float32(tiny_voc):
    torch.manual_seed(0)
    plain = build_detector(build_trunk("random", seed=0)[0], 3, tiny_config(channels_last=False))
    fast = build_detector(build_trunk("random", seed=0)[0], 3, tiny_config(channels_last=True))
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.trunk.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 112)]
    batch, _ = plain.transform(images)
    expected = plain.backbone(batch.tensors)  # (2, 256, 6, 8) in float32
    dtypes = output_dtypes(fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.backbone(batch.tensors)
        logits, deltas = fast.rpn.head([expected])  # objectness (2, A, 6, 8), box deltas (2, 4A, 6, 8)
        rois = torch.randn(5, 256, 6, 6)  # (R, C, 6, 6) pooled RoIs
        scores, box_deltas = fast.roi_heads.box_predictor(fast.roi_heads.box_head(rois))
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert (got - expected).norm() / expected.norm() < 0.05  # bf16 keeps ~3 significant digits per layer
    expected_logits, expected_deltas = plain.rpn.head([expected])
    assert logits[0].dtype == deltas[0].dtype == scores.dtype == box_deltas.dtype == torch.float32
    assert (deltas[0] - expected_deltas[0]).norm() / expected_deltas[0].norm() < 0.05
    bf16 = {name for name, dtype in dtypes.items() if dtype == torch.bfloat16}
    assert bf16 == {*(f"backbone.trunk.{n}" for n in ("conv1", "conv2", "conv3", "conv4", "conv5")),
                    "rpn.head.conv.0.0", "roi_heads.box_head.fc6", "roi_heads.box_head.fc7"}, bf16
    # the predictor computes in float32 under autocast: exactly what it computes without
    fc7 = torch.rand(5, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fast.roi_heads.box_predictor(fc7)
    assert all(torch.equal(a, b) for a, b in zip(inside, fast.roi_heads.box_predictor(fc7.float())))
    # a whole training step under autocast, and detections out of it in float32
    ds = VOCDataset(tiny_voc, split="train", task="detection", transform=DetectionTransform(train=True))
    train_images, targets = list_collate([ds[0], ds[3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = fast(train_images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert fast.backbone.trunk.conv1.weight.grad.dtype == torch.float32
    fast.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out, _) = fast(images)
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    # without autocast (--amp none) nothing is bf16
    dtypes.clear()
    with torch.no_grad():
        fast(images)
    assert set(dtypes.values()) == {torch.float32}
