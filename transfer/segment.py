"""Semantic segmentation transfer: an FCN on the AlexNet trunk, scored with mIoU.

`python -m transfer.segment [--flag value ...]` (`--help` lists every option). The third column of the
paper's Table 2 (FCN on VOC2012: 30.0% mIoU from the context encoder, 19.8% from random init).

Model (Long et al. 2015, FCN-32s/16s/8s on AlexNet):
- the trunk conv1..pool5 from any `--init` (transfer.trunk.build_trunk), fine-tuned end to end;
- fc6 as a k x k convolution (k=3, padding 1, so pool5's grid is kept even for small inputs, instead of
  FCN's 6x6 kernel on an input padded by 100 px), fc7 as a 1x1 convolution, dropout after both;
- a 1x1 classifier; `--skip 16s` adds a score from pool2 (stride 16), `--skip 8s` one more from pool1
  (stride 8), the FCN analogues of VGG's pool4/pool3. Skip scores start at zero, so training starts from
  the 32s net, as in FCN;
- upsampling by fixed bilinear interpolation that knows where every feature cell's receptive field is
  centred (stride and offset of each layer, `feature_geometry`), so coarse and fine scores are aligned
  without FCN's crop layers, and the output has the input's exact H x W for any size, odd ones included.

Training: the engine's SGD recipe (transfer.engine, the same for every start), random scale + crop + flip,
cross-entropy with 255 ignored. Before it, every start goes through the rescaling protocol
(transfer.trunk.calibrate_network_), after which the score layer starts at the constant prediction that
minimises the training loss (`constant_prediction_init_`). The loss is taken on every 4th pixel
(`--loss-stride`, 1 = every pixel): the logits are a fixed bilinear interpolation of the stride-8..32
scores, so denser samples add little gradient but cost ~30% of a step on a CPU. Evaluation is always at
every pixel of the label.

torchvision's `segmentation.fcn.FCNHead` (3x3 conv to in/4 = 64 channels + BatchNorm + 1x1) and its `FCN`
wrapper (one head, one bilinear resize, no skips) are the DeepLab-style head of FCN-ResNet, not the paper's
fc6/fc7 + skips, so they are not used; torchvision's v2 transforms are (joint image/mask scale, crop with
255 padding of the mask, flip, exactly as its segmentation reference scripts do).

`torchrun --nproc_per_node=N -m transfer.segment ...` trains with DDP: `--batch-size` is the global batch (each
process takes 1/N of it, from a DistributedSampler) and `--lr` applies to it unchanged. Each process averages the
loss over its own labelled pixels and DDP averages those means, which equals the single-process loss when the
processes' crops hold equally many labelled pixels. Rank 0 alone scores the test split, writes and prints; every
rank returns its metrics (transfer.experiment explains the split).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pretrain.config import field
from pretrain.data import VOCDataset, skip_none_collate
from pretrain.data.images import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.synthetic import voc_palette
from pretrain.dataset import denormalize
from pretrain.errors import BadOptionError, run_cli
from pretrain.models import FEATURE_KEYS, AlexNetEncoder
from transfer.engine import autocast, fit
from transfer.experiment import (
    FinetuneConfig,
    calibration_batch,
    finish_distributed,
    init_label,
    print0,
    setup,
    share_from_main,
    train_sampler,
    wrap_ddp,
    write_results,
)
from transfer.metrics import ConfusionMatrix, segmentation_collapse
from transfer.trunk import build_trunk, calibrate_network_

IGNORE_INDEX = 255
# Trunk features scored by each variant, coarse to fine (AlexNet: pool2 has stride 16, pool1 stride 8).
SKIP_FEATURES: dict[str, tuple[str, ...]] = {"32s": (), "16s": ("pool2",), "8s": ("pool2", "pool1")}


@dataclass
class SegmentConfig(FinetuneConfig):
    """Every option of a segmentation transfer run; written to <out>/config.json."""

    epochs: int = field(10, "passes over the training split")
    batch_size: int = field(32, "global training batch size, under torchrun split evenly over the processes (also "
                                "the evaluation batch size)")
    skip: str = field("8s", "FCN variant: 32s (no skip), 16s (+pool2 score), 8s (+pool2 and pool1 scores)",
                      choices=tuple(SKIP_FEATURES))
    fc_width: int = field(1024, "channels of fc6/fc7 (AlexNet's fc layers have 4096; 1024 keeps CPU runs short)")
    fc6_kernel: int = field(3, "fc6 kernel on pool5 (odd; padded so pool5's grid is kept)", choices=(1, 3, 5))
    dropout: float = field(0.5, "dropout after fc6 and fc7")
    crop_size: int = field(193, "training crop; smaller images are padded (mask with 255). The net is fully "
                                "convolutional, so tests run at full size")
    scale_min: float = field(0.75, "training images are rescaled by a random factor in [scale_min, scale_max]")
    scale_max: float = field(1.25, "upper end of the random rescaling")
    test_short_side: int = field(0, "resize test images to this short side before the net (0: native size); "
                                    "scores are always taken at the label's own resolution")
    loss_stride: int = field(4, "training loss on every s-th pixel (1: every pixel, as FCN). The logits are a fixed "
                                "bilinear interpolation of a stride-8 to 32 score grid, so sparser samples of them "
                                "carry nearly the same gradient at a fraction of the cost")
    class_weights: str = field("median_frequency", "pixel loss weights: median_frequency (Eigen & Fergus 2015: "
                                                   "rare classes weigh more, so objects are not drowned by "
                                                   "background) or none (every pixel counts the same, as FCN)",
                               choices=("median_frequency", "none"))
    threads: int = field(0, "torch CPU threads (0: torch's default, one per core)")
    classifier_init: str = field("prior", "the score layer after the rescaling: prior (zero weights, the bias of the "
                                          "constant prediction that minimises the weighted training loss, for every "
                                          "start) or rescaled (the within-layer init's scores of std 1)",
                                 choices=("prior", "rescaled"))
    num_predictions: int = field(4, "test images drawn in predictions.png")


# ----------------------------------------------------------------------------------------------- geometry

def _layer_spec(module: nn.Module) -> tuple[int, int, int]:
    """(effective kernel, stride, padding) of a trunk layer: a conv, a max-pool or a pool-free (conv, ReLU)."""
    if isinstance(module, nn.Sequential):  # pool_free: Conv2d(3, stride 2) + ReLU
        module = next(m for m in module if isinstance(m, nn.Conv2d))
    if isinstance(module, nn.MaxPool2d) and module.ceil_mode:
        raise ValueError("transfer.segment: ceil-mode pooling is not supported by feature_geometry")

    def first(v: Any) -> int:
        return int(v[0] if isinstance(v, (tuple, list)) else v)

    k, s, p, d = (first(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
    return d * (k - 1) + 1, s, p


def feature_geometry(trunk: AlexNetEncoder) -> dict[str, tuple[int, float]]:
    """{feature key: (stride, offset)}: cell i of that feature map is centred on input pixel offset + stride * i.

    Each layer with kernel k, stride s and padding p maps its output cell i to input cell s*i - p + (k-1)/2.
    For Caffe's AlexNet: conv1 (4, 5), pool1 (8, 9), pool2/conv3-5 (16, 17), pool5 (32, 33).
    """
    stride, offset = 1, 0.0
    geometry = {}
    for key in FEATURE_KEYS:
        k, s, p = _layer_spec(getattr(trunk, key))
        offset += stride * ((k - 1) / 2 - p)
        stride *= s
        geometry[key] = (stride, offset)
    return geometry


def min_input_size(trunk: AlexNetEncoder) -> int:
    """The smallest input side for which pool5 has at least one cell."""
    specs = [_layer_spec(getattr(trunk, key)) for key in FEATURE_KEYS]
    n = 1
    while True:
        m = n
        for k, s, p in specs:
            m = (m + 2 * p - k) // s + 1
            if m < 1:
                break
        else:
            return n
        n += 1


def interp_matrix(n_in: int, geo_in: tuple[float, float], n_out: int, geo_out: tuple[float, float],
                  device: torch.device | None = None) -> torch.Tensor:
    """(n_out, n_in) 1-D linear interpolation from one feature grid to another, both given as (stride, offset)
    in input pixels; positions beyond the outer cell centres take the outer value (clamped)."""
    s_in, o_in = geo_in
    s_out, o_out = geo_out
    pos = o_out + s_out * torch.arange(n_out, dtype=torch.float64, device=device)  # (n_out,) input pixels
    u = ((pos - o_in) / s_in).clamp(0, n_in - 1)  # (n_out,) fractional index into the coarse grid
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    if n_in == 1:
        return matrix.fill_(1.0).float()
    i0 = u.floor().long().clamp(max=n_in - 2)
    frac = u - i0
    rows = torch.arange(n_out, device=device)
    matrix[rows, i0] = 1 - frac
    matrix[rows, i0 + 1] += frac
    return matrix.float()


def resample(x: torch.Tensor, geo_in: tuple[float, float], size: Sequence[int],
             geo_out: tuple[float, float] = (1, 0.0)) -> torch.Tensor:
    """Bilinear resampling of x (B, C, h, w) on grid `geo_in` onto `size` cells of grid `geo_out` (default:
    input pixels), as two small matrix products (separable, exact, differentiable)."""
    h, w = x.shape[-2:]
    ry = interp_matrix(h, geo_in, size[0], geo_out, x.device).to(x.dtype)  # (H, h)
    rx = interp_matrix(w, geo_in, size[1], geo_out, x.device).to(x.dtype)  # (W, w)
    return torch.einsum("yh,bchw,xw->bcyx", ry, x, rx)  # (B, C, H, W)


# -------------------------------------------------------------------------------------------------- model

class FCNAlexNet(nn.Module):
    """FCN-32s/16s/8s on an AlexNet trunk: returns logits (B, num_classes, H, W) for an input (B, 3, H, W)."""

    def __init__(self, trunk: AlexNetEncoder, num_classes: int, skip: str = "8s", fc_width: int = 1024,
                 fc6_kernel: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        if skip not in SKIP_FEATURES:
            raise BadOptionError(f"--skip {skip!r}: choose one of {sorted(SKIP_FEATURES)}")
        if fc6_kernel % 2 == 0:
            raise BadOptionError(f"--fc6-kernel {fc6_kernel}: use an odd kernel so pool5's grid is kept")
        self.trunk = trunk
        self.skip_keys = SKIP_FEATURES[skip]
        self.geometry = feature_geometry(trunk)
        self.min_size = min_input_size(trunk)
        self.fc6 = nn.Conv2d(trunk.out_channels, fc_width, fc6_kernel, padding=fc6_kernel // 2)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Conv2d(fc_width, num_classes, 1)
        self.score_skip = nn.ModuleDict(
            {k: nn.Conv2d(trunk.feature_channels[k], num_classes, 1) for k in self.skip_keys})
        for conv in self.score_skip.values():  # FCN: skip scores start at zero, so training starts from the 32s net
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def new_layers(self) -> list[nn.Module]:
        """fc6, fc7 and the score layer, in forward order: the chain the rescaling protocol calibrates. The skip
        scores stay out of it: they start at zero (so they add nothing to the calibration forward), and a branch
        off the chain would make its gradient ratios impossible to equalise with one scale per layer."""
        return [self.fc6, self.fc7, self.score]

    def forward(self, x: torch.Tensor, label_stride: int = 1) -> torch.Tensor:
        """Logits (B, K, H, W) at every input pixel, or with `label_stride` s > 1 only at the pixels
        `label_grid(s)` picks, (B, K, ceil((H - s//2) / s), ...): the same bilinear function sampled
        sparsely, for a cheaper training loss."""
        height, width = x.shape[-2:]
        # Too small for pool5: pad bottom/right with 0 (the mean colour); the top-left origin, hence the
        # geometry, is unchanged and the padding is never sampled back into the output.
        pad_h, pad_w = max(0, self.min_size - height), max(0, self.min_size - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.trunk(x, ["pool5", *self.skip_keys])
        h = self.dropout(F.relu(self.fc6(feats[0]), inplace=True))  # (B, fc_width, h5, w5)
        h = self.dropout(F.relu(self.fc7(h), inplace=True))  # (B, fc_width, h5, w5)
        score, key = self.score(h), "pool5"  # (B, K, h5, w5)
        for name, feat in zip(self.skip_keys, feats[1:]):  # coarse to fine
            score = resample(score, self.geometry[key], feat.shape[-2:], self.geometry[name])  # (B, K, hs, ws)
            score = score + self.score_skip[name](feat)
            key = name
        offset = label_offset(label_stride)
        size = (len(range(offset, height, label_stride)), len(range(offset, width, label_stride)))
        with torch.autocast(device_type=x.device.type, enabled=False):  # full-resolution logits in float32
            return resample(score.float(), self.geometry[key], size, (label_stride, offset))  # (B, K, H/s, W/s)


def label_offset(stride: int) -> int:
    """First pixel (row and column) of the sparse label grid: pixels offset, offset + stride, ..."""
    return stride // 2


def subsample_labels(target: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, H, W) labels -> the (B, ceil((H - s//2) / s), ...) labels at the pixels FCNAlexNet(x, s) scores."""
    o = label_offset(stride)
    return target[..., o::stride, o::stride]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy, the weighted mean over labelled pixels (`class_weights`: (K,) or None for 1 each);
    255 (void) contributes neither loss nor gradient."""
    return F.cross_entropy(logits.float(), target, weight=class_weights,  # (B, K, H, W), (B, H, W)
                           ignore_index=IGNORE_INDEX)


def class_pixel_counts(masks: Iterable[torch.Tensor], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(class_pixels, image_pixels), both (K,) float64: each class's labelled pixels over `masks` ((H, W) int64,
    void = 255), and the labelled pixels of the masks that hold the class (the denominator of its frequency)."""
    class_pixels = torch.zeros(num_classes, dtype=torch.float64)  # (K,)
    image_pixels = torch.zeros(num_classes, dtype=torch.float64)  # (K,)
    for mask in masks:
        counts = torch.bincount(mask[mask != IGNORE_INDEX].flatten(), minlength=num_classes)[:num_classes]
        class_pixels += counts
        image_pixels += (counts > 0) * counts.sum()
    return class_pixels, image_pixels


def median_frequency_weights(class_pixels: torch.Tensor, image_pixels: torch.Tensor) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus 2015, as SegNet trains) from `class_pixel_counts`: class c's
    weight is median(freq) / freq(c), where freq(c) is c's pixels over all labelled pixels of the images c appears
    in. A class absent from every mask gets weight 0 and takes no part in the median. (K,) float32.

    Without it a short fine-tuning on scenes that are mostly background learns the prior (every pixel
    background) before any start's features can show; with it every start must find the objects.
    """
    present = class_pixels > 0
    freq = class_pixels[present] / image_pixels[present]
    weights = torch.zeros(len(class_pixels), dtype=torch.float64)
    weights[present] = freq.median() / freq
    return weights.float()


def constant_prediction_init_(score: nn.Conv2d, class_pixels: torch.Tensor,
                              class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the score layer's weights and set its bias to the log of the constant prediction that minimises the
    (weighted) training loss: p(c) proportional to w(c) x pixels(c), so the loss's gradient on the bias is zero at
    the start. A class the loss never sees gets a millionth of the mass, so its logit stays finite. Returns the
    bias (K,).

    Why: the within-layer init gives the scores std 1 per class, a start whose first gradients are spent
    unlearning it (on the built-in data the first epoch's mean loss is 2.97, above the uniform prediction's
    ln 13 = 2.56). The bias reaches the output unchanged: skip scores start at zero and every upsampling row
    sums to one.
    """
    mass = class_pixels.double() * (1.0 if class_weights is None else class_weights.double().cpu())  # (K,)
    mass = mass.clamp_min(1e-6 * mass.sum())
    bias = torch.log(mass / mass.sum()).to(score.bias.dtype)
    with torch.no_grad():
        score.weight.zero_()
        score.bias.copy_(bias)
    return bias


# --------------------------------------------------------------------------------------------------- data

class RandomScale(nn.Module):
    """Rescale image and mask together by a factor drawn uniformly from [low, high] (mask: nearest)."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        if not 0 < low <= high:
            raise BadOptionError(f"scale range [{low}, {high}]: need 0 < scale_min <= scale_max")
        self.low, self.high = low, high

    def forward(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        s = self.low + (self.high - self.low) * torch.rand(()).item()
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        return TF.resize(image, size, antialias=True), TF.resize(mask, size)  # Mask -> nearest


class SegmentationTransform:
    """(PIL image, (H, W) int64 mask) -> (normalised (3, h, w) float, (h', w') int64 mask).

    train: random scale, a crop_size square crop (padded with the mean colour / 255), horizontal flip.
    test: normalised full image, optionally resized to `short_side`; the mask keeps its own resolution.
    """

    def __init__(self, train: bool, crop_size: int = 227, scale: tuple[float, float] = (0.75, 1.25),
                 short_side: int = 0) -> None:
        self.train, self.short_side = train, short_side
        self.to_input = v2.Compose([v2.ToImage(), v2.ToDtype({tv_tensors.Image: torch.float32, "others": None},
                                                             scale=True),
                                    v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.augment = v2.Compose([
            RandomScale(*scale),
            # normalised 0 = mean colour; 255 padding is ignored by the loss
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(),
        ])

    def __call__(self, image: Image.Image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_t, mask_t = self.to_input(image, tv_tensors.Mask(mask))
        if self.train:
            image_t, mask_t = self.augment(image_t, mask_t)
        elif self.short_side:
            image_t = TF.resize(image_t, self.short_side, antialias=True)  # short side, aspect kept
        return image_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()


def _list_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batch  # test images may differ in size: grouped by size in `evaluate`


def _eval_collate(batch: list[Any]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, int]:
    return skip_none_collate(batch, collate=_list_collate)


# ------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device,
             amp: str = "none", channels_last: bool = False, keep: int = 0,
             ) -> tuple[ConfusionMatrix, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Score `model` on every batch of `loader` into one confusion matrix (255 ignored).

    `loader` yields lists of (image (3, h, w), mask (H, W)) pairs, or `(list, n_skipped)` from
    `skip_none_collate`. Images of one size are run together; logits are resized to the mask's resolution
    when the image was resized. Returns the matrix, the first `keep` (image, prediction, mask) triples and
    the number of unreadable images skipped.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes)
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    skipped = 0
    for batch in loader:
        if isinstance(batch, tuple):  # from skip_none_collate
            batch, n_skipped = batch
            skipped += n_skipped
            if batch is None:
                continue
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (image, _) in enumerate(batch):
            groups.setdefault(tuple(image.shape), []).append(i)
        preds: dict[int, torch.Tensor] = {}
        for idx in groups.values():
            images = torch.stack([batch[i][0] for i in idx]).to(device)  # (b, 3, h, w)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(images)  # (b, K, h, w)
            for j, i in enumerate(idx):
                target_size = tuple(batch[i][1].shape)
                lg = logits[j : j + 1].float()  # (1, K, h, w)
                if tuple(lg.shape[-2:]) != target_size:
                    lg = F.interpolate(lg, size=target_size, mode="bilinear", align_corners=False)  # (1, K, H, W)
                preds[i] = lg[0].argmax(0).cpu()  # (H, W)
        for i, (image, mask) in enumerate(batch):
            cm.update(preds[i], mask, ignore_index=IGNORE_INDEX)
            if len(samples) < keep:
                samples.append((image, preds[i], mask))
    return cm, samples, skipped


def segmentation_report(cm: ConfusionMatrix, classes: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-class rows) from a confusion matrix: per-class IoU, mIoU over the classes present in
    prediction or truth, pixel accuracy; classes in neither are listed under `absent`."""
    report = cm.report(classes)
    gt, pred = cm.matrix.sum(1), cm.matrix.sum(0)
    rows = [{"class": name, "iou": report["per_class"][name], "gt_pixels": int(g), "pred_pixels": int(p),
             "absent": name in report["absent"]} for name, g, p in zip(classes, gt, pred)]
    metrics = {"mIoU": report["mIoU"], "pixel_accuracy": report["pixel_accuracy"],
               "mean_class_accuracy": report["mean_class_accuracy"], "per_class_iou": report["per_class"],
               "absent": report["absent"], "num_pixels": int(cm.matrix.sum())}
    return metrics, rows


def _palette_image(mask: torch.Tensor) -> Image.Image:
    img = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")  # (H, W) class indices, 255 = void
    img.putpalette(voc_palette())
    return img.convert("RGB")


def save_predictions(samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """One row per test image: image | predicted mask | true mask, masks in the VOC palette (void = cream)."""
    rows = []
    for image, pred, mask in samples:
        h, w = mask.shape
        rgb = (denormalize(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (h, w, 3)
        picture = Image.fromarray(rgb).resize((w, h), Image.BILINEAR)
        rows.append([picture, _palette_image(pred), _palette_image(mask)])
    gap, header = 4, 14
    width = max(sum(p.width for p in r) + 2 * gap for r in rows)
    height = header + sum(r[0].height + gap for r in rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, part in zip(("image", "predicted", "truth"), rows[0]):
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        x += part.width + gap
    y = header
    for row in rows:
        x = 0
        for part in row:
            canvas.paste(part, (x, y))
            x += part.width + gap
        y += row[0].height + gap
    path = Path(path)
    canvas.save(path)
    return path


# ------------------------------------------------------------------------------------------------ training

def segmentation_step_loss(model: nn.Module, batch: tuple, device: torch.device, loss_stride: int,
                           class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """The training loss on every `loss_stride`-th pixel; None for a batch without a labelled pixel."""
    images, masks = batch  # (B, 3, c, c), (B, c, c)
    masks = subsample_labels(masks.to(device, non_blocking=True), loss_stride)  # (B, c/s, c/s)
    if (masks == IGNORE_INDEX).all():
        return None
    logits = model(images.to(device, non_blocking=True), loss_stride)  # (B, K, c/s, c/s), float32
    return segmentation_loss(logits, masks, class_weights)


def main(cfg: SegmentConfig) -> dict[str, Any]:
    """Fine-tune an FCN from `cfg.init` on the train split, score the test split; returns the metrics."""
    if cfg.loss_stride < 1:
        raise BadOptionError(f"--loss-stride {cfg.loss_stride}: must be >= 1 (1 = every pixel)")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    exp = setup(cfg, "segment", cfg.batch_size, "segmentation", (cfg.train_split, cfg.test_split))
    run, device = exp.run, exp.device
    label = init_label(cfg.init)
    train_set = VOCDataset(exp.root, split=cfg.train_split, task="segmentation", strict=cfg.strict_images,
                           transform=SegmentationTransform(True, cfg.crop_size, (cfg.scale_min, cfg.scale_max)))
    test_set = VOCDataset(exp.root, split=cfg.test_split, task="segmentation", strict=cfg.strict_images,
                          transform=SegmentationTransform(False, short_side=cfg.test_short_side))
    classes = train_set.info.mask_classes
    num_classes = len(classes)

    trunk, checkpoint = build_trunk(cfg.init, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the new layers' weights do not depend on how the trunk was made
    model = FCNAlexNet(trunk, num_classes, cfg.skip, cfg.fc_width, cfg.fc6_kernel, cfg.dropout)
    calibration = None
    if cfg.rescale:
        raw = VOCDataset(exp.root, split=cfg.train_split, task="segmentation", strict=cfg.strict_images)
        calib = calibration_batch(raw, n=cfg.calib_images, seed=cfg.seed)  # (n, 3, 227, 227)
        calibration = calibrate_network_(model, trunk, model.new_layers(), lambda: model(calib, 4),
                                         trunk_is_fresh=cfg.init == "random")
    # the training masks as stored (`target` decodes no image and applies no augmentation)
    class_pixels, image_pixels = class_pixel_counts((train_set.target(i) for i in range(len(train_set))), num_classes)
    class_weights = None
    if cfg.class_weights == "median_frequency":
        class_weights = median_frequency_weights(class_pixels, image_pixels)
        print0("class weights (median frequency): " + ", ".join(f"{c} {w:.2f}" for c, w in zip(classes, class_weights)))
    if cfg.classifier_init == "prior":
        constant_prediction_init_(model.score, class_pixels, class_weights)
    if class_weights is not None:
        class_weights = class_weights.to(device)
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = wrap_ddp(model, run)  # trains; `model` (the same weights) is tested
    if run.world_size > 1:  # own augmentation and dropout per rank: one seed would repeat them on every rank's share
        torch.manual_seed(cfg.seed + run.rank)

    # the loader's generator seeds its workers' augmentation (per rank under torchrun, as above)
    loader_gen = torch.Generator().manual_seed(cfg.seed + run.rank)
    common = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda",
              "persistent_workers": cfg.workers > 0}
    drop_last = len(train_set) > cfg.batch_size
    sampler = train_sampler(train_set, run, cfg.seed, drop_last)  # None without torchrun: the loader shuffles
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size // run.world_size, shuffle=sampler is None,
                              sampler=sampler, drop_last=drop_last, collate_fn=skip_none_collate, generator=loader_gen,
                              **common)
    test_loader = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=False, collate_fn=_eval_collate, **common)
    print0(f"segment: {label} seed {cfg.seed}, {len(train_set)} train / {len(test_set)} {cfg.test_split} images, "
           f"{num_classes} classes, FCN-{cfg.skip}, {cfg.epochs} epochs x {len(train_loader)} steps on {device}, "
           f"{run.world_size} process(es)", flush=True)

    def set_epoch(epoch: int) -> None:
        if sampler is not None:
            sampler.set_epoch(epoch)

    def loss_fn(m: nn.Module, batch: tuple, dev: torch.device) -> torch.Tensor | None:
        return segmentation_step_loss(m, batch, dev, cfg.loss_stride, class_weights)

    state = fit(model, ddp_model, train_loader, loss_fn, cfg, device, set_epoch)

    metrics: dict[str, Any] | None = None
    if run.is_main:  # the whole test split with the unwrapped model, as one process would; the others wait below
        cm, samples, skipped_test = evaluate(model, test_loader, num_classes, device, cfg.amp, cfg.channels_last,
                                             keep=cfg.num_predictions)
        scores, rows = segmentation_report(cm, classes)
        details = {"data_root": str(exp.root), "train_split": cfg.train_split, "test_split": cfg.test_split,
                   "skip": cfg.skip, "classes": list(classes), "num_classes": num_classes, **scores,
                   "num_train_images": len(train_set), "num_test_images": len(test_set),
                   "skipped_images": {"train": state.skipped_images, "test": skipped_test}, "epochs": cfg.epochs,
                   "steps": state.step, "train_history": state.history, "calibration": calibration,
                   "class_weights": None if class_weights is None else [round(w, 4) for w in class_weights.tolist()],
                   "device": str(device), "threads": torch.get_num_threads()}
        metrics = write_results(exp, {"mIoU": scores["mIoU"], "pixel_accuracy": scores["pixel_accuracy"]}, details,
                                rows, segmentation_collapse(cm), checkpoint)
        if samples:
            save_predictions(samples, exp.out / "predictions.png")
        absent = f", absent (not in mean): {', '.join(scores['absent'])}" if scores["absent"] else ""
        print(f"segment {label} seed {cfg.seed} on {cfg.data} {cfg.test_split}: mIoU {100 * scores['mIoU']:.1f}% "
              f"pixel acc {100 * scores['pixel_accuracy']:.1f}% ({len(test_set)} images, FCN-{cfg.skip}, "
              f"{metrics['wall_seconds']:.0f} s){absent} -> {exp.out}", flush=True)
    metrics = share_from_main(metrics)  # rank 0's metrics on every rank (identity without torchrun)
    finish_distributed(run)
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(main, SegmentConfig, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    cli(sys.argv[1:])
