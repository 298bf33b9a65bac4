"""Transfer to object detection: Faster R-CNN on the AlexNet trunk, scored with VOC AP@0.5.

`python -m transfer.detect --init <random|rescaled|runs/<name>/|...> [--flag value ...]` (`--help` lists all).

The paper (Table 2) fine-tunes Fast R-CNN with Selective Search proposals. Here the proposals come from
torchvision's region proposal network trained jointly on the same trunk (Faster R-CNN), because Selective
Search is not in torchvision and would be a second, CPU-heavy, hand-written component. Everything that
torchvision already does (anchors, box coding, sampling, NMS, resizing) is torchvision's; RoIAlign computes
torchvision's roi_align as one gather (GatherRoIAlign: torchvision's CPU backward is a serial loop):

    image -> GeneralizedRCNNTransform (resize to --min-size/--max-size, ImageNet mean/std, as in pretraining)
          -> AlexNet conv1..conv5 (the --init trunk, fine-tuned; conv5 after ReLU, stride 16, 256 channels)
          -> RPN (AnchorGenerator, --anchor-sizes x --aspect-ratios per location; ProposalHead)
          -> RoIAlign to 256 x 6 x 6 (pool5's shape, so fc6 has AlexNet's 9216 inputs)
          -> new fc6/fc7 (TwoMLPHead, --representation-size) -> BoxPredictor (classes + background)

Under bf16 (`--amp auto` where the device has it natively, or `--amp bf16`) the trunk's convolutions, the RPN's
3x3 conv and fc6/fc7 compute in bf16 under the shared loop's autocast; the feature map, objectness, box deltas,
class scores, RoIAlign and all box coding (anchors, proposals, detections) stay float32.

conv5 rather than pool5 is the feature map: pool5 has stride 32, so on a 256 px image it is an 8x8 grid
whose cells are as large as the median object, and the RPN's anchors (one set per cell) could not tell
neighbouring small objects apart. conv5 (stride 16) doubles the grid at no cost in parameters; the
RoIAlign output is still 6x6 like pool5 (`--feature pool5` is there to compare).

Data and protocol: VOC-layout detection targets (boxes 0-based continuous x1y1x2y2), torchvision labels
= class index + 1 (0 is background). `difficult` boxes are left out of the training targets (as in
py-faster-rcnn) and kept for evaluation, where matching them is neither rewarded nor penalised. Images
without any non-difficult box are kept as negatives (torchvision takes empty targets: all proposals are
background), not skipped. Horizontal flips (p = 0.5) during training. Evaluation: per-class AP at IoU 0.5,
VOC2007 11-point and all-point, mAP over classes with ground truth (others listed as skipped).

Writes `<out>/`: config.json, metrics.json, per_class.csv, detections.png (a few test images with the
true boxes in green and predictions with score > 0.5 in red).

`torchrun --nproc_per_node=N -m transfer.detect ...` trains with DDP: `--batch-size` is the global batch (each
process takes 1/N of it, from a DistributedSampler) and `--lr` applies to it unchanged. torchvision's losses are
means over each process's sampled anchors and RoIs, and DDP averages those means, so the gradient is the
single-process one up to how the samples split over the processes. Rank 0 alone scores the test split, writes and
prints; every rank returns its metrics (transfer.experiment explains the split).
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.utils import draw_bounding_boxes

from pretrain.config import field
from pretrain.data import IMAGENET_MEAN, IMAGENET_STD, VOCDataset, skip_none_collate
from pretrain.errors import BadOptionError, run_cli
from pretrain.precision import AMP_CHOICES, AMP_HELP
from transfer.engine import autocast, fit
from transfer.experiment import (
    FinetuneConfig,
    calibration_batch,
    finish_distributed,
    init_label,
    setup,
    share_from_main,
    train_sampler,
    wrap_ddp,
    write_results,
)
from transfer.metrics import detection_collapse, detection_report
from transfer.rescale import within_layer_init_
from transfer.trunk import build_trunk, calibrate_network_

ROI_SIZE = 6  # RoIAlign output, pool5's 6x6: fc6 sees the same 256*6*6 inputs as AlexNet's
ROI_SAMPLING = 2  # bilinear samples per RoIAlign bin side (torchvision's MultiScaleRoIAlign default)


@dataclass
class DetectConfig(FinetuneConfig):
    """Every option of a detection transfer run; written to <out>/config.json."""

    epochs: int = field(2, "passes over the training split")
    batch_size: int = field(8, "images per step in all (under torchrun split evenly over the processes)")
    lr: float = field(0.02, "SGD learning rate for the global batch: linear warm-up from lr/100, then cosine decay to 0")
    weight_decay: float = field(1e-4, "SGD weight decay on weights (not biases)")
    warmup_epochs: float = field(0.3, "epochs of linear lr warm-up (at most a fifth of the run)")
    amp: str = field("auto", AMP_HELP + "; bf16 runs the trunk, the RPN's 3x3 conv and fc6/fc7 in bf16, while "
                             "objectness, box deltas, class scores and box coding stay float32", choices=AMP_CHOICES)
    min_size: int = field(256, "short side images are resized to (torchvision's transform; Detectron uses 800)")
    max_size: int = field(400, "cap on the long side after resizing")
    feature: str = field("conv5", "trunk feature map: conv5 (stride 16) or pool5 (stride 32)", choices=("conv5", "pool5"))
    anchor_sizes: tuple[int, ...] = field((32, 64, 128, 256), "anchor sizes in px (at the resized scale)")
    aspect_ratios: tuple[float, ...] = field((0.5, 1.0, 2.0), "anchor height/width ratios")
    # The box head's cost is (sampled RoIs) x 9216 x width: a 512-wide head halves fc6 and quarters fc7, and 32 sampled
    # RoIs per image (256 per batch of 8; Fast R-CNN samples 64 per image, 128 per batch of 2) halve fc6/fc7 and
    # RoIAlign again. 300 proposals (of 600 before NMS) still cover a 16x16 conv5 grid of 1-5 objects.
    representation_size: int = field(512, "width of the new fc6/fc7 box head (AlexNet: 4096)")
    rpn_post_nms_train: int = field(300, "proposals kept per image (after NMS, from twice as many before it) for "
                                         "training the box head")
    rpn_post_nms_test: int = field(150, "proposals kept per image at test time (after NMS, from twice as many before "
                                        "it; scenes hold 1-5 objects)")
    box_batch_size: int = field(32, "sampled RoIs per image for the box head (Fast R-CNN: 64; torchvision: 512)")
    box_score_thresh: float = field(0.001, "test-time detections below this score are dropped before NMS (a low "
                                    "threshold can only raise AP)")
    threads: int = field(0, "torch CPU threads (0: torch's default)")
    vis_images: int = field(4, "test images drawn into detections.png")


# ------------------------------------------------------------------------------------------------- model


def float32_region(x: torch.Tensor) -> torch.autocast:
    """Autocast off on `x`'s device: the layers whose outputs code boxes compute in float32 even when the loop's
    --amp bf16 autocast encloses them. In bf16 (8 significant bits) a box delta or an anchor coordinate of 128-512 px
    moves in 1-2 px steps, and torchvision decodes, matches and clips boxes in its inputs' dtype."""
    return torch.autocast(x.device.type, enabled=False)


class TrunkBackbone(nn.Module):
    """The AlexNet trunk as a torchvision detection backbone: one feature map, `out_channels` = 256.

    `channels_last`: the input is made NHWC (oneDNN's and cuDNN's fast layout; build_detector makes the trunk's
    weights NHWC too). The feature map comes back float32 whatever the enclosing autocast computed it in:
    torchvision makes its anchors in the feature map's dtype, and RoIAlign then averages float32 features.
    """

    def __init__(self, trunk: nn.Module, feature: str = "conv5", channels_last: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.feature = feature
        self.channels_last = channels_last
        self.out_channels = trunk.feature_channels[feature]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W), NHWC in memory
        features = self.trunk(x, [self.feature])[0]  # (B, 256, H/16, W/16) for conv5
        return features.float()  # NHWC if channels_last: the gather's (B*H*W, C) table is then a free view


def roi_align_gather(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                     sampling_ratio: int) -> torch.Tensor:
    """torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False), as
    one weighted gather of feature rows (F.embedding_bag over the NHWC feature map); the same sample points,
    border rules and average, so equal up to float rounding.

    features (B, C, H, W); rois (R, 5): image index, x1, y1, x2, y2 in input pixels -> (R, C, P, P).
    Bilinear interpolation is separable: each output bin sums S x S samples x 2 x 2 corners = 4 S^2 rows
    of the (B*H*W, C) table, each weighted by (y weight) * (x weight) / S^2.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_gather: sampling_ratio must be positive, got {sampling_ratio}")
    batch, channels, height, width = features.shape
    bins, samples = output_size, sampling_ratio
    image, box = rois[:, 0].long(), rois[:, 1:] * spatial_scale  # (R,), (R, 4) in feature cells
    size = (box[:, 2:] - box[:, :2]).clamp_min(1.0)  # (R, 2) width, height; aligned=False's minimum of 1 cell
    offsets = (torch.arange(bins * samples, device=rois.device, dtype=rois.dtype) + 0.5) / samples  # (P*S,) in bins
    points = box[:, None, :2] + offsets[None, :, None] * (size / bins)[:, None, :]  # (R, P*S, 2) x, y
    limit = torch.tensor([width, height], device=rois.device, dtype=rois.dtype)  # (2,)
    inside = (points >= -1) & (points <= limit)  # (R, P*S, 2); a point beyond a border by > 1 cell adds 0
    points = points.clamp_min(0)
    low = points.floor().long()
    last = (limit - 1).long().expand_as(low)  # (R, P*S, 2)
    at_edge = low >= last  # on or past the last row/column: both corners are that row/column
    low = torch.where(at_edge, last, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(points), points - low)
    corner = torch.stack([low, high], -1)  # (R, P*S, 2 axes, 2 corners)
    weight = torch.stack([1 - frac, frac], -1) * inside[..., None]  # (R, P*S, 2 axes, 2 corners)
    cx, cy = corner[:, :, 0].view(-1, 1, bins, 1, 1, samples, 2), corner[:, :, 1].view(-1, bins, 1, samples, 2, 1, 1)
    wx, wy = weight[:, :, 0].view(-1, 1, bins, 1, 1, samples, 2), weight[:, :, 1].view(-1, bins, 1, samples, 2, 1, 1)
    # dims (R, bin y, bin x, sample y, corner y, sample x, corner x): one bag of 4 S^2 rows per output bin
    rows = image.view(-1, 1, 1, 1, 1, 1, 1) * (height * width) + cy * width + cx
    row_weights = wy * wx / samples ** 2
    table = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # (B*H*W, C); a view if NHWC
    n, bag = rois.shape[0] * bins * bins, 4 * samples ** 2
    pooled = nn.functional.embedding_bag(rows.reshape(n, bag), table, mode="sum",
                                         per_sample_weights=row_weights.reshape(n, bag).to(table.dtype))  # (R*P*P, C)
    return pooled.view(-1, bins, bins, channels).permute(0, 3, 1, 2)  # (R, C, P, P)


class GatherRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign for a single feature map ("0"), computed by `roi_align_gather`
    (a subclass because FasterRCNN accepts only that type).

    Why not torchvision's: its CPU roi_align backward loops over every RoI x channel x bin serially, ~1/4 of a
    float32 training step at 8 images x 64 RoIs; the gather's backward adds whole NHWC rows and is ~6x faster.
    The spatial scale is inferred as torchvision does: the power of 2 nearest feature height / image height.
    """

    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__(featmap_names=["0"], output_size=output_size, sampling_ratio=sampling_ratio)
        self.bins = output_size

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feature = features["0"]  # (B, C, H, W)
        scale = 2.0 ** round(math.log2(feature.shape[-2] / max(h for h, _ in image_shapes)))
        index = torch.cat([torch.full((len(p), 1), i, dtype=p.dtype, device=p.device) for i, p in enumerate(proposals)])
        rois = torch.cat([index, torch.cat(proposals)], dim=1)  # (R, 5): image index, x1, y1, x2, y2
        return roi_align_gather(feature, rois, self.bins, scale, self.sampling_ratio)  # (R, C, 6, 6)


class ProposalHead(RPNHead):
    """torchvision's RPNHead; its 3x3 conv (256 -> 256 at every feature cell) runs under the enclosing autocast,
    the 1x1 objectness and box-delta convs in float32 (`float32_region`): the deltas are decoded against the anchors."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for feature in x:  # one (B, C, H, W) map per level; here one level
            hidden = self.conv(feature)  # (B, C, H, W), after ReLU; bf16 under --amp bf16
            with float32_region(hidden):
                hidden = hidden.float()
                logits.append(self.cls_logits(hidden))  # (B, A, H, W)
                deltas.append(self.bbox_pred(hidden))  # (B, 4A, H, W)
        return logits, deltas


class BoxPredictor(FastRCNNPredictor):
    """torchvision's FastRCNNPredictor in float32 (`float32_region`) on fc7's output, whatever dtype fc6/fc7 computed
    in: the box deltas are decoded against the proposals, and the class scores rank the detections."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with float32_region(x):
            return super().forward(x.float())  # (R, classes + 1) scores, (R, 4 (classes + 1)) box deltas


def build_detector(trunk: nn.Module, num_classes: int, cfg: DetectConfig) -> FasterRCNN:
    """Faster R-CNN around `trunk` (not copied: the detector fine-tunes these very weights).

    `num_classes` counts foreground classes; the predictor adds the background class 0.
    """
    if cfg.channels_last:
        trunk.to(memory_format=torch.channels_last)  # NHWC weights for NHWC inputs: no layout copy per convolution
    backbone = TrunkBackbone(trunk, cfg.feature, channels_last=cfg.channels_last)
    anchors = AnchorGenerator(sizes=(tuple(cfg.anchor_sizes),), aspect_ratios=(tuple(cfg.aspect_ratios),))
    roi_pool = GatherRoIAlign(ROI_SIZE, ROI_SAMPLING)
    head = TwoMLPHead(backbone.out_channels * ROI_SIZE ** 2, cfg.representation_size)
    predictor = BoxPredictor(cfg.representation_size, num_classes + 1)
    # built after the box head, where FasterRCNN would build its own RPNHead: the same random draws per seed
    rpn_head = ProposalHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    return FasterRCNN(
        backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),  # what the trunk was pretrained on
        rpn_anchor_generator=anchors, rpn_head=rpn_head, rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_pre_nms_top_n_train=2 * cfg.rpn_post_nms_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_pre_nms_top_n_test=2 * cfg.rpn_post_nms_test, box_roi_pool=roi_pool, box_head=head,
        box_predictor=predictor, box_batch_size_per_image=cfg.box_batch_size, box_score_thresh=cfg.box_score_thresh,
    )


# -------------------------------------------------------------------------------------------------- data


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror (N, 4) x1y1x2y2 boxes in continuous coordinates across an image `width` px wide."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped  # (N, 4), still x1 < x2


def training_target(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """VOC target -> torchvision's: non-difficult boxes only, labels + 1 (0 is background)."""
    keep = ~target["difficult"]
    return {"boxes": target["boxes"][keep].float().reshape(-1, 4), "labels": target["labels"][keep].long() + 1}


class DetectionTransform:
    """(PIL image, VOC target) -> ((3, H, W) float in [0, 1], target); random horizontal flip if `train`.

    Resizing and normalisation are left to torchvision's GeneralizedRCNNTransform inside the model.
    """

    def __init__(self, train: bool) -> None:
        self.train = train

    def __call__(self, image: Image.Image, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        tensor = TF.to_tensor(image)  # (3, H, W) in [0, 1]
        if self.train and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
            target = dict(target, boxes=hflip_boxes(target["boxes"], tensor.shape[-1]))
        return tensor, (training_target(target) if self.train else target)


def list_collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Detection images differ in size and box count: keep lists, torchvision batches them itself."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ------------------------------------------------------------------------------------------- evaluation


def to_detections(outputs: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """torchvision's eval outputs (boxes in input-image pixels, labels 1..C) -> metrics' (labels 0..C-1)."""
    return [{"boxes": o["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
             "scores": o["scores"].detach().float().cpu().numpy(),
             "labels": o["labels"].detach().cpu().numpy().astype(np.int64) - 1} for o in outputs]


def to_ground_truth(target: dict[str, Any]) -> dict[str, np.ndarray]:
    """A VOC target (with its difficult flags, 0-based labels) as metrics' ground-truth entry."""
    return {"boxes": target["boxes"].numpy().reshape(-1, 4), "labels": target["labels"].numpy().astype(np.int64),
            "difficult": target["difficult"].numpy().astype(bool)}


def score_detections(detections: Sequence[dict[str, np.ndarray]], ground_truth: Sequence[dict[str, np.ndarray]],
                     classes: Sequence[str]) -> dict[str, Any]:
    """VOC AP@0.5 per class, 11-point and all-point (transfer.metrics.detection_report)."""
    return detection_report(detections, ground_truth, num_classes=len(classes), iou_threshold=0.5, classes=classes)


@torch.no_grad()
def predict(model: FasterRCNN, loader: DataLoader, device: torch.device, amp: str = "none",
            ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[str]]:
    """(detections, ground truth, image ids) over a whole split, in loader order (unreadable images skipped)."""
    model.eval()
    detections, ground_truth, ids = [], [], []
    for batch, _skipped in loader:
        if batch is None:
            continue
        images, targets = batch
        with autocast(device, amp):
            outputs = model([im.to(device) for im in images])
        detections += to_detections(outputs)
        ground_truth += [to_ground_truth(t) for t in targets]
        ids += [t["image_id"] for t in targets]
    return detections, ground_truth, ids


def save_detection_grid(path: str | Path, images: Sequence[torch.Tensor], detections: Sequence[dict[str, np.ndarray]],
                        ground_truth: Sequence[dict[str, np.ndarray]], classes: Sequence[str],
                        score_min: float = 0.5, top_k: int = 10) -> Path:
    """Side-by-side panels: true boxes green (difficult ones orange), the top-k predictions > score_min red."""
    panels = []
    for image, det, gt in zip(images, detections, ground_truth):
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8)  # (3, H, W)
        if len(gt["boxes"]):
            colours = ["orange" if d else "lime" for d in gt["difficult"]]
            canvas = draw_bounding_boxes(canvas, torch.as_tensor(gt["boxes"]), colors=colours, width=2)
        keep = np.flatnonzero(det["scores"] > score_min)[:top_k]  # outputs are sorted by score
        if len(keep):
            names = [f"{classes[det['labels'][k]]} {det['scores'][k]:.2f}" for k in keep]
            canvas = draw_bounding_boxes(canvas, torch.as_tensor(det["boxes"][keep]), labels=names, colors="red", width=1)
        panels.append(canvas)
    height = max(p.shape[1] for p in panels)
    # pad to a common height (test images may differ in size), then a 4 px white gap between panels
    padded = [nn.functional.pad(p, (0, 4, 0, height - p.shape[1]), value=255) for p in panels]
    grid = torch.cat(padded, dim=2)  # (3, H, sum of widths)
    path = Path(path)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


# ---------------------------------------------------------------------------------------------- training


def make_loader(dataset: VOCDataset, batch_size: int, train: bool, workers: int, seed: int,
                sampler: DistributedSampler | None = None) -> DataLoader:
    """`sampler` (torchrun) replaces the loader's own shuffling of a training split."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=functools.partial(skip_none_collate, collate=list_collate),
                      generator=torch.Generator().manual_seed(seed), persistent_workers=train and workers > 0)


def detection_loss(model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
    """The sum of torchvision's four Faster R-CNN losses (RPN objectness and box, classifier and box)."""
    images, targets = batch
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return sum(model(images, targets).values())  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg


def calibration_boxes(size: int, per_side: int = 3) -> torch.Tensor:
    """(per_side^2 * 2, 4) fixed x1y1x2y2 boxes over a size x size image: a grid of squares at two scales, for the
    box head's rescaling (any fixed set of regions of real images serves; ground truth is not needed)."""
    boxes = []
    for scale in (0.5, 0.3):
        side = size * scale
        for cy in torch.linspace(side / 2, size - side / 2, per_side):
            for cx in torch.linspace(side / 2, size - side / 2, per_side):
                boxes.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    return torch.tensor(boxes)


def calibrate_detector_(model: FasterRCNN, trunk: nn.Module, calib: torch.Tensor, trunk_is_fresh: bool) -> dict[str, Any]:
    """The rescaling protocol on the detector, as Krähenbühl et al. apply it to Fast R-CNN: the chain trunk ->
    RoIAlign on fixed boxes -> fc6 -> fc7 -> class scores gets the within-layer init of its fresh layers and the
    between-layer calibration; the RPN's conv and objectness layers (a branch off the trunk) get the within-layer
    init on the calibrated trunk's features; both box regressors start at zero (no box change before training)."""
    size = calib.shape[-1]
    boxes = calibration_boxes(size)
    heads = model.roi_heads

    def class_scores() -> torch.Tensor:
        features = {"0": model.backbone(calib)}  # (B, 256, h, w)
        rois = heads.box_roi_pool(features, [boxes] * len(calib), [(size, size)] * len(calib))  # (B*R, 256, 6, 6)
        return heads.box_predictor(heads.box_head(rois))[0]  # (B*R, classes + 1)

    head_layers = [heads.box_head.fc6, heads.box_head.fc7, heads.box_predictor.cls_score]
    report = calibrate_network_(model, trunk, head_layers, class_scores, trunk_is_fresh)
    rpn = model.rpn.head
    rpn_layers = [next(m for m in rpn.conv.modules() if isinstance(m, nn.Conv2d)), rpn.cls_logits]
    with torch.no_grad():
        features = model.backbone(calib)  # (B, 256, h, w), the calibrated trunk's
    model.eval()
    within_layer_init_(rpn_layers, lambda: rpn([features])[0][0], set(rpn_layers))
    model.train()
    for regressor in (rpn.bbox_pred, heads.box_predictor.bbox_pred):
        nn.init.zeros_(regressor.weight)
        nn.init.zeros_(regressor.bias)
    return report


def main(cfg: DetectConfig) -> dict[str, Any]:
    """Train on `train_split`, score on `test_split`; writes the run folder and returns metrics.json's content."""
    if cfg.epochs < 0 or cfg.batch_size <= 0:
        raise BadOptionError("--epochs must be >= 0 and --batch-size positive")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)  # oversubscribed OpenMP threads spin at every small op's barrier
    exp = setup(cfg, "detect", cfg.batch_size, "detection", (cfg.train_split, cfg.test_split))
    run, device = exp.run, exp.device
    train_set = VOCDataset(exp.root, split=cfg.train_split, task="detection", transform=DetectionTransform(train=True))
    test_set = VOCDataset(exp.root, split=cfg.test_split, task="detection", transform=DetectionTransform(train=False))
    classes = train_set.classes

    trunk, checkpoint = build_trunk(cfg.init, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the heads' init does not depend on which --init built the trunk
    model = build_detector(trunk, len(classes), cfg)
    calibration = None
    if cfg.rescale:
        raw = VOCDataset(exp.root, split=cfg.train_split, task="detection")
        calib = calibration_batch(raw, n=cfg.calib_images, seed=cfg.seed)  # (n, 3, 227, 227)
        calibration = calibrate_detector_(model, trunk, calib, trunk_is_fresh=cfg.init == "random")
    model.to(device)
    # A pool-free trunk's pool5 is a conv that conv5 features never reach: DDP must then expect unused parameters.
    unused = cfg.feature == "conv5" and any(p.requires_grad for p in trunk.pool5.parameters())
    ddp_model = wrap_ddp(model, run, find_unused_parameters=unused)  # trains; `model` (the same weights) is tested
    if run.world_size > 1:  # own flips per rank: one seed would repeat them on every rank's share
        torch.manual_seed(cfg.seed + run.rank)

    sampler = train_sampler(train_set, run, cfg.seed, drop_last=False)  # None without torchrun: the loader shuffles
    # the loader's generator seeds its workers' flips (per rank under torchrun, as above)
    train_loader = make_loader(train_set, cfg.batch_size // run.world_size, True, cfg.workers, cfg.seed + run.rank,
                               sampler)
    test_loader = make_loader(test_set, cfg.batch_size, False, cfg.workers, cfg.seed)

    def set_epoch(epoch: int) -> None:
        if sampler is not None:
            sampler.set_epoch(epoch)

    state = fit(model, ddp_model, train_loader, detection_loss, cfg, device, set_epoch)

    metrics: dict[str, Any] | None = None
    if run.is_main:  # the whole test split with the unwrapped model, as one process would; the others wait below
        start = time.time()
        detections, ground_truth, ids = predict(model, test_loader, device, cfg.amp)
        eval_seconds = time.time() - start
        report = score_detections(detections, ground_truth, classes)
        n_vis = min(cfg.vis_images, len(detections))
        if n_vis:
            position = {image_id: k for k, image_id in enumerate(test_set.ids)}
            images = [test_set[position[i]][0] for i in ids[:n_vis]]
            save_detection_grid(exp.out / "detections.png", images, detections[:n_vis], ground_truth[:n_vis], classes)
        details = {
            "iou_threshold": report["iou_threshold"], "skipped_classes": report["skipped"],
            "ap_11point": {r["class"]: r["ap_11point"] for r in report["per_class"]},
            "ap_all_point": {r["class"]: r["ap_all_point"] for r in report["per_class"]},
            "num_train_images": len(train_set), "num_test_images": len(detections), "epochs": cfg.epochs,
            "eval_seconds": round(eval_seconds, 1), "train_history": state.history, "calibration": calibration,
        }
        n_boxes = sum(len(d["scores"]) for d in detections)
        metrics = write_results(exp, {"mAP_11point": report["mAP_11point"], "mAP_all_point": report["mAP_all_point"]},
                                details, report["per_class"], detection_collapse(n_boxes, cfg.box_score_thresh),
                                checkpoint)
        print(f"detect {init_label(cfg.init)} seed {cfg.seed} on {cfg.data}: mAP@0.5 11-point "
              f"{100 * report['mAP_11point']:.1f}, all-point {100 * report['mAP_all_point']:.1f} "
              f"({len(classes) - len(report['skipped'])} classes scored, {metrics['wall_seconds']:.0f} s) -> {exp.out}",
              flush=True)
    metrics = share_from_main(metrics)  # rank 0's metrics on every rank (identity without torchrun)
    finish_distributed(run)
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(main, DetectConfig, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    cli()
