"""Frozen-feature probes on objects: `python -m transfer.object_probe [--flag value ...]`.

The probe of `transfer.probe` (Goyal et al.'s per-class linear SVMs and a kNN classifier, on every layer of the
frozen, rescaled trunk), fitted and scored on *objects* instead of whole scenes: every non-difficult annotated
object of a VOC detection split is its own single-label image (`pretrain.data.ObjectCrops`: the box widened to a
square of `--context` times its longer side). This asks what a whole-scene label cannot: whether the features
tell one object class from another when the object fills the view, as ImageNet's images do. On a built-in scene
of several objects and clutter a whole-image label is a set of classes whose evidence is a small part of the
picture, and every start, a trunk trained on those classes included, scores the same there; on objects the
supervised start is well above random filters, so this is the task whose positive control can pass.

Scores (metrics.json, as the probe's): per layer `svm_mAP_11point`, `svm_mAP_all_point`, `knn_mAP_*` and
`knn_top1` (top-1 accuracy of the kNN vote: every object has exactly one label). `--max-objects` probes a
fixed random subset of each split (the same for every start and seed), so the SVMs' N x N kernels stay small.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Subset

from pretrain.config import field
from pretrain.data import ObjectCrops
from pretrain.errors import BadOptionError, run_cli
from transfer.experiment import setup
from transfer.probe import ProbeConfig, probe_images


@dataclass
class ObjectProbeConfig(ProbeConfig):
    """Every option of an object-probe run; written to <out>/config.json."""

    context: float = field(1.3, "each object's crop: a square of this many times the box's longer side, centred on "
                                "the box (outside the image is black)")
    max_objects: int = field(1500, "objects per split: a fixed random subset (the same for every start and seed) "
                                   "when the split has more; 0: every object")


def object_subset(objects: ObjectCrops, max_objects: int) -> tuple[Subset, np.ndarray]:
    """(a fixed random subset of at most `max_objects` objects, in split order; its (n, C) one-hot targets).

    The subset depends on the split alone (generator seed 0), so every start and seed sees the same objects.
    """
    index = np.arange(len(objects))
    if 0 < max_objects < len(objects):
        index = np.sort(np.random.default_rng(0).choice(len(objects), max_objects, replace=False))
    targets = np.zeros((len(index), len(objects.classes)), dtype=np.int64)  # (n, C) one-hot
    targets[np.arange(len(index)), [objects.objects[k][2] for k in index]] = 1
    return Subset(objects, index.tolist()), targets


def main(cfg: ObjectProbeConfig) -> dict[str, Any]:
    """Probe the trunk on the object crops of both splits; returns metrics.json's content."""
    if cfg.context < 1.0:
        raise BadOptionError(f"--context {cfg.context}: use 1 or more (1: the box's longer side, no context)")
    if cfg.max_objects < 0:
        raise BadOptionError(f"--max-objects {cfg.max_objects}: use 0 (every object) or a positive count")
    exp = setup(cfg, "object_probe", voc_task="detection", splits=(cfg.train_split, cfg.test_split))
    train, train_t = object_subset(ObjectCrops(exp.root, cfg.train_split, cfg.context, cfg.strict_images), cfg.max_objects)
    test, test_t = object_subset(ObjectCrops(exp.root, cfg.test_split, cfg.context, cfg.strict_images), cfg.max_objects)
    if not len(train) or not len(test):
        raise BadOptionError(f"{exp.root}: split {cfg.train_split if not len(train) else cfg.test_split!r} has no "
                         "non-difficult object: the object probe needs boxes in Annotations/*.xml")
    return probe_images(cfg, exp, train, test, train_t, test_t, list(train.dataset.classes), "objects")


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(main, ObjectProbeConfig, argv, description=__doc__ or "")


if __name__ == "__main__":
    cli(sys.argv[1:])
