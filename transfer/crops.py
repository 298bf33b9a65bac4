"""Which crop of which image each retrieval entry is, and loading those crops as tensors.

An entry is a square box in an image file's pixels, resized to the encoder's input; the same box of a
neighbour fills a query's hole (NN-inpainting) and is drawn in the gallery.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from pretrain.data import load_rgb


@dataclass
class EntryMetadata:
    """Where each index entry came from, stored column-wise so 1M entries cost ~20 MB, not a JSON of dicts.

    `paths[source[i]]` is entry i's image file; `boxes[i]` = (left, top, right, bottom) in that file's pixels
    is the crop that was resized to the encoder's input. `paths` holds each source image once.
    """

    paths: list[str]
    source: np.ndarray  # (N,) int64 index into paths
    boxes: np.ndarray  # (N, 4) float32

    def __post_init__(self) -> None:
        self.source = np.asarray(self.source, dtype=np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if len(self.source) != len(self.boxes):
            raise ValueError(f"EntryMetadata: {len(self.source)} sources but {len(self.boxes)} boxes")
        if len(self.source) and (self.source.min() < 0 or self.source.max() >= len(self.paths)):
            raise ValueError(f"EntryMetadata: source indices must be in [0, {len(self.paths)})")

    def __len__(self) -> int:
        return len(self.source)

    def path(self, i: int) -> str:
        return self.paths[int(self.source[i])]

    def save(self, folder: Path) -> None:
        (folder / "images.json").write_text(json.dumps(self.paths))
        np.savez(folder / "entries.npz", source=self.source, boxes=self.boxes)

    @classmethod
    def load(cls, folder: Path) -> EntryMetadata:
        with np.load(folder / "entries.npz", allow_pickle=False) as z:
            return cls(json.loads((folder / "images.json").read_text()), z["source"], z["boxes"])


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square: resize short side to S then centre-crop S x S, as one box."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def random_square_box(width: int, height: int, rng: np.random.Generator, min_area: float = 0.3
                      ) -> tuple[float, float, float, float]:
    """A random square covering `min_area`..1 of the largest square's area, anywhere in the image."""
    side = min(width, height) * math.sqrt(rng.uniform(min_area, 1.0))
    left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    return left, top, left + side, top + side


@functools.lru_cache(maxsize=16)
def _cached_rgb(path: str) -> Image.Image:
    return load_rgb(path)  # consecutive crops of one image decode it once


def load_crop(path: str | Path, box: Sequence[float], size: int) -> torch.Tensor:
    """Crop `box` of the image at `path`, resized to size x size: (3, size, size) in [0, 1]."""
    image = _cached_rgb(str(path))
    return TF.to_tensor(image.resize((size, size), Image.BILINEAR, box=tuple(float(b) for b in box)))


def load_crops(metadata: EntryMetadata, ids: Sequence[int], size: int) -> torch.Tensor:
    """(len(ids), 3, size, size) crops in [0, 1]."""
    return torch.stack([load_crop(metadata.path(i), metadata.boxes[i], size) for i in ids])


def paste(fill01: torch.Tensor, target01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`fill` inside the hole, `target` outside: (B, 3, S, S)."""
    return torch.where(mask.unsqueeze(-3), fill01, target01)
