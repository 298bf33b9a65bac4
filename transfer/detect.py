"""Transfer to object detection: Faster R-CNN on the AlexNet trunk, scored with VOC AP@0.5.

`python -m transfer.detect --init <random|rescaled|runs/<name>/|...> [--flag value ...]` (`--help` lists all).

The paper (Table 2) fine-tunes Fast R-CNN with Selective Search proposals. Here the proposals come from
torchvision's region proposal network trained jointly on the same trunk (Faster R-CNN), because Selective
Search is not in torchvision and would be a second, CPU-heavy, hand-written component. Everything that
torchvision already does (anchors, box coding, sampling, NMS, RoIAlign, resizing) is torchvision's:

    image -> GeneralizedRCNNTransform (resize to --min-size/--max-size, ImageNet mean/std, as in pretraining)
          -> AlexNet conv1..conv5 (the --init trunk, fine-tuned; conv5 after ReLU, stride 16, 256 channels)
          -> RPN (AnchorGenerator, --anchor-sizes x --aspect-ratios per location)
          -> MultiScaleRoIAlign to 256 x 6 x 6 (pool5's shape, so fc6 has AlexNet's 9216 inputs)
          -> new fc6/fc7 (TwoMLPHead, --representation-size) -> FastRCNNPredictor (classes + background)

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
from contextlib import nullcontext
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
from torchvision.ops import MultiScaleRoIAlign
from torchvision.utils import draw_bounding_boxes

from pretrain.config import field, parse_config
from pretrain.data import IMAGENET_MEAN, IMAGENET_STD, VOCDataset, resolve_voc_root, skip_none_collate
from pretrain.distributed import all_reduce_mean
from transfer.experiment import (
    calibration_batch,
    every_rank,
    finish_distributed,
    global_count,
    print0,
    seed_everything,
    share_from_main,
    start_distributed,
    train_sampler,
    wrap_ddp,
    write_results,
)
from transfer.metrics import detection_report
from transfer.trunk import build_trunk, init_label

ROI_SIZE = 6  # RoIAlign output, pool5's 6x6: fc6 sees the same 256*6*6 inputs as AlexNet's


@dataclass
class DetectConfig:
    """Every option of a detection transfer run; written to <out>/config.json."""

    init: str = field("random", "trunk: random, rescaled, torchvision:PATH, a runs/<name>/ folder or a checkpoint .pth")
    data: str = field("builtin", "'builtin' (generated VOC-layout scenes) or a VOC root (e.g. ../shared/data/camvid-voc)")
    data_cache: str = field("", "where the built-in data is generated (default: $CTXENC_DATA_CACHE or ~/.cache/ctxenc)")
    builtin_images: int = field(2000, "size of the built-in dataset")
    train_split: str = field("train", "split the detector is trained on")
    test_split: str = field("test", "split it is scored on")
    min_size: int = field(256, "short side images are resized to (torchvision's transform; Detectron uses 800)")
    max_size: int = field(400, "cap on the long side after resizing")
    feature: str = field("conv5", "trunk feature map: conv5 (stride 16) or pool5 (stride 32)", choices=("conv5", "pool5"))
    anchor_sizes: tuple[int, ...] = field((32, 64, 128, 256), "anchor sizes in px (at the resized scale)")
    aspect_ratios: tuple[float, ...] = field((0.5, 1.0, 2.0), "anchor height/width ratios")
    representation_size: int = field(1024, "width of the new fc6/fc7 box head (AlexNet: 4096)")
    rpn_post_nms_train: int = field(600, "proposals kept per image (after NMS) for training the box head")
    rpn_post_nms_test: int = field(150, "proposals kept per image at test time (scenes hold 1-5 objects)")
    box_batch_size: int = field(64, "sampled RoIs per image for the box head (Fast R-CNN's 64; torchvision's 512)")
    box_score_thresh: float = field(0.001, "test-time detections below this score are dropped before NMS (a low "
                                    "threshold can only raise AP; 0.05 left a weak detector with no detections at all)")
    epochs: int = field(2, "passes over the training split (2 x 1400 built-in images: ~13 min on 1 busy CPU core)")
    batch_size: int = field(8, "images per step in all (under torchrun split evenly over the processes)")
    lr: float = field(0.02, "SGD learning rate for the global batch, also under torchrun (after warmup; cosine decay to 0)")
    momentum: float = field(0.9, "SGD momentum")
    weight_decay: float = field(1e-4, "SGD weight decay")
    warmup_steps: int = field(50, "linear learning-rate warmup from lr/100")
    clip_grad: float = field(10.0, "max global gradient norm (0: off); keeps the early RPN box losses from diverging")
    amp: str = field("none", "autocast: none or bf16 (CPU or CUDA)", choices=("none", "bf16"))
    seed: int = field(0, "seed for the trunk init, the head init, data order and flips")
    device: str = field("auto", "auto, cpu or cuda")
    workers: int = field(2, "data loader processes")
    threads: int = field(0, "torch CPU threads (0: torch's default); 1 is ~2x faster on a CPU shared with other jobs")
    calib_images: int = field(32, "training images that calibrate --init rescaled and --normalize-trunk")
    normalize_trunk: bool = field(False, "divide each trunk conv by a scalar giving unit-RMS pre-activations before "
                                         "fine-tuning, as classify and segment do by default; off here because the "
                                         "committed detection results were measured without it (not yet compared)")
    vis_images: int = field(4, "test images drawn into detections.png")
    log_every: int = field(20, "steps between progress lines")
    out: str = field("", "output folder (default: runs/transfer/detect/<init label>-seed<seed>)")


# ------------------------------------------------------------------------------------------------- model


class TrunkBackbone(nn.Module):
    """The AlexNet trunk as a torchvision detection backbone: one feature map, `out_channels` = 256."""

    def __init__(self, trunk: nn.Module, feature: str = "conv5") -> None:
        super().__init__()
        self.trunk = trunk
        self.feature = feature
        self.out_channels = trunk.feature_channels[feature]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, [self.feature])[0]  # (B, 256, H/16, W/16) for conv5


def build_detector(trunk: nn.Module, num_classes: int, cfg: DetectConfig) -> FasterRCNN:
    """Faster R-CNN around `trunk` (not copied: the detector fine-tunes these very weights).

    `num_classes` counts foreground classes; the predictor adds the background class 0.
    """
    backbone = TrunkBackbone(trunk, cfg.feature)
    anchors = AnchorGenerator(sizes=(tuple(cfg.anchor_sizes),), aspect_ratios=(tuple(cfg.aspect_ratios),))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=ROI_SIZE, sampling_ratio=2)
    head = TwoMLPHead(backbone.out_channels * ROI_SIZE ** 2, cfg.representation_size)
    predictor = FastRCNNPredictor(cfg.representation_size, num_classes + 1)
    return FasterRCNN(
        backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),  # what the trunk was pretrained on
        rpn_anchor_generator=anchors, rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
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


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()


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
        with _autocast(device, amp):
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


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup from 1/100, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_one_epoch(model: FasterRCNN, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, cfg: DetectConfig,
                    epoch: int) -> dict[str, float]:
    """One pass; returns the mean of each torchvision loss term (and their sum) over the epoch, over this
    process's batches (under torchrun, its share of each global batch)."""
    model.train()
    sums: dict[str, float] = {}
    steps, skipped, start = 0, 0, time.time()
    for batch, n_skipped in loader:
        skipped += n_skipped
        if not every_rank(batch is not None, device):  # all images unreadable (on some rank): skip the step
            continue
        images, targets = batch
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with _autocast(device, cfg.amp):
            losses = model(images, targets)  # dict: loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch} step {steps}: non-finite detection loss {losses}; "
                                     f"lower --lr or keep --clip-grad on")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        steps += 1
        if cfg.log_every and steps % cfg.log_every == 0:
            rate = steps * cfg.batch_size / (time.time() - start)
            print0(f"epoch {epoch} step {steps}/{len(loader)} loss {sums['loss'] / steps:.3f} "
                   f"lr {optimizer.param_groups[0]['lr']:.4f} {rate:.1f} img/s", flush=True)
    means = {k: v / max(steps, 1) for k, v in sums.items()}
    means["skipped_images"] = skipped
    return means


def default_out(cfg: DetectConfig) -> Path:
    return Path("runs") / "transfer" / "detect" / f"{init_label(cfg.init)}-seed{cfg.seed}"


def main(cfg: DetectConfig) -> dict[str, Any]:
    """Train on `train_split`, score on `test_split`; writes the run folder and returns metrics.json's content."""
    if cfg.epochs < 0 or cfg.batch_size <= 0:
        raise ValueError("--epochs must be >= 0 and --batch-size positive")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)  # oversubscribed OpenMP threads spin at every small op's barrier
    seed_everything(cfg.seed)
    run = start_distributed(cfg.device, cfg.batch_size)  # without torchrun: rank 0 of 1 on --device
    device = run.device
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    root = resolve_voc_root(cfg.data, cfg.data_cache or None, cfg.builtin_images)
    train_set = VOCDataset(root, split=cfg.train_split, task="detection", transform=DetectionTransform(train=True))
    test_set = VOCDataset(root, split=cfg.test_split, task="detection", transform=DetectionTransform(train=False))
    classes = train_set.classes

    calib = None
    if cfg.init == "rescaled" or cfg.normalize_trunk:
        raw = VOCDataset(root, split=cfg.train_split, task="detection")
        calib = calibration_batch(raw, n=cfg.calib_images, seed=cfg.seed)
    trunk = build_trunk(cfg.init, seed=cfg.seed, calib_images=calib, normalize=cfg.normalize_trunk)
    torch.manual_seed(cfg.seed)  # the heads' init does not depend on which --init built the trunk
    model = build_detector(trunk, len(classes), cfg).to(device)
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train_loader)  # global steps: under torchrun each rank takes 1/N of every batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps))

    history = []
    start = time.time()
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        losses = train_one_epoch(ddp_model, train_loader, optimizer, scheduler, device, cfg, epoch)
        # over all ranks (identities without torchrun): each loss term averages the ranks' means
        losses = {k: global_count(v, device) if k == "skipped_images" else all_reduce_mean(v, device)
                  for k, v in losses.items()}
        history.append(losses)
        print0(f"epoch {epoch}: " + " ".join(f"{k} {v:.3f}" for k, v in losses.items()), flush=True)
    train_seconds = time.time() - start

    metrics: dict[str, Any] | None = None
    if run.is_main:  # the whole test split with the unwrapped model, as one process would; the others wait below
        start = time.time()
        detections, ground_truth, ids = predict(model, test_loader, device, cfg.amp)
        eval_seconds = time.time() - start
        report = score_detections(detections, ground_truth, classes)

        out.mkdir(parents=True, exist_ok=True)
        n_vis = min(cfg.vis_images, len(detections))
        if n_vis:
            position = {image_id: k for k, image_id in enumerate(test_set.ids)}
            images = [test_set[position[i]][0] for i in ids[:n_vis]]
            save_detection_grid(out / "detections.png", images, detections[:n_vis], ground_truth[:n_vis], classes)

        metrics = {
            "task": "detect", "init": init_label(cfg.init), "seed": cfg.seed, "data": cfg.data,
            "mAP_11point": report["mAP_11point"], "mAP_all_point": report["mAP_all_point"],
            "iou_threshold": report["iou_threshold"], "skipped_classes": report["skipped"],
            "ap_11point": {r["class"]: r["ap_11point"] for r in report["per_class"]},
            "ap_all_point": {r["class"]: r["ap_all_point"] for r in report["per_class"]},
            "num_train_images": len(train_set), "num_test_images": len(detections),
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
            "train_losses": history,
        }
        write_results(out, metrics, report["per_class"], config=cfg)
        print(f"detect {metrics['init']} seed {cfg.seed} on {cfg.data}: mAP@0.5 11-point {100 * metrics['mAP_11point']:.1f}, "
              f"all-point {100 * metrics['mAP_all_point']:.1f} ({len(classes) - len(report['skipped'])} classes scored, "
              f"train {train_seconds:.0f} s, test {eval_seconds:.0f} s) -> {out}", flush=True)
    metrics = share_from_main(metrics)  # rank 0's metrics on every rank (identity without torchrun)
    finish_distributed(run)
    return metrics


if __name__ == "__main__":
    main(parse_config(DetectConfig, description=__doc__.split("\n")[0]))
