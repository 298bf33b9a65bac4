"""Robust image loading: any common file -> PIL RGB, plus a folder dataset that survives bad files.

Real image folders contain greyscale, CMYK, RGBA, palette and 16-bit files, truncated downloads and
files that are not images at all. `load_rgb` turns every readable one into an 8-bit RGB image and every
unreadable one into an `UnreadableImageError` naming the file; `ImageFolderDataset` + `skip_none_collate`
let a training loop skip (and count) bad files instead of crashing hours into a run.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from pretrain.errors import UserError, list_problems

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # matched case-insensitively

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(UserError, ValueError):
    """A file that cannot be decoded into a usable RGB image (corrupt, truncated, not an image, too small)."""

    def __init__(self, path: str | Path, reason: str, fix: str | None = None):
        self.path = Path(path)
        self.reason = reason
        fix = fix or "re-download or re-encode the file, or delete it from the dataset folder"
        self.fix = fix
        super().__init__(f"unreadable image {self.path}: {reason}. Fix: {fix}.")

    def __reduce__(self):  # picklable across DataLoader worker processes despite the custom __init__
        return type(self), (self.path, self.reason, self.fix)


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset folder that does not exist or does not hold what was expected."""

    def __init__(self, path: str | Path, expected: str):
        self.path = Path(path)
        self.expected = expected
        super().__init__(f"dataset not found at {self.path}: expected {expected}")

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.path, self.expected)


class DatasetFormatError(UserError, ValueError):
    """A dataset file that exists but whose contents are wrong (malformed XML, a box outside its image, an unknown
    class name, a mask value that is no class); the message names the file and the fix."""


class SkippedImageWarning(UserWarning):
    """Emitted when a non-strict dataset skips an unreadable image (filter it with `warnings`)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img.copy()  # copy so the result outlives the closed file
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert() would clip 16-bit values at 255 (nearly all white); rescale 0..65535 -> 0..255.
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        arr = np.clip(arr, 0, 65535) / 257.0  # 65535 / 257 == 255 exactly
        grey = Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's "palette with transparency" warning; alpha is then dropped.
        img = img.convert("RGBA")
    # L, LA, 1, P, CMYK, YCbCr, RGBA, ...: alpha is dropped (same as torchvision's pil_loader), not
    # composited, so the colours under transparent pixels are kept as stored.
    return img.convert("RGB")


def load_rgb(path: str | Path, min_size: int = 16) -> Image.Image:
    """Fully decode `path` and return it as an 8-bit RGB PIL image.

    16-bit images are rescaled (65535 -> 255), not clipped. EXIF orientation is NOT applied, so pixel
    coordinates match annotation files (VOC boxes refer to the stored pixel grid).
    Raises UnreadableImageError (naming the file) for missing, empty, truncated or non-image files and for
    images whose short side is below `min_size` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(path, "file does not exist", "check the path / the split list")
    if path.stat().st_size == 0:
        raise UnreadableImageError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            # Force the full decode here: Image.open only reads the header, so truncated files would
            # otherwise fail later inside a DataLoader worker. LOAD_TRUNCATED_IMAGES stays False on purpose.
            img.load()
            rgb = _to_rgb(img)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ... for corrupt data
        raise UnreadableImageError(path, f"cannot decode ({type(exc).__name__}: {exc})") from exc
    if min(rgb.size) < min_size:
        raise UnreadableImageError(
            path,
            f"too small: {rgb.size[0]}x{rgb.size[1]} px, short side below {min_size} px",
            "remove the file or replace it with a larger image",
        )
    return rgb


def check_images_readable(paths: Sequence[Path], what: str, fix: str, min_size: int = 16) -> None:
    """Fully decode each file (as `load_rgb`); a UserError naming up to 5 unreadable ones (then a count) and `fix`.

    For image sets that must not lose a file silently, such as a held-out split that every evaluation scores."""
    problems = []
    for path in paths:
        try:
            load_rgb(path, min_size=min_size)
        except UnreadableImageError as err:
            problems.append(f"{path} ({err.reason})")
    if problems:
        raise UserError(f"{len(problems)} of the {len(paths)} {what} cannot be read: {list_problems(problems)}. "
                        f"Fix: {fix}")


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | Path) -> list[Path]:
    """All image files under `root` (recursive, sorted). Hidden files/folders (".*") are skipped.

    Raises DatasetNotFoundError if `root` is missing, not a folder, or holds no image files.
    """
    root = Path(root)
    expected = f"a folder of images ({', '.join(IMAGE_EXTENSIONS)}), flat or in class subfolders"
    if not root.is_dir():
        raise DatasetNotFoundError(root, expected + ("" if not root.exists() else "; this is not a folder"))
    files = sorted(
        p
        for p in root.rglob("*")
        # skip "._x.jpg" (macOS resource forks), ".ipynb_checkpoints/", ...
        if _is_image_file(p) and p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    if not files:
        raise DatasetNotFoundError(root, expected + "; found none")
    return files


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a flat folder or an ImageFolder tree (`root/<class>/<img>`), returned without labels.

    `files`: sorted image paths. `classes`: sorted names of the top-level subfolders holding images (empty
    for a flat folder); `targets[i]`: index of files[i]'s class, -1 for files directly in `root`.
    `__getitem__` returns `transform(img)` (or the PIL RGB image). An unreadable file raises
    UnreadableImageError if `strict`, else warns (SkippedImageWarning) and returns None; use
    `skip_none_collate` in the DataLoader to drop those.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        strict: bool = False,
        min_size: int = 16,
    ):
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
        self.min_size = min_size
        self.files = list_images(self.root)
        tops = [p.relative_to(self.root).parts for p in self.files]
        self.classes = sorted({parts[0] for parts in tops if len(parts) > 1})
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = [index[parts[0]] if len(parts) > 1 else -1 for parts in tops]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        img = load_rgb_or_skip(self.files[i], self.min_size, self.strict)
        if img is None:
            return None
        return self.transform(img) if self.transform is not None else img


class LabelledImageFolder(ImageFolderDataset):
    """An ImageFolder tree (`root/<class>/<img>`) with each image's folder as its label: items are
    `(PIL RGB image, float32 (C,) multi-hot with the one class set)`, or None for a skipped unreadable file.

    Every image must sit in a class subfolder; `classes` are their sorted names.
    """

    def __init__(self, root: str | Path, strict: bool = False, min_size: int = 16):
        super().__init__(root, strict=strict, min_size=min_size)
        loose = [f for f, t in zip(self.files, self.targets) if t < 0]
        if loose or not self.classes:
            where = f"e.g. {loose[0]}" if loose else "none has a class subfolder"
            raise DatasetNotFoundError(self.root, f"every image in a class subfolder (<root>/<class>/<image>) for labels; "
                                                  f"{len(loose) or len(self.files)} image(s) are not ({where}). "
                                                  f"Fix: move each image into the folder of its class")

    def __getitem__(self, i: int) -> Any:
        img = load_rgb_or_skip(self.files[i], self.min_size, self.strict)
        if img is None:
            return None
        target = torch.zeros(len(self.classes), dtype=torch.float32)  # (C,)
        target[self.targets[i]] = 1.0
        return img, target


def load_rgb_or_skip(path: str | Path, min_size: int = 16, strict: bool = False) -> Image.Image | None:
    """`load_rgb`, but an unreadable file gives a warning naming it and None (for `skip_none_collate` to
    count) unless `strict`, when the error propagates: a long job goes on, a strict one stops at once."""
    try:
        return load_rgb(path, min_size=min_size)
    except UnreadableImageError as exc:
        if strict:
            raise
        warnings.warn(f"skipping {path}: {exc.reason}", SkippedImageWarning, stacklevel=3)
        return None


def skip_none_collate(
    batch: Sequence[Any], collate: Callable[[list[Any]], Any] = default_collate
) -> tuple[Any, int]:
    """Drop None items (skipped images) and collate the rest: returns `(collated, n_skipped)`.

    Returns `(None, n_skipped)` when every item was None; the training loop must then skip the step.
    The training loop sums `n_skipped` over the epoch and logs it, so silently shrinking batches are
    visible. `collate` replaces torch's default_collate (e.g. a list collate for detection targets).
    """
    kept = [item for item in batch if item is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return None, n_skipped
    return collate(kept), n_skipped
