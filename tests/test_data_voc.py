"""pretrain.data.voc on real CamVid-VOC and labelme VOC files, the tiny generated set, and broken inputs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.images import DatasetNotFoundError, SkippedImageWarning, UnreadableImageError
from pretrain.data.voc import (
    VOC_CLASSES,
    VOCDataset,
    find_year_dir,
    image_labels,
    parse_annotation,
    read_mask,
    read_split_ids,
    read_voc_info,
)

CAMVID_THINGS = {"SignSymbol", "Car", "Pedestrian", "Bicyclist"}  # the only classes with boxes


@pytest.fixture(scope="module")
def camvid(shared_data):
    return shared_data / "camvid-voc"


@pytest.fixture(scope="module")
def voc_examples(shared_data):
    return shared_data / "voc-examples"


@pytest.fixture
def tiny_copy(tiny_voc, tmp_path):
    """A writable copy of tiny_voc for tests that break it."""
    return shutil.copytree(tiny_voc, tmp_path / "VOCdevkit")


def _xml(width=100, height=80, objects=""):
    return (
        f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def _obj(name="cat", box=("10", "20", "30", "40"), difficult="<difficult>0</difficult>"):
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box) if v is not None)
    return f"<object><name>{name}</name>{difficult}<bndbox>{tags}</bndbox></object>"


# ---------------------------------------------------------------------------------------------- CamVid


def test_camvid_info_and_splits(camvid):
    info = read_voc_info(camvid)
    assert info.year_dir == camvid / "VOC2007"
    assert len(info.classes) == 11 and info.classes[0] == "Sky" and info.classes[-1] == "Bicyclist"
    assert info.mask_classes == info.classes and not info.has_background
    assert len(read_split_ids(info.year_dir, "train")) == 367
    assert len(read_split_ids(info.year_dir, "trainval", "Segmentation")) == 468
    ds = VOCDataset(camvid, "train")
    assert len(ds) == 367 and ds.classes == info.classes and ds.ids[0] == "0001TP_006690"


def test_camvid_masks(camvid):
    ds = VOCDataset(camvid, "train", task="segmentation")
    allowed = set(range(11)) | {255}
    for i in (0, 100, 366):
        image, mask = ds[i]
        assert image.mode == "RGB" and image.size == (480, 360)
        assert mask.dtype == torch.int64 and mask.shape == (360, 480)
        assert set(mask.unique().tolist()) <= allowed
    assert 255 in ds[0][1]  # void kept, not mapped to a class


def test_camvid_boxes_inside_image_with_difficult_flags(camvid):
    info = read_voc_info(camvid)
    ids = read_split_ids(info.year_dir, "train")
    n_difficult = n_boxes = 0
    for image_id in ids:
        ann = parse_annotation(info.year_dir / "Annotations" / f"{image_id}.xml", info.classes)
        assert ann["size"] == (360, 480)
        boxes = ann["boxes"]
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 480).all() and (boxes[:, 3] <= 360).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert {info.classes[k] for k in ann["labels"]} <= CAMVID_THINGS
        n_difficult += int(ann["difficult"].sum())
        n_boxes += len(boxes)
    # README: train has 1624 + 1226 + 928 + 198 boxes, 880 + 304 + 327 + 56 difficult
    assert (n_boxes, n_difficult) == (3976, 1567)
    # first box of the first image: <xmin>122 <ymin>92 <xmax>155 <ymax>169 (1-based inclusive)
    first = parse_annotation(info.year_dir / "Annotations" / "0001TP_006690.xml", info.classes)
    assert first["boxes"][0].tolist() == [121, 91, 155, 169]


def test_camvid_classification_matches_class_lists(camvid):
    ds = VOCDataset(camvid, "train", task="classification")
    main = ds.year_dir / "ImageSets" / "Main"
    assert ds.labels.shape == (367, 11) and ds.labels.sum(0).tolist()[:3] == [365, 357, 252]  # README counts
    for name in ("Sky", "Fence", "Car", "Bicyclist"):
        truth = dict(line.split() for line in (main / f"{name}_train.txt").read_text().splitlines())
        c = ds.classes.index(name)
        for i in (0, 5, 50, 200, 366):
            _, target = ds[i]
            assert target.dtype == torch.float32 and target.shape == (11,)
            assert target[c].item() == (1.0 if truth[ds.ids[i]] == "1" else 0.0)


# -------------------------------------------------------------------------------------- labelme (VOC12)


def test_voc_examples_labelme_files(voc_examples):
    info = read_voc_info(voc_examples)
    assert info.year_dir.name == "VOC2012"
    assert info.mask_classes[0] == "_background_" and info.has_background
    assert len(info.classes) == 20 and "person" in info.classes and "potted plant" in info.classes
    ds = VOCDataset(voc_examples, "trainval", task="detection")
    assert ds.ids == ["2011_000003", "2011_000006", "2011_000025"]
    person = info.classes.index("person")
    image, target = ds[0]
    assert image.size == (500, 338)
    assert target["labels"].tolist() == [person, person]
    # labelme float coordinates survive: <ymin>107.369...</ymin> -> 106.369 (0-based)
    assert target["boxes"][0].tolist() == pytest.approx([190.0, 106.369, 313.0, 329.369], abs=1e-3)
    assert not target["difficult"].any()  # empty <difficult/> = 0
    assert [info.classes[k] for k in ds[2][1]["labels"]] == ["bus", "bus", "car"]


def test_voc_examples_labels_from_annotations_and_masks(voc_examples):
    ds = VOCDataset(voc_examples, "trainval", task="classification")  # no <cls>_trainval.txt: from XMLs
    names = [[ds.classes[c] for c in np.flatnonzero(row)] for row in ds.labels]
    assert names == [["person"], ["person"], ["bus", "car"]]
    seg = VOCDataset(voc_examples, "trainval", task="segmentation")
    _, mask = seg[0]
    assert mask.shape == (338, 500)
    values = set(mask.unique().tolist())
    assert values <= set(range(21)) | {255} and seg.info.mask_classes.index("person") in values


def test_missing_split_lists_existing_ones(voc_examples):
    with pytest.raises(DatasetNotFoundError) as info:
        VOCDataset(voc_examples, "train")
    msg = str(info.value)
    assert "train.txt" in msg and "trainval" in msg and str(voc_examples / "VOC2012") in msg


# ------------------------------------------------------------------------------- same structure everywhere


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation", "images"])
def test_same_structures_on_all_datasets(task, camvid, voc_examples, tiny_voc):
    items = [
        VOCDataset(root, split, task=task)[0]
        for root, split in ((camvid, "train"), (voc_examples, "trainval"), (tiny_voc, "trainval"))
    ]
    for image, target in items:
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        if task == "classification":
            assert isinstance(target, torch.Tensor) and target.dtype == torch.float32 and target.ndim == 1
            assert set(target.unique().tolist()) <= {0.0, 1.0}
        elif task == "detection":
            assert set(target) == {"boxes", "labels", "difficult", "image_id"}
            assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
            assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
            assert len(target["boxes"]) == len(target["labels"]) == len(target["difficult"]) > 0
            assert isinstance(target["image_id"], str)
        elif task == "segmentation":
            assert target.dtype == torch.int64 and tuple(target.shape) == (image.height, image.width)
        else:
            assert target is None


# ------------------------------------------------------------------------------------------- tiny_voc


def test_tiny_voc_layout_and_year_dir(tiny_voc):
    year_dir = tiny_voc / "VOC2007"
    assert find_year_dir(tiny_voc) == year_dir  # a VOCdevkit
    assert find_year_dir(year_dir) == year_dir  # the year folder itself
    assert find_year_dir(tiny_voc.parent) == year_dir  # a folder holding VOCdevkit
    info = read_voc_info(tiny_voc)
    assert info.classes == ("circle", "square", "triangle")
    assert info.mask_classes == ("background", "circle", "square", "triangle")


def test_tiny_voc_targets(tiny_voc):
    det = VOCDataset(tiny_voc, "val", task="detection")
    _, target = det[0]  # img_004: square (8,8)-(31,39), triangle (36,6)-(61,35), 0-based inclusive
    assert target["image_id"] == "img_004"
    assert target["boxes"].tolist() == [[8, 8, 32, 40], [36, 6, 62, 36]]
    assert target["labels"].tolist() == [1, 2]
    seg = VOCDataset(tiny_voc, "val", task="segmentation")
    _, mask = seg[0]
    assert mask[20, 20].item() == 2 and mask[8, 8].item() == 255 and mask[0, 0].item() == 0  # square+1


def test_difficult_only_labels_files_and_annotations_agree(tiny_voc):
    year_dir = tiny_voc / "VOC2007"
    ids = read_split_ids(year_dir, "trainval")
    classes = read_voc_info(tiny_voc).classes
    from_files = image_labels(year_dir, ids, classes, "trainval", source="files", return_difficult=True)
    from_xml = image_labels(year_dir, ids, classes, "trainval", source="annotations", return_difficult=True)
    np.testing.assert_array_equal(from_files[0], from_xml[0])
    np.testing.assert_array_equal(from_files[1], from_xml[1])
    labels, difficult = from_files
    assert labels.dtype == np.int64 and labels.shape == (6, 3)
    # img_005 holds only a difficult triangle (VOC value 0): absent in the labels, flagged difficult
    assert labels[5].tolist() == [0, 0, 0] and difficult[5].tolist() == [False, False, True]
    assert labels[3].tolist() == [1, 0, 0] and difficult[3].tolist() == [False, False, True]
    ds = VOCDataset(tiny_voc, "trainval")
    assert ds[5][1].tolist() == [0.0, 0.0, 0.0] and ds.label_difficult[5, 2]


def test_transform_gets_image_and_target(tiny_voc):
    ds = VOCDataset(tiny_voc, "train", task="detection", transform=lambda img, t: (img.size, len(t["boxes"])))
    assert ds[0] == ((64, 48), 2)


def test_segmentation_falls_back_to_main(tiny_copy):
    (tiny_copy / "VOC2007" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    (tiny_copy / "VOC2007" / "SegmentationClass" / "img_005.png").unlink()
    ds = VOCDataset(tiny_copy, "val", task="segmentation")
    assert ds.ids == ["img_004"]  # Main's val, only ids with a mask


def test_several_years_pick_highest_or_asked(tiny_copy):
    shutil.copytree(tiny_copy / "VOC2007", tiny_copy / "VOC2012")
    assert find_year_dir(tiny_copy).name == "VOC2012"
    assert find_year_dir(tiny_copy, year=2007).name == "VOC2007"
    assert VOCDataset(tiny_copy, "train", year="2007").year_dir.name == "VOC2007"
    with pytest.raises(DatasetNotFoundError, match="VOC2010"):
        find_year_dir(tiny_copy, year=2010)


def test_unreadable_image_skipped_or_strict(tiny_copy):
    (tiny_copy / "VOC2007" / "JPEGImages" / "img_001.jpg").write_text("not a jpeg")
    ds = VOCDataset(tiny_copy, "train", task="detection")
    with pytest.warns(SkippedImageWarning, match="img_001.jpg"):
        assert ds[1] is None
    assert ds[0] is not None
    with pytest.raises(UnreadableImageError, match="img_001.jpg"):
        VOCDataset(tiny_copy, "train", task="detection", strict=True)[1]


# --------------------------------------------------------------------------------------- broken inputs


def test_class_names_match_loosely(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml(objects=_obj("Potted Plant") + _obj("tv/monitor") + _obj("DiningTable")))
    ann = parse_annotation(path, VOC_CLASSES)
    assert [VOC_CLASSES[k] for k in ann["labels"]] == ["pottedplant", "tvmonitor", "diningtable"]
    labelme_names = ("potted plant", "tv/monitor", "diningtable")
    assert parse_annotation(path, labelme_names)["labels"].tolist() == [0, 1, 2]


def test_no_objects_and_empty_difficult(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml())
    ann = parse_annotation(path, VOC_CLASSES)
    assert ann["boxes"].shape == (0, 4) and ann["labels"].shape == (0,) and ann["difficult"].dtype == bool
    path.write_text(_xml(objects=_obj(difficult="<difficult/>") + _obj(difficult="<difficult>1</difficult>")))
    assert parse_annotation(path, VOC_CLASSES)["difficult"].tolist() == [False, True]


@pytest.mark.parametrize(
    "objects, field",
    [
        (_obj(box=("10", "20", None, "40")), "xmax"),  # missing bndbox field
        (_obj(box=("10", "20", "", "40")), "xmax"),  # empty bndbox field
        ("<object><name>cat</name></object>", "bndbox"),
        (_obj(box=("10", "20", "130", "40")), "outside"),  # 30 px beyond the 100 px wide image
        (_obj(box=("-5", "20", "30", "40")), "outside"),
        (_obj(box=("30", "20", "10", "40")), "empty"),
        (_obj(name="unicorn"), "unicorn"),
        (_obj(name=""), "name"),
    ],
)
def test_bad_annotations_name_file_and_field(tmp_path, objects, field):
    path = tmp_path / "bad.xml"
    path.write_text(_xml(objects=objects))
    with pytest.raises(ValueError, match=field) as info:
        parse_annotation(path, VOC_CLASSES)
    assert str(path) in str(info.value)


def test_bad_xml_files(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<annotation><size>")
    with pytest.raises(ValueError, match="not valid XML") as info:
        parse_annotation(path, VOC_CLASSES)
    assert str(path) in str(info.value)
    path.write_text("<annotation><object/></annotation>")
    with pytest.raises(ValueError, match="size") as info:
        parse_annotation(path, VOC_CLASSES)
    assert str(path) in str(info.value)


def test_boxes_slightly_outside_are_clipped(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml(objects=_obj(box=("0", "0.5", "101", "80.9"))))  # e.g. labelme's 0-based xmin
    assert parse_annotation(path, VOC_CLASSES)["boxes"].tolist() == [[0, 0, 100, 80]]


def test_bad_masks_name_file_and_values(tmp_path):
    mask = Image.new("P", (20, 10), 0)
    mask.putpalette([0, 0, 0] * 256)
    mask.paste(3, (0, 0, 5, 5))
    mask.paste(12, (5, 0, 10, 5))
    mask.paste(255, (10, 0, 15, 5))
    mask.save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", 13).dtype == np.uint8
    with pytest.raises(ValueError, match=r"\[12\]") as info:
        read_mask(tmp_path / "m.png", 11)
    assert str(tmp_path / "m.png") in str(info.value) and "Fix" in str(info.value)
    mask.convert("RGB").save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode 'RGB'") as info:
        read_mask(tmp_path / "rgb.png", 21)
    assert str(tmp_path / "rgb.png") in str(info.value)


def test_mask_out_of_range_in_dataset(tiny_copy):
    path = tiny_copy / "VOC2007" / "SegmentationClass" / "img_000.png"
    with Image.open(path) as img:
        arr = np.array(img)
        palette = img.getpalette()
    arr[0, 0] = 7  # tiny_voc has mask values 0..3
    bad = Image.fromarray(arr, mode="P")
    bad.putpalette(palette)
    bad.save(path)
    with pytest.raises(ValueError, match=r"\[7\]") as info:
        VOCDataset(tiny_copy, "train", task="segmentation")[0]
    assert str(path) in str(info.value)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        VOCDataset(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "JPEGImages" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="VOC<year>") as info:
        read_voc_info(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(ValueError, match="task"):
        VOCDataset(tmp_path, task="keypoints")
