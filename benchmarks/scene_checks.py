"""Can a measure on whole scenes see features at all? Checks of the supervised control on the evaluation set.

    python benchmarks/scene_checks.py --init runs/benchmark/results/pretrain/supervised-seed0
    python benchmarks/scene_checks.py --init <supervised run> --data ../shared/data/camvid-voc --out results/camvid

The positive control of the tables (results/transfer.md) is a supervised start: the AlexNet trunk trained with
fc6/fc7 and a classifier on object crops of the same classes (`python -m pretrain --objective supervised`).
Where a whole-scene measure (classification, segmentation, the whole-image probe) cannot tell it from random
filters, this asks why, with the control's own classifier and frozen features, no fine-tuning:

- its classifier on the evaluation set's object crops, the box widened to a square of 1.3x (as it was trained),
  2x and 3x its longer side: top-1 accuracy and all-point mAP against chance (1 / the classes among the
  crops). A drop with context means it recognises objects at one scale only;
- its classifier on whole test images (centre crop of the short side resized to 256): all-point mAP against
  the label prior (the frequency of a class among the images, what a constant ranking scores);
- a logistic regression per class on globally max-pooled frozen features of whole images (conv3, conv5,
  pool5: position-free, so an object anywhere counts), for the control's trunk and a random one.

Writes <out>/scene_checks.{csv,md} with the commit and the checkpoint it came from, and prints the table.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import field  # noqa: E402
from pretrain.data import VOCDataset, resolve_voc_root  # noqa: E402
from pretrain.data.voc import ObjectCrops  # noqa: E402
from pretrain.errors import BadOptionError, run_cli  # noqa: E402
from pretrain.hub import checkpoint_step, load_checkpoint  # noqa: E402
from pretrain.models import build_encoder  # noqa: E402
from pretrain.provenance import git_commit  # noqa: E402
from pretrain.supervised import SupervisedClassifier  # noqa: E402
from transfer.classify import centre_crop  # noqa: E402
from transfer.metrics import classification_map  # noqa: E402
from transfer.trunk import build_trunk  # noqa: E402

CONTEXTS = (1.3, 2.0, 3.0)
POOLED_LAYERS = ("conv3", "conv5", "pool5")


def load_classifier(path: str, classes: tuple[str, ...]) -> tuple[SupervisedClassifier, str]:
    """The supervised run's whole classifier (trunk, fc6/fc7, head) in eval mode, and 'run folder/file (step N)'."""
    ckpt, source = load_checkpoint(path)
    config = ckpt["config"]
    if config.get("objective") != "supervised":
        raise BadOptionError(f"{source} was pretrained with --objective {config.get('objective', 'inpainting')}; "
                             f"these checks need a supervised run (python -m pretrain --objective supervised)")
    model = SupervisedClassifier(build_encoder(config.get("encoder", "alexnet")), classes, config.get("crop_size", 227))
    model.load_state_dict(ckpt["model"])
    return model.eval(), f"{source.parent.name}/{source.name} (step {checkpoint_step(ckpt, source)})"


@torch.no_grad()
def batched(fn, images: list, batch: int = 50) -> Any:
    """fn over the stacked centre crops of PIL images, in batches: (N, ...) numpy, or a tuple of them when fn
    returns a tuple of tensors."""
    outs = [fn(torch.cat([centre_crop(im) for im in images[i:i + batch]])) for i in range(0, len(images), batch)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts).numpy() for parts in zip(*outs))
    return torch.cat(outs).numpy()


def mean_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """All-point VOC mAP over the classes with a positive; targets (N, C) in {1, 0, -1: ignored}."""
    return classification_map(scores, targets.astype(np.int64), method="all_point")["mAP"]


def crop_rows(model: SupervisedClassifier, root: Path, split: str, max_objects: int) -> list[dict]:
    rows = []
    for context in CONTEXTS:
        crops = ObjectCrops(root, split, context=context, strict=True)
        picked = np.linspace(0, len(crops) - 1, min(max_objects, len(crops))).round().astype(int)
        images, targets = zip(*(crops[int(k)] for k in picked))
        labels = np.stack([t.numpy() for t in targets])  # (N, C) one-hot
        scores = batched(model, list(images))  # (N, C)
        rows.append({"check": f"own classifier, object crops at {context:g}x context", "trunk": "supervised",
                     "images": len(images), "top-1 (%)": 100 * float(labels[np.arange(len(labels)), scores.argmax(1)].mean()),
                     "mAP (%)": 100 * mean_ap(labels, scores),
                     "chance or prior (%)": 100 / int(labels.any(0).sum())})  # 1 / the classes among the crops
    return rows


def pooled_features(trunk: torch.nn.Module, images: list) -> dict[str, np.ndarray]:
    """{layer: (N, channels)} global max over each feature map of POOLED_LAYERS."""
    trunk.eval()
    return dict(zip(POOLED_LAYERS, batched(lambda x: tuple(f.amax((2, 3)) for f in trunk(x, list(POOLED_LAYERS))),
                                           images)))


def logistic_map(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """All-point mAP of one logistic regression per class (standardised features), over the classes with both
    labels in training."""
    scaler = StandardScaler().fit(train_x)
    fit = [c for c in range(train_y.shape[1]) if 0 < train_y[:, c].sum() < len(train_y)]  # both labels present
    scores = np.stack([LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(train_x), train_y[:, c])
                       .decision_function(scaler.transform(test_x)) for c in fit], 1)  # (N, len(fit))
    return mean_ap(test_y[:, fit], scores)


@dataclass
class SceneChecksConfig:
    """Every option of benchmarks/scene_checks.py."""

    init: str = field("", "the supervised run folder or checkpoint to check (python -m pretrain --objective supervised)")
    data: str = field("builtin", "'builtin' or a VOC root: its train and test splits")
    data_cache: str = field("", "where the built-in data is generated (default: $CTXENC_DATA_CACHE or ~/.cache/ctxenc)")
    train_split: str = field("train", "split the logistic regressions are fitted on")
    test_split: str = field("test", "split every check scores")
    max_objects: int = field(500, "object crops scored per context (evenly spaced over the test split's objects)")
    seed: int = field(0, "seed of the random trunk")
    out: str = field("results", "folder for scene_checks.{csv,md}")


def main(args: SceneChecksConfig) -> pd.DataFrame:
    if not args.init:
        raise BadOptionError("--init: give the supervised run to check, e.g. runs/<name>/ from python -m pretrain "
                             "--objective supervised")
    commit = git_commit()  # before this run rewrites its own tables, which would read as a dirty tree
    torch.manual_seed(args.seed)
    root = resolve_voc_root(args.data, args.data_cache or None)
    train, test = VOCDataset(root, args.train_split, strict=True), VOCDataset(root, args.test_split, strict=True)
    model, source = load_classifier(args.init, tuple(test.classes))

    rows = crop_rows(model, root, args.test_split, args.max_objects)
    test_images = [test[i][0] for i in range(len(test))]
    test_y = test.labels  # (N, C) in {1, 0, -1: difficult only, ignored}
    positive = test_y > 0
    prior = 100 * float(positive[:, positive.any(0)].mean())
    rows.append({"check": "own classifier, whole images", "trunk": "supervised", "images": len(test_images),
                 "top-1 (%)": float("nan"), "mAP (%)": 100 * mean_ap(test_y, batched(model, test_images)),
                 "chance or prior (%)": prior})
    train_images, train_y = [train[i][0] for i in range(len(train))], train.labels > 0
    trunks = {"supervised": model.encoder, "random": build_trunk("random", seed=args.seed)[0]}
    for name, trunk in trunks.items():
        train_f, test_f = pooled_features(trunk, train_images), pooled_features(trunk, test_images)
        for layer in POOLED_LAYERS:
            rows.append({"check": f"logistic regression on max-pooled {layer}, whole images", "trunk": name,
                         "images": len(test_images), "top-1 (%)": float("nan"),
                         "mAP (%)": 100 * logistic_map(train_f[layer], train_y, test_f[layer], test_y),
                         "chance or prior (%)": prior})

    table = pd.DataFrame(rows).round(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "scene_checks.csv", index=False)
    data_label = "the built-in data" if args.data == "builtin" else Path(args.data).name
    (out / "scene_checks.md").write_text(
        f"# Scene checks of the supervised control on {data_label}\n\n"
        f"`benchmarks/scene_checks.py` (its docstring says what each check asks), commit {commit}, the "
        f"control's checkpoint {source}; split {args.test_split}, no fine-tuning. Top-1 and mAP in %, mAP all-point "
        f"(VOC; difficult-only labels ignored); the last column is chance (1 / the classes among the crops) for "
        f"crops and the label prior for whole images.\n\n"
        f"{table.to_markdown(index=False)}\n")
    print(table.to_string(index=False))
    return table


def cli(argv: list[str] | None = None) -> pd.DataFrame:
    return run_cli(main, SceneChecksConfig, argv, description=__doc__ or "")


if __name__ == "__main__":
    cli()
