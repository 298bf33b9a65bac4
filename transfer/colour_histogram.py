"""The trivial baseline of the classification column: `python -m transfer.colour_histogram [--flag value ...]`.

No network: each image becomes the square root of its L1-normalised RGB histogram (`--bins` per channel; the
Hellinger map, so a linear model compares histograms by their Bhattacharyya overlap), and one L2-regularised
logistic regression per class is fitted on the training split and scores the test split, with the same AP
code as `transfer.classify`. Features that do not beat this number see no more than colour statistics.

Writes `<out>/metrics.json` (the common header of every transfer task, `scores`: mAP_11point, mAP_all_point),
`per_class.csv` and `config.json`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from pretrain.config import field
from pretrain.data import VOCDataset
from pretrain.errors import BadOptionError, run_cli
from transfer.classify import eval_targets
from transfer.experiment import TransferConfig, setup, write_results
from transfer.metrics import classification_collapse, classification_report


@dataclass
class ColourHistogramConfig(TransferConfig):
    """`init`, `rescale` and `calib_images` are kept for the shared header; no network is built."""

    init: str = field("colour-histogram", "the method's name in the results header (no network is loaded)")
    rescale: bool = field(False, "unused: there is no network to rescale")
    train_split: str = field("train", "split the classifiers are fitted on")
    test_split: str = field("test", "split that is scored")
    bins: int = field(8, "histogram bins per RGB channel (8: a 512-d feature)")
    cost: float = field(10.0, "inverse L2 regularisation strength C of each class's logistic regression")


def colour_histograms(images: list[Image.Image], bins: int = 8) -> np.ndarray:
    """sqrt of each image's L1-normalised bins x bins x bins RGB histogram: (N, bins^3)."""
    rows = []
    for image in images:
        q = (np.asarray(image.convert("RGB"), dtype=np.int64) * bins // 256).reshape(-1, 3)  # (H*W, 3) bin per channel
        counts = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3).astype(np.float64)
        rows.append(np.sqrt(counts / counts.sum()))
    return np.stack(rows)


def _features(voc: VOCDataset, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(histograms of the readable images, their indices in `voc`)."""
    kept = [(i, item[0]) for i in range(len(voc)) if (item := voc[i]) is not None]
    if not kept:
        raise BadOptionError(f"split {voc.split!r} of {voc.year_dir} has no readable image")
    return colour_histograms([image for _, image in kept], bins), np.array([i for i, _ in kept])


def main(cfg: ColourHistogramConfig) -> dict[str, Any]:
    if cfg.bins < 1 or cfg.cost <= 0:
        raise BadOptionError("--bins must be at least 1 and --cost positive")
    exp = setup(cfg, "colour_histogram", 1, "classification", (cfg.train_split, cfg.test_split))
    train_voc = VOCDataset(exp.root, split=cfg.train_split, task="classification")
    test_voc = VOCDataset(exp.root, split=cfg.test_split, task="classification")
    x_train, train_index = _features(train_voc, cfg.bins)  # (N, bins^3)
    x_test, test_index = _features(test_voc, cfg.bins)
    y_train = eval_targets(train_voc)[train_index]  # (N, C) in {1, 0, -1}
    scores = np.zeros((len(x_test), len(train_voc.classes)))  # (M, C)
    for c in range(scores.shape[1]):
        known = y_train[:, c] >= 0  # "difficult only" images are neither positive nor negative
        labels = y_train[known, c]
        if labels.min() == labels.max():  # one label only: a constant score, which the AP code handles
            continue
        model = LogisticRegression(C=cfg.cost, max_iter=3000).fit(x_train[known], labels)
        scores[:, c] = model.decision_function(x_test)
    report = classification_report(scores, eval_targets(test_voc)[test_index], train_voc.classes)
    details = {"per_class": {r["class"]: {"ap_11point": r["ap_11point"], "ap_all_point": r["ap_all_point"]}
                             for r in report["per_class"]},
               "num_train_images": len(x_train), "num_test_images": len(x_test), "feature_dim": x_train.shape[1]}
    metrics = write_results(exp, {"mAP_11point": report["mAP_11point"], "mAP_all_point": report["mAP_all_point"]},
                            details, report["per_class"], classification_collapse(scores))
    print(f"colour histogram + logistic regression: mAP 11pt {100 * report['mAP_11point']:.1f} / all-point "
          f"{100 * report['mAP_all_point']:.1f} on {cfg.test_split} ({len(x_test)} images) -> {exp.out}/")
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(main, ColourHistogramConfig, argv, description=__doc__ or "")


if __name__ == "__main__":
    cli()
