"""The data layer shared by pretraining and every transfer task.

`images` reads any image file as RGB and folders of them; `voc` reads Pascal VOC layouts (labels,
boxes, masks); `synthetic` generates the built-in VOC-layout dataset every command defaults to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from pretrain.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageFolderDataset,
    LabelledImageFolder,
    UnreadableImageError,
    check_images_readable,
    list_images,
    load_rgb,
    skip_none_collate,
)
from pretrain.data.synthetic import builtin_pretraining_root, builtin_voc_root
from pretrain.data.voc import OBJECT_CONTEXT, ObjectCrops, VOCDataset, VOCInfo, find_year_dir, read_voc_info, validate_voc_split

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DatasetFormatError", "DatasetNotFoundError", "ImageFolderDataset",
           "LabelledImageFolder", "LabelledImages", "OBJECT_CONTEXT", "ObjectCrops", "UnreadableImageError",
           "VOCDataset", "VOCInfo", "builtin_pretraining_root", "builtin_voc_root", "check_images_readable",
           "find_year_dir", "image_paths", "list_images", "load_rgb", "open_labelled_images",
           "open_pretraining_images", "read_voc_info", "resolve_voc_root", "skip_none_collate", "validate_voc_split"]


def resolve_voc_root(data: str, cache_dir: str | Path | None = None, builtin_images: int = 2000) -> Path:
    """`builtin` -> the generated dataset (created on first use); anything else is a VOC root by path."""
    if data == "builtin":
        return builtin_voc_root(cache_dir=Path(cache_dir) if cache_dir else None, num_images=builtin_images)
    path = Path(data).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(path, "a Pascal VOC root (VOC<year>/JPEGImages, Annotations, ImageSets) "
                                         "or 'builtin' for the generated dataset")
    return path


def image_paths(images: Dataset) -> list[Path]:
    """The file behind each item of a dataset from `open_pretraining_images` (a VOCDataset, an ImageFolderDataset
    or a Subset of one), in item order."""
    if isinstance(images, Subset):
        files = image_paths(images.dataset)
        return [files[i] for i in images.indices]
    if isinstance(images, ObjectCrops):
        files = image_paths(images.images)
        return [files[i] for i in images.image_index]
    if isinstance(images, VOCDataset):
        return [images.image_path(i) for i in range(len(images))]
    if isinstance(images, ImageFolderDataset):
        return list(images.files)
    raise TypeError(f"image_paths: no files known for a {type(images).__name__}")


def _is_voc(path: Path) -> bool:
    try:
        find_year_dir(path)
        return True
    except (FileNotFoundError, ValueError):
        return False


def open_pretraining_images(data: str, cache_dir: str | Path | None = None, builtin_images: int = 2000,
                            strict: bool = False, max_shape_masks: int = 300,
                            ) -> tuple[Dataset, Dataset, list[torch.Tensor]]:
    """(train images, held-out images, segmentation label maps for mask shapes) for pretraining.

    A VOC root uses its train and val split lists (and its SegmentationClass masks, when present, as
    the source of random-region shapes); a plain image folder holds out every 20th file.
    """
    root = resolve_voc_root(data, cache_dir, builtin_images) if data == "builtin" else Path(data).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(root, "a VOC root or a folder of JPEG/PNG/WebP images")
    if data == "builtin" or _is_voc(root):
        train = VOCDataset(root, split="train", task="images", strict=strict)
        val = VOCDataset(root, split="val", task="images", strict=strict)
        label_maps: list[torch.Tensor] = []
        try:
            seg = VOCDataset(root, split="train", task="segmentation", strict=strict)
            for i in range(min(len(seg), max_shape_masks)):
                item = seg[i]
                if item is not None:
                    label_maps.append(torch.as_tensor(item[1]))
        except (FileNotFoundError, ValueError):
            pass  # no masks: random regions fall back to thresholded noise
        return train, val, label_maps
    images = ImageFolderDataset(root, strict=strict)
    n = len(images)
    held_out = list(range(0, n, 20))
    train_idx = [i for i in range(n) if i % 20]
    return Subset(images, train_idx), Subset(images, held_out), []


@dataclass
class LabelledImages:
    """Images with multi-hot labels for supervised pretraining: items of `train` and `held_out` are
    `(PIL RGB image, float32 (C,) labels)` or None (a skipped unreadable file); `classes` names the C labels."""

    train: Dataset
    held_out: Dataset
    classes: tuple[str, ...]


def open_labelled_images(data: str, cache_dir: str | Path | None = None, builtin_images: int = 2000,
                         strict: bool = False, object_crops: bool = True,
                         max_context: float = OBJECT_CONTEXT) -> LabelledImages:
    """Labelled training and held-out images for supervised pretraining.

    `builtin`: the built-in *pretraining* set (`builtin_pretraining_root`: the evaluation set's generator and
    classes from another seed, no image file in common with it), its train and val splits. A VOC root: its
    train and val splits. For both, `object_crops` makes every object its own image with its class as the label
    (`ObjectCrops`, an object-centric set as ImageNet is; training crops drawn with up to `max_context` times the
    object's side, held-out ones centred at 1.3x), else each whole image has its multi-hot image labels.
    A folder of class subfolders (ImageFolder): each image labelled with its folder, every 20th file held out.
    """
    if data == "builtin":
        root = builtin_pretraining_root(cache_dir=Path(cache_dir) if cache_dir else None, num_images=builtin_images)
    else:
        root = Path(data).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(root, "'builtin', a VOC root, or a folder of class subfolders of images")
    if (data == "builtin" or _is_voc(root)) and object_crops:
        train = ObjectCrops(root, "train", strict=strict, max_context=max_context)
        held_out = ObjectCrops(root, "val", strict=strict)
        return LabelledImages(train, held_out, tuple(train.classes))
    if data == "builtin" or _is_voc(root):
        train = VOCDataset(root, split="train", task="classification", strict=strict)
        held_out = VOCDataset(root, split="val", task="classification", strict=strict)
        return LabelledImages(train, held_out, tuple(train.classes))
    images = LabelledImageFolder(root, strict=strict)
    n = len(images)
    return LabelledImages(Subset(images, [i for i in range(n) if i % 20]), Subset(images, list(range(0, n, 20))),
                          tuple(images.classes))
