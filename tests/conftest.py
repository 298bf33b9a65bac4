"""Shared fixtures: the real read-only data (`shared_data`) and a tiny generated VOC set (`tiny_voc`)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pretrain.data.synthetic import voc_palette

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # make `import pretrain` / `import transfer` work without installing
    sys.path.insert(0, str(REPO_ROOT))

# tiny_voc's ground truth, for tests that want to compare against it.
TINY_VOC_CLASSES = ("circle", "square", "triangle")
TINY_VOC_SIZE = (48, 64)  # (H, W)
TINY_VOC_SPLITS = {"train": ["img_000", "img_001", "img_002", "img_003"], "val": ["img_004", "img_005"]}
# id -> list of (class name, x0, y0, x1, y1 inclusive 0-based pixel box, difficult)
TINY_VOC_OBJECTS: dict[str, list[tuple[str, int, int, int, int, bool]]] = {
    "img_000": [("circle", 4, 4, 23, 23, False), ("square", 34, 10, 57, 33, False)],
    "img_001": [("square", 0, 0, 19, 19, False)],  # touches the image corner
    "img_002": [("triangle", 10, 8, 41, 39, False), ("circle", 45, 30, 62, 47, False)],  # at bottom
    "img_003": [("circle", 20, 10, 39, 29, False), ("triangle", 50, 2, 56, 8, True)],
    "img_004": [("square", 8, 8, 31, 39, False), ("triangle", 36, 6, 61, 35, False)],
    "img_005": [("triangle", 30, 30, 36, 36, True)],  # only a difficult object: VOC label 0
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the read-only real data (../shared/data beside the repo root)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.fail(
            f"real data folder {path} is missing: the tests expect ../shared/data beside the repo root "
            "(imagenet-sample/, camvid-voc/, voc-examples/). Link it there; never copy it into the repo."
        )
    return path


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill, outline=None) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill, outline=outline)


def write_tiny_voc(root: Path) -> Path:
    """Write the tiny VOC-layout set under `root/VOCdevkit/VOC2007` and return `root/VOCdevkit`."""
    year_dir = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (year_dir / sub).mkdir(parents=True, exist_ok=True)
    (year_dir / "labels.txt").write_text("background\n" + "\n".join(TINY_VOC_CLASSES) + "\n")
    height, width = TINY_VOC_SIZE
    colours = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (40, 60, 220)}
    rng = np.random.default_rng(0)
    for image_id, objects in TINY_VOC_OBJECTS.items():
        noise = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)  # (H, W, 3) grey noise
        image = Image.fromarray(noise, mode="RGB")
        mask = Image.new("P", (width, height), 0)
        mask.putpalette(voc_palette())
        img_draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        xml_objects = []
        for name, x0, y0, x1, y1, difficult in objects:
            value = TINY_VOC_CLASSES.index(name) + 1  # mask value: background is 0
            _draw(img_draw, name, (x0, y0, x1, y1), colours[name])
            _draw(mask_draw, name, (x0, y0, x1, y1), value, outline=255)  # VOC-style void border
            xml_objects.append(
                f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n"
                f"    <truncated>0</truncated>\n    <difficult>{int(difficult)}</difficult>\n"
                f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax>"
                f"<ymax>{y1 + 1}</ymax></bndbox>\n  </object>\n"  # VOC boxes: 1-based inclusive
            )
        image.save(year_dir / "JPEGImages" / f"{image_id}.jpg", quality=95)
        mask.save(year_dir / "SegmentationClass" / f"{image_id}.png")
        (year_dir / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>\n  <folder>VOC2007</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"
            f"  <segmented>1</segmented>\n{''.join(xml_objects)}</annotation>\n"
        )
    splits = dict(TINY_VOC_SPLITS, trainval=TINY_VOC_SPLITS["train"] + TINY_VOC_SPLITS["val"])
    for split, ids in splits.items():
        for task in ("Main", "Segmentation"):
            (year_dir / "ImageSets" / task / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name in TINY_VOC_CLASSES:
            lines = []
            for image_id in ids:
                flags = [d for n, *_, d in TINY_VOC_OBJECTS[image_id] if n == name]
                value = -1 if not flags else (0 if all(flags) else 1)  # VOC: 0 = only difficult objects
                lines.append(f"{image_id} {value:2d}")
            (year_dir / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root / "VOCdevkit"


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A 6-image VOC-layout dataset (64x48 JPEGs, 3 classes + background, boxes, palette masks with a 255
    border, Main + Segmentation splits train/val/trainval, per-class lists). Returns the VOCdevkit folder
    (holding VOC2007/); ground truth is in TINY_VOC_* above."""
    return write_tiny_voc(tmp_path_factory.mktemp("tiny_voc"))


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory, tiny_voc) -> Path:
    """A context-encoder run folder (runs/<name>/ layout) trained for 2 steps on `tiny_voc`, for --init tests."""
    from pretrain.main_pretrain import PretrainConfig, main

    out = tmp_path_factory.mktemp("runs")
    cfg = PretrainConfig(name="tiny-ce", output_dir=str(out), data=str(tiny_voc), steps=2, batch_size=4, workers=0,
                         eval_images=2, lambda_adv=0.0, amp="none", log_every=1, ckpt_every=1)
    main(cfg)
    return out / "tiny-ce"
