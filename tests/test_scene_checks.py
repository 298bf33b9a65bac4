"""benchmarks/scene_checks.py: the supervised control's scene checks run on a tiny labelled set, report chance
(1 / the classes among the crops) and the label prior correctly, and refuse a run that is not supervised."""
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import ObjectCrops, VOCDataset
from pretrain.main_pretrain import PretrainConfig, main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scene_checks  # noqa: E402


def test_scene_checks_of_a_supervised_run_and_refusal_of_an_inpainting_one(tmp_path, tiny_voc, tiny_pretrain_run):
    main(PretrainConfig(objective="supervised", name="sup", output_dir=str(tmp_path), data=str(tiny_voc), steps=2,
                        batch_size=4, workers=0, eval_images=0, amp="none", log_every=1, ckpt_every=2))
    common = ["--data", str(tiny_voc), "--test-split", "val", "--out", str(tmp_path / "out")]
    table = scene_checks.cli(["--init", str(tmp_path / "sup"), *common])
    crops = table[table["check"].str.contains("object crops")]
    assert len(crops) == len(scene_checks.CONTEXTS)
    present = {int(ObjectCrops(tiny_voc, "val")[k][1].argmax()) for k in range(len(ObjectCrops(tiny_voc, "val")))}
    assert (crops["chance or prior (%)"] == round(100 / len(present), 1)).all()  # 1 / the classes among the crops
    val_labels = VOCDataset(tiny_voc, "val").labels > 0
    prior = 100 * val_labels[:, val_labels.any(0)].mean()
    whole = table[~table["check"].str.contains("object crops")]
    assert len(whole) == 1 + 2 * len(scene_checks.POOLED_LAYERS)  # own classifier + 2 trunks x layers
    assert np.allclose(whole["chance or prior (%)"], round(prior, 1))
    assert table["mAP (%)"].between(0, 100).all()
    assert (tmp_path / "out" / "scene_checks.md").read_text().startswith("# Scene checks of the supervised control")
    with pytest.raises(SystemExit) as err:  # a context encoder has no classifier to check
        scene_checks.cli(["--init", str(tiny_pretrain_run), *common])
    assert err.value.code == 2
