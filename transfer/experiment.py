"""What every transfer command shares: device and seeding, the calibration batch, and writing results.

Each task module (classify, probe, detect, segment, retrieve) owns its model, data transforms and
loop; this module only holds the pieces that would otherwise be copied into each of them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF

from pretrain.dataset import normalize, resize_short_side


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def calibration_batch(images, n: int = 32, size: int = 227, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) normalised centre crops of random training images, for `--init rescaled`.

    `images[i]` may be a PIL image or an (image, target) pair; unreadable items (None) are skipped.
    """
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    batch = []
    for i in order:
        item = images[i]
        image = item[0] if isinstance(item, tuple) else item
        if image is None:
            continue
        image = TF.center_crop(resize_short_side(image, size), [size, size])
        batch.append(normalize(TF.to_tensor(image)))
        if len(batch) == n:
            break
    if not batch:
        raise ValueError("no readable training image to calibrate --init rescaled on")
    return torch.stack(batch)  # (n, 3, size, size)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def write_results(out_dir: str | Path, metrics: dict[str, Any], per_class: list[dict[str, Any]] | None = None,
                  config: Any = None) -> Path:
    """`metrics.json` (+ `per_class.csv`, + `config.json` from a dataclass) in `out_dir`; returns the folder.

    NaN (e.g. the AP of a class with no positives) is written as JSON null, never as a bare NaN.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        (out / "config.json").write_text(json.dumps(_jsonable(cfg), indent=2))
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    if per_class:
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_class[0].keys()))
            writer.writeheader()
            writer.writerows(per_class)
    return out
