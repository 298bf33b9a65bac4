"""transfer.colour_histogram, the trivial baseline: the features, a run's results header, and run_all's row."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.colour_histogram import ColourHistogramConfig, colour_histograms, main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all  # noqa: E402


def test_histograms_are_the_square_roots_of_the_colour_shares():
    red = Image.new("RGB", (4, 4), (250, 0, 0))
    half = np.zeros((4, 4, 3), dtype=np.uint8)
    half[:, 2:] = (0, 0, 250)  # left half black, right half blue
    h = colour_histograms([red, Image.fromarray(half)], bins=8)  # (2, 512)
    assert h.shape == (2, 512)
    assert h[0, 7 * 64] == 1.0 and np.count_nonzero(h[0]) == 1  # red: bin (7, 0, 0)
    assert h[1, 0] == pytest.approx(np.sqrt(0.5)) and h[1, 7] == pytest.approx(np.sqrt(0.5))  # black, (0, 0, 7)
    assert np.allclose((h ** 2).sum(1), 1.0)  # sqrt of an L1-normalised histogram has unit L2 norm


def test_colour_coded_classes_are_ranked_perfectly_and_the_header_is_common(tmp_path, tiny_voc):
    # tiny_voc paints each class its own colour on grey noise, so colour statistics are enough there
    metrics = main(ColourHistogramConfig(data=str(tiny_voc), train_split="train", test_split="val", out=str(tmp_path)))
    assert metrics["status"] == "ok" and metrics["scores"]["mAP_11point"] == pytest.approx(1.0)
    status, scores, provenance = run_all.read_task_result(tmp_path / "metrics.json")
    assert status == "ok" and provenance["task"] == "colour_histogram" and provenance["init"] == "colour-histogram"
    assert json.loads((tmp_path / "config.json").read_text())["bins"] == 8


def test_run_all_runs_it_once_and_shows_it_as_the_trivial_row(tmp_path):
    starts = run_all.known_starts({"work": Path("w")}, {}, "", "colour_histogram")
    assert starts == {"colour-histogram": ("colour-histogram", None)}  # no trunk start is evaluated by it
    cells = [{"task": "colour_histogram", "start": "colour-histogram", "seed": 0, "status": "ok", "stale": None,
              "scores": {"mAP_11point": 0.21}}]
    run_all.build_tables(cells, ["colour-histogram"], tmp_path, "test data")
    table = (tmp_path / "transfer.md").read_text()
    assert "colour histogram + logistic regression (trivial)" in table and "21.0" in table
