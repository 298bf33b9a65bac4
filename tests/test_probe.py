"""transfer.probe: VISSL feature sizes, the parallel SVM grid, the kNN classifier, and a complete (tiny) probe run."""
from __future__ import annotations

import csv
import json
import math
import threading
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from transfer.probe import PROBE_LAYERS, ProbeConfig, ProbeFeatures, knn_probe, l2svm_newton, main, span_basis, svm_probe
from transfer.trunk import build_trunk

# Caffe AlexNet at 227x227 after VISSL's pooling (see PROBE_POOLING)
EXPECTED_DIMS = {"conv1": 96 * 10 * 10, "conv2": 256 * 6 * 6, "conv3": 384 * 5 * 5, "conv4": 384 * 5 * 5,
                 "conv5": 256 * 6 * 6, "pool5": 256 * 6 * 6}


def _two_clusters(n_per: int = 30, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian clusters; targets one-hot (N, 2) in {0, 1}."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, dim))
    centres[0, 0], centres[1, 1] = 10.0, 10.0
    labels = np.repeat([0, 1], n_per)
    x = centres[labels] + rng.normal(size=(2 * n_per, dim))  # (N, D)
    return x.astype(np.float32), np.eye(2, dtype=np.int64)[labels]


def test_feature_dims_follow_vissl_alexnet_settings():
    features = ProbeFeatures(build_trunk("random"))
    assert features.layers == PROBE_LAYERS
    assert features.dims(227) == EXPECTED_DIMS
    with pytest.raises(ValueError, match="fc6"):
        ProbeFeatures(build_trunk("random"), ["fc6"])


def test_knn_on_separable_clusters_is_perfect():
    train_x, train_t = _two_clusters(seed=0)
    test_x, test_t = _two_clusters(n_per=10, seed=1)
    for temperature in (0.07, 0.0):
        result = knn_probe(train_x, train_t, test_x, test_t, k=5, temperature=temperature)
        assert result["mAP_11point"] == result["mAP_all_point"] == 1.0
        assert result["top1"] == 1.0  # one label per image: accuracy is reported
    multi = test_t.copy()
    multi[0, 1] = 1  # an image with two labels: voting mAP only, no top-1
    assert knn_probe(train_x, train_t, test_x, multi, k=5)["top1"] is None


@pytest.mark.parametrize("solver", ["newton", "liblinear"])
def test_svm_grid_picks_a_cost_per_class_in_parallel(solver):
    train_x, train_t = _two_clusters(seed=0)
    test_x, test_t = _two_clusters(n_per=10, seed=1)
    costs = (0.01, 1.0, 100.0)
    result = svm_probe(train_x, train_t, test_x, costs=costs, folds=3, n_jobs=2, seed=0, solver=solver)
    assert set(result["best_C"]) == {0, 1} and all(c in costs for c in result["best_C"].values())
    assert all(len(v) == len(costs) for v in result["cv_ap"].values())
    assert result["fits"] == 2 * 3 * len(costs) + 2  # (class, cost, fold) fits + one final fit per class
    assert threading.get_ident() not in result["workers"]  # the fits ran in joblib's worker threads
    assert result["unconverged"] == 0
    for c in range(2):  # test scores separate the clusters
        pos, neg = result["scores"][test_t[:, c] == 1, c], result["scores"][test_t[:, c] == 0, c]
        assert pos.min() > neg.max()


@pytest.mark.parametrize("cost", [0.001, 0.1, 10.0])
def test_newton_svm_solves_linearsvc_objective_exactly(cost):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 200))
    y = (x[:, :3].sum(1) + 0.5 * rng.normal(size=60) > 0).astype(int)  # not separable along the signal
    test = rng.normal(size=(20, 200))
    beta, converged = l2svm_newton(x @ x.T + 1, 2.0 * y - 1, cost, np.where(y == 1, 2.0, 1.0))
    ours = (test @ x.T + 1) @ beta
    reference = LinearSVC(C=cost, dual=True, tol=1e-10, max_iter=200_000, class_weight={1: 2.0, 0: 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear's own stopping test is stricter than needed
        expected = reference.fit(x, y).decision_function(test)
    assert converged
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_svm_in_the_training_span_gives_the_same_classifier():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 300))  # n < D, like 1400 images x 9k dims
    y = (x[:, :5].sum(1) > 0).astype(int)
    test = rng.normal(size=(15, 300))
    basis = span_basis(x)
    assert basis.shape == (300, 40)
    kwargs = {"C": 0.1, "dual": True, "tol": 1e-8, "max_iter": 100_000}
    full = LinearSVC(**kwargs).fit(x, y).decision_function(test)
    projected = LinearSVC(**kwargs).fit(x @ basis, y).decision_function(test @ basis)
    np.testing.assert_allclose(projected, full, rtol=1e-4, atol=1e-4)


def test_tiny_probe_run_writes_a_table_per_layer(tiny_voc, tmp_path):
    cfg = ProbeConfig(data=str(tiny_voc), test_split="val", layers=("conv1", "pool5"), costs=(0.1, 10.0), workers=0,
                      n_jobs=2, knn_k=3, out=str(tmp_path / "probe"))
    metrics = main(cfg)
    assert list(metrics) == ["conv1", "pool5"]
    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    for layer, m in saved.items():
        assert m["dim"] == EXPECTED_DIMS[layer]
        for key in ("svm_mAP_11point", "svm_mAP_all_point", "knn_mAP_11point", "knn_mAP_all_point"):
            assert math.isfinite(m[key]) and 0 <= m[key] <= 1, (layer, key)
        assert set(m["best_C"]) <= {"circle", "square", "triangle"}
        assert m["knn_top1"] is None  # tiny_voc images have several labels
    with open(tmp_path / "probe" / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and {"svm_ap_11point", "svm_ap_all_point", "knn_ap_11point", "best_C"} <= set(rows[0])
