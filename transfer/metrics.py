"""Evaluation metrics for the transfer tasks: VOC classification mAP, VOC detection AP, segmentation mIoU,
and kNN voting scores.

Everything is numpy-based and works on whole splits (never averaged per batch or per image). Inputs may be
numpy arrays, lists or torch tensors (tensors are detached and moved to the CPU).

The PASCAL VOC definitions follow the official devkit (VOCevalcls.m, VOCevaldet.m, VOCap):

* VOC2007 reports the 11-point interpolated AP (`method="11point"`); the Context Encoders paper reports
  classification and detection on VOC2007, so this is the default everywhere.
* VOC2010+ reports the all-point interpolated AP (`method="all_point"`).

Both are *interpolated* (precision is replaced by its running maximum from the right), so neither equals
`sklearn.metrics.average_precision_score`, which is the non-interpolated step sum.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

APMethod = Literal["11point", "all_point"]
AP_METHODS: tuple[str, ...] = ("11point", "all_point")

# Recall thresholds of the VOC2007 11-point AP. Computed as i / 10 (correctly rounded) rather than
# np.arange(0, 1.1, 0.1), whose 0.30000000000000004 / 0.7000000000000001 would wrongly exclude a recall of
# exactly 3/10 or 7/10 (the devkit's intent is "recall >= 0.3", as in MATLAB's 0:0.1:1).
_ELEVEN_POINTS = np.arange(11) / 10.0


def _to_numpy(x: Any) -> np.ndarray:
    """Array-like or torch tensor (any device) -> numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_method(method: str, where: str) -> None:
    if method not in AP_METHODS:
        raise ValueError(f"transfer.metrics.{where}: method={method!r}; use one of {AP_METHODS}")


def _class_names(classes: Sequence[str] | None, num_classes: int, where: str) -> list[str]:
    if classes is None:
        return [str(c) for c in range(num_classes)]
    names = [str(c) for c in classes]
    if len(names) != num_classes:
        raise ValueError(f"transfer.metrics.{where}: got {len(names)} class names for {num_classes} classes; "
                         f"pass one name per class (column) or classes=None")
    return names


def _nanmean(values: Sequence[float]) -> float:
    """Mean over the finite values; nan when there are none (no 'mean of empty slice' warning)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


# ----------------------------------------------------------------------------------------------------------
# AP from a precision/recall curve
# ----------------------------------------------------------------------------------------------------------
def voc_ap(recall: npt.ArrayLike, precision: npt.ArrayLike, method: APMethod = "11point") -> float:
    """PASCAL VOC average precision from the points of a precision/recall curve.

    Args:
        recall:
            Array of shape (M,): recall after each ranked prediction (or after each distinct score
            threshold), non-decreasing, in [0, 1].
        precision:
            Array of shape (M,): precision at the same points, in [0, 1].
        method:
            "11point": VOC2007. For each r in {0, 0.1, ..., 1.0}, take the maximum precision over all points
                with recall >= r (0 if there is none), and average these 11 values.
            "all_point": VOC2010+. Make precision monotonically non-increasing in recall (each point gets
                the maximum precision at any recall >= its own), then take the exact area under that
                step curve, from recall 0 to 1. Recall beyond the last point contributes 0.

    Returns:
        AP in [0, 1]. An empty curve (no predictions) gives 0.0.
    """
    _check_method(method, "voc_ap")
    rec = _to_numpy(recall).astype(np.float64).ravel()
    prec = _to_numpy(precision).astype(np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"transfer.metrics.voc_ap: recall has {rec.size} points but precision has "
                         f"{prec.size}; pass the two coordinates of the same curve")
    if np.isnan(rec).any() or np.isnan(prec).any():
        raise ValueError("transfer.metrics.voc_ap: recall/precision contain nan (0/0 precision before the "
                         "first prediction?); drop those points before calling")

    if method == "11point":
        # sum the 11 maxima, then divide once (a perfect curve gives exactly 1.0)
        maxima = [prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in _ELEVEN_POINTS]
        return float(np.sum(maxima) / 11.0)

    # all_point: sentinels at recall 0 and 1 with precision 0 (VOCap.m).
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    # precision envelope: running max from the right, so precision never increases with recall
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    # sum the rectangles where recall changes
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


# ----------------------------------------------------------------------------------------------------------
# Classification (one AP per class, VOC multi-label style)
# ----------------------------------------------------------------------------------------------------------
def _ranked_pr(scores: np.ndarray, is_pos: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at each distinct score threshold (descending), ties grouped."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    pos = is_pos[order]
    tp = np.cumsum(pos)
    fp = np.cumsum(~pos)
    # last index of every run of equal scores: all tied items enter the ranking together, like
    # sklearn's precision_recall_curve, so the order among ties cannot change the result
    last = np.concatenate((np.flatnonzero(s[1:] != s[:-1]), [s.size - 1])) if s.size else np.array([], int)
    tp, fp = tp[last], fp[last]
    return tp / npos, tp / (tp + fp)


def average_precision(
    scores: npt.ArrayLike,
    targets: npt.ArrayLike,
    method: APMethod = "11point",
    ignore: npt.ArrayLike | None = None,
) -> float:
    """VOC average precision of one class of a (multi-label) classification problem.

    Samples are ranked by score, highest first. Ties: all samples sharing a score are processed as one
    group, i.e. the PR curve is only evaluated at distinct score thresholds (as sklearn's
    `precision_recall_curve` does), so the result does not depend on the input order of tied samples.
    Without ties this is exactly VOCevalcls.m (one PR point per ranked sample).

    Args:
        scores:
            Array of shape (N,) with the classifier score of each sample for this class (finite).
        targets:
            Array of shape (N,) with 1 = positive, 0 = negative, -1 = ignored. Note: the raw VOC
            annotation encoding is different (1 / -1 / 0 for difficult); convert it before calling.
        method:
            "11point" (VOC2007) or "all_point" (VOC2010+), see `voc_ap`.
        ignore:
            Optional bool array of shape (N,); True samples (e.g. VOC "difficult") are dropped, as are
            samples whose target is -1. They count as neither positive nor negative.

    Returns:
        AP in [0, 1], or nan when the class has no (non-ignored) positive sample.
    """
    _check_method(method, "average_precision")
    s = _to_numpy(scores).astype(np.float64).ravel()
    t = _to_numpy(targets).ravel()
    if s.shape != t.shape:
        raise ValueError(f"transfer.metrics.average_precision: {s.size} scores but {t.size} targets; pass "
                         "one score and one target per sample")
    if not np.isin(t, (-1, 0, 1)).all():
        raise ValueError("transfer.metrics.average_precision: targets must be 1 (positive), 0 (negative) or "
                         f"-1 (ignored); got values {np.unique(t)[:10]}")
    if not np.isfinite(s).all():
        raise ValueError("transfer.metrics.average_precision: scores contain nan/inf; fix the model outputs")
    keep = t != -1
    if ignore is not None:
        ign = _to_numpy(ignore).astype(bool).ravel()
        if ign.shape != t.shape:
            raise ValueError(f"transfer.metrics.average_precision: ignore mask has {ign.size} entries for "
                             f"{t.size} samples; pass one flag per sample")
        keep &= ~ign
    s, is_pos = s[keep], t[keep] == 1
    npos = int(is_pos.sum())
    if npos == 0:
        return float("nan")
    recall, precision = _ranked_pr(s, is_pos, npos)
    return voc_ap(recall, precision, method)


def _check_matrix(scores: Any, targets: Any, ignore: Any, where: str) -> tuple[np.ndarray, ...]:
    s = _to_numpy(scores)
    t = _to_numpy(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"transfer.metrics.{where}: scores {s.shape} and targets {t.shape} must both be "
                         "(N, C), one row per image and one column per class")
    ign = None if ignore is None else _to_numpy(ignore).astype(bool)
    if ign is not None and ign.shape != t.shape:
        raise ValueError(f"transfer.metrics.{where}: ignore mask {ign.shape} must match targets {t.shape}")
    return s, t, ign


def classification_map(
    scores: npt.ArrayLike,
    targets: npt.ArrayLike,
    classes: Sequence[str] | None = None,
    method: APMethod = "11point",
    ignore: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Per-class AP and mAP of a multi-label classifier (VOC classification protocol).

    Args:
        scores:
            Array of shape (N, C): score of image n for class c.
        targets:
            Array of shape (N, C) in {1, 0, -1} (positive / negative / ignored), see `average_precision`.
        classes:
            C class names; defaults to "0", "1", ...
        method:
            "11point" (VOC2007) or "all_point" (VOC2010+).
        ignore:
            Optional bool array of shape (N, C) of ignored (e.g. difficult-only) entries.

    Returns:
        Dict with `per_class` {name: AP} (nan for a class without positives), `mAP` (mean over the
        classes that have positives; nan if none has) and `skipped` (names of classes without positives).
    """
    s, t, ign = _check_matrix(scores, targets, ignore, "classification_map")
    names = _class_names(classes, s.shape[1], "classification_map")
    per_class = {
        name: average_precision(s[:, c], t[:, c], method, None if ign is None else ign[:, c])
        for c, name in enumerate(names)
    }
    skipped = [name for name, ap in per_class.items() if math.isnan(ap)]
    return {"per_class": per_class, "mAP": _nanmean(list(per_class.values())), "skipped": skipped}


def classification_report(
    scores: npt.ArrayLike,
    targets: npt.ArrayLike,
    classes: Sequence[str] | None = None,
    ignore: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """`classification_map` with both AP definitions, in a table-friendly layout.

    Returns:
        Dict with `mAP_11point`, `mAP_all_point`, `per_class` (list of dicts with keys class, ap_11point,
        ap_all_point, num_positives; `pandas.DataFrame(report["per_class"])` gives a table) and `skipped`.
    """
    s, t, ign = _check_matrix(scores, targets, ignore, "classification_report")
    eleven = classification_map(s, t, classes, "11point", ign)
    allp = classification_map(s, t, classes, "all_point", ign)
    valid = t == 1 if ign is None else (t == 1) & ~ign
    rows = [
        {"class": name, "ap_11point": eleven["per_class"][name], "ap_all_point": allp["per_class"][name],
         "num_positives": int(valid[:, c].sum())}
        for c, name in enumerate(eleven["per_class"])
    ]
    return {"mAP_11point": eleven["mAP"], "mAP_all_point": allp["mAP"], "per_class": rows,
            "skipped": eleven["skipped"]}


# ----------------------------------------------------------------------------------------------------------
# Detection (VOC AP at an IoU threshold)
# ----------------------------------------------------------------------------------------------------------
def box_iou(boxes1: npt.ArrayLike, boxes2: npt.ArrayLike) -> np.ndarray:
    """Pairwise IoU of (x1, y1, x2, y2) boxes in continuous coordinates.

    Width is x2 - x1 (no +1 as in the VOC devkit's pixel-inclusive convention; the same as
    `torchvision.ops.box_iou`). Degenerate boxes have area 0; a 0/0 IoU is reported as 0.

    Args:
        boxes1: Array of shape (K, 4).
        boxes2: Array of shape (G, 4).

    Returns:
        Array of shape (K, G).
    """
    a = _to_numpy(boxes1).astype(np.float64).reshape(-1, 4)
    b = _to_numpy(boxes2).astype(np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (K,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (G,)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (K, G, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (K, G, 2)
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]  # (K, G)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _image_arrays(item: Mapping[str, Any], i: int, kind: str, has_scores: bool) -> dict[str, np.ndarray]:
    where = f"transfer.metrics.detection_ap: {kind}[{i}]"
    for key in ("boxes", "labels") + (("scores",) if has_scores else ()):
        if key not in item:
            raise ValueError(f"{where} has no {key!r}; each image needs a dict with boxes (K, 4), labels (K,)"
                             + (", scores (K,)" if has_scores else " and optionally difficult (K,)"))
    boxes = _to_numpy(item["boxes"]).astype(np.float64).reshape(-1, 4)
    labels = _to_numpy(item["labels"]).astype(np.int64).ravel()
    out = {"boxes": boxes, "labels": labels}
    if has_scores:
        out["scores"] = _to_numpy(item["scores"]).astype(np.float64).ravel()
    else:
        diff = item.get("difficult")
        out["difficult"] = (np.zeros(len(labels), bool) if diff is None
                            else _to_numpy(diff).astype(bool).ravel())
    for key, arr in out.items():
        if len(arr) != len(boxes):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(arr)} {key}; pass one entry per box")
    return out


def _match_detections(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float,
) -> list[dict[str, Any]]:
    """VOC greedy matching. Per class: tp/fp flags of the ranked (non-ignored) detections and counts."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"transfer.metrics.detection_ap: {len(detections)} detection entries but "
                         f"{len(ground_truth)} ground-truth entries; pass one of each per image, same order")
    dets = [_image_arrays(d, i, "detections", True) for i, d in enumerate(detections)]
    gts = [_image_arrays(g, i, "ground_truth", False) for i, g in enumerate(ground_truth)]
    for kind, items in (("detections", dets), ("ground_truth", gts)):
        for i, it in enumerate(items):
            bad = (it["labels"] < 0) | (it["labels"] >= num_classes)
            if bad.any():
                raise ValueError(f"transfer.metrics.detection_ap: {kind}[{i}] has labels "
                                 f"{np.unique(it['labels'][bad])} outside [0, {num_classes}); labels are "
                                 "0-based foreground class indices (no background class)")
        if kind == "detections" and any(not np.isfinite(it["scores"]).all() for it in items):
            raise ValueError("transfer.metrics.detection_ap: detection scores contain nan/inf")

    results = []
    for c in range(num_classes):
        npos = 0
        img_ids, det_scores, ious = [], [], []  # ious[j]: (K_c, G_c) IoU of image j's class-c dets vs GT
        gt_diff = []
        for j, (d, g) in enumerate(zip(dets, gts)):
            gmask = g["labels"] == c
            dmask = d["labels"] == c
            gt_diff.append(g["difficult"][gmask])
            npos += int((~g["difficult"][gmask]).sum())
            ious.append(box_iou(d["boxes"][dmask], g["boxes"][gmask]))
            img_ids.append(np.full(int(dmask.sum()), j))
            det_scores.append(d["scores"][dmask])
        img = np.concatenate(img_ids) if img_ids else np.zeros(0, int)
        # row of each detection inside its image's IoU matrix
        row = np.concatenate([np.arange(len(x)) for x in img_ids]) if img_ids else np.zeros(0, int)
        sc = np.concatenate(det_scores) if det_scores else np.zeros(0)
        order = np.argsort(-sc, kind="stable")  # descending, stable like MATLAB's sort(-confidence)
        matched = [np.zeros(len(dd), bool) for dd in gt_diff]
        tp, fp = [], []
        n_ignored = 0
        for k in order:
            j, r = int(img[k]), int(row[k])
            ov = ious[j][r] if ious[j].shape[1] else None
            # VOC: the best-overlap GT box among *all* class-c GT of the image (matched or not, difficult
            # or not) decides; a detection is not re-assigned to the next-best unmatched box.
            best = int(np.argmax(ov)) if ov is not None else -1
            if best >= 0 and ov[best] >= iou_threshold:
                if gt_diff[j][best]:
                    n_ignored += 1  # difficult: neither TP nor FP
                    continue
                if matched[j][best]:
                    tp.append(False)  # duplicate detection
                    fp.append(True)
                else:
                    matched[j][best] = True
                    tp.append(True)
                    fp.append(False)
            else:
                tp.append(False)
                fp.append(True)
        results.append({"tp": np.array(tp, bool), "fp": np.array(fp, bool), "npos": npos,
                        "ignored": n_ignored})
    return results


def _detection_ap_from_matches(m: dict[str, Any], method: APMethod) -> float:
    if m["npos"] == 0:
        return float("nan")
    tp = np.cumsum(m["tp"])
    fp = np.cumsum(m["fp"])
    # one PR point per ranked detection (VOCevaldet.m); every kept detection is TP or FP, so tp+fp > 0
    return voc_ap(tp / m["npos"], tp / np.maximum(tp + fp, 1), method)


def detection_ap(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    method: APMethod = "11point",
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """VOC detection AP per class at one IoU threshold (VOCevaldet.m rules).

    Per class, all detections of the split are sorted by score (descending, stable, so equal scores keep
    image order then in-image order) and greedily assigned: a detection's best-IoU ground-truth box of
    the same class in the same image is found among *all* such boxes. If that IoU >= `iou_threshold`:
    a difficult box makes the detection ignored (neither TP nor FP); an already matched box makes it a
    FP (duplicate); otherwise it is a TP and the box becomes matched. Below the threshold (or no box): FP.
    npos is the number of non-difficult ground-truth boxes. One PR point per detection (no tie grouping).

    Boxes are (x1, y1, x2, y2) in continuous coordinates, IoU without the devkit's +1 (see `box_iou`),
    so IoU values differ slightly from the devkit on small boxes.

    Args:
        detections:
            One dict per image: boxes (K, 4), scores (K,), labels (K,) as 0-based class indices.
        ground_truth:
            One dict per image, same order: boxes (G, 4), labels (G,), optional difficult (G,) bool.
        num_classes:
            Number of foreground classes (20 for VOC).
        iou_threshold:
            Minimum IoU for a match (VOC: 0.5, inclusive).
        method:
            "11point" (VOC2007) or "all_point" (VOC2010+), see `voc_ap`.
        classes:
            Class names; defaults to "0", "1", ...

    Returns:
        Dict with `per_class` {name: AP}, `mAP` (over classes with npos > 0), `skipped` (names of classes
        with no non-difficult ground truth; their AP is nan), `counts` {name: {npos, tp, fp, ignored}}.
    """
    _check_method(method, "detection_ap")
    names = _class_names(classes, num_classes, "detection_ap")
    matches = _match_detections(detections, ground_truth, num_classes, iou_threshold)
    per_class = {name: _detection_ap_from_matches(m, method) for name, m in zip(names, matches)}
    counts = {name: {"npos": m["npos"], "tp": int(m["tp"].sum()), "fp": int(m["fp"].sum()),
                     "ignored": m["ignored"]} for name, m in zip(names, matches)}
    skipped = [name for name, m in zip(names, matches) if m["npos"] == 0]
    return {"per_class": per_class, "mAP": _nanmean(list(per_class.values())), "skipped": skipped,
            "counts": counts}


def detection_report(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`detection_ap` with both AP definitions (matching done once), in a table-friendly layout.

    Returns:
        Dict with `mAP_11point`, `mAP_all_point`, `iou_threshold`, `per_class` (list of dicts with keys
        class, ap_11point, ap_all_point, npos, tp, fp, ignored) and `skipped`.
    """
    names = _class_names(classes, num_classes, "detection_report")
    matches = _match_detections(detections, ground_truth, num_classes, iou_threshold)
    rows = [
        {"class": name, "ap_11point": _detection_ap_from_matches(m, "11point"),
         "ap_all_point": _detection_ap_from_matches(m, "all_point"), "npos": m["npos"],
         "tp": int(m["tp"].sum()), "fp": int(m["fp"].sum()), "ignored": m["ignored"]}
        for name, m in zip(names, matches)
    ]
    return {
        "mAP_11point": _nanmean([r["ap_11point"] for r in rows]),
        "mAP_all_point": _nanmean([r["ap_all_point"] for r in rows]),
        "iou_threshold": iou_threshold,
        "per_class": rows,
        "skipped": [r["class"] for r in rows if r["npos"] == 0],
    }


# ----------------------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------------------
class ConfusionMatrix:
    """Pixel confusion matrix accumulated over a whole split (rows = ground truth, columns = prediction).

    All scores are computed from the summed matrix, i.e. over all pixels of the split, not averaged per
    image (the FCN / VOC segmentation protocol).

    Examples:
        >>> cm = ConfusionMatrix(num_classes=21)
        >>> for logits, target in loader:
        >>>     cm.update(logits.argmax(1), target)  # (B, H, W) each; 255 = void, ignored
        >>> cm.report(VOC_SEG_CLASSES)["mIoU"]
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"transfer.metrics.ConfusionMatrix: num_classes={num_classes}; must be >= 1")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred: npt.ArrayLike, target: npt.ArrayLike, ignore_index: int | None = 255) -> None:
        """Add the pixels of one image (H, W) or a batch (B, H, W); pixels with target == ignore_index
        are skipped (whatever is predicted there)."""
        p = _to_numpy(pred)
        t = _to_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"transfer.metrics.ConfusionMatrix.update: pred {p.shape} and target {t.shape} "
                             "differ; pass label maps of the same shape (argmax the logits first)")
        p = p.astype(np.int64).ravel()
        t = t.astype(np.int64).ravel()
        if ignore_index is not None:
            keep = t != ignore_index
            p, t = p[keep], t[keep]
        n = self.num_classes
        for name, arr in (("target", t), ("pred", p)):
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                bad = np.unique(arr[(arr < 0) | (arr >= n)])[:10]
                raise ValueError(f"transfer.metrics.ConfusionMatrix.update: {name} has labels {bad} outside "
                                 f"[0, {n}) (ignore_index={ignore_index}); fix num_classes or ignore_index")
        # one bincount over combined indices n * target + pred
        self.matrix += np.bincount(n * t + p, minlength=n * n).reshape(n, n)

    def iou_per_class(self) -> np.ndarray:
        """(C,) IoU = TP / (TP + FP + FN); nan for a class absent from both prediction and ground truth."""
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in prediction or ground truth."""
        return _nanmean(self.iou_per_class().tolist())

    def pixel_accuracy(self) -> float:
        """Fraction of non-ignored pixels labelled correctly (nan if no pixel was counted)."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def mean_class_accuracy(self) -> float:
        """Mean over classes present in the ground truth of the per-class recall TP / (TP + FN)."""
        gt = self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(gt > 0, np.diag(self.matrix) / gt, np.nan)
        return _nanmean(acc.tolist())

    def report(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """Dict with `per_class` {name: IoU} (nan if absent), `mIoU`, `pixel_accuracy`,
        `mean_class_accuracy` and `absent` (names of classes in neither prediction nor ground truth,
        left out of the mean)."""
        names = _class_names(classes, self.num_classes, "ConfusionMatrix.report")
        iou = self.iou_per_class()
        return {
            "per_class": {name: float(v) for name, v in zip(names, iou)},
            "mIoU": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_class_accuracy": self.mean_class_accuracy(),
            "absent": [name for name, v in zip(names, iou) if np.isnan(v)],
        }


# ----------------------------------------------------------------------------------------------------------
# kNN evaluation
# ----------------------------------------------------------------------------------------------------------
def precision_at_k(neighbour_labels: npt.ArrayLike, query_labels: npt.ArrayLike) -> float:
    """Mean over queries of the fraction of the k retrieved neighbours that share the query's label.

    Args:
        neighbour_labels: Array of shape (Q, k) with the labels of each query's k nearest neighbours.
        query_labels: Array of shape (Q,).

    Returns:
        Precision@k in [0, 1].
    """
    nb = _to_numpy(neighbour_labels)
    q = _to_numpy(query_labels).ravel()
    if nb.ndim != 2 or nb.shape[0] != q.shape[0] or nb.shape[1] == 0:
        raise ValueError(f"transfer.metrics.precision_at_k: neighbour_labels {nb.shape} must be (Q, k>0) "
                         f"with Q = len(query_labels) = {q.shape[0]}")
    return float(np.mean(nb == q[:, None]))  # (Q, k) hits; equal k per query, so a flat mean is per-query


def knn_vote_scores(neighbour_targets: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> np.ndarray:
    """Class scores of each query from its neighbours' (multi-)hot targets, by weighted voting.

    Args:
        neighbour_targets:
            Array of shape (Q, k, C): one-hot or multi-hot targets of each query's k neighbours.
        weights:
            Optional non-negative array of shape (Q, k), e.g. exp(similarity / T); None = equal votes.

    Returns:
        Array of shape (Q, C): the weighted mean of the neighbours' targets (weights normalised per
        query so scores of different queries are comparable when ranked per class for AP). A query whose
        weights sum to 0 gets all-zero scores.
    """
    t = _to_numpy(neighbour_targets).astype(np.float64)
    if t.ndim != 3:
        raise ValueError(f"transfer.metrics.knn_vote_scores: neighbour_targets has shape {t.shape}; expected "
                         "(Q, k, C) (one-hot encode single labels first)")
    w = np.ones(t.shape[:2]) if weights is None else _to_numpy(weights).astype(np.float64)
    if w.shape != t.shape[:2]:
        raise ValueError(f"transfer.metrics.knn_vote_scores: weights {w.shape} must be (Q, k) = "
                         f"{t.shape[:2]}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("transfer.metrics.knn_vote_scores: weights must be finite and >= 0; use e.g. "
                         "exp(similarity / T) instead of raw cosine similarities")
    total = w.sum(1, keepdims=True)  # (Q, 1)
    votes = np.einsum("qk,qkc->qc", w, t)  # (Q, C)
    return np.divide(votes, total, out=np.zeros_like(votes), where=total > 0)


# ----------------------------------------------------------------------------------------------------------
# Collapse: degenerate predictions are reported as such, never as a score
# ----------------------------------------------------------------------------------------------------------
def classification_collapse(scores: npt.ArrayLike, atol: float = 1e-6) -> str | None:
    """Why (N, C) classification scores are degenerate, or None: collapsed when no class's score varies
    across the images (every image gets the same ranking: the mAP then only measures class frequencies)."""
    s = _to_numpy(scores).astype(np.float64)
    if s.ndim != 2 or s.shape[0] < 2:
        return None
    spread = float(np.ptp(s, axis=0).max())  # the largest per-class range over images
    if spread <= atol:
        return f"the scores do not vary across images (largest per-class range {spread:.2g})"
    return None


def segmentation_collapse(cm: ConfusionMatrix, background: int = 0, max_share: float = 0.98,
                          margin: float = 0.005) -> str | None:
    """Why a segmentation result is degenerate, or None: one class takes at least `max_share` of the predicted
    pixels, or the mIoU is not more than `margin` (0.5 points) above what predicting `background` everywhere
    scores (below it counts too: such a model has learnt less than the class prior)."""
    pred = cm.matrix.sum(0).astype(np.float64)  # (C,) predicted pixels per class
    if pred.sum() == 0:
        return "no pixel was scored"
    top = int(pred.argmax())
    if pred[top] / pred.sum() >= max_share:
        return f"class {top} takes {100 * pred[top] / pred.sum():.1f}% of the predicted pixels"
    trivial = ConfusionMatrix(cm.num_classes)
    trivial.matrix[:, background] = cm.matrix.sum(1)  # every labelled pixel predicted as background
    if cm.miou() - trivial.miou() <= margin:
        return (f"mIoU {100 * cm.miou():.2f}% is not {100 * margin:.1f} points above predicting background "
                f"everywhere ({100 * trivial.miou():.2f}%)")
    return None


def detection_collapse(num_detections: int, score_threshold: float) -> str | None:
    """Why a detection result is degenerate, or None: collapsed when no box clears the score threshold."""
    if num_detections == 0:
        return f"no detection clears the score threshold {score_threshold:g} on any test image"
    return None
