"""Frozen-feature probes of a trunk: `python -m transfer.probe [--flag value ...]`.

The linear-SVM benchmark of Goyal et al. 2019 (VISSL's AlexNet VOC07 settings): the trunk is frozen, each of
conv1..conv5 and pool5 is average-pooled to roughly 9k dimensions, and a linear SVM per class (squared hinge,
cost C from 0.01 to 1000 picked by 3-fold cross-validation on the training split, scored by AP) is trained
on the training split and scored on the test split. A FAISS kNN classifier on the same features (cosine
similarity, weighted neighbour voting) is reported beside it: mAP by voting for multi-label data, plus
top-1 accuracy when every image has exactly one label.

The SVM objective is exactly LinearSVC's (squared hinge, L2, liblinear's regularised bias, positives
weighted 2 as in VISSL). By default it is solved exactly by Newton steps on the N x N kernel of the training
split (`l2svm_newton`): with N ~ 1k images and D ~ 9k dims, liblinear's dual coordinate descent hit its
2000-epoch cap on most fits here and took ~3 s each, Newton converges in a few Cholesky solves (and agrees
with LinearSVC to 1e-12 where LinearSVC converges). `--svm-solver liblinear` runs sklearn's LinearSVC itself.
Every (class, fold) path over the costs is an independent job spread over all cores (joblib threads: the
solvers release the GIL, and threads share the features instead of copying them); single-threaded SVM
grids are what make other suites' probes slow.

Writes `<out>/metrics.json` ({layer: {svm_mAP_11point, svm_mAP_all_point, knn_mAP_11point, knn_mAP_all_point,
knn_top1, best_C, dim, ...}}), `per_class.csv` (one row per layer and class) and `config.json`, and prints
one summary line per layer.
"""
from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg as sla
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pretrain.config import field, parse_config
from pretrain.data import VOCDataset, resolve_voc_root, skip_none_collate
from transfer.classify import centre_crop, eval_targets
from transfer.experiment import calibration_batch, seed_everything, select_device, write_results
from transfer.metrics import average_precision, classification_report, knn_vote_scores
from transfer.trunk import build_trunk, init_label

PROBE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")
# VISSL's AlexNet VOC07 SVM settings (Goyal et al. 2019): AvgPool2d (kernel, stride) per conv layer, so each
# layer gives ~9k dims. pool5 is flattened as it is (256x6x6 = 9216).
PROBE_POOLING: dict[str, tuple[int, int] | None] = {
    "conv1": (19, 4),  # 96x55x55 -> 96x10x10 = 9600
    "conv2": (12, 3),  # 256x27x27 -> 256x6x6 = 9216
    "conv3": (9, 1),  # 384x13x13 -> 384x5x5 = 9600
    "conv4": (9, 1),  # 384x13x13 -> 384x5x5 = 9600
    "conv5": (8, 1),  # 256x13x13 -> 256x6x6 = 9216
    "pool5": None,  # 256x6x6 = 9216
}
SVM_SOLVERS = ("newton", "liblinear")
DEFAULT_MAX_ITER = {"newton": 100, "liblinear": 2000}  # Newton steps; liblinear epochs (VISSL: 2000)


@dataclass
class ProbeConfig:
    """Every option of a probe run; written to <out>/config.json."""

    init: str = field("random", "trunk: random, rescaled, torchvision:PATH, a runs/<name>/ folder or a checkpoint .pth")
    data: str = field("builtin", "'builtin' (generated VOC-layout scenes) or a VOC root (e.g. ../shared/data/camvid-voc)")
    data_cache: str = field("", "where the built-in data is generated (default: $CTXENC_DATA_CACHE or ~/.cache/ctxenc)")
    builtin_images: int = field(2000, "size of the built-in dataset")
    train_split: str = field("train", "split the SVMs are fitted (and cross-validated) on, and the kNN index holds")
    test_split: str = field("test", "split scored")
    layers: tuple[str, ...] = field(PROBE_LAYERS, "trunk layers to probe")
    costs: tuple[float, ...] = field((0.01, 0.1, 1.0, 10.0, 100.0, 1000.0), "SVM costs C cross-validated per class")
    cv_folds: int = field(3, "cross-validation folds on the training split (stratified per class)")
    positive_weight: float = field(2.0, "SVM weight of positive samples (VISSL: 2; negatives 1)")
    svm_solver: str = field("newton", "newton: exact, from the N x N kernel (fast); liblinear: sklearn LinearSVC "
                                      "(VISSL's solver; same objective, slower, often stops at its iteration cap)",
                            choices=SVM_SOLVERS)
    svm_max_iter: int = field(0, "Newton steps or liblinear epochs per fit (0: 100 / 2000); unconverged fits are counted")
    n_jobs: int = field(-1, "parallel SVM fits (-1: every core)")
    knn_k: int = field(20, "neighbours of the kNN classifier")
    knn_temperature: float = field(0.07, "kNN votes weighted by exp(cosine / T) (Wu et al. 2018); 0: equal votes")
    input_size: int = field(227, "centre crop fed to the trunk")
    resize: int = field(256, "short side images are resized to before the centre crop")
    batch_size: int = field(64, "feature-extraction batch size")
    amp: str = field("bf16", "feature extraction under autocast: none or bf16 (CPU or CUDA)", choices=("none", "bf16"))
    channels_last: bool = field(True, "NHWC memory layout (faster convolutions with oneDNN and cuDNN)")
    workers: int = field(2, "data loader processes")
    seed: int = field(0, "seed for random/rescaled trunks and the cross-validation folds")
    device: str = field("auto", "auto, cpu or cuda")
    calib_images: int = field(32, "training images that calibrate --init rescaled")
    strict_images: bool = field(False, "stop at the first unreadable image instead of skipping it")
    out: str = field("", "output folder (default: runs/transfer/probe/<init label>-seed<seed>)")


# ------------------------------------------------------------------------------------------- features


class ProbeFeatures(nn.Module):
    """Frozen trunk -> per layer (B, D) vectors: conv layers average-pooled as in PROBE_POOLING, pool5 flattened."""

    def __init__(self, trunk: nn.Module, layers: Sequence[str] = PROBE_LAYERS) -> None:
        super().__init__()
        unknown = [k for k in layers if k not in PROBE_POOLING]
        if unknown:
            raise ValueError(f"--layers {unknown}: unknown; choose from {list(PROBE_POOLING)}")
        self.trunk, self.layers = trunk, tuple(layers)
        self.pools = nn.ModuleDict({k: nn.AvgPool2d(*PROBE_POOLING[k]) if PROBE_POOLING[k] else nn.Identity()
                                    for k in self.layers})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.trunk(x, list(self.layers))  # e.g. conv1 (B, 96, 55, 55) ... pool5 (B, 256, 6, 6)
        return [self.pools[k](f).flatten(1) for k, f in zip(self.layers, feats)]  # each (B, ~9k)

    @torch.no_grad()
    def dims(self, input_size: int = 227) -> dict[str, int]:
        """Feature dimension of each layer for a square input of `input_size`."""
        device = next(self.trunk.parameters()).device
        feats = self(torch.zeros(1, 3, input_size, input_size, device=device))
        return {k: f.shape[1] for k, f in zip(self.layers, feats)}


class CentreCrops(Dataset):
    """Items `(x (3, S, S) normalised centre crop, index)`, or None for an unreadable image."""

    def __init__(self, voc: VOCDataset, size: int = 227, resize: int = 256) -> None:
        self.voc, self.size, self.resize = voc, size, resize

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, i: int):
        item = self.voc[i]
        if item is None:
            return None
        return centre_crop(item[0], self.size, self.resize)[0], i


@torch.no_grad()
def extract_features(features: ProbeFeatures, loader: DataLoader, device: torch.device, amp: str = "bf16",
                     channels_last: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({layer: (N, D) float32}, dataset indices (N,)) for every readable image of the loader."""
    features.eval()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in features.layers}
    indices = []
    for batch, _ in loader:
        if batch is None:
            continue
        x, index = batch
        x = x.to(device, non_blocking=True)  # (B, 3, S, S)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            feats = features(x)
        for k, f in zip(features.layers, feats):
            out[k].append(f.float().cpu())  # (B, D)
        indices.append(index)
    if not indices:
        raise ValueError("no readable image in this split: every image was skipped")
    return {k: torch.cat(v).numpy() for k, v in out.items()}, torch.cat(indices).numpy()


# ------------------------------------------------------------------------------------------------ SVMs


def span_basis(train_x: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """(D, r) orthonormal basis of the span of the training rows (r <= n_train).

    An L2-regularised linear SVM's weight vector is a combination of training samples (representer
    theorem), and so is that of an SVM fitted on any subset of them (a CV fold). Projecting every sample
    onto this basis therefore keeps each fitted classifier's scores exactly (up to solver tolerance, and
    liblinear's regularised bias is unaffected), while the solver works on r <= n_train dims, not ~9k.
    Computed from the (N, N) Gram matrix: much cheaper than an SVD of (N, D) when N << D.
    """
    eigval, eigvec = np.linalg.eigh(train_x @ train_x.T)  # (N,), (N, N) ascending; Gram = U diag(s^2) U^T
    keep = eigval > rtol ** 2 * max(eigval[-1], 0.0) if eigval.size else np.zeros(0, bool)
    if not keep.any():
        return np.zeros((train_x.shape[1], 0))
    return train_x.T @ (eigvec[:, keep] / np.sqrt(eigval[keep]))  # V = X^T U diag(1/s): (D, r)


def l2svm_newton(kernel: np.ndarray, y: np.ndarray, cost: float, weights: np.ndarray, beta: np.ndarray | None = None,
                 max_iter: int = 100) -> tuple[np.ndarray, bool]:
    """Exact squared-hinge linear SVM from a kernel: LinearSVC's problem, solved by Newton steps.

    Minimises  1/2 |w|^2 + cost * sum_i weights_i * max(0, 1 - y_i f_i)^2  with f = X w, where `kernel` is
    X X^T + 1 (the +1 is liblinear's bias: a constant feature whose weight is regularised like the others,
    so this is the very objective of LinearSVC(loss="squared_hinge", class_weight=...)). The minimiser is
    w = X^T beta with beta zero outside the margin violators A, and for a fixed A it solves
    (K_AA + diag(1 / (2 cost weights_A))) beta_A = y_A; so each Newton step (Chapelle 2007) is one
    Cholesky solve, followed by a backtracking line search. The objective is piecewise quadratic, so the
    iteration stops exactly when A no longer changes (typically 2-6 steps; fewer when warm-started).

    Args:
        kernel: (N, N) X X^T + 1 of the training rows.
        y: (N,) labels in {-1, +1}; weights: (N,) per-sample cost multipliers (e.g. 2 for positives).
        beta: (N,) a warm start (the solution for a nearby cost), or None for 0.

    Returns:
        (beta (N,), converged); decision values of new rows are (X_new X^T + 1) @ beta.
    """
    cw = cost * weights  # (N,)

    def objective(b: np.ndarray) -> tuple[float, np.ndarray]:
        f = kernel @ b  # (N,) decision values
        xi = np.maximum(0.0, 1.0 - y * f)
        return 0.5 * float(b @ f) + float(np.sum(cw * xi * xi)), f

    beta = np.zeros(len(y)) if beta is None else beta.copy()
    obj, f = objective(beta)
    active = y * f < 1
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        target = np.zeros_like(beta)
        if idx.size:
            system = kernel[np.ix_(idx, idx)]  # (|A|, |A|)
            system[np.diag_indices_from(system)] += 0.5 / cw[idx]
            try:
                target[idx] = sla.cho_solve(sla.cho_factor(system, check_finite=False), y[idx], check_finite=False)
            except np.linalg.LinAlgError:  # numerically singular (huge cost): least squares instead
                target[idx] = np.linalg.lstsq(system, y[idx], rcond=None)[0]
        step, t = target - beta, 1.0
        while True:  # backtracking: the full Newton step almost always decreases the objective
            new_obj, new_f = objective(beta + t * step)
            if new_obj <= obj + 1e-12 * abs(obj) or t < 1e-6:
                break
            t *= 0.5
        beta, obj, f = beta + t * step, new_obj, new_f
        new_active = y * f < 1
        if t == 1.0 and np.array_equal(new_active, active):
            return beta, True
        active = new_active
    return beta, False


def _fit_liblinear(x: np.ndarray, y: np.ndarray, cost: float, positive_weight: float, max_iter: int, seed: int
                   ) -> tuple[LinearSVC, bool]:
    """One binary LinearSVC (y in {0, 1}); returns (model, converged)."""
    # dual="auto": the dual solver when samples <= dims (the usual case here), the primal one otherwise
    svm = LinearSVC(C=cost, loss="squared_hinge", penalty="l2", dual="auto", class_weight={1: positive_weight, 0: 1.0},
                    max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    return svm, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _svm_path(solver: str, fit_data: np.ndarray, eval_data: np.ndarray, y: np.ndarray, fit_idx: np.ndarray,
              eval_idx: np.ndarray, costs: Sequence[float], positive_weight: float, max_iter: int, seed: int
              ) -> tuple[list[np.ndarray], int, int]:
    """One class's SVMs on rows `fit_idx` for each cost (ascending: Newton warm-starts from the previous one).

    newton: `fit_data` is the (N, N) training kernel and `eval_data` the (M, N) kernel of the scored rows
    against the training rows; liblinear: both are feature matrices. y in {0, 1}.
    Returns ([decision values of the `eval_idx` rows, per cost], unconverged fits, worker thread id).
    """
    y_fit = y[fit_idx]
    scores, unconverged = [], 0
    if solver == "newton":
        kernel = fit_data[np.ix_(fit_idx, fit_idx)]  # (n, n)
        cross = eval_data[np.ix_(eval_idx, fit_idx)]  # (m, n)
        signs = np.where(y_fit == 1, 1.0, -1.0)
        weights = np.where(y_fit == 1, positive_weight, 1.0)
        beta = None
        for cost in costs:
            beta, ok = l2svm_newton(kernel, signs, cost, weights, beta, max_iter)
            scores.append(cross @ beta)  # (m,)
            unconverged += not ok
    else:
        for cost in costs:
            svm, ok = _fit_liblinear(fit_data[fit_idx], y_fit, cost, positive_weight, max_iter, seed)
            scores.append(svm.decision_function(eval_data[eval_idx]))  # (m,)
            unconverged += not ok
    return scores, unconverged, threading.get_ident()


def svm_probe(train_x: np.ndarray, train_t: np.ndarray, test_x: np.ndarray, costs: Sequence[float] = (0.01, 0.1, 1, 10,
              100, 1000), folds: int = 3, positive_weight: float = 2.0, max_iter: int = 0, n_jobs: int = -1,
              seed: int = 0, solver: str = "newton") -> dict[str, Any]:
    """One linear SVM per class, cost picked per class by stratified k-fold CV (AP) on the training split.

    Features are standardised with the training split's statistics. Both solvers minimise the same
    objective (LinearSVC's squared hinge with a regularised bias): "newton" exactly, from the N x N
    kernel (`l2svm_newton`); "liblinear" with sklearn's LinearSVC in the span of the training features
    (`span_basis`), up to its tolerance and iteration cap.

    Args:
        train_x: (N, D) training features; test_x: (M, D) test features.
        train_t: (N, C) targets in {1, 0, -1}; -1 ("difficult only") samples are left out of that class's fits.
        costs: the SVM costs C tried; ties in CV AP go to the smaller C (stronger regularisation).
        max_iter: Newton steps or liblinear epochs per fit; 0: DEFAULT_MAX_ITER.
        n_jobs: joblib worker threads over the (class, fold) cost paths, then over the final per-class fits.

    Returns:
        dict(scores=(M, C) decision values (0 for a class without positive or negative training samples),
        best_C={class index: C}, cv_ap={class index: [mean AP per cost, costs ascending]}, fits, unconverged,
        workers (ids of the threads that ran fits), fitted_dim (the dims the solver saw)).
    """
    if solver not in SVM_SOLVERS:
        raise ValueError(f"--svm-solver {solver!r}: choose one of {SVM_SOLVERS}")
    max_iter = max_iter or DEFAULT_MAX_ITER[solver]
    costs = sorted(float(c) for c in costs)
    scaler = StandardScaler().fit(train_x)  # zero mean, unit variance per dimension, from the training split
    xtr = scaler.transform(train_x).astype(np.float64)  # (N, D)
    xte = scaler.transform(test_x).astype(np.float64)  # (M, D)
    if solver == "newton":
        fit_data, test_data = xtr @ xtr.T + 1.0, xte @ xtr.T + 1.0  # (N, N), (M, N) kernels; +1: the bias
        fitted_dim = xtr.shape[1]
    else:
        if xtr.shape[0] < xtr.shape[1]:
            basis = span_basis(xtr)  # (D, r)
            xtr, xte = xtr @ basis, xte @ basis  # (N, r), (M, r)
        fit_data, test_data, fitted_dim = xtr, xte, xtr.shape[1]
    num_classes = train_t.shape[1]
    jobs, plan, best_cost, cv_ap = [], [], {}, {}
    for c in range(num_classes):
        keep = np.flatnonzero(train_t[:, c] != -1)
        y = (train_t[:, c] == 1).astype(np.int64)
        npos, nneg = int(y[keep].sum()), int(len(keep) - y[keep].sum())
        if npos == 0 or nneg == 0:
            continue  # nothing to separate: scores stay 0 and evaluation skips or reports the class
        n_splits = min(folds, npos, nneg)
        if n_splits < 2:  # too few positives to cross-validate: the middle of the grid
            best_cost[c] = costs[len(costs) // 2]
            continue
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for tr, va in splitter.split(keep, y[keep]):
            plan.append((c, y[keep[va]]))
            jobs.append(delayed(_svm_path)(solver, fit_data, fit_data, y, keep[tr], keep[va], costs, positive_weight,
                                           max_iter, seed))
    # Threads, not processes: both solvers spend their time in code that releases the GIL, and threads
    # share the features instead of copying them. BLAS is kept to one thread per worker: OpenBLAS
    # threads inside parallel workers oversubscribe the cores and spin (30x slower Cholesky here).
    parallel = Parallel(n_jobs=n_jobs, prefer="threads")
    with threadpool_limits(limits=1 if effective_n_jobs(n_jobs) > 1 else None, user_api="blas"):
        results = parallel(jobs) if jobs else []
        by_class: dict[int, list[list[float]]] = {}
        for (c, y_val), (fold_scores, _, _) in zip(plan, results):
            by_class.setdefault(c, []).append([average_precision(s, y_val, "all_point") for s in fold_scores])
        for c, fold_aps in by_class.items():
            means = np.nanmean(np.array(fold_aps), axis=0)  # (costs,) mean CV AP per cost
            cv_ap[c] = means.tolist()
            best_cost[c] = costs[int(np.nanargmax(means))] if not np.isnan(means).all() else costs[len(costs) // 2]
        final = sorted(best_cost.items())
        finals = parallel(
            delayed(_svm_path)(solver, fit_data, test_data, (train_t[:, c] == 1).astype(np.int64),
                               np.flatnonzero(train_t[:, c] != -1), np.arange(len(xte)), [cost], positive_weight,
                               max_iter, seed)
            for c, cost in final)
    scores = np.zeros((len(xte), num_classes))
    for (c, _), (s, _, _) in zip(final, finals):
        scores[:, c] = s[0]
    return {"scores": scores, "best_C": dict(final), "cv_ap": cv_ap,
            "fits": len(results) * len(costs) + len(finals), "unconverged": sum(r[1] for r in results + finals),
            "workers": {r[2] for r in results + finals}, "fitted_dim": fitted_dim}


# ------------------------------------------------------------------------------------------------- kNN


def _single_label(targets: np.ndarray) -> bool:
    """True when every row has exactly one positive and nothing ignored (an ImageFolder-style dataset)."""
    return bool(((targets == 1).sum(1) == 1).all() and (targets != -1).all())


def knn_probe(train_x: np.ndarray, train_t: np.ndarray, test_x: np.ndarray, test_t: np.ndarray, k: int = 20,
              temperature: float = 0.07, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """kNN classifier on L2-normalised features (FAISS inner product = cosine similarity).

    Each test image's class scores are its k nearest training images' targets, averaged with weights
    exp(cosine / temperature) (temperature 0: equal votes). Returns `classification_report`'s mAP_11point,
    mAP_all_point and per_class, plus `top1`: the accuracy of the highest-scoring class where every train
    and test image has exactly one label (None for multi-label data), and `scores` (M, C).
    """
    import faiss  # imported here: only the kNN probe needs it

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # (N, D) unit rows

    index = faiss.IndexFlatIP(train_x.shape[1])
    index.add(unit(train_x))
    k = min(k, train_x.shape[0])
    sims, nbrs = index.search(unit(test_x), k)  # (M, k) cosine similarities and training-row indices
    votes = (train_t == 1).astype(np.float64)  # (N, C): difficult-only entries do not vote
    weights = np.exp((sims - 1.0) / temperature) if temperature > 0 else None  # shifted by 1: same ranking, no overflow
    scores = knn_vote_scores(votes[nbrs], weights)  # (M, C)
    report = classification_report(scores, test_t, classes)
    top1 = None
    if _single_label(train_t) and _single_label(test_t):
        top1 = float(np.mean(scores.argmax(1) == (test_t == 1).argmax(1)))
    return {"mAP_11point": report["mAP_11point"], "mAP_all_point": report["mAP_all_point"],
            "per_class": report["per_class"], "top1": top1, "scores": scores}


# ------------------------------------------------------------------------------------------------ main


def default_out(cfg: ProbeConfig) -> Path:
    return Path("runs") / "transfer" / "probe" / f"{init_label(cfg.init)}-seed{cfg.seed}"


def main(cfg: ProbeConfig) -> dict[str, Any]:
    """Extract features, fit and score the probes per layer, write the results; returns {layer: metrics}."""
    start = time.time()
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    root = resolve_voc_root(cfg.data, cfg.data_cache or None, cfg.builtin_images)
    train_voc = VOCDataset(root, cfg.train_split, "classification", strict=cfg.strict_images)
    test_voc = VOCDataset(root, cfg.test_split, "classification", strict=cfg.strict_images)
    classes = list(train_voc.classes)

    calib = calibration_batch(train_voc, cfg.calib_images, cfg.input_size, cfg.seed) if cfg.init == "rescaled" else None
    trunk = build_trunk(cfg.init, cfg.seed, calib).to(device)
    features = ProbeFeatures(trunk, cfg.layers).to(device)
    if cfg.channels_last:
        features.to(memory_format=torch.channels_last)
    dims = features.dims(cfg.input_size)
    print(f"probe init={cfg.init} on {root}: {len(train_voc)} {cfg.train_split} / {len(test_voc)} {cfg.test_split} "
          f"images, {len(classes)} classes; feature dims " + ", ".join(f"{k} {d}" for k, d in dims.items()), flush=True)

    split_feats = {}
    for name, voc in (("train", train_voc), ("test", test_voc)):
        loader = DataLoader(CentreCrops(voc, cfg.input_size, cfg.resize), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.workers, collate_fn=skip_none_collate)
        t0 = time.perf_counter()
        split_feats[name] = extract_features(features, loader, device, cfg.amp, cfg.channels_last)
        print(f"features of {len(split_feats[name][1])} {name} images in {time.perf_counter() - t0:.0f} s", flush=True)
    (train_feats, train_index), (test_feats, test_index) = split_feats["train"], split_feats["test"]
    train_t, test_t = eval_targets(train_voc)[train_index], eval_targets(test_voc)[test_index]  # (N, C), (M, C)

    metrics: dict[str, Any] = {}
    per_class: list[dict[str, Any]] = []
    for layer in features.layers:
        t0 = time.perf_counter()
        svm = svm_probe(train_feats[layer], train_t, test_feats[layer], cfg.costs, cfg.cv_folds, cfg.positive_weight,
                        cfg.svm_max_iter, cfg.n_jobs, cfg.seed, cfg.svm_solver)
        svm_report = classification_report(svm["scores"], test_t, classes)
        svm_seconds = time.perf_counter() - t0
        knn = knn_probe(train_feats[layer], train_t, test_feats[layer], test_t, cfg.knn_k, cfg.knn_temperature, classes)
        best = {classes[c]: cost for c, cost in svm["best_C"].items()}
        metrics[layer] = {
            "svm_mAP_11point": svm_report["mAP_11point"], "svm_mAP_all_point": svm_report["mAP_all_point"],
            "knn_mAP_11point": knn["mAP_11point"], "knn_mAP_all_point": knn["mAP_all_point"], "knn_top1": knn["top1"],
            "best_C": best, "dim": dims[layer], "svm_fitted_dim": svm["fitted_dim"], "svm_fits": svm["fits"],
            "svm_unconverged": svm["unconverged"], "svm_seconds": svm_seconds, "skipped_classes": svm_report["skipped"],
        }
        for s_row, k_row in zip(svm_report["per_class"], knn["per_class"]):
            per_class.append({"layer": layer, "class": s_row["class"], "svm_ap_11point": s_row["ap_11point"],
                              "svm_ap_all_point": s_row["ap_all_point"], "knn_ap_11point": k_row["ap_11point"],
                              "knn_ap_all_point": k_row["ap_all_point"], "best_C": best.get(s_row["class"]),
                              "num_positives": s_row["num_positives"]})
        cs = list(best.values())
        top1 = f", top-1 {100 * knn['top1']:.1f}" if knn["top1"] is not None else ""
        unconverged = f", {svm['unconverged']} unconverged" if svm["unconverged"] else ""
        print(f"probe init={init_label(cfg.init)} seed={cfg.seed} {layer} ({dims[layer]}-d): "
              f"SVM mAP 11pt {100 * svm_report['mAP_11point']:.1f} / all-point {100 * svm_report['mAP_all_point']:.1f} "
              f"(median C {np.median(cs) if cs else float('nan'):g}, {svm['fits']} fits in {svm_seconds:.0f} s"
              f"{unconverged}) | kNN k={cfg.knn_k} mAP 11pt "
              f"{100 * knn['mAP_11point']:.1f} / all-point {100 * knn['mAP_all_point']:.1f}{top1}", flush=True)

    write_results(out, metrics, per_class, cfg)
    skipped = sorted({c for m in metrics.values() for c in m["skipped_classes"]})
    if skipped:
        print(f"classes without a positive test image (left out of every mAP): {', '.join(skipped)}")
    print(f"probe init={init_label(cfg.init)} seed={cfg.seed}: {len(features.layers)} layers on {cfg.test_split} "
          f"({len(test_index)} images) in {(time.time() - start) / 60:.1f} min -> {out}/")
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return main(parse_config(ProbeConfig, argv, description=__doc__ or ""))


if __name__ == "__main__":
    cli(sys.argv[1:])
