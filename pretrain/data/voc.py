"""Pascal VOC-layout readers: split lists, class lists, XML boxes, palette masks and a Dataset.

Layout: `<root>/VOC<year>/{JPEGImages,Annotations,SegmentationClass,ImageSets/Main,ImageSets/Segmentation}`.
The same code reads the official VOC 2007/2012 devkits, labelme's `labelme2voc.py` output (float box
coordinates, empty elements, `class_names.txt` with `_background_` first) and VOC-layout conversions of
other datasets with their own `labels.txt` (e.g. CamVid: 11 classes, no background, void = 255).

Box convention: VOC XML boxes are 1-based inclusive pixel indices; everything returned here uses 0-based
continuous pixel coordinates `(x1, y1, x2, y2) = (xmin - 1, ymin - 1, xmax, ymax)`, so a box covering the
whole W x H image is `(0, 0, W, H)` and width = x2 - x1.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pretrain.data.images import IMAGE_EXTENSIONS, DatasetFormatError, DatasetNotFoundError, load_rgb_or_skip
from pretrain.errors import list_problems

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

VOC_LAYOUT = (
    "<root>/VOC<year>/{JPEGImages,Annotations,SegmentationClass,ImageSets/Main,ImageSets/Segmentation} "
    "(root may be the VOC<year> folder itself, a VOCdevkit folder, or a folder holding one of those)"
)
TASKS = ("classification", "detection", "segmentation", "images")
CLASS_LIST_FILES = ("labels.txt", "class_names.txt")
BACKGROUND_NAMES = ("_background_", "background", "__background__")
IGNORE_INDEX = 255  # VOC's "void" mask value (object borders, unlabelled pixels)
BOX_TOLERANCE_PX = 1.0  # boxes at most this far outside the image are clipped, further out is an error

_YEAR_DIR = re.compile(r"VOC(\d{4})")


def normalize_class_name(name: str) -> str:
    """Key for matching class names: "Potted Plant" == "pottedplant", "tv/monitor" == "tvmonitor"."""
    return re.sub(r"[\s/_\-]+", "", name).lower()


def _class_index(classes: Sequence[str]) -> dict[str, int]:
    return {normalize_class_name(c): i for i, c in enumerate(classes)}


# ---------------------------------------------------------------------------------------------- layout


def _year_of(path: Path) -> int | None:
    m = _YEAR_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def find_year_dir(root: str | Path, year: int | str | None = None) -> Path:
    """Locate the `VOC<year>` folder under `root` (see VOC_LAYOUT for what `root` may be).

    With several VOC<year> folders the highest year is taken unless `year` is given.
    Raises DatasetNotFoundError naming the path and the expected layout.
    """
    root = Path(root)
    want = int(year) if year is not None else None
    if not root.is_dir():
        raise DatasetNotFoundError(root, f"a Pascal VOC-layout dataset: {VOC_LAYOUT}")
    if (root / "JPEGImages").is_dir():  # root is the year folder itself
        if want is not None and _year_of(root) not in (None, want):
            raise DatasetNotFoundError(root, f"VOC{want}, but this folder is {root.name}")
        return root
    if _year_of(root) is not None:  # a VOC<year> folder without its images
        raise DatasetNotFoundError(root / "JPEGImages", f"the images folder of {VOC_LAYOUT}")
    years = {y: d for d in root.iterdir() if d.is_dir() and (y := _year_of(d)) is not None}
    if not years:
        devkits = [d for d in root.iterdir() if d.is_dir() and d.name.lower() == "vocdevkit"]
        if len(devkits) == 1:
            return find_year_dir(devkits[0], year)
        raise DatasetNotFoundError(root, f"a VOC<year> folder (none found here): {VOC_LAYOUT}")
    if want is not None:
        if want not in years:
            found = ", ".join(d.name for _, d in sorted(years.items()))
            raise DatasetNotFoundError(root, f"a VOC{want} folder; found only {found}")
        year_dir = years[want]
    else:
        year_dir = years[max(years)]
    if not (year_dir / "JPEGImages").is_dir():
        raise DatasetNotFoundError(year_dir / "JPEGImages", f"the images folder of {VOC_LAYOUT}")
    return year_dir


@dataclass(frozen=True)
class VOCInfo:
    """Where a VOC-layout dataset is and what its classes are.

    `classes`: object classes, what image labels, boxes and classifiers index into.
    `mask_classes`: names of the segmentation mask values 0..K-1 (255 = ignore). Equals `classes` when the
    dataset has no background class (CamVid), else `("background" or "_background_",) + classes`.
    """

    year_dir: Path
    classes: tuple[str, ...]
    mask_classes: tuple[str, ...]

    @property
    def has_background(self) -> bool:
        """True when mask value 0 is a background class, so object class c has mask value c + 1."""
        return len(self.mask_classes) == len(self.classes) + 1


def _read_class_list(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DatasetFormatError(f"{path}: class list is empty. Fix: write one class name per line.")
    keys = [normalize_class_name(n) for n in names]
    dupes = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
    if dupes:
        raise DatasetFormatError(f"{path}: duplicate class names {dupes} (compared ignoring case, spaces and '/').")
    return names


def read_voc_info(root: str | Path, year: int | str | None = None) -> VOCInfo:
    """Find the year folder and its classes.

    Class list: the first of `labels.txt` / `class_names.txt` inside the year folder, then beside it. If its
    first name is a background name (`_background_`, `background`) that name is mask value 0 and is not an
    object class; otherwise mask value i is object class i. No file: the 20 standard VOC classes with
    background at mask value 0.
    """
    year_dir = find_year_dir(root, year)
    for folder in (year_dir, year_dir.parent):
        for fname in CLASS_LIST_FILES:
            path = folder / fname
            if path.is_file():
                names = _read_class_list(path)
                if names[0].lower() in BACKGROUND_NAMES:
                    if len(names) == 1:
                        raise DatasetFormatError(f"{path}: lists only the background class. Fix: add the classes.")
                    return VOCInfo(year_dir, tuple(names[1:]), tuple(names))
                return VOCInfo(year_dir, tuple(names), tuple(names))
    return VOCInfo(year_dir, VOC_CLASSES, ("background",) + VOC_CLASSES)


def _available_splits(folder: Path) -> list[str]:
    """Split names in an ImageSets folder, leaving out VOC's per-class lists `<cls>_<split>.txt`."""
    stems = sorted(p.stem for p in folder.glob("*.txt"))
    return [s for s in stems if not any(s.endswith("_" + t) for t in stems)]


def read_split_ids(year_dir: str | Path, split: str, task: str = "Main") -> list[str]:
    """Image ids listed in `ImageSets/<task>/<split>.txt` (first token of each line, file order kept)."""
    folder = Path(year_dir) / "ImageSets" / task
    path = folder / f"{split}.txt"
    if not path.is_file():
        if folder.is_dir():
            found = ", ".join(_available_splits(folder)) or "none"
            raise DatasetNotFoundError(path, f"the list of split {split!r}; splits in {folder}: {found}")
        raise DatasetNotFoundError(path, f"the list of split {split!r}; {folder} does not exist")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetFormatError(f"{path}: split list is empty. Fix: write one image id per line.")
    return ids


# ------------------------------------------------------------------------------------------ annotations


def _text(elem: ET.Element | None) -> str:
    return (elem.text or "").strip() if elem is not None else ""


def _required_number(parent: ET.Element, tag: str, path: Path, where: str) -> float:
    text = _text(parent.find(tag))
    if not text:
        raise DatasetFormatError(f"{path}: missing or empty <{tag}> in {where}. Fix: add the field.")
    try:
        return float(text)
    except ValueError:
        raise DatasetFormatError(f"{path}: <{tag}> in {where} is {text!r}, not a number.") from None


def parse_annotation(xml_path: str | Path, classes: Sequence[str]) -> dict[str, Any]:
    """Read one VOC XML file.

    Returns dict(boxes=float32 (N, 4) x1, y1, x2, y2 in 0-based pixel coordinates (see module docstring),
    labels=int64 (N,) indices into `classes`, difficult=bool (N,), size=(H, W)).
    Accepts labelme output: float coordinates, empty `<difficult/>` (= 0), empty/missing optional elements.
    Class names match ignoring case, spaces, '_', '-' and '/'. Boxes up to BOX_TOLERANCE_PX outside the image
    are clipped. Raises DatasetFormatError (a ValueError) naming the file and field for malformed XML, missing size/name/bndbox
    fields, unknown classes, empty boxes and boxes further outside the image.
    """
    path = Path(xml_path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DatasetNotFoundError(path, "a VOC annotation XML for this image id") from None
    except ET.ParseError as exc:
        raise DatasetFormatError(f"{path}: not valid XML ({exc}). Fix: regenerate the annotation file.") from None
    root = tree.getroot()
    size = root.find("size")
    if size is None:
        raise DatasetFormatError(f"{path}: missing <size>. Fix: add <size><width>W</width><height>H</height></size>.")
    width = _required_number(size, "width", path, "<size>")
    height = _required_number(size, "height", path, "<size>")
    if width <= 0 or height <= 0:
        raise DatasetFormatError(f"{path}: <size> is {width:g}x{height:g}; it must be the image's width/height.")
    index = _class_index(classes)

    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        where = f"<object> #{k}"
        name = _text(obj.find("name"))
        if not name:
            raise DatasetFormatError(f"{path}: missing or empty <name> in {where}.")
        label = index.get(normalize_class_name(name))
        if label is None:
            raise DatasetFormatError(
                f"{path}: unknown class {name!r} in {where}; known classes: {list(classes)}. "
                "Fix: add it to labels.txt / class_names.txt or correct the name."
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetFormatError(f"{path}: missing <bndbox> in {where} ({name}).")
        xmin, ymin, xmax, ymax = (_required_number(bndbox, t, path, f"{where} <bndbox>")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        box = np.array([xmin - 1, ymin - 1, xmax, ymax], dtype=np.float64)  # 1-based inclusive -> 0-based
        limit = np.array([width, height, width, height])
        if (box < -BOX_TOLERANCE_PX).any() or (box > limit + BOX_TOLERANCE_PX).any():
            raise DatasetFormatError(
                f"{path}: <bndbox> of {where} ({name}) "
                f"xmin,ymin,xmax,ymax={xmin:g},{ymin:g},{xmax:g},{ymax:g} lies outside the "
                f"{width:g}x{height:g} image (<size>). Fix: correct the box or the size."
            )
        box = np.clip(box, 0, limit)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetFormatError(
                f"{path}: <bndbox> of {where} ({name}) is empty: xmin,ymin,xmax,ymax={xmin:g},{ymin:g},"
                f"{xmax:g},{ymax:g}. Fix: xmax >= xmin and ymax >= ymin (1-based inclusive)."
            )
        diff_text = _text(obj.find("difficult"))
        try:
            is_difficult = bool(int(float(diff_text))) if diff_text else False  # labelme writes <difficult/>
        except ValueError:
            raise DatasetFormatError(f"{path}: <difficult> of {where} is {diff_text!r}; expected 0 or 1.") from None
        boxes.append(box)
        labels.append(label)
        difficult.append(is_difficult)
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),  # (N, 4)
        "labels": np.asarray(labels, dtype=np.int64),  # (N,)
        "difficult": np.asarray(difficult, dtype=bool),  # (N,)
        "size": (int(height), int(width)),
    }


def read_mask(png_path: str | Path, num_classes: int) -> np.ndarray:
    """Class-index mask (H, W) uint8 from a VOC SegmentationClass PNG; 255 = ignore.

    Palette ('P') PNGs are read as palette indices (their colours are only for viewing); greyscale 'L' PNGs
    are read as-is. Raises DatasetFormatError (a ValueError) naming the file for other modes and for values >= num_classes
    other than 255.
    """
    path = Path(png_path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            mask = np.array(img) if mode in ("P", "L") else None  # (H, W) uint8 indices, no RGB conversion
    except FileNotFoundError:
        raise DatasetNotFoundError(path, "a SegmentationClass PNG for this image id") from None
    except Exception as exc:  # corrupt PNG
        raise DatasetFormatError(f"{path}: cannot decode mask ({type(exc).__name__}: {exc}).") from exc
    if mask is None:
        raise DatasetFormatError(
            f"{path}: mask has mode {mode!r}. Fix: save class indices as a palette ('P') or greyscale ('L') "
            "PNG, not as colours (RGB)."
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DatasetFormatError(
            f"{path}: mask values {bad.tolist()} are not class indices 0..{num_classes - 1} "
            f"or {IGNORE_INDEX} (ignore). Fix: list every class in labels.txt / class_names.txt, "
            "or set those pixels to 255."
        )
    return mask


def _class_list_files(main: Path, classes: Sequence[str], split: str) -> dict[int, Path]:
    """Map class index -> `ImageSets/Main/<cls>_<split>.txt`, matching file names like class names."""
    suffix = f"_{split}.txt"
    by_key = {normalize_class_name(p.name[: -len(suffix)]): p for p in main.glob(f"*{suffix}")}
    found = {}
    for c, name in enumerate(classes):
        exact = main / f"{name}{suffix}"
        path = exact if exact.is_file() else by_key.get(normalize_class_name(name))
        if path is not None:
            found[c] = path
    return found


def image_labels(
    year_dir: str | Path,
    ids: Sequence[str],
    classes: Sequence[str],
    split: str,
    source: str = "auto",
    return_difficult: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Multi-label image labels (N, C) int64: 1 = class present, 0 = absent.

    Source: `ImageSets/Main/<cls>_<split>.txt` for every class (source="auto" when all exist, or "files"),
    else derived from the XML objects (source="annotations"). VOC's value 0 ("only difficult objects of the
    class") is returned as 0 (absent) in the labels and flagged True in the second array (N, C) bool, which
    is returned when `return_difficult`; evaluation code should ignore those entries, as VOC's does.
    From annotations the same rule holds: present = any non-difficult object, difficult = only difficult ones.
    """
    year_dir = Path(year_dir)
    n, num_c = len(ids), len(classes)
    labels = np.zeros((n, num_c), dtype=np.int64)
    difficult = np.zeros((n, num_c), dtype=bool)
    if source not in ("auto", "files", "annotations"):
        raise ValueError(f"source must be 'auto', 'files' or 'annotations', got {source!r}")
    main = year_dir / "ImageSets" / "Main"
    files = _class_list_files(main, classes, split) if source in ("auto", "files") else {}
    if source == "files" and len(files) < num_c:
        missing = [f"{classes[c]}_{split}.txt" for c in range(num_c) if c not in files]
        raise DatasetNotFoundError(main, f"per-class lists for split {split!r}; missing {missing}")

    if len(files) == num_c:
        row = {image_id: r for r, image_id in enumerate(ids)}
        for c, path in files.items():
            seen = np.zeros(n, dtype=bool)
            for line in path.read_text().splitlines():
                parts = line.split()
                if not parts or parts[0] not in row:
                    continue
                if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                    raise DatasetFormatError(f"{path}: bad line {line!r}; expected '<id> <1|0|-1>'.")
                r, value = row[parts[0]], int(parts[1])
                labels[r, c] = value == 1
                difficult[r, c] = value == 0
                seen[r] = True
            if not seen.all():
                missing = [ids[r] for r in np.flatnonzero(~seen)[:5]]
                raise DatasetFormatError(f"{path}: no entry for ids {missing}... of split {split!r}.")
    else:
        for r, image_id in enumerate(ids):
            ann = parse_annotation(year_dir / "Annotations" / f"{image_id}.xml", classes)
            for label, diff in zip(ann["labels"], ann["difficult"]):
                if diff:
                    difficult[r, label] = True
                else:
                    labels[r, label] = 1
        difficult &= labels == 0  # a class with any easy object is simply present
    return (labels, difficult) if return_difficult else labels


# ---------------------------------------------------------------------------------------------- dataset


class VOCDataset(torch.utils.data.Dataset):
    """A VOC-layout split for one task; items are `(PIL RGB image, target)`.

    Targets: classification -> float32 tensor (C,) multi-hot (difficult-only classes are 0, see
    `label_difficult`); detection -> dict(boxes=float32 (N, 4) 0-based x1y1x2y2, labels=int64 (N,) into
    `classes`, difficult=bool (N,), image_id=str); segmentation -> int64 tensor (H, W) of mask values
    (indices into `info.mask_classes`, 255 = ignore); images -> None.
    With `transform`, items are `transform(image, target)`. Split list: ImageSets/Main for classification,
    detection and images, ImageSets/Segmentation for segmentation, each falling back to the other folder
    (for segmentation only the ids that have a mask). Unreadable images raise if `strict`, else warn and
    the item is None (use `skip_none_collate`); broken annotations and masks always raise.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        task: str = "classification",
        transform: Callable[[Image.Image, Any], Any] | None = None,
        year: int | str | None = None,
        strict: bool = False,
        min_size: int = 16,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.info = read_voc_info(root, year)
        self.year_dir = self.info.year_dir
        self.classes = self.info.classes
        self.split, self.task = split, task
        self.transform, self.strict, self.min_size = transform, strict, min_size

        needed = {"detection": "Annotations", "segmentation": "SegmentationClass"}.get(task)
        if needed and not (self.year_dir / needed).is_dir():
            raise DatasetNotFoundError(
                self.year_dir / needed, f"the {needed} folder for task={task!r}: {VOC_LAYOUT}"
            )
        primary, other = ("Segmentation", "Main") if task == "segmentation" else ("Main", "Segmentation")
        try:
            self.ids = read_split_ids(self.year_dir, split, primary)
        except DatasetNotFoundError:
            if not (self.year_dir / "ImageSets" / other / f"{split}.txt").is_file():
                raise
            self.ids = read_split_ids(self.year_dir, split, other)
            if task == "segmentation":
                masks = self.year_dir / "SegmentationClass"
                self.ids = [i for i in self.ids if (masks / f"{i}.png").is_file()]
                if not self.ids:
                    raise DatasetNotFoundError(
                        self.year_dir / "SegmentationClass", f"masks for the ids of split {split!r}"
                    ) from None

        if task == "classification":
            labels, diff = image_labels(self.year_dir, self.ids, self.classes, split, return_difficult=True)
            self.labels: np.ndarray | None = labels  # (N, C) int64
            self.label_difficult: np.ndarray | None = diff  # (N, C) bool, to be ignored in evaluation
        else:
            self.labels = self.label_difficult = None

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        """Path of image i: `JPEGImages/<id>.jpg`, or another image extension if that is what exists."""
        folder = self.year_dir / "JPEGImages"
        path = folder / f"{self.ids[i]}.jpg"
        if path.is_file():
            return path
        for candidate in sorted(folder.glob(f"{self.ids[i]}.*")):
            if candidate.suffix.lower() in IMAGE_EXTENSIONS:
                return candidate
        return path  # missing: load_rgb_or_skip reports it

    def target(self, i: int) -> Any:
        """The target of item i (no image decoding)."""
        image_id = self.ids[i]
        if self.task == "classification":
            return torch.from_numpy(self.labels[i].astype(np.float32))  # (C,)
        if self.task == "detection":
            ann = parse_annotation(self.year_dir / "Annotations" / f"{image_id}.xml", self.classes)
            return {
                "boxes": torch.from_numpy(ann["boxes"]),  # (N, 4)
                "labels": torch.from_numpy(ann["labels"]),  # (N,)
                "difficult": torch.from_numpy(ann["difficult"]),  # (N,)
                "image_id": image_id,
            }
        if self.task == "segmentation":
            mask_path = self.year_dir / "SegmentationClass" / f"{image_id}.png"
            mask = read_mask(mask_path, len(self.info.mask_classes))
            return torch.from_numpy(mask.astype(np.int64))  # (H, W)
        return None

    def __getitem__(self, i: int) -> Any:
        path = self.image_path(i)
        image = load_rgb_or_skip(path, self.min_size, self.strict)
        if image is None:
            return None
        target = self.target(i)
        if self.task == "segmentation" and tuple(target.shape) != (image.height, image.width):
            raise DatasetFormatError(
                f"{self.year_dir / 'SegmentationClass' / (self.ids[i] + '.png')}: mask is "
                f"{target.shape[1]}x{target.shape[0]} but {path} is {image.width}x{image.height}."
            )
        if self.transform is not None:
            return self.transform(image, target)
        return image, target


# ------------------------------------------------------------------------------------------- validation


def _image_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from the image file's header, or None when it cannot be opened (training skips and counts it)."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable image is the data loader's to skip, not this check's
        return None


def validate_voc_split(root: str | Path, split: str, task: str, year: int | str | None = None, limit: int = 5) -> int:
    """Read every annotation or mask a `task` run on `split` will use, before any training; return the number
    of image ids checked.

    detection, and classification when its labels come from the XML files (no complete set of per-class lists):
    every `Annotations/<id>.xml` parses, names known classes and has its boxes inside its <size>.
    segmentation: every `SegmentationClass/<id>.png` opens, holds only values below len(mask_classes) or 255,
    and has the size of its image. images: nothing beyond the split list. Images are not decoded (training
    skips and counts an unreadable one). Raises DatasetFormatError naming up to `limit` bad files, then a count.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    # The dataset resolves the split's ids exactly as training will (Main / Segmentation lists, fallbacks);
    # "images" reads classification's ids without parsing its labels, which would stop at the first bad file.
    dataset = VOCDataset(root, split=split, task="images" if task == "classification" else task, year=year)
    info, year_dir, ids = dataset.info, dataset.year_dir, dataset.ids
    from_xml = task == "detection" or (
        task == "classification"
        and len(_class_list_files(year_dir / "ImageSets" / "Main", info.classes, split)) < len(info.classes))
    problems: list[str] = []
    for k, image_id in enumerate(ids):
        try:
            if from_xml:
                parse_annotation(year_dir / "Annotations" / f"{image_id}.xml", info.classes)
            if task == "segmentation":
                mask_path = year_dir / "SegmentationClass" / f"{image_id}.png"
                mask = read_mask(mask_path, len(info.mask_classes))  # (H, W)
                size = _image_size(dataset.image_path(k))
                if size is not None and size != (mask.shape[1], mask.shape[0]):
                    raise DatasetFormatError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                             f"is {size[0]}x{size[1]}")
        except (DatasetFormatError, DatasetNotFoundError) as err:
            problems.append(str(err).replace(f"{year_dir}/", ""))  # paths relative to the year folder: shorter
    if problems:
        files = "annotation files" if from_xml else "masks"
        raise DatasetFormatError(f"{len(problems)} of the {len(ids)} {files} of split {split!r} in {year_dir} are "
                                 f"unusable: {list_problems(problems, limit)}")
    return len(ids)


OBJECT_CONTEXT = 1.3  # an object crop's side over the object's longer side: the object fills most of it


class ObjectCrops(Dataset):
    """Every non-difficult object of a VOC split as its own labelled image, like an object-centric set (ImageNet):
    items are `(PIL RGB crop, float32 (C,) one-hot label)`, or None for a skipped unreadable image.

    The crop is the object's box widened to a square of `context` times its longer side around the box centre
    (outside the image is black), so the object fills most of the crop whatever its size in the scene.
    `image_index[k]` is the index in `images` of crop k's image.

    `draw(k, g)` is the training view when `max_context` > `context`: the square's side is drawn log-uniformly
    from [context, max_context] times the object's longer side, the object is placed at random inside it, and
    the square is moved inside the image where it fits (so the object is seen at several scales and positions,
    without a black border the scenes never have).
    """

    def __init__(self, root: str | Path, split: str = "train", context: float = OBJECT_CONTEXT, strict: bool = False,
                 max_context: float | None = None):
        self.images = VOCDataset(root, split=split, task="detection", strict=strict)
        self.classes, self.context = self.images.classes, context
        self.max_context = context if max_context is None else max_context
        if self.max_context < context:
            raise ValueError(f"max_context {max_context} is below context {context}")
        self.objects: list[tuple[int, np.ndarray, int]] = []  # (image index, box x1y1x2y2, class)
        for i in range(len(self.images)):
            target = self.images.target(i)
            for box, label, difficult in zip(target["boxes"].numpy(), target["labels"].tolist(),
                                             target["difficult"].tolist()):
                if not difficult:
                    self.objects.append((i, box, label))
        self.image_index = [i for i, _, _ in self.objects]

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, k: int) -> Any:
        return self._crop(k, None)

    def draw(self, k: int, g: torch.Generator) -> Any:
        """Crop k with its context and placement drawn from `g` (nothing is drawn when max_context == context,
        so the fixed crop then leaves `g` as it was)."""
        return self._crop(k, g if self.max_context > self.context else None)

    def _crop(self, k: int, g: torch.Generator | None) -> Any:
        i, _, label = self.objects[k]
        image = load_rgb_or_skip(self.images.image_path(i), self.images.min_size, self.images.strict)
        if image is None:
            return None
        crop = image.crop(self.square(k, *image.size, g))
        target = torch.zeros(len(self.classes), dtype=torch.float32)  # (C,)
        target[label] = 1.0
        return crop, target

    def square(self, k: int, width: int, height: int, g: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """Crop k's square (left, top, right, bottom) in an image of `width` x `height`: centred on the box at
        `context` without `g`, drawn from `g` as `draw` says with it."""
        x1, y1, x2, y2 = self.objects[k][1]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if g is None:
            half = self.context * max(x2 - x1, y2 - y1) / 2
        else:
            u = torch.rand(3, generator=g).tolist()  # context, x placement, y placement
            context = self.context * (self.max_context / self.context) ** u[0]  # log-uniform
            half = context * max(x2 - x1, y2 - y1) / 2
            cx += (2 * u[1] - 1) * (half - (x2 - x1) / 2)  # the box stays inside the square
            cy += (2 * u[2] - 1) * (half - (y2 - y1) / 2)
            if 2 * half <= width:  # moving the square inside the image keeps the box inside it
                cx = min(max(cx, half), width - half)
            if 2 * half <= height:
                cy = min(max(cy, half), height - half)
        return round(cx - half), round(cy - half), round(cx + half), round(cy + half)
