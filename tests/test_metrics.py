"""Known-answer tests for transfer.metrics (all expected values hand-computed in the comments)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from transfer.metrics import (
    ConfusionMatrix,
    average_precision,
    box_iou,
    classification_map,
    classification_report,
    detection_ap,
    detection_report,
    knn_vote_scores,
    precision_at_k,
    voc_ap,
)


# ---------------------------------------------------------------------------------------------- voc_ap
def test_voc_ap_11point_and_all_point_differ():
    # ranked labels 1,0,1,0,0 with npos=2 -> PR points (r, p):
    #   (.5, 1), (.5, 1/2), (1, 2/3), (1, 1/2), (1, 2/5)
    rec = [0.5, 0.5, 1.0, 1.0, 1.0]
    prec = [1.0, 0.5, 2 / 3, 0.5, 0.4]
    # all-point: envelope is 1 on (0, .5] and 2/3 on (.5, 1] -> .5*1 + .5*2/3 = 5/6
    assert voc_ap(rec, prec, "all_point") == pytest.approx(5 / 6)
    # 11-point: r = 0,.1,..,.5 (6 points) -> 1; r = .6,..,1 (5 points) -> 2/3 -> (6 + 10/3)/11 = 28/33
    assert voc_ap(rec, prec, "11point") == pytest.approx(28 / 33)


def test_voc_ap_11point_threshold_is_inclusive_at_exact_tenths():
    # a single point at recall exactly 7/10: thresholds 0,.1,..,.7 (8 of 11) see precision 1 -> 8/11.
    # (np.arange(0, 1.1, 0.1)[7] == 0.7000000000000001 would wrongly give 7/11.)
    assert voc_ap([14 / 20], [1.0], "11point") == pytest.approx(8 / 11)
    # all-point: .7 * 1 = .7
    assert voc_ap([0.7], [1.0], "all_point") == pytest.approx(0.7)


def test_voc_ap_empty_and_bad_method():
    assert voc_ap([], [], "11point") == 0.0
    assert voc_ap([], [], "all_point") == 0.0
    with pytest.raises(ValueError, match="method"):
        voc_ap([1.0], [1.0], "auc")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- average_precision
@pytest.mark.parametrize("method", ["11point", "all_point"])
def test_perfect_ranking_is_one(method):
    scores = [0.9, 0.8, 0.7, 0.2, 0.1]
    targets = [1, 1, 1, 0, 0]
    assert average_precision(scores, targets, method) == 1.0


def test_interpolated_ap_differs_from_sklearn():
    # ranked labels 0,1,1 (npos=2): PR points (0, 0), (.5, 1/2), (1, 2/3)
    scores = np.array([0.9, 0.8, 0.7])
    targets = np.array([0, 1, 1])
    # sklearn (not interpolated): .5*1/2 + .5*2/3 = 7/12
    assert average_precision_score(targets, scores) == pytest.approx(7 / 12)
    # all-point (interpolated): envelope 2/3 on all of (0, 1] -> 2/3
    assert average_precision(scores, targets, "all_point") == pytest.approx(2 / 3)
    # 11-point: max precision at recall >= r is 2/3 for all 11 r -> 2/3
    assert average_precision(scores, targets, "11point") == pytest.approx(2 / 3)


@pytest.mark.parametrize("method,expected", [("all_point", 5 / 6), ("11point", 28 / 33)])
def test_ties_do_not_depend_on_order(method, expected):
    # one positive at .9, then a tie at .5 with one positive and one negative. Grouped thresholds:
    #   >= .9: tp=1 fp=0 -> (r=.5, p=1);  >= .5: tp=2 fp=1 -> (r=1, p=2/3)
    # all-point: .5*1 + .5*2/3 = 5/6; 11-point: (6*1 + 5*2/3)/11 = 28/33.
    # (Ungrouped, order pos-first would give 1.0 and neg-first 5/6.)
    a = average_precision([0.9, 0.5, 0.5], [1, 1, 0], method)
    b = average_precision([0.9, 0.5, 0.5], [1, 0, 1], method)
    assert a == pytest.approx(expected)
    assert b == pytest.approx(expected)


def test_no_positives_is_nan():
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    # a positive that is ignored does not count either
    assert math.isnan(average_precision([0.3, 0.2], [1, 0], ignore=[True, False]))


def test_ignored_samples_are_dropped():
    # ranked 0(-1 ignored),1,0,1 -> without the ignored one: 1,0,1 -> points (.5,1), (.5,1/2), (1,2/3)
    # all-point: .5*1 + .5*2/3 = 5/6
    scores = [0.95, 0.9, 0.8, 0.7]
    assert average_precision(scores, [-1, 1, 0, 1], "all_point") == pytest.approx(5 / 6)
    assert average_precision(scores, [0, 1, 0, 1], "all_point", ignore=[True, False, False, False]) == \
        pytest.approx(5 / 6)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="targets"):
        average_precision([0.1, 0.2], [2, 0])


# ------------------------------------------------------------------------------------ classification
def test_classification_map_skips_class_without_positives():
    scores = np.array([[0.9, 0.9, 0.1], [0.8, 0.7, 0.2], [0.7, 0.8, 0.3]])
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    # cat: ranked 1,1,0 -> 1.0
    # dog: scores .9(0), .8(1), .7(1) -> ranked 0,1,1 -> all-point 2/3 (see the sklearn test)
    # cow: no positives -> nan, skipped; mAP = (1 + 2/3) / 2 = 5/6
    out = classification_map(scores, targets, ["cat", "dog", "cow"], "all_point")
    assert out["per_class"]["cat"] == pytest.approx(1.0)
    assert out["per_class"]["dog"] == pytest.approx(2 / 3)
    assert math.isnan(out["per_class"]["cow"])
    assert out["skipped"] == ["cow"]
    assert out["mAP"] == pytest.approx(5 / 6)


def test_classification_report_both_methods():
    scores = np.array([[0.9, 0.1], [0.5, 0.2], [0.5, 0.3]])
    targets = np.array([[1, 0], [1, 0], [0, 0]])
    # class a: the tie case above -> 11-point 28/33, all-point 5/6; class b: no positives
    rep = classification_report(scores, targets, ["a", "b"])
    assert rep["mAP_11point"] == pytest.approx(28 / 33)
    assert rep["mAP_all_point"] == pytest.approx(5 / 6)
    assert rep["skipped"] == ["b"]
    assert rep["per_class"][0] == {"class": "a", "ap_11point": pytest.approx(28 / 33),
                                   "ap_all_point": pytest.approx(5 / 6), "num_positives": 2}
    assert rep["per_class"][1]["num_positives"] == 0


def test_classification_shape_errors():
    with pytest.raises(ValueError, match="class names"):
        classification_map(np.zeros((2, 2)), np.zeros((2, 2)), ["only-one"])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        classification_map(np.zeros((2, 2)), np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------ detection
def _gt(boxes, labels, difficult=None):
    out = {"boxes": np.array(boxes, float).reshape(-1, 4), "labels": np.array(labels, int)}
    if difficult is not None:
        out["difficult"] = np.array(difficult, bool)
    return out


def _det(boxes, scores, labels):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float),
            "labels": np.array(labels, int)}


def test_box_iou_continuous_convention():
    # [0,0,10,10] vs [0,0,10,5]: inter 50, union 100 -> .5 (no +1 pixel convention)
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[0, 0, 10, 5], [20, 20, 30, 30]]), [[0.5, 0.0]])


@pytest.mark.parametrize("method", ["11point", "all_point"])
def test_perfect_detector(method):
    gts = [_gt([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]), _gt([[5, 5, 15, 15]], [0])]
    dets = [_det([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [0, 1]), _det([[5, 5, 15, 15]], [0.7], [0])]
    out = detection_ap(dets, gts, num_classes=2, method=method)
    assert out["per_class"] == {"0": 1.0, "1": 1.0}
    assert out["mAP"] == 1.0
    assert out["skipped"] == []
    assert out["counts"]["0"] == {"npos": 2, "tp": 2, "fp": 0, "ignored": 0}


def _duplicate_case():
    # image 0: GT A; det .9 on A (TP), det .8 on A again (duplicate -> FP)
    # image 1: GT B; det .7 on B (TP)
    gts = [_gt([[0, 0, 10, 10]], [0]), _gt([[0, 0, 20, 20]], [0])]
    dets = [_det([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0]), _det([[0, 0, 20, 20]], [0.7], [0])]
    return dets, gts


def test_duplicate_detection_is_false_positive():
    dets, gts = _duplicate_case()
    # ranked TP, FP, TP with npos=2 -> (.5, 1), (.5, 1/2), (1, 2/3)
    # all-point 5/6; 11-point 28/33
    out = detection_ap(dets, gts, 1, method="all_point")
    assert out["per_class"]["0"] == pytest.approx(5 / 6)
    assert out["counts"]["0"] == {"npos": 2, "tp": 2, "fp": 1, "ignored": 0}
    assert detection_ap(dets, gts, 1, method="11point")["per_class"]["0"] == pytest.approx(28 / 33)


def test_detection_on_difficult_box_is_ignored():
    dets, gts = _duplicate_case()
    base = detection_report(dets, gts, 1)
    # add a difficult GT box in image 0 and a .85 detection on it: neither TP nor FP, npos unchanged
    gts[0] = _gt([[0, 0, 10, 10], [30, 30, 50, 50]], [0, 0], [False, True])
    dets[0] = _det([[0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 50, 50]], [0.9, 0.8, 0.85], [0, 0, 0])
    rep = detection_report(dets, gts, 1)
    assert rep["mAP_11point"] == pytest.approx(base["mAP_11point"]) == pytest.approx(28 / 33)
    assert rep["mAP_all_point"] == pytest.approx(base["mAP_all_point"]) == pytest.approx(5 / 6)
    assert rep["per_class"][0]["npos"] == 2
    assert (rep["per_class"][0]["tp"], rep["per_class"][0]["fp"], rep["per_class"][0]["ignored"]) == (2, 1, 1)


def test_iou_threshold_inclusive_and_below_is_fp():
    gts = [_gt([[0, 0, 10, 10]], [0])]
    # IoU exactly .5 ([0,0,10,5]: 50/100) -> TP (VOC uses >=) -> AP 1
    at = detection_ap([_det([[0, 0, 10, 5]], [0.9], [0])], gts, 1, method="all_point")
    assert at["per_class"]["0"] == 1.0
    # IoU .4 ([0,0,10,4]: 40/100) -> FP, GT never found -> AP 0
    below = detection_ap([_det([[0, 0, 10, 4]], [0.9], [0])], gts, 1, method="all_point")
    assert below["per_class"]["0"] == 0.0
    assert below["counts"]["0"] == {"npos": 1, "tp": 0, "fp": 1, "ignored": 0}


def test_best_overlap_box_already_matched_gives_fp_not_reassignment():
    # GT A=[0,0,10,10], B=[5,0,15,10]. det1 = A (.9) -> TP on A.
    # det2 = [2,0,12,10] (.8): IoU(A) = 80/120 = .667, IoU(B) = 70/130 = .538. VOC takes the best box A,
    # already matched -> FP (it is not reassigned to B). Ranked TP, FP with npos=2:
    # (.5, 1), (.5, 1/2) -> all-point .5*1 = .5; 11-point 6/11
    gts = [_gt([[0, 0, 10, 10], [5, 0, 15, 10]], [0, 0])]
    dets = [_det([[0, 0, 10, 10], [2, 0, 12, 10]], [0.9, 0.8], [0, 0])]
    rep = detection_report(dets, gts, 1)
    assert rep["mAP_all_point"] == pytest.approx(0.5)
    assert rep["mAP_11point"] == pytest.approx(6 / 11)


def test_class_without_ground_truth_is_skipped():
    # class "cow" (2) has only a difficult GT box and a detection: npos=0 -> skipped, nan, out of the mean;
    # class "dog" (1) has no GT at all.
    gts = [_gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 2], [False, True])]
    dets = [_det([[0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.8, 0.7], [0, 2, 1])]
    out = detection_ap(dets, gts, 3, classes=["cat", "dog", "cow"])
    assert out["skipped"] == ["dog", "cow"]
    assert math.isnan(out["per_class"]["dog"]) and math.isnan(out["per_class"]["cow"])
    assert out["mAP"] == 1.0
    assert out["counts"]["dog"] == {"npos": 0, "tp": 0, "fp": 1, "ignored": 0}
    assert detection_report(dets, gts, 3, classes=["cat", "dog", "cow"])["skipped"] == ["dog", "cow"]


def test_class_with_ground_truth_but_no_detections_is_zero():
    gts = [_gt([[0, 0, 10, 10], [0, 0, 5, 5]], [0, 1])]
    dets = [_det([[0, 0, 10, 10]], [0.9], [0])]
    out = detection_ap(dets, gts, 2)
    assert out["per_class"] == {"0": 1.0, "1": 0.0}
    assert out["mAP"] == 0.5


def test_detection_input_errors():
    with pytest.raises(ValueError, match="one of each per image"):
        detection_ap([], [_gt([], [])], 1)
    with pytest.raises(ValueError, match="outside"):
        detection_ap([_det([[0, 0, 1, 1]], [0.5], [3])], [_gt([], [])], 2)


# --------------------------------------------------------------------------------------- segmentation
TARGET = np.array([
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 255, 255],
    [2, 2, 1, 0],
])
PRED = np.array([
    [0, 1, 1, 1],
    [0, 0, 1, 2],
    [2, 2, 3, 0],  # predictions at void pixels (3 and 0) must not count
    [2, 0, 1, 0],
])
# confusion over the 14 non-void pixels (rows = truth, columns = prediction):
#        p0 p1 p2 p3
#   t0 [  4  1  0  0 ]   row 5
#   t1 [  0  4  1  0 ]   row 5
#   t2 [  1  0  3  0 ]   row 4
#   t3 [  0  0  0  0 ]   absent from both
#   col  5  5  4  0
# IoU0 = 4/(5+5-4) = 2/3; IoU1 = 4/(5+5-4) = 2/3; IoU2 = 3/(4+4-3) = 3/5; IoU3 = nan
# mIoU = (2/3 + 2/3 + 3/5)/3 = 29/45; pixel acc = 11/14; mean class acc = (4/5 + 4/5 + 3/4)/3 = 47/60


def test_confusion_matrix_hand_case():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, [[4, 1, 0, 0], [0, 4, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    iou = cm.iou_per_class()
    np.testing.assert_allclose(iou[:3], [2 / 3, 2 / 3, 3 / 5])
    assert np.isnan(iou[3])
    assert cm.miou() == pytest.approx(29 / 45)
    assert cm.pixel_accuracy() == pytest.approx(11 / 14)
    assert cm.mean_class_accuracy() == pytest.approx(47 / 60)
    rep = cm.report(["bg", "cat", "dog", "cow"])
    assert rep["absent"] == ["cow"]
    assert rep["mIoU"] == pytest.approx(29 / 45)
    assert rep["per_class"]["dog"] == pytest.approx(3 / 5)
    assert math.isnan(rep["per_class"]["cow"])
    assert rep["pixel_accuracy"] == pytest.approx(11 / 14)


def test_confusion_accumulates_pixels_not_per_image_mean():
    # image A: truth [0,0], pred [0,0] -> per-image mIoU 1 (class 1 absent)
    # image B: truth [1,1], pred [0,1] -> IoU0 = 0/1 = 0, IoU1 = 1/2 -> per-image mIoU 1/4
    # per-image mean would be 5/8. Accumulated: t0->p0: 2, t1->p0: 1, t1->p1: 1
    # IoU0 = 2/(3+2-2) = 2/3; IoU1 = 1/(1+2-1) = 1/2 -> mIoU 7/12
    ta, pa = np.array([[0, 0]]), np.array([[0, 0]])
    tb, pb = np.array([[1, 1]]), np.array([[0, 1]])
    acc = ConfusionMatrix(2)
    acc.update(pa, ta)
    acc.update(pb, tb)
    assert acc.miou() == pytest.approx(7 / 12)
    cat = ConfusionMatrix(2)
    cat.update(np.concatenate([pa, pb], 1), np.concatenate([ta, tb], 1))
    np.testing.assert_array_equal(acc.matrix, cat.matrix)
    batch = ConfusionMatrix(2)
    batch.update(np.stack([pa, pb]), np.stack([ta, tb]))  # (B, H, W)
    np.testing.assert_array_equal(acc.matrix, batch.matrix)


def test_confusion_torch_input_and_errors():
    torch = pytest.importorskip("torch")
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    assert cm.miou() == pytest.approx(29 / 45)
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2).update(np.array([[0, 5]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="differ"):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------------ kNN
def test_precision_at_k():
    # query 0 (label 1): neighbours 1,1,0 -> 2/3; query 1 (label 0): 2,2,2 -> 0; mean 1/3
    assert precision_at_k([[1, 1, 0], [2, 2, 2]], [1, 0]) == pytest.approx(1 / 3)
    # query 1 neighbours 2,0,0 -> 2/3; mean 2/3
    assert precision_at_k([[1, 1, 0], [2, 0, 0]], [1, 0]) == pytest.approx(2 / 3)


def test_knn_vote_scores():
    targets = np.array([[[1, 0, 0], [0, 1, 1]]])  # (Q=1, k=2, C=3)
    # weights 3, 1 -> (3*[1,0,0] + 1*[0,1,1]) / 4 = [.75, .25, .25]
    np.testing.assert_allclose(knn_vote_scores(targets, np.array([[3.0, 1.0]])), [[0.75, 0.25, 0.25]])
    # equal votes -> [.5, .5, .5]
    np.testing.assert_allclose(knn_vote_scores(targets), [[0.5, 0.5, 0.5]])
    # zero total weight -> zeros
    np.testing.assert_allclose(knn_vote_scores(targets, np.zeros((1, 2))), [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=">= 0"):
        knn_vote_scores(targets, np.array([[-1.0, 1.0]]))


# ------------------------------------------------------------------- cross-checks vs literal references
def _reference_all_point(scores, targets):
    """Independent form: each positive adds 1/npos times the best precision at its rank or later."""
    order = np.argsort(-scores)
    lab = targets[order]
    prec = np.cumsum(lab) / np.arange(1, len(lab) + 1)
    return sum(prec[i:].max() for i in np.flatnonzero(lab)) / lab.sum()


def test_all_point_matches_reference_on_random_untied_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.permutation(50) / 50.0  # distinct
        targets = (rng.random(50) < 0.3).astype(int)
        targets[0] = 1
        assert average_precision(scores, targets, "all_point") == pytest.approx(
            _reference_all_point(scores, targets))


def _reference_voc_det(dets, gts, c, thr):
    """Literal port of VOCevaldet.m's loop (>= threshold, continuous IoU), 11-point AP."""
    flat = [(s, i, b) for i, d in enumerate(dets) for b, s, lab in zip(d["boxes"], d["scores"], d["labels"])
            if lab == c]
    flat.sort(key=lambda x: -x[0])
    used = [np.zeros(int((g["labels"] == c).sum()), bool) for g in gts]
    npos = sum(int((~g["difficult"][g["labels"] == c]).sum()) for g in gts)
    tp, fp = [], []
    for _, i, b in flat:
        gb = gts[i]["boxes"][gts[i]["labels"] == c]
        gd = gts[i]["difficult"][gts[i]["labels"] == c]
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(gb):
            iw = min(b[2], g[2]) - max(b[0], g[0])
            ih = min(b[3], g[3]) - max(b[1], g[1])
            if iw > 0 and ih > 0:
                ua = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        if ovmax >= thr:
            if not gd[jmax]:
                tp.append(0 if used[i][jmax] else 1)
                fp.append(1 if used[i][jmax] else 0)
                used[i][jmax] = True
            else:
                tp.append(0)
                fp.append(0)
        else:
            tp.append(0)
            fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(float).eps)
    return sum(prec[rec >= t].max() if (rec >= t).any() else 0 for t in np.arange(11) / 10) / 11


def test_detection_matches_literal_devkit_port_on_random_boxes():
    rng = np.random.default_rng(1)
    dets, gts = [], []
    for _ in range(15):
        g = rng.uniform(0, 50, (4, 2))
        gts.append({"boxes": np.concatenate([g, g + rng.uniform(5, 30, (4, 2))], 1),
                    "labels": rng.integers(0, 3, 4), "difficult": rng.random(4) < 0.2})
        # jittered copies of the GT (two per box: matches, duplicates, misses) plus random boxes
        near = np.repeat(gts[-1]["boxes"], 2, 0) + rng.normal(0, 3, (8, 4))
        d = rng.uniform(0, 50, (4, 2))
        far = np.concatenate([d, d + rng.uniform(5, 30, (4, 2))], 1)
        labels = np.concatenate([np.repeat(gts[-1]["labels"], 2), rng.integers(0, 3, 4)])
        dets.append({"boxes": np.concatenate([near, far]), "scores": rng.random(12), "labels": labels})
    out = detection_ap(dets, gts, 3)
    assert all(0.2 < out["per_class"][str(c)] < 0.9 for c in range(3))  # a non-trivial case
    assert sum(v["ignored"] for v in out["counts"].values()) > 0
    for c in range(3):
        assert out["per_class"][str(c)] == pytest.approx(_reference_voc_det(dets, gts, c, 0.5))
