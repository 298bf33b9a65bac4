"""transfer.segment: FCN geometry and output size, the loss's void handling, the evaluation path, tiny runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from pretrain.models import AlexNetEncoder
from transfer.segment import (
    FCNAlexNet,
    SegmentationTransform,
    SegmentConfig,
    class_pixel_counts,
    constant_prediction_init_,
    evaluate,
    feature_geometry,
    interp_matrix,
    main,
    median_frequency_weights,
    min_input_size,
    resample,
    segmentation_loss,
    segmentation_report,
    subsample_labels,
)


@pytest.mark.parametrize("skip", ["32s", "16s", "8s"])
@pytest.mark.parametrize("arch", ["caffe", "torchvision"])
def test_output_has_input_size(skip, arch):
    torch.manual_seed(0)
    model = FCNAlexNet(AlexNetEncoder(arch), num_classes=5, skip=skip, fc_width=32).eval()
    for hw in [(227, 227), (200, 301), (97, 131), (48, 64), (5, 3)]:  # the last two are below the minimum size
        with torch.no_grad():
            out = model(torch.randn(1, 3, *hw))
        assert out.shape == (1, 5, *hw), (skip, hw)
        assert torch.isfinite(out).all()


def test_sparse_logits_are_the_dense_ones_subsampled():
    torch.manual_seed(0)
    model = FCNAlexNet(AlexNetEncoder(), num_classes=3, skip="8s", fc_width=16).eval()
    nn.init.normal_(model.score.weight)  # the score layers start at zero: make the output non-trivial
    nn.init.normal_(model.score_skip["pool1"].weight)
    x = torch.randn(2, 3, 101, 90)
    target = torch.zeros(2, 101, 90, dtype=torch.int64)
    with torch.no_grad():
        dense = model(x)  # (2, 3, 101, 90)
        for stride in (2, 3, 4):
            sparse = model(x, stride)
            assert sparse.shape[-2:] == subsample_labels(target, stride).shape[-2:]
            o = stride // 2
            assert torch.allclose(sparse, dense[..., o::stride, o::stride], atol=1e-5)


def test_feature_geometry_caffe():
    trunk = AlexNetEncoder("caffe")
    geo = feature_geometry(trunk)
    assert geo["conv1"] == (4, 5.0) and geo["pool1"] == (8, 9.0) and geo["pool2"] == (16, 17.0)
    assert geo["pool5"] == (32, 33.0)
    assert min_input_size(trunk) == 67
    assert feature_geometry(AlexNetEncoder("caffe", pool_free=True)) == geo  # same kernels and strides
    # pool5's cell i sees the input window [32 i, 32 i + 67) (receptive field 67 px), centred on 33 + 32 i
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 67, 67)).shape[-2:] == (1, 1)


def test_resample_puts_cells_at_their_centres():
    # a ramp on the pool1 grid (stride 8, offset 9): value i at cell i
    cells = torch.arange(5, dtype=torch.float32).view(1, 1, 1, 5).expand(1, 1, 3, 5)  # (1, 1, 3, 5)
    out = resample(cells, (8, 9.0), (40, 50))  # (1, 1, 40, 50) on input pixels
    row = out[0, 0, 0]
    for i in range(5):
        assert row[9 + 8 * i].item() == pytest.approx(i)  # cell centres land exactly on their pixels
    assert row[13].item() == pytest.approx(0.5)  # halfway between centres 9 and 17
    assert row[0].item() == 0 and row[49].item() == 4  # clamped beyond the outer centres
    assert torch.allclose(interp_matrix(4, (16, 17.0), 4, (16, 17.0)), torch.eye(4))  # same grid: identity
    assert torch.allclose(interp_matrix(1, (32, 33.0), 6, (1, 0.0)), torch.ones(6, 1))


def test_loss_ignores_void_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, :2] = 255
    target[1, :, 3] = 255
    loss = segmentation_loss(logits, target)
    loss.backward()
    void = target == 255  # (2, 5, 6)
    assert logits.grad.permute(0, 2, 3, 1)[void].abs().max() == 0  # no gradient at void pixels, any class
    assert logits.grad.permute(0, 2, 3, 1)[~void].abs().sum(-1).min() > 0
    keep = ~void
    expected = nn.functional.cross_entropy(logits.detach().permute(0, 2, 3, 1)[keep], target[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # mean over labelled pixels only


class FixedLogits(nn.Module):
    """Returns one-hot logits of a stored prediction; the image's channel-0 value says which."""

    def __init__(self, predictions: list[torch.Tensor], num_classes: int) -> None:
        super().__init__()
        self.predictions, self.num_classes = predictions, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for image in images:
            pred = self.predictions[int(image[0, 0, 0].item())]
            logits = nn.functional.one_hot(pred, self.num_classes).permute(2, 0, 1).float()  # (K, h, w)
            if logits.shape[-2:] != image.shape[-2:]:  # a constant prediction, at the image's size
                logits = logits[:, :1, :1].expand(-1, *image.shape[-2:])
            out.append(logits)
        return torch.stack(out)  # (B, K, H, W)


def _image(index: int, h: int, w: int) -> torch.Tensor:
    return torch.full((3, h, w), float(index))


def test_median_frequency_weights_match_hand_computed_ones():
    # image A: 6 background, 2 class 1, 1 void; image B: 3 background, 1 class 2. Class 3 never appears.
    a = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 255]])
    b = torch.tensor([[0, 0], [0, 2]])
    class_pixels, image_pixels = class_pixel_counts([a, b], num_classes=4)
    assert class_pixels.tolist() == [9, 2, 1, 0] and image_pixels.tolist() == [12, 8, 4, 0]
    weights = median_frequency_weights(class_pixels, image_pixels)
    freq = torch.tensor([9 / 12, 2 / 8, 1 / 4])  # class pixels / labelled pixels of the images holding the class
    expected = freq.median() / freq  # median of (0.75, 0.25, 0.25) = 0.25
    assert weights[:3].tolist() == pytest.approx(expected.tolist())
    assert weights[3] == 0  # absent: no weight, not in the median
    # weighted loss = sum_i w_{y_i} CE_i / sum_i w_{y_i}: rare classes count more than background
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 0] = 5.0  # predicts background everywhere
    target = torch.tensor([[[0, 0], [0, 2]]])
    plain, weighted = segmentation_loss(logits, target), segmentation_loss(logits, target, weights)
    assert weighted > plain


@pytest.mark.parametrize("weighted", [False, True])
def test_constant_prediction_init_is_the_loss_minimising_constant(weighted):
    # At the prior start the FCN predicts the same distribution at every pixel of any image, and on the training
    # masks (one batch, every pixel) the loss's gradient on the score bias is zero: no constant does better.
    torch.manual_seed(0)
    masks = torch.zeros(3, 40, 48, dtype=torch.long)  # mostly background, three rare classes, some void
    masks[0, 5:15, 5:20], masks[1, 20:30, 10:18], masks[2, 0:6, 30:48], masks[2, 30:, :4] = 1, 2, 3, 255
    class_pixels, image_pixels = class_pixel_counts(masks, num_classes=5)  # class 4 never appears
    weights = median_frequency_weights(class_pixels, image_pixels) if weighted else None
    model = FCNAlexNet(AlexNetEncoder(), num_classes=5, skip="8s", fc_width=16).eval()
    bias = constant_prediction_init_(model.score, class_pixels, weights)
    logits = model(torch.randn(3, 3, 40, 48))  # (3, 5, 40, 48)
    assert torch.allclose(logits, bias.view(1, -1, 1, 1).expand_as(logits), atol=1e-5)
    assert bias.exp().sum().item() == pytest.approx(1.0) and bias[4] < bias[:4].min() - 5
    loss = segmentation_loss(logits, masks, weights)
    (grad,) = torch.autograd.grad(loss, model.score.bias)
    assert grad.abs().max() < 1e-5
    assert loss.item() < segmentation_loss(torch.zeros_like(logits), masks, weights).item()  # beats uniform


def test_evaluate_matches_hand_computed_iou():
    classes = ("bg", "a", "b", "c")  # "c" appears in neither truth nor prediction (outside the void pixels)
    truth = [torch.tensor([[0, 0, 1], [1, 255, 2]]), torch.tensor([[2, 2], [2, 255]])]
    preds = [torch.tensor([[0, 1, 1], [1, 3, 2]]), torch.tensor([[2, 0], [0, 3]])]  # 3 only on void pixels
    model = FixedLogits(preds, 4)
    # two batches, the second as skip_none_collate gives it (one unreadable image skipped)
    loader = [[(_image(0, 2, 3), truth[0])], ([(_image(1, 2, 2), truth[1])], 1)]
    cm, samples, skipped = evaluate(model, loader, 4, torch.device("cpu"), keep=1)
    metrics, rows = segmentation_report(cm, classes)
    # pairs (truth, pred): (0,0) (0,1) (1,1) (1,1) (2,2) | (2,2) (2,0) (2,0)
    # bg: TP 1, FN 1, FP 2 -> 1/4;  a: TP 2, FP 1 -> 2/3;  b: TP 2, FN 2 -> 1/2;  c: absent
    iou = metrics["per_class_iou"]
    assert iou["bg"] == pytest.approx(1 / 4)
    assert iou["a"] == pytest.approx(2 / 3)
    assert iou["b"] == pytest.approx(1 / 2)
    assert math.isnan(iou["c"])
    assert metrics["absent"] == ["c"]
    assert metrics["mIoU"] == pytest.approx((1 / 4 + 2 / 3 + 1 / 2) / 3)  # not the per-image mean (0.444)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 8)
    assert metrics["num_pixels"] == 8
    assert [r["class"] for r in rows] == list(classes) and rows[3]["absent"] and not rows[0]["absent"]
    assert rows[2]["gt_pixels"] == 4 and rows[0]["pred_pixels"] == 3
    assert skipped == 1 and len(samples) == 1 and torch.equal(samples[0][1], preds[0])


def test_evaluate_scores_at_the_labels_resolution():
    # the net saw a 2x upscaled image; its logits are resized back to the 3x4 mask before scoring
    model = FixedLogits([torch.tensor([[1]])], 3)
    mask = torch.tensor([[1, 1, 0, 255], [1, 2, 1, 1], [1, 1, 1, 1]])
    cm, _, _ = evaluate(model, [[(_image(0, 6, 8), mask)]], 3, torch.device("cpu"))
    assert cm.matrix.sum() == 11 and cm.matrix[1, 1] == 9 and cm.pixel_accuracy() == pytest.approx(9 / 11)


def test_transforms_pad_mask_with_void():
    image = Image.new("RGB", (40, 30), (124, 116, 104))  # the normalisation mean colour
    mask = torch.ones(30, 40, dtype=torch.int64)
    torch.manual_seed(0)
    x, y = SegmentationTransform(True, crop_size=64, scale=(1.0, 1.0))(image, mask)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {1, 255} and (y == 1).sum() == 30 * 40
    assert x.abs().max() < 0.05  # padding is the mean colour, i.e. 0 after normalisation
    x, y = SegmentationTransform(False, short_side=60)(image, mask)
    assert x.shape == (3, 60, 80) and y.shape == (30, 40)  # the mask keeps the label resolution


def _tiny_config(tiny_voc, out, **kw) -> SegmentConfig:
    options = {"data": str(tiny_voc), "test_split": "val", "epochs": 1, "batch_size": 2, "crop_size": 72, "fc_width": 32,
               "workers": 0, "amp": "none", "warmup_epochs": 0.0, "out": str(out), "num_predictions": 2}
    return SegmentConfig(**{**options, **kw})


def test_tiny_run_writes_results(tiny_voc, tmp_path):
    metrics = main(_tiny_config(tiny_voc, tmp_path / "run", skip="16s"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(saved["mIoU"]) and saved["scores"]["mIoU"] == pytest.approx(metrics["scores"]["mIoU"])
    assert saved["classes"] == ["background", "circle", "square", "triangle"]
    assert set(saved["absent"]) <= {"circle"}  # val has no circle; the others are in the truth
    assert (tmp_path / "run" / "per_class.csv").read_text().startswith("class,iou,")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["skip"] == "16s"
    with Image.open(tmp_path / "run" / "predictions.png") as png:
        assert png.width >= 3 * 64 and png.height >= 2 * 48


def test_tiny_run_from_pretrained_and_raw_random_trunks(tiny_voc, tiny_pretrain_run, tmp_path):
    for init, rescale in ((str(tiny_pretrain_run), True), ("random", False)):
        metrics = main(_tiny_config(tiny_voc, tmp_path / init.replace("/", "_"), init=init, rescale=rescale, skip="8s",
                                    amp="bf16"))
        assert math.isfinite(metrics["scores"]["mIoU"])
        assert (metrics["calibration"] is not None) == rescale
    assert metrics["init_label"] == "random" and metrics["rescale"] is False
