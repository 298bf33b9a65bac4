"""The object probe: every annotated object as its own single-label image, probed like whole images."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import TINY_VOC_CLASSES, TINY_VOC_OBJECTS, TINY_VOC_SPLITS

from pretrain.data import ObjectCrops
from pretrain.errors import BadOptionError
from transfer import object_probe
from transfer.object_probe import ObjectProbeConfig, object_subset


def _train_objects() -> list[str]:
    """Class names of the tiny set's non-difficult training objects, in split order."""
    return [name for i in TINY_VOC_SPLITS["train"] for name, *_, difficult in TINY_VOC_OBJECTS[i] if not difficult]


def test_object_subset_is_fixed_and_its_targets_are_the_objects_classes(tiny_voc):
    objects = ObjectCrops(tiny_voc, "train")
    names = _train_objects()
    everything, targets = object_subset(objects, 0)
    assert len(everything) == len(names) == 6
    assert [TINY_VOC_CLASSES[c] for c in targets.argmax(1)] == names and (targets.sum(1) == 1).all()
    part, part_targets = object_subset(objects, 4)
    again, _ = object_subset(ObjectCrops(tiny_voc, "train"), 4)
    assert part.indices == again.indices and len(part.indices) == 4 and part.indices == sorted(part.indices)
    np.testing.assert_array_equal(part_targets, targets[part.indices])  # the same objects for every start and seed


def test_object_probe_fits_and_scores_on_objects(tiny_voc, tmp_path):
    cfg = ObjectProbeConfig(data=str(tiny_voc), test_split="val", layers=("conv1", "pool5"), costs=(0.1, 10.0),
                            cv_folds=2, workers=0, n_jobs=1, knn_k=3, out=str(tmp_path / "objects"))
    object_probe.main(cfg)
    saved = json.loads((tmp_path / "objects" / "metrics.json").read_text())
    assert saved["task"] == "object_probe"
    assert json.loads((tmp_path / "objects" / "config.json").read_text())["context"] == 1.3
    for layer in ("conv1", "pool5"):
        top1 = saved["scores"][f"{layer}/knn_top1"]  # every object has one label, so top-1 is defined
        assert top1 in (0.0, 0.5, 1.0)  # two test objects
    with open(tmp_path / "objects" / "per_class.csv") as f:
        positives = {r["class"]: int(r["num_positives"]) for r in csv.DictReader(f) if r["layer"] == "pool5"}
    assert positives == {"circle": 0, "square": 1, "triangle": 1}  # val's non-difficult objects, one image each


@pytest.mark.parametrize("option, message", [({"context": 0.5}, "--context 0.5"), ({"max_objects": -1}, "--max-objects -1")])
def test_object_probe_refuses_bad_options_before_any_work(tiny_voc, tmp_path, option, message):
    with pytest.raises(BadOptionError, match=message):
        object_probe.main(ObjectProbeConfig(data=str(tiny_voc), out=str(tmp_path / "x"), **option))
    assert not (tmp_path / "x").exists()
