"""Transfer tasks check what they need before training: bad files and folders stop them at once, in a few lines."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pretrain.data import DatasetFormatError
from transfer import classify, segment


def _copy(tiny_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc, root)
    return root


def _no_training(monkeypatch, module):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the inputs were checked")
    monkeypatch.setattr(module, "fit", fail)


def test_an_out_of_range_test_mask_stops_segmentation_before_training(tiny_voc, tmp_path, monkeypatch):
    root = _copy(tiny_voc, tmp_path)
    year = next(root.glob("VOC*"))
    mask_path = sorted((year / "SegmentationClass").glob("*.png"))[-1]  # one of the val images
    with Image.open(mask_path) as m:
        bad = np.array(m)
        palette = m.getpalette()
    bad[0, 0] = 77  # not a class of this dataset, not 255
    img = Image.fromarray(bad, mode="P")
    img.putpalette(palette)
    img.save(mask_path)
    _no_training(monkeypatch, segment)
    cfg = segment.SegmentConfig(data=str(root), train_split="trainval", test_split="trainval", epochs=1, batch_size=2,
                                workers=0, out=str(tmp_path / "out"))
    with pytest.raises(DatasetFormatError, match=mask_path.name):
        segment.main(cfg)


def test_an_unwritable_out_stops_classification_before_training(tiny_voc, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _no_training(monkeypatch, classify)
    cfg = classify.ClassifyConfig(data=str(tiny_voc), test_split="val", epochs=1, batch_size=2, workers=0,
                                  out=str(blocker / "run"))
    with pytest.raises(PermissionError, match="--out"):
        classify.main(cfg)


@pytest.mark.parametrize("module", ["transfer.classify", "transfer.segment", "transfer.retrieve"])
def test_a_missing_init_is_a_short_message_with_exit_2(tiny_voc, tmp_path, module):
    splits = ["--test-split", "val"] if module != "transfer.retrieve" else []
    run = subprocess.run([sys.executable, "-m", module, "--data", str(tiny_voc), *splits, "--init", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "nope" in run.stderr and "Traceback" not in run.stderr, run.stderr
