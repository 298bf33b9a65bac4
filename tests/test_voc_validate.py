"""validate_voc_split reads every annotation / mask of a split up front and names each bad file."""
import numpy as np
import pytest
from PIL import Image

from pretrain.data import DatasetFormatError, validate_voc_split
from pretrain.errors import UserError
from tests.conftest import TINY_VOC_SPLITS, write_tiny_voc


@pytest.fixture
def voc(tmp_path):
    return write_tiny_voc(tmp_path)  # a fresh copy: each test damages it


def test_a_clean_split_passes_and_counts_its_ids(voc):
    assert validate_voc_split(voc, "train", "detection") == len(TINY_VOC_SPLITS["train"])
    assert validate_voc_split(voc, "val", "segmentation") == len(TINY_VOC_SPLITS["val"])


def test_malformed_xml_and_out_of_range_box_and_unknown_class_are_each_named(voc):
    ann = voc / "VOC2007" / "Annotations"
    (ann / "img_000.xml").write_text("<annotation><size>")  # truncated
    text = (ann / "img_001.xml").read_text()
    (ann / "img_001.xml").write_text(text.replace("<xmax>20</xmax>", "<xmax>200</xmax>"))  # 64 px wide image
    (ann / "img_003.xml").write_text((ann / "img_003.xml").read_text().replace("circle", "hexagon"))
    with pytest.raises(DatasetFormatError) as info:
        validate_voc_split(voc, "train", "detection")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "3 of the 4 annotation files" in message
    assert "img_000.xml: not valid XML" in message
    assert "img_001.xml" in message and "outside" in message
    assert "img_003.xml" in message and "hexagon" in message
    assert "img_002" not in message


def test_mask_value_beyond_the_classes_is_named(voc):
    png = voc / "VOC2007" / "SegmentationClass" / "img_005.png"
    mask = np.array(Image.open(png))  # (H, W) palette indices
    mask[0, 0] = 7  # tiny_voc has background + 3 classes: 0..3 and 255 are valid
    Image.fromarray(mask, mode="L").save(png)
    with pytest.raises(DatasetFormatError, match=r"1 of the 2 masks.*img_005\.png: mask values \[7\]"):
        validate_voc_split(voc, "val", "segmentation")


def test_more_than_the_limit_are_counted_not_listed(voc):
    for image_id in TINY_VOC_SPLITS["train"]:
        (voc / "VOC2007" / "Annotations" / f"{image_id}.xml").write_text("not xml")
    with pytest.raises(DatasetFormatError) as info:
        validate_voc_split(voc, "train", "detection", limit=2)
    message = str(info.value)
    assert message.count("not valid XML") == 2 and message.endswith("and 2 more")
