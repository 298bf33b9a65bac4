"""pretrain.data.images: every image mode -> RGB, bad files -> UnreadableImageError, skipping datasets."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.images import (
    IMAGE_EXTENSIONS,
    DatasetNotFoundError,
    ImageFolderDataset,
    SkippedImageWarning,
    UnreadableImageError,
    list_images,
    load_rgb,
    skip_none_collate,
)


def _rgb(path) -> np.ndarray:
    img = load_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img)  # (H, W, 3)


# ------------------------------------------------------------------------------------------ conversions


def test_greyscale_modes_become_rgb(tmp_path):
    Image.new("L", (20, 18), 77).save(tmp_path / "l.png")
    Image.new("LA", (20, 18), (200, 0)).save(tmp_path / "la.png")
    Image.new("1", (20, 18), 1).save(tmp_path / "one.png")
    grey = _rgb(tmp_path / "l.png")
    assert grey.shape == (18, 20, 3) and (grey == 77).all()
    assert (_rgb(tmp_path / "la.png") == 200).all()  # alpha dropped, grey kept
    assert (_rgb(tmp_path / "one.png") == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
    pixel = _rgb(tmp_path / "cmyk.jpg")[16, 16].astype(int)
    assert np.abs(pixel - [255, 0, 0]).max() <= 3  # pure magenta+yellow ink = red


def test_rgba_png_drops_alpha(tmp_path):
    Image.new("RGBA", (20, 20), (10, 120, 250, 0)).save(tmp_path / "rgba.png")
    assert (_rgb(tmp_path / "rgba.png") == [10, 120, 250]).all()


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.array([0, 257, 32896, 65535], dtype=np.uint16)
    arr = np.repeat(np.repeat(values[None, :], 20, axis=0), 5, axis=1)  # (20, 20) four 5-px columns
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
    out = _rgb(tmp_path / "g16.png")
    assert out[0, ::5, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_palette_png_becomes_rgb_colours(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 10, 20))
    img.paste(2, (10, 0, 20, 20))
    img.save(tmp_path / "p.png")
    out = _rgb(tmp_path / "p.png")
    assert out[5, 2].tolist() == [10, 20, 30] and out[5, 15].tolist() == [200, 100, 50]
    img.save(tmp_path / "pt.png", transparency=0)  # palette transparency must not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _rgb(tmp_path / "pt.png")[5, 15].tolist() == [200, 100, 50]


def test_upper_case_extension_listed(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.JPEG", format="JPEG")
    Image.new("RGB", (20, 20)).save(tmp_path / "b.webp")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / ".hidden" / "c.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPEG", "b.webp"]
    assert ".webp" in IMAGE_EXTENSIONS


# ------------------------------------------------------------------------------------------- bad files


def _bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    return ["truncated.jpg", "empty.jpg", "text.jpg", "tiny.png"]


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.jpg", "text.jpg", "tiny.png", "missing.jpg"])
def test_unreadable_files_raise_naming_the_file(tmp_path, name):
    _bad_files(tmp_path)
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)
    assert "Fix:" in str(info.value)
    assert isinstance(info.value, ValueError)
    if name == "tiny.png":
        assert "too small" in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))  # must survive DataLoader worker processes
    assert str(clone) == str(info.value)


def test_min_size_is_configurable(tmp_path):
    Image.new("RGB", (10, 30)).save(tmp_path / "tiny.png")
    assert load_rgb(tmp_path / "tiny.png", min_size=8).size == (10, 30)


def test_folder_dataset_skips_with_warning_and_collate_counts(tmp_path):
    bad = _bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, transform=lambda img: torch.zeros(3, 8, 8))
    assert len(ds) == 5 and ds.classes == [] and ds.targets == [-1] * 5
    items = []
    for i, path in enumerate(ds.files):
        if path.name in bad:
            with pytest.warns(SkippedImageWarning, match=path.name):
                items.append(ds[i])
            assert items[-1] is None
        else:
            items.append(ds[i])
    batch, n_skipped = skip_none_collate(items)
    assert n_skipped == 4 and batch.shape == (1, 3, 8, 8)
    assert skip_none_collate([None, None]) == (None, 2)
    pairs, n = skip_none_collate([(1, {"a": 1}), None], collate=lambda b: list(zip(*b)))
    assert n == 1 and pairs == [(1,), ({"a": 1},)]


def test_folder_dataset_strict_raises(tmp_path):
    _bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, strict=True)
    i = [p.name for p in ds.files].index("text.jpg")
    with pytest.raises(UnreadableImageError, match="text.jpg"):
        ds[i]


def test_class_subfolders(tmp_path):
    for cls, n in (("dog", 2), ("cat", 1)):
        (tmp_path / cls).mkdir()
        for k in range(n):
            Image.new("RGB", (20, 20), (k, 0, 0)).save(tmp_path / cls / f"{k}.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1, 1]
    assert isinstance(ds[0], Image.Image) and ds[0].mode == "RGB"


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetNotFoundError) as info:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value) and "found none" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


# ------------------------------------------------------------------------------------------- real data


def test_imagenet_sample(shared_data):
    root = shared_data / "imagenet-sample"
    ds = ImageFolderDataset(root)
    assert len(ds.files) == 1000 and ds.classes == []
    assert ds.files[0].name == "n01440764_tench.JPEG"
    greys = []  # README: 23 greyscale JPEGs
    for path in ds.files:
        with Image.open(path) as img:  # header only
            if img.mode == "L":
                greys.append(path)
        if len(greys) == 2:
            break
    for path in [ds.files[0], ds.files[-1], *greys]:
        img = load_rgb(path)
        assert img.mode == "RGB" and min(img.size) >= 16
    assert len(greys) == 2
