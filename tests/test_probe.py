"""transfer.probe: VISSL feature sizes, Goyal et al.'s SVM protocol (against a hand-built sklearn pipeline), the
exact solvers, the kNN classifier, and a complete (tiny) probe run."""
from __future__ import annotations

import csv
import json
import math
import threading
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC

from transfer import probe
from transfer.metrics import classification_report
from transfer.probe import (
    GOYAL_COSTS,
    PROBE_LAYERS,
    ProbeConfig,
    ProbeFeatures,
    cv_average_precision,
    knn_probe,
    l2svm_newton,
    main,
    shifted_solves,
    svm_probe,
    svm_protocol,
)
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
    features = ProbeFeatures(build_trunk("random")[0])
    assert features.layers == PROBE_LAYERS
    assert features.dims(227) == EXPECTED_DIMS
    with pytest.raises(ValueError, match="fc6"):
        ProbeFeatures(build_trunk("random")[0], ["fc6"])


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


def _toy_multilabel(n: int, seed: int, dim: int = 24, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Noisy multi-label data: (N, D) non-negative features with row norms from 0.2x to 20x, targets (N, C) in {0, 1}."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < 0.35).astype(np.int64)
    directions = np.random.default_rng(99).normal(size=(classes, dim))  # the same class signal in every split
    x = np.abs(rng.normal(size=(n, dim)) + 0.8 * targets @ directions)  # non-negative, like ReLU features
    return x * rng.uniform(0.2, 20.0, size=(n, 1)), targets


@pytest.fixture(scope="module")
def goyal_by_hand():
    """Goyal et al.'s train_svm_kfold.py / test_svm.py written out with sklearn on a toy problem.

    Returns (train_x, train_t, test_x, test_t, chosen cost per class, mean CV AP (classes, costs),
    costs whose liblinear fit stopped at its epoch cap, hand-built report).
    """
    train_x, train_t = _toy_multilabel(150, seed=0)
    test_x, test_t = _toy_multilabel(60, seed=1)
    train_t[3, 0] = -1  # a difficult-only training image: their code trains it as a negative
    scores, chosen, cv_means, capped = np.zeros((len(test_x), 3)), [], [], set()
    for c in range(3):
        y = np.where(train_t[:, c] == 1, 1, -1)
        means = []
        for cost in GOYAL_COSTS:
            svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                            tol=1e-4, dual=True, max_iter=2000, random_state=0)
            pipeline = Pipeline([("normalise", Normalizer()), ("svm", svm)])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                cv = cross_validate(pipeline, train_x, y, cv=3, scoring="average_precision", return_estimator=True)
            means.append(cv["test_score"].mean())
            capped |= {cost for fitted in cv["estimator"] if fitted[-1].n_iter_ >= 2000}
        best = GOYAL_COSTS[int(np.argmax(means))]
        svm = LinearSVC(C=best, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                        tol=1e-4, dual=True, max_iter=2000, random_state=0)
        scores[:, c] = Pipeline([("normalise", Normalizer()), ("svm", svm)]).fit(train_x, y).decision_function(test_x)
        chosen.append(best)
        cv_means.append(means)
    report = classification_report(scores, test_t)
    return train_x, train_t, test_x, test_t, chosen, np.array(cv_means), capped, report


@pytest.mark.parametrize("solver", ["newton", "liblinear"])
def test_probe_equals_goyal_pipeline_built_by_hand(goyal_by_hand, solver):
    train_x, train_t, test_x, test_t, chosen, cv_means, capped, expected = goyal_by_hand
    assert len(set(chosen)) > 1 and chosen != [GOYAL_COSTS[0]] * 3  # the toy makes the cross-validation matter
    result = svm_probe(train_x, train_t, test_x, n_jobs=2, solver=solver)
    assert [result["best_C"][c] for c in range(3)] == chosen
    converged = [i for i, cost in enumerate(GOYAL_COSTS) if cost not in capped]  # liblinear's cap: not an optimum
    np.testing.assert_allclose(np.array([result["cv_ap"][c] for c in range(3)])[:, converged], cv_means[:, converged],
                               rtol=0, atol=1e-12)
    report = classification_report(result["scores"], test_t)
    assert report["mAP_11point"] == pytest.approx(expected["mAP_11point"], abs=1e-12)
    assert report["mAP_all_point"] == pytest.approx(expected["mAP_all_point"], abs=1e-12)


def test_feature_rows_are_l2_normalised_one_by_one():
    train_x, train_t = _toy_multilabel(60, seed=0)
    test_x, _ = _toy_multilabel(20, seed=1)
    reference = svm_probe(train_x, train_t, test_x, costs=(0.1, 10.0), n_jobs=1)
    scaled_train, scaled_test = train_x.copy(), test_x.copy()
    scaled_train[0] *= 100.0  # a per-dimension standardisation fitted on the training rows would move every score
    scaled_test[5] *= 100.0
    scaled = svm_probe(scaled_train, train_t, scaled_test, costs=(0.1, 10.0), n_jobs=1)
    assert scaled["best_C"] == reference["best_C"]
    np.testing.assert_allclose(scaled["scores"], reference["scores"], rtol=1e-9, atol=1e-9)


def test_difficult_training_images_count_as_negatives():
    train_x, train_t = _toy_multilabel(60, seed=0)
    test_x, _ = _toy_multilabel(20, seed=1)
    difficult = train_t.copy()
    difficult[np.flatnonzero(train_t[:, 0] == 0)[:8], 0] = -1
    as_negatives = svm_probe(train_x, train_t, test_x, costs=(0.01, 1.0), n_jobs=1)["scores"]
    np.testing.assert_array_equal(svm_probe(train_x, difficult, test_x, costs=(0.01, 1.0), n_jobs=1)["scores"], as_negatives)


@pytest.mark.parametrize("solver", ["newton", "liblinear"])
def test_svm_grid_picks_a_cost_per_class_in_parallel(solver):
    train_x, train_t = _two_clusters(seed=0)
    test_x, test_t = _two_clusters(n_per=10, seed=1)
    costs = (0.01, 1.0, 100.0)
    result = svm_probe(train_x, train_t, test_x, costs=costs, folds=3, n_jobs=2, seed=0, solver=solver)
    assert set(result["best_C"]) == {0, 1} and all(c in costs for c in result["best_C"].values())
    assert all(len(v) == len(costs) for v in result["cv_ap"].values())
    assert result["fits"] == 2 * 3 * len(costs) + 2  # (class, fold, cost) fits + one final fit per class
    assert threading.get_ident() not in result["workers"]  # the fits ran in joblib's worker threads
    assert result["unconverged"] == 0
    for c in range(2):  # test scores separate the clusters
        pos, neg = result["scores"][test_t[:, c] == 1, c], result["scores"][test_t[:, c] == 0, c]
        assert pos.min() > neg.max()


def test_cv_ties_go_to_the_first_cost_in_grid_order():
    train_x, train_t = _two_clusters(seed=0)  # separable: every cost's CV AP is the same
    test_x, _ = _two_clusters(n_per=10, seed=1)
    for costs in ((1.0, 0.01, 100.0), (100.0, 0.01, 1.0)):
        result = svm_probe(train_x, train_t, test_x, costs=costs, n_jobs=1)
        assert len({ap for aps in result["cv_ap"].values() for ap in aps}) == 1  # a tie (AP 1 up to rounding)
        assert result["best_C"] == {0: costs[0], 1: costs[0]}  # np.argmax, as their test_svm.py


def test_cv_average_precision_is_sklearns_to_the_last_bit():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        y = np.where(rng.random(n) < rng.random(), 1, -1)
        scores = rng.integers(0, 4, n).astype(float) if trial % 2 else rng.normal(size=n)  # with and without ties
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No positive class found": sklearn's AP is then 0
            assert cv_average_precision(y, scores) == average_precision_score(y, scores)


def test_shifted_solves_match_direct_solves():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 80))
    matrix, rhs, shifts = a @ a.T, rng.normal(size=50), [1000.0, 10.0, 1.0]
    solutions = shifted_solves(matrix, rhs, shifts, max_dim=50)
    for shift, solution in zip(shifts, solutions):
        np.testing.assert_allclose(solution, np.linalg.solve(matrix + shift * np.eye(50), rhs), rtol=1e-9, atol=1e-12)


def test_newton_path_uses_the_closed_form_and_stays_exact(monkeypatch):
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(80, 300)))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit rows, as the probe fits them
    y = np.where(x[:, :5].sum(1) + 0.05 * rng.normal(size=80) > np.median(x[:, :5].sum(1)), 1.0, -1.0)
    kernel, weights, costs = x @ x.T + 1, np.where(y > 0, 2.0, 1.0), sorted(GOYAL_COSTS)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return l2svm_newton(*args, **kwargs)

    monkeypatch.setattr(probe, "l2svm_newton", counted)
    path = probe.l2svm_path(kernel, y, costs, weights)
    assert 0 < len(calls) < len(costs) // 2  # most costs in closed form, the large ones by Newton steps
    for cost, (beta, converged) in zip(costs, path):
        expected, _ = l2svm_newton(kernel, y, cost, weights)
        assert converged
        np.testing.assert_allclose(kernel @ beta, kernel @ expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cost", [0.001, 0.1, 10.0])
def test_newton_svm_solves_linearsvc_objective_exactly(cost):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 200))
    y = np.where(x[:, :3].sum(1) + 0.5 * rng.normal(size=60) > 0, 1, -1)  # not separable along the signal
    test = rng.normal(size=(20, 200))
    beta, converged = l2svm_newton(x @ x.T + 1, y.astype(float), cost, np.where(y == 1, 2.0, 1.0))
    ours = (test @ x.T + 1) @ beta
    reference = LinearSVC(C=cost, dual=True, tol=1e-10, max_iter=200_000, class_weight={1: 2.0, -1: 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear's own stopping test is stricter than needed
        expected = reference.fit(x, y).decision_function(test)
    assert converged
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_svm_protocol_names_every_difference_from_goyal():
    default = svm_protocol()
    assert "Newton" in default and "|x| + 1e-5" in default and "theirs 3-fold" not in default
    assert "(theirs: 1e-7" not in default  # the default grid is theirs
    changed = svm_protocol(costs=(0.1, 1.0), folds=2, positive_weight=1.0, solver="liblinear", max_iter=50)
    for words in ("2-fold CV (theirs 3-fold)", "costs 0.1, 1", "positives weighted 1 (theirs 2)", "at most 50 epochs"):
        assert words in changed
    assert "Newton" not in changed


def test_svm_probe_rejects_more_folds_than_images():
    train_x, train_t = _two_clusters(n_per=2)
    with pytest.raises(ValueError, match="--cv-folds 5"):
        svm_probe(train_x, train_t, train_x, folds=5)


def test_tiny_probe_run_writes_a_table_per_layer(tiny_voc, tmp_path):
    cfg = ProbeConfig(data=str(tiny_voc), test_split="val", layers=("conv1", "pool5"), costs=(0.1, 10.0), workers=0,
                      n_jobs=2, knn_k=3, out=str(tmp_path / "probe"))
    metrics = main(cfg)
    assert list(metrics["layers"]) == ["conv1", "pool5"] and "pool5/svm_mAP_11point" in metrics["scores"]
    saved = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert saved["task"] == "probe" and saved["calibration"]["layers"][0] == "conv1"
    for layer, m in saved["layers"].items():
        assert m["dim"] == EXPECTED_DIMS[layer]
        for key in ("svm_mAP_11point", "svm_mAP_all_point", "knn_mAP_11point", "knn_mAP_all_point"):
            assert math.isfinite(m[key]) and 0 <= m[key] <= 1, (layer, key)
        assert set(m["best_C"]) <= {"circle", "square", "triangle"}
        assert m["knn_top1"] is None  # tiny_voc images have several labels
        assert "Goyal" in m["svm_protocol"] and "costs 0.1, 10 (theirs" in m["svm_protocol"]
    with open(tmp_path / "probe" / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and {"svm_ap_11point", "svm_ap_all_point", "knn_ap_11point", "best_C"} <= set(rows[0])
