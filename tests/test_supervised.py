"""Supervised pretraining (`--objective supervised`), the positive control: it learns labels from pixels, never
trains on an evaluation image, and its checkpoint is a trunk every transfer task can load."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from pretrain.checkpoint import list_checkpoints
from pretrain.data import DatasetNotFoundError, LabelledImageFolder, ObjectCrops, image_paths, open_labelled_images
from pretrain.data.synthetic import SYNTHETIC_CLASSES, builtin_voc_root, image_hashes
from pretrain.errors import UserError
from pretrain.main_pretrain import PretrainConfig, main
from pretrain.models import build_encoder
from pretrain.supervised import LabelledCropDataset, SupervisedClassifier, multilabel_loss, supervised_train_step
from transfer.trunk import build_trunk

BUILTIN_IMAGES = 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cfg(tmp_path, data, **kw):
    base = dict(output_dir=str(tmp_path), data=str(data), objective="supervised", batch_size=4, workers=0,
                eval_images=0, amp="none", channels_last=False, log_every=1, ckpt_every=2)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_loss_is_bce_summed_over_classes_and_averaged_over_images():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])  # (B=2, C=2)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_entry = [np.log(2), np.log(1 + np.exp(2)), np.log(1 + np.exp(-1)), np.log(1 + np.exp(-0.5))]
    expected = (per_entry[0] + per_entry[1] + per_entry[2] + per_entry[3]) / 2
    assert multilabel_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_fits_built_in_labels_below_the_best_constant_guess(cache):
    """On 8 built-in images the loss must fall far below that of the best image-independent prediction (each
    class's frequency on the batch): falling to that level learns only the class prior, below it the labels come
    from the pixels. Small crops (99 px: pool5 is 2x2) keep it fast; the layers are the same."""
    images = open_labelled_images("builtin", cache, BUILTIN_IMAGES).train
    data = LabelledCropDataset(images, crop_size=99, resize=111, train=False)
    batch = default_collate([data[i] for i in range(8)])  # input (8, 3, 99, 99), labels (8, C)
    p = batch["labels"].mean(0).clamp(1e-6, 1 - 1e-6)  # (C,)
    prior_loss = -(p * p.log() + (1 - p) * (1 - p).log()).sum().item()
    torch.manual_seed(0)
    model = SupervisedClassifier(build_encoder("alexnet"), SYNTHETIC_CLASSES, input_size=99, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [supervised_train_step(model, batch, optimizer, scaler, "none", torch.device("cpu"))["loss"]
              for _ in range(20)]
    assert losses[0] > prior_loss and min(losses[-3:]) < 0.5 * prior_loss, (prior_loss, losses)


@pytest.mark.parametrize("object_crops", [True, False])
def test_built_in_training_data_never_includes_an_evaluation_image(cache, object_crops):
    labelled = open_labelled_images("builtin", cache, BUILTIN_IMAGES, object_crops=object_crops)
    assert labelled.classes == SYNTHETIC_CLASSES
    evaluation = image_hashes(builtin_voc_root(cache, BUILTIN_IMAGES))  # every split of the evaluation set
    used = sorted({path for ds in (labelled.train, labelled.held_out) for path in image_paths(ds)})
    assert len(used) == round(0.8 * BUILTIN_IMAGES)  # its train and val splits
    trained_on = {hashlib.sha256(path.read_bytes()).hexdigest() for path in used}
    assert len(trained_on) == len(used) and trained_on.isdisjoint(evaluation)


def test_run_trains_resumes_and_its_checkpoint_is_a_trunk(tmp_path, tiny_voc):
    main(_cfg(tmp_path, tiny_voc, name="straight", steps=4))
    main(_cfg(tmp_path, tiny_voc, name="resumed", steps=4, stop_at=2))
    main(_cfg(tmp_path, tiny_voc, name="resumed", steps=4, resume=True))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert len(straight) == 4 and straight == pytest.approx(resumed, rel=1e-6, abs=1e-7)

    run = tmp_path / "straight"
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["ap"]) <= {"circle", "square", "triangle"} and 0 <= ev["map"] <= 1 and 0 < ev["chance_map"] < 1
    assert ev["images"] == 2 and not (run / "samples").exists()  # img_004's two objects
    ckpt = torch.load(list_checkpoints(run)[-1], weights_only=False)
    assert ckpt["config"]["objective"] == "supervised" and ckpt["model"]["head.weight"].shape == (3, 4096)
    trunk, info = build_trunk(str(run))
    assert info["step"] == 4
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, ckpt["model"][f"encoder.{key}"]), key
    assert not torch.equal(trunk.conv1.weight, build_trunk("random")[0].conv1.weight)


def test_object_crops_are_every_non_difficult_object_labelled_with_its_class(tiny_voc):
    crops = ObjectCrops(tiny_voc, "train", context=1.5)
    # img_000: circle, square; img_001: square; img_002: triangle, circle; img_003: circle (its triangle is difficult)
    assert crops.image_index == [0, 0, 1, 2, 2, 3]
    names = [crops.classes[int(crops[k][1].argmax())] for k in range(len(crops))]
    assert names == ["circle", "square", "square", "triangle", "circle", "circle"]
    assert all(crops[k][1].sum() == 1 for k in range(len(crops)))  # one-hot
    image, _ = crops[0]  # circle (4, 4)-(23, 23) in VOC's 1-based pixels: 20 px wide, widened 1.5x
    assert image.size == (30, 30)
    assert len(ObjectCrops(tiny_voc, "val")) == 2


def test_drawn_object_crops_vary_in_scale_and_place_but_always_hold_the_object(tiny_voc):
    fixed = ObjectCrops(tiny_voc, "train")
    g = torch.Generator().manual_seed(0)
    assert fixed.draw(1, g)[0].size == fixed[1][0].size  # max_context == context: the centred crop ...
    assert torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=torch.Generator().manual_seed(0)))  # ... g untouched
    crops = ObjectCrops(tiny_voc, "train", max_context=3.0)
    sides, centres = [], set()
    for seed in range(40):
        for k in range(len(crops)):
            x1, y1, x2, y2 = crops.objects[k][1]
            left, top, right, bottom = crops.square(k, 64, 48, torch.Generator().manual_seed(seed))  # tiny_voc: 64x48
            side = max(x2 - x1, y2 - y1)
            assert abs((right - left) - (bottom - top)) <= 1 and 1.3 * side - 1 <= right - left <= 3.0 * side + 1
            assert left <= x1 + 1 and top <= y1 + 1 and right >= x2 - 1 and bottom >= y2 - 1  # the object is inside
            if right - left <= 48:
                assert 0 <= top and bottom <= 48  # fits: no black border
            sides.append(right - left)
            centres.add((k, round((left + right) / 2 - (x1 + x2) / 2)))
    assert max(sides) > 2 * min(sides) and len(centres) > 3 * len(crops)
    same = [crops.square(0, 64, 48, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same[0] == same[1]  # a pure function of the generator: resumes see the same crops
    with pytest.raises(ValueError, match="below context"):
        ObjectCrops(tiny_voc, "train", max_context=1.0)


def test_centred_epochs_come_first_then_the_drawn_crops(tiny_voc):
    drawn = ObjectCrops(tiny_voc, "train", max_context=3.0)
    common = {"crop_size": 32, "resize": 40, "seed": 0, "train": True}
    curriculum = LabelledCropDataset(drawn, centred_epochs=1, **common)
    always_drawn = LabelledCropDataset(drawn, **common)
    centred = LabelledCropDataset(ObjectCrops(tiny_voc, "train"), **common)
    keys = range(len(drawn))
    assert all(torch.equal(curriculum[(0, k)]["input"], centred[(0, k)]["input"]) for k in keys)
    assert not all(torch.equal(curriculum[(0, k)]["input"], always_drawn[(0, k)]["input"]) for k in keys)
    assert all(torch.equal(curriculum[(1, k)]["input"], always_drawn[(1, k)]["input"]) for k in keys)


def test_image_folder_labels_are_the_subfolders(tmp_path, tiny_voc):
    jpegs = sorted((tiny_voc / "VOC2007" / "JPEGImages").glob("*.jpg"))
    for i, path in enumerate(jpegs):
        (tmp_path / "tree" / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / ("cat" if i % 2 else "dog") / path.name).write_bytes(path.read_bytes())
    labelled = open_labelled_images(str(tmp_path / "tree"))
    assert labelled.classes == ("cat", "dog") and len(labelled.train) + len(labelled.held_out) == len(jpegs)
    image, target = labelled.held_out[0]  # file 0 of the sorted tree: cat/img_001.jpg
    assert target.tolist() == [1.0, 0.0] and image.size == (64, 48)
    (tmp_path / "tree" / "loose.jpg").write_bytes(jpegs[0].read_bytes())
    with pytest.raises(DatasetNotFoundError, match="loose.jpg"):
        LabelledImageFolder(tmp_path / "tree")


def test_supervised_needs_the_alexnet_model(tmp_path, tiny_voc):
    with pytest.raises(UserError, match="supervised.*inpaint128"):
        main(_cfg(tmp_path, tiny_voc, name="wrong", steps=1, model="inpaint128"))
