"""Fine-tune a trunk for multi-label image classification: `python -m transfer.classify [--flag value ...]`.

The first column of the paper's Table 2 (VOC2007 classification, Krähenbühl et al.'s protocol): the AlexNet
trunk (conv1..pool5) from `--init` is kept, fc6/fc7 (ReLU, dropout 0.5) and the classifier are new, and the
whole net is fine-tuned with a per-class logistic (BCE) loss, the classifier starting at the label prior.
Training sees whole images (random-resized crops with --crop-scale-min below 1) and flips; testing averages the
sigmoid scores of 10 crops (4 corners + centre, and their mirrors) of each image resized to a 256 short side.
Reported: per-class AP and mAP with both the VOC2007 11-point and the all-point definitions.

Every start goes through the same protocol before fine-tuning (transfer.trunk.calibrate_network_:
Krähenbühl et al.'s data-dependent init of fc6/fc7/fc8, and of the trunk too for the random start, then
their between-layer rescaling) and the same SGD recipe (transfer.engine).

Writes `<out>/metrics.json`, `per_class.csv` and `config.json`, and prints a one-line summary.

`torchrun --nproc_per_node=N -m transfer.classify ...` fine-tunes with DDP: `--batch-size` is the global batch
(each process takes 1/N of it, from a DistributedSampler) and `--lr` applies to it unchanged. Crops are seeded by
(seed, epoch, image index), so they do not depend on which process loads an image. Rank 0 alone tests, writes and
prints; every rank returns its metrics (transfer.experiment explains the split).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pretrain.config import field
from pretrain.data import VOCDataset, skip_none_collate
from pretrain.dataset import normalize, resize_short_side, sample_generator
from pretrain.errors import BadOptionError, run_cli
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
from transfer.metrics import classification_collapse, classification_report
from transfer.trunk import build_trunk, calibrate_network_


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Every option of a classification fine-tuning run; written to <out>/config.json."""

    epochs: int = field(8, "passes over the training split")
    batch_size: int = field(64, "global training batch size (under torchrun split evenly over the processes)")
    lr: float = field(0.003, "SGD learning rate for the global batch: linear warm-up from lr/100, then cosine decay to 0")
    fc_width: int = field(4096, "width of the new fc6 and fc7 (AlexNet: 4096)")
    dropout: float = field(0.5, "dropout after fc6 and after fc7")
    input_size: int = field(227, "crop size fed to the trunk (227: pool5 is 256x6x6)")
    resize: int = field(256, "short side images are resized to before cropping (aspect kept)")
    crop_scale_min: float = field(1.0, "random-resized crops cover [this, 1] of the resized image's area (1: the whole "
                                       "image, flipped at random; smaller crops can leave out the small objects whose "
                                       "labels the image still carries)")
    ten_crop: bool = field(True, "test on 10 crops (corners + centre, and flips) and average; false: centre crop only")
    classifier_init: str = field("prior", "the new classifier after the rescaling: prior (zero weights, each class's "
                                          "bias the log prior odds of the training split, so training starts at the "
                                          "label prior's loss) or rescaled (Krähenbühl et al.'s data-dependent init, "
                                          "logits of std 1)", choices=("prior", "rescaled"))


# ---------------------------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """trunk (conv1..pool5) -> flatten -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> classifier.

    The new layers start from PyTorch's default initialisation, seeded the same way for every `--init`; the
    rescaling protocol (`calibrate_network_`) then re-initialises them from data.
    """

    def __init__(self, trunk: nn.Module, num_classes: int, input_size: int = 227, width: int = 4096,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.trunk = trunk
        with torch.no_grad():  # the trunk's output size for this input size (256x6x6 at 227)
            flat = trunk(torch.zeros(1, 3, input_size, input_size)).flatten(1).shape[1]
        self.head = nn.Sequential(
            nn.Linear(flat, width), nn.ReLU(inplace=True), nn.Dropout(dropout),  # fc6
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Dropout(dropout),  # fc7
            nn.Linear(width, num_classes),  # classifier (fc8)
        )

    def new_layers(self) -> list[nn.Module]:
        """fc6, fc7 and the classifier, in forward order."""
        return [m for m in self.head if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).flatten(1))  # (B, 3, S, S) -> (B, 256*6*6) -> (B, C) logits


# ----------------------------------------------------------------------------------------------- data


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) like torchvision's RandomResizedCrop.get_params, but drawn from `g`, so a sample's
    crop depends only on (seed, epoch, index), not on the number of loader workers."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=g).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (), generator=g))
            left = int(torch.randint(width - w + 1, (), generator=g))
            return top, left, h, w
    # fallback (no valid draw in 10 tries): the largest centre crop within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop(image: Image.Image, g: torch.Generator, size: int = 227, resize: int = 256,
               scale_min: float = 0.3) -> torch.Tensor:
    """(3, size, size) normalised: short side to `resize`, a random-resized crop, a random horizontal flip."""
    image = resize_short_side(image, max(resize, size))
    top, left, h, w = random_resized_crop_box(image.width, image.height, (scale_min, 1.0), (3 / 4, 4 / 3), g)
    image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    x = TF.to_tensor(image)  # (3, size, size) in [0, 1]
    if torch.rand((), generator=g).item() < 0.5:
        x = x.flip(-1)
    return normalize(x)


def ten_crops(image: Image.Image, size: int = 227, resize: int = 256) -> torch.Tensor:
    """(10, 3, size, size) normalised: the 4 corner and the centre crops of the image resized to a `resize`
    short side, then their horizontal mirrors (torchvision.transforms.TenCrop's order)."""
    image = resize_short_side(image, max(resize, size))
    crops = TF.ten_crop(image, [size, size])  # 10 PIL images
    return torch.stack([normalize(TF.to_tensor(c)) for c in crops])  # (10, 3, size, size)


def centre_crop(image: Image.Image, size: int = 227, resize: int = 256) -> torch.Tensor:
    """(1, 3, size, size) normalised centre crop of the image resized to a `resize` short side."""
    image = TF.center_crop(resize_short_side(image, max(resize, size)), [size, size])
    return normalize(TF.to_tensor(image)).unsqueeze(0)  # (1, 3, size, size)


class ClassificationCrops(Dataset):
    """A VOC classification split as tensors: items `(x, labels (C,), valid (C,), index)` or None.

    Training: `x` is one augmented crop (3, S, S), drawn from a generator seeded by (seed, epoch, index);
    call `set_epoch` before each epoch (loader workers are not persistent, so they see the new value).
    Testing: `x` is (10, 3, S, S) ten crops, or (1, 3, S, S) the centre crop.
    `valid` is False where VOC marks the class "difficult only": those entries are left out of the loss.
    """

    def __init__(self, voc: VOCDataset, train: bool, size: int = 227, resize: int = 256, scale_min: float = 0.3,
                 ten_crop: bool = True, seed: int = 0) -> None:
        self.voc, self.train, self.size, self.resize = voc, train, size, resize
        self.scale_min, self.ten_crop, self.seed, self.epoch = scale_min, ten_crop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, i: int):
        item = self.voc[i]
        if item is None:  # unreadable image (already warned about): skip_none_collate drops it
            return None
        image, labels = item  # PIL, (C,) float multi-hot
        valid = torch.from_numpy(~self.voc.label_difficult[i])  # (C,) bool
        if self.train:
            x = train_crop(image, sample_generator(self.seed, self.epoch, i), self.size, self.resize, self.scale_min)
        elif self.ten_crop:
            x = ten_crops(image, self.size, self.resize)
        else:
            x = centre_crop(image, self.size, self.resize)
        return x, labels, valid, i


def eval_targets(voc: VOCDataset) -> np.ndarray:
    """(N, C) in {1, 0, -1} for transfer.metrics: positive, negative, ignored ("difficult only")."""
    targets = voc.labels.astype(np.int64).copy()
    targets[voc.label_difficult] = -1
    return targets


# -------------------------------------------------------------------------------------------- training


def label_prior_init_(classifier: nn.Linear, targets: np.ndarray) -> torch.Tensor:
    """Zero `classifier`'s weights and set its bias to each class's log prior odds over `targets` ((N, C) in
    {1, 0, -1}; -1 is left out), with one pseudo-count each way so a class never seen stays finite.

    Why: the data-dependent init gives the classifier logits of std 1, which costs about twice the prior's loss on
    the first batches; with the short schedules here, the large first gradients are clipped and shrink every
    layer's steps, and training spends its first epochs unlearning them. Starting at the prior, the classifier's
    weights move first and the layers below follow as it finds signal. Returns the bias (C,).
    """
    prior = ((targets == 1).sum(0) + 1) / ((targets >= 0).sum(0) + 2)  # (C,)
    bias = torch.as_tensor(np.log(prior / (1 - prior)), dtype=classifier.bias.dtype)
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.copy_(bias)
    return bias


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-class logistic losses summed over the valid (not difficult-only) classes, averaged over images.

    All (B, C). Summing over classes, as Caffe's SigmoidCrossEntropyLoss does (normalised by the batch),
    keeps the gradient per image the size of a softmax loss's, so the usual AlexNet learning rates apply;
    the mean over B x C entries would divide the effective learning rate by the number of classes.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")  # (B, C)
    return (loss * valid.float()).sum() / logits.shape[0]


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "bf16",
            channels_last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N, C) = sigmoid averaged over each image's crops, dataset indices (N,)); skipped images are absent."""
    model.eval()
    scores, indices = [], []
    for batch, _ in loader:
        if batch is None:
            continue
        x, _, _, index = batch  # x (B, K, 3, S, S), K crops per image
        b, k = x.shape[:2]
        x = x.flatten(0, 1).to(device, non_blocking=True)  # (B*K, 3, S, S)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        scores.append(torch.sigmoid(logits.float()).view(b, k, -1).mean(1).cpu())  # (B, C)
        indices.append(index)
    if not scores:
        raise BadOptionError("no readable test image: every image of the test split was skipped")
    return torch.cat(scores).numpy(), torch.cat(indices).numpy()


def classification_loss(model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
    x, labels, valid, _ = batch  # (B, 3, S, S), (B, C), (B, C), (B,)
    x = x.to(device, non_blocking=True)  # a channels_last model makes its convolutions channels_last
    return masked_bce(model(x), labels.to(device), valid.to(device))  # logits (B, C)


def main(cfg: ClassifyConfig) -> dict[str, Any]:
    """Fine-tune, test, write the results; returns the metrics (also in <out>/metrics.json)."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise BadOptionError("--epochs and --batch-size must be positive")
    if not 0 < cfg.crop_scale_min <= 1:
        raise BadOptionError(f"--crop-scale-min {cfg.crop_scale_min}: must be in (0, 1]")
    exp = setup(cfg, "classify", cfg.batch_size, "classification", (cfg.train_split, cfg.test_split))
    run, device = exp.run, exp.device
    train_voc = VOCDataset(exp.root, cfg.train_split, "classification", strict=cfg.strict_images)
    test_voc = VOCDataset(exp.root, cfg.test_split, "classification", strict=cfg.strict_images)
    classes = list(train_voc.classes)

    trunk, checkpoint = build_trunk(cfg.init, cfg.seed)
    torch.manual_seed(cfg.seed)  # the new layers' weights: the same for every --init
    model = Classifier(trunk, len(classes), cfg.input_size, cfg.fc_width, cfg.dropout)
    calibration = None
    if cfg.rescale:
        calib = calibration_batch(train_voc, cfg.calib_images, cfg.input_size, cfg.seed)  # (n, 3, S, S)
        calibration = calibrate_network_(model, trunk, model.new_layers(), lambda: model(calib),
                                         trunk_is_fresh=cfg.init == "random")
    if cfg.classifier_init == "prior":
        label_prior_init_(model.new_layers()[-1], eval_targets(train_voc))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp_model = wrap_ddp(model, run)  # trains; `model` (the same weights) is tested
    if run.world_size > 1:  # own dropout masks per rank: one seed would repeat them on every rank's share
        torch.manual_seed(cfg.seed + run.rank)

    train_set = ClassificationCrops(train_voc, True, cfg.input_size, cfg.resize, cfg.crop_scale_min, seed=cfg.seed)
    test_set = ClassificationCrops(test_voc, False, cfg.input_size, cfg.resize, ten_crop=cfg.ten_crop)
    drop_last = len(train_set) > cfg.batch_size  # no tiny last batch at full lr, unless the split is tiny
    sampler = train_sampler(train_set, run, cfg.seed, drop_last)  # None without torchrun: the loader shuffles
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size // run.world_size, shuffle=sampler is None,
                              sampler=sampler, num_workers=cfg.workers, collate_fn=skip_none_collate,
                              drop_last=drop_last, generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(test_set, batch_size=max(1, cfg.batch_size // (10 if cfg.ten_crop else 1)),
                             shuffle=False, num_workers=cfg.workers, collate_fn=skip_none_collate)
    print0(f"classify init={cfg.init} on {exp.root}: {len(train_set)} {cfg.train_split} / {len(test_set)} "
           f"{cfg.test_split} images, {len(classes)} classes; {cfg.epochs} epochs x {len(train_loader)} steps of "
           f"{cfg.batch_size}, fc {cfg.fc_width}, device {device}, amp {cfg.amp}, {run.world_size} process(es)",
           flush=True)

    def set_epoch(epoch: int) -> None:
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)

    state = fit(model, ddp_model, train_loader, classification_loss, cfg, device, set_epoch)

    metrics: dict[str, Any] | None = None
    if run.is_main:  # the whole test split with the unwrapped model, as one process would; the others wait below
        scores, index = predict(model, test_loader, device, cfg.amp, cfg.channels_last)
        targets = eval_targets(test_voc)[index]  # (N, C) rows of the images actually scored
        report = classification_report(scores, targets, classes)
        details = {
            "per_class": {r["class"]: {"ap_11point": r["ap_11point"], "ap_all_point": r["ap_all_point"]}
                          for r in report["per_class"]},
            "skipped_classes": report["skipped"], "data_root": str(exp.root), "test_split": cfg.test_split,
            "num_train_images": len(train_set), "num_test_images": int(len(index)),
            "skipped_images": state.skipped_images + len(test_set) - int(len(index)), "epochs": cfg.epochs,
            "train_history": state.history, "calibration": calibration,
        }
        metrics = write_results(exp, {"mAP_11point": report["mAP_11point"], "mAP_all_point": report["mAP_all_point"]},
                                details, report["per_class"], classification_collapse(scores), checkpoint)
        if report["skipped"]:
            print(f"classes without a positive test image (left out of the mAP): {', '.join(report['skipped'])}")
        print(f"classify init={init_label(cfg.init)} seed={cfg.seed}: mAP 11pt {100 * report['mAP_11point']:.1f} / "
              f"all-point {100 * report['mAP_all_point']:.1f} on {cfg.test_split} ({len(index)} images) in "
              f"{metrics['wall_seconds'] / 60:.1f} min -> {exp.out}/")
    metrics = share_from_main(metrics)  # rank 0's metrics on every rank (identity without torchrun)
    finish_distributed(run)
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(main, ClassifyConfig, argv, description=__doc__ or "")


if __name__ == "__main__":
    cli(sys.argv[1:])
