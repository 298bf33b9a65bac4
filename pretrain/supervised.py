"""Supervised pretraining, the suite's positive control: the context encoder's AlexNet trunk trained on labels.

`python -m pretrain --objective supervised` trains trunk -> fc6 -> fc7 (4096 each, ReLU, dropout) -> a linear
multi-label head with binary cross-entropy, on a labelled set (`pretrain.data.open_labelled_images`). The
network keeps its trunk under the attribute `encoder`, as the context encoder does, so its checkpoints load
into every transfer task the same way. A trunk that does not beat random filters after this has no signal
to find in the data, whatever the self-supervised objective.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn
from torch.utils.data import Dataset

from pretrain.data import ObjectCrops
from pretrain.dataset import crop_and_flip, sample_generator
from pretrain.engine import autocast


class SupervisedClassifier(nn.Module):
    """Trunk -> flatten -> fc6 -> fc7 -> linear head: one logit per class of `classes` (AlexNet's classifier,
    Krizhevsky et al. 2012)."""

    def __init__(self, encoder: nn.Module, classes: Sequence[str], input_size: int = 227, dropout: float = 0.5,
                 width: int = 4096) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.encoder = encoder
        with torch.no_grad():  # infer the trunk's output size once, so any trunk fits
            features = encoder(torch.zeros(1, 3, input_size, input_size)).flatten(1).shape[1]
        self.fc6 = nn.Linear(features, width)
        self.fc7 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, len(self.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x).flatten(1)  # (B, 256*6*6)
        z = self.dropout(F.relu(self.fc6(z)))  # (B, 4096)
        z = self.dropout(F.relu(self.fc7(z)))  # (B, 4096)
        return self.head(z)  # (B, C) logits


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over the C classes, averaged over the B images: (B, C), (B, C) -> ()."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none").sum(1).mean()


class LabelledCropDataset(Dataset):
    """Wraps `(PIL image, labels (C,))` items: returns {"input": normalised crop (3, S, S), "labels": (C,)}, or
    None for a skipped file. Training items get a random crop and flip from a generator seeded by
    (seed, epoch, index), as the inpainting pipeline's, so a resumed run sees the same batches; held-out
    items the centre crop."""

    def __init__(self, images: Dataset, crop_size: int = 227, resize: int = 256, seed: int = 0,
                 train: bool = True, centred_epochs: int = 0) -> None:
        self.images, self.crop_size, self.resize, self.seed, self.train = images, crop_size, resize, seed, train
        self.centred_epochs = centred_epochs  # object crops: passes of fixed, centred crops before drawn ones

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)  # StreamSampler gives (epoch, index)
        g = sample_generator(self.seed, epoch if self.train else -1, index)
        # object crops draw their context and placement from the same generator when training
        drawn = self.train and isinstance(self.images, ObjectCrops) and epoch >= self.centred_epochs
        item = self.images.draw(index, g) if drawn else self.images[index]
        if item is None:
            return None
        image, labels = item
        return {"input": crop_and_flip(image, self.resize, self.crop_size, g, self.train), "labels": labels}


def supervised_train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                          scaler: torch.amp.GradScaler, amp: str, device: torch.device) -> dict[str, float]:
    """One optimiser step on the multi-label loss; FloatingPointError if the loss is not finite."""
    with autocast(device, amp):
        logits = model(batch["input"])  # (B, C)
    loss = multilabel_loss(logits, batch["labels"])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.item()}


@torch.no_grad()
def evaluate_classifier(model: SupervisedClassifier, loader, device: torch.device, amp: str = "none") -> dict:
    """Held-out mean average precision (all-point AP per class, averaged over the classes present) and its
    chance level, the mean frequency of those classes (a random ranking's expected AP); the per-class APs
    and the held-out loss too."""
    model.eval()
    scores, labels, losses = [], [], []
    for batch, _ in loader:
        if batch is None:
            continue
        with autocast(device, amp):
            logits = model(batch["input"].to(device)).float()  # (B, C)
        y = batch["labels"].to(device)  # (B, C)
        losses.append(multilabel_loss(logits, y).item() * len(y))
        scores.append(logits.cpu().numpy())
        labels.append(y.cpu().numpy())
    model.train()
    s, y = np.concatenate(scores), np.concatenate(labels)  # (N, C) each
    present = [c for c in range(y.shape[1]) if y[:, c].any()]
    ap = {model.classes[c]: float(average_precision_score(y[:, c], s[:, c])) for c in present}
    return {"map": float(np.mean(list(ap.values()))), "chance_map": float(y[:, present].mean(0).mean()),
            "loss": float(sum(losses) / len(y)), "images": int(len(y)), "ap": ap}
