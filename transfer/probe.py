"""Frozen-feature probes of a trunk: `python -m transfer.probe [--flag value ...]`.

The linear-SVM benchmark of Goyal et al. 2019 as their code runs it (fair_self_supervision_benchmark,
tools/svm/), with VISSL's AlexNet VOC07 pooling: the trunk is frozen, each of conv1..conv5 and pool5 is
average-pooled to roughly 9k dimensions, each feature row is divided by its L2 norm, and per class a linear
SVM (sklearn LinearSVC's objective: squared hinge, L2 penalty, bias with intercept_scaling 1, positives
weighted 2; difficult-only training images as negatives) is fitted at each of their 26 costs (1e-7 ... 100
and 0.5^4 ... 0.5^19), the cost with the best mean AP (sklearn's average_precision, as their
cross_val_score) over 3 unshuffled stratified folds of the training split is refitted on the whole training
split, and its scores give the test AP (VOC07 11-point and all-point, difficult-only images left out). A
FAISS kNN classifier on the same features (cosine similarity, weighted neighbour voting) is reported beside
it: mAP by voting for multi-label data, plus top-1 accuracy when every image has exactly one label.

Where this differs from their code (metrics.json's `svm_protocol` says it for each run): by default the SVM
objective is solved exactly, by Newton steps on the N x N kernel of the training split (`l2svm_path`,
`l2svm_newton`; equal to LinearSVC where LinearSVC converges): with N ~ 1k images and D ~ 9k dims their
liblinear (tol 1e-4, at most 2000 epochs) needs seconds to tens of seconds per fit at costs >= 1 and stops
at its epoch cap at 100, while the exact solver covers a class's whole cost path in a fraction of a second.
`--svm-solver liblinear` runs their Normalizer -> LinearSVC pipeline itself. Rows are divided by |x| (sklearn's
Normalizer), theirs by |x| + 1e-5. Other --costs, --cv-folds or --positive-weight are further differences.
Every (class, fold) path over the costs is an independent job spread over all cores (joblib threads: the
solvers release the GIL, and threads share the features instead of copying them).

The trunk goes through the same rescaling protocol as in the fine-tuning tasks (`--rescale`): for a random
trunk that is Krähenbühl et al.'s data-dependent init; the between-layer scaling multiplies each layer's
features by one positive factor, which the per-row L2 normalisation removes.

Writes `<out>/metrics.json` (the common header with `scores` "<layer>/svm_mAP_11point" ..., and under
`layers` {layer: {svm_mAP_11point, svm_mAP_all_point, knn_mAP_11point, knn_mAP_all_point, knn_top1, best_C,
dim, svm_protocol, ...}}), `per_class.csv` (one row per layer and class) and `config.json`, and prints one
summary line per layer.
"""
from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg as sla
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import get_scorer
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pretrain.config import field
from pretrain.data import VOCDataset, skip_none_collate
from pretrain.errors import run_cli
from pretrain.precision import AMP_CHOICES, AMP_HELP
from transfer.classify import centre_crop, eval_targets
from transfer.experiment import Experiment, TransferConfig, calibration_batch, init_label, setup, write_results
from transfer.metrics import classification_report, knn_vote_scores
from transfer.trunk import build_trunk, calibrate_network_

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
# Goyal et al.'s VOC07 SVM settings (fair_self_supervision_benchmark, tools/svm/): their VOC07 --costs_list,
# then the 0.5^4 .. 0.5^19 that their parse_cost_list appends, in their order (which breaks ties).
GOYAL_COSTS: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0) + tuple(
    0.5 ** k for k in range(4, 20))
GOYAL_FOLDS = 3  # cross_val_score(cv=3)
GOYAL_POSITIVE_WEIGHT = 2.0  # class_weight={1: 2, -1: 1}
# and the rest of their LinearSVC arguments (fit_intercept=True: sklearn's default, which they keep).
GOYAL_LINEAR_SVC: dict[str, Any] = {"loss": "squared_hinge", "penalty": "l2", "dual": True, "fit_intercept": True,
                                    "intercept_scaling": 1.0, "tol": 1e-4, "max_iter": 2000}
SVM_SOLVERS = ("newton", "liblinear")
DEFAULT_MAX_ITER = {"newton": 100, "liblinear": GOYAL_LINEAR_SVC["max_iter"]}  # Newton steps; liblinear epochs


@dataclass
class ProbeConfig(TransferConfig):
    """Every option of a probe run; written to <out>/config.json."""

    train_split: str = field("train", "split the SVMs are fitted (and cross-validated) on, and the kNN index holds")
    test_split: str = field("test", "split scored")
    layers: tuple[str, ...] = field(PROBE_LAYERS, "trunk layers to probe")
    costs: tuple[float, ...] = field(GOYAL_COSTS, "SVM costs C cross-validated per class, in the order that breaks ties "
                                     "(default: Goyal et al.'s 26: 1e-7, 1e-6, ..., 10, 100, then 0.5^4 ... 0.5^19)")
    cv_folds: int = field(GOYAL_FOLDS, "unshuffled stratified cross-validation folds of the training split per class "
                                       "(Goyal et al.: 3)")
    positive_weight: float = field(GOYAL_POSITIVE_WEIGHT, "SVM weight of positive samples (Goyal et al.: 2; negatives 1)")
    svm_solver: str = field("newton", "newton: LinearSVC's objective solved exactly from the N x N kernel (fast); "
                                      "liblinear: Goyal et al.'s Normalizer -> LinearSVC pipeline itself (slow; stops "
                                      "at its epoch cap before the optimum at large costs)", choices=SVM_SOLVERS)
    svm_max_iter: int = field(0, "Newton steps or liblinear epochs per fit (0: 100 / Goyal et al.'s 2000); "
                                 "unconverged fits are counted")
    n_jobs: int = field(-1, "parallel SVM fits (-1: every core)")
    knn_k: int = field(20, "neighbours of the kNN classifier")
    knn_temperature: float = field(0.07, "kNN votes weighted by exp(cosine / T) (Wu et al. 2018); 0: equal votes")
    input_size: int = field(227, "centre crop fed to the trunk")
    resize: int = field(256, "short side images are resized to before the centre crop")
    batch_size: int = field(64, "feature-extraction batch size")
    amp: str = field("auto", "feature extraction under autocast: " + AMP_HELP, choices=AMP_CHOICES)
    channels_last: bool = field(True, "NHWC memory layout (faster convolutions with oneDNN and cuDNN)")
    workers: int = field(2, "data loader processes")
    strict_images: bool = field(False, "stop at the first unreadable image instead of skipping it")


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
#
# Goyal et al.'s code (tools/svm/ of fair_self_supervision_benchmark) runs the protocol as follows.
# train_svm_kfold.py: divide each feature row by its L2 norm; per class, labels 1 -> +1 and 0 -> -1, where the
# -1 ("difficult only") of the targets stays -1, so those images train as negatives; per cost, a LinearSVC
# scored by cross_val_score(cv=3, scoring="average_precision") and fitted on all training rows.
# test_svm.py: per class, the cost of the highest mean CV AP (np.argmax: the first in list order on ties),
# its SVM's test AP without the difficult-only images.


def goyal_svm(cost: float, positive_weight: float = GOYAL_POSITIVE_WEIGHT, max_iter: int = GOYAL_LINEAR_SVC["max_iter"],
              seed: int = 0) -> Pipeline:
    """Normalizer (each row / its L2 norm) -> LinearSVC with Goyal et al.'s settings; labels in {-1, +1}."""
    settings = {**GOYAL_LINEAR_SVC, "max_iter": max_iter}
    svm = LinearSVC(C=cost, class_weight={1: positive_weight, -1: 1.0}, random_state=seed, **settings)
    return Pipeline([("l2_rows", Normalizer()), ("svm", svm)])


def l2svm_newton(kernel: np.ndarray, y: np.ndarray, cost: float, weights: np.ndarray, beta: np.ndarray | None = None,
                 max_iter: int = 100) -> tuple[np.ndarray, bool]:
    """Exact squared-hinge linear SVM from a kernel: LinearSVC's problem, solved by Newton steps.

    Minimises  1/2 |w|^2 + cost * sum_i weights_i * max(0, 1 - y_i f_i)^2  with f = X w, where `kernel` is
    X X^T + 1 (the +1 is liblinear's bias with intercept_scaling 1: a constant feature whose weight is
    regularised like the others, so this is the very objective of LinearSVC(loss="squared_hinge",
    class_weight=...)). The minimiser is w = X^T beta with beta zero outside the margin violators A, and for
    a fixed A it solves (K_AA + diag(1 / (2 cost weights_A))) beta_A = y_A; so each Newton step (Chapelle
    2007) is one Cholesky solve, followed by a backtracking line search. The objective is piecewise
    quadratic, so the iteration stops exactly when A no longer changes (typically 2-6 steps; fewer when
    warm-started).

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
            system = kernel.take(idx, 0).take(idx, 1)  # (|A|, |A|); 3x faster than kernel[np.ix_(idx, idx)]
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


def shifted_solves(matrix: np.ndarray, rhs: np.ndarray, shifts: Sequence[float], max_dim: int = 64, rtol: float = 1e-12
                   ) -> np.ndarray:
    """(matrix + shift I)^-1 rhs for every shift at once, from one Krylov basis of a symmetric PSD matrix.

    Lanczos (fully reorthogonalised) builds V (k, N) and the tridiagonal T = V matrix V^T; since a shift
    leaves the Krylov space unchanged, every solution is |rhs| V^T (T + shift I)^-1 e1 (Saad 2003, 7.3). It
    stops once the residual of every shift, beta_k |e_k^T (T + shift I)^-1 e1|, is below rtol |rhs|, or at
    `max_dim` vectors: large shifts (well-conditioned systems) converge in a few dozen, small ones may not,
    so callers check the residuals of the solutions they use.

    Returns:
        (len(shifts), N) solutions, in the order of `shifts`.
    """
    shifts = np.asarray(shifts, dtype=np.float64)  # (S,)
    size = float(np.linalg.norm(rhs))
    if size == 0:
        return np.zeros((len(shifts), len(rhs)))
    max_dim = min(max_dim, len(rhs))
    basis = np.zeros((max_dim, len(rhs)))  # (k, N) orthonormal rows
    alpha, beta = np.zeros(max_dim), np.zeros(max_dim)  # T's diagonal and off-diagonal
    basis[0] = rhs / size
    for k in range(max_dim):
        w = matrix @ basis[k]  # (N,)
        alpha[k] = basis[k] @ w
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w -= basis[: k + 1].T @ (basis[: k + 1] @ w)
        beta[k] = np.linalg.norm(w)
        dim = k + 1
        tri = np.diag(alpha[:dim]) + np.diag(beta[: dim - 1], 1) + np.diag(beta[: dim - 1], -1)  # (k, k)
        eigval, eigvec = np.linalg.eigh(tri)
        coef = eigvec @ (eigvec[0][None, :] / (eigval[None, :] + shifts[:, None])).T  # (k, S): (T + s I)^-1 e1
        if beta[k] <= rtol * size or np.all(beta[k] * np.abs(coef[-1]) <= rtol) or dim == max_dim:
            return size * (basis[:dim].T @ coef).T  # (S, N)
        basis[k + 1] = w / beta[k]
    raise AssertionError("unreachable: the loop returns at max_dim")


def l2svm_path(kernel: np.ndarray, y: np.ndarray, costs: Sequence[float], weights: np.ndarray, max_iter: int = 100
               ) -> list[tuple[np.ndarray, bool]]:
    """`l2svm_newton` at each of `costs` (ascending), the small costs in closed form.

    While every training row violates the margin (y_i f_i < 1, as it does for every small enough cost:
    most of Goyal et al.'s grid on L2-normalised rows), the optimum solves one linear system,
    (K + diag(1 / (2 C weights))) beta = y, i.e. beta = W^1/2 (S + I / (2 C))^-1 W^1/2 y with W = diag(weights)
    and S = W^1/2 K W^1/2. `shifted_solves` gives it for every cost from one Krylov basis (a few dozen
    products with S, instead of a Cholesky factorisation per cost). A cost's closed form is kept only where
    its residual is below 1e-10 |y| and every row does violate the margin: then it meets the optimality
    conditions (to that residual). From the first cost where it does not, Newton steps take over, each cost
    warm-started from the previous one's solution.

    Returns:
        [(beta (N,), converged)] in the order of `costs`.
    """
    if list(costs) != sorted(costs):
        raise ValueError(f"l2svm_path: costs {list(costs)} must be ascending")
    sqrt_w = np.sqrt(weights)  # (N,)
    scaled = shifted_solves(sqrt_w[:, None] * kernel * sqrt_w[None, :], sqrt_w * y, [0.5 / c for c in costs])  # (costs, N)
    path: list[tuple[np.ndarray, bool]] = []
    beta, closed_form = None, True
    for cost, solution in zip(costs, scaled):
        if closed_form:
            candidate = sqrt_w * solution  # (N,)
            f = kernel @ candidate  # (N,) decision values
            residual = f + 0.5 / (cost * weights) * candidate - y  # of (K + diag(1 / (2 C weights))) beta = y
            if np.linalg.norm(residual) <= 1e-10 * np.linalg.norm(y) and np.all(y * f < 1):
                beta = candidate
                path.append((beta, True))
                continue
            closed_form = False
        beta, converged = l2svm_newton(kernel, y, cost, weights, beta, max_iter)
        path.append((beta, converged))
    return path


def cv_average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's average_precision_score(y, scores) for y in {-1, +1} (+1 positive): the score of
    cross_val_score(scoring="average_precision"), the step sum over distinct thresholds of
    (recall_k - recall_k-1) * precision_k. Same arithmetic as sklearn's, so equal to the last bit, but
    without its input checks, which take ~100x the computation on a cross-validation fold.
    """
    order = np.argsort(scores, kind="stable")[::-1]  # (m,) descending; the order among ties does not matter
    ranked = scores[order]
    ends = np.concatenate((np.flatnonzero(np.diff(ranked)), [ranked.size - 1]))  # last row of each distinct score
    tps = np.cumsum(y[order] == 1, dtype=np.float64)[ends]  # true positives at each threshold
    fps = 1 + ends.astype(np.float64) - tps
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)  # sklearn: recall 1 when there is no positive
    precision = np.concatenate(((tps / (tps + fps))[::-1], [1.0]))
    recall = np.concatenate((recall[::-1], [0.0]))
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _cv_fold(solver: str, data: np.ndarray, y: np.ndarray, fit_idx: np.ndarray, val_idx: np.ndarray,
             costs: Sequence[float], positive_weight: float, max_iter: int, seed: int) -> tuple[list[float], int, int, int]:
    """One (class, fold) of the cross-validation: the validation rows' AP (`cv_average_precision`, i.e. the
    scorer of cross_val_score(scoring="average_precision")) of an SVM fitted on `fit_idx`, for each cost.

    newton: `data` is the (N, N) kernel of the L2-normalised training rows (+1); liblinear: the (N, D) raw
    training features, fitted by `goyal_svm` pipelines. y in {-1, +1}. A fit part without both labels scores
    nan at every cost, as LinearSVC's refusal to fit one class does in cross_val_score.
    Returns (AP per cost in the order of `costs`, fits, unconverged fits, worker thread id).
    """
    y_fit, y_val = y[fit_idx], y[val_idx]
    if np.unique(y_fit).size < 2:
        return [float("nan")] * len(costs), 0, 0, threading.get_ident()
    aps, unconverged = [], 0
    if solver == "newton":
        order = np.argsort(costs, kind="stable")  # ascending for the path's warm starts
        path = l2svm_path(data[np.ix_(fit_idx, fit_idx)], y_fit.astype(np.float64), [costs[i] for i in order],
                          np.where(y_fit == 1, positive_weight, 1.0), max_iter)
        cross = data[np.ix_(val_idx, fit_idx)]  # (m, n) kernel of the validation rows against the fit rows
        by_cost = {int(i): cv_average_precision(y_val, cross @ beta) for i, (beta, _) in zip(order, path)}
        aps = [float(by_cost[i]) for i in range(len(costs))]
        unconverged = sum(not ok for _, ok in path)
    else:
        scorer = get_scorer("average_precision")
        for cost in costs:
            svm = goyal_svm(cost, positive_weight, max_iter, seed).fit(data[fit_idx], y_fit)
            aps.append(float(scorer(svm, data[val_idx], y_val)))
            unconverged += int(svm[-1].n_iter_ >= max_iter)
    return aps, len(costs), unconverged, threading.get_ident()


def _final_fit(solver: str, data: np.ndarray, test_data: np.ndarray, y: np.ndarray, cost: float, positive_weight: float,
               max_iter: int, seed: int) -> tuple[np.ndarray, int, int]:
    """One class's SVM on every training row at `cost`: (test decision values (M,), unconverged, thread id).

    newton: `data` (N, N) and `test_data` (M, N) kernels (+1) against the training rows; liblinear: raw features.
    """
    if solver == "newton":
        beta, converged = l2svm_newton(data, y.astype(np.float64), cost, np.where(y == 1, positive_weight, 1.0),
                                       max_iter=max_iter)
        return test_data @ beta, int(not converged), threading.get_ident()
    svm = goyal_svm(cost, positive_weight, max_iter, seed).fit(data, y)
    return svm.decision_function(test_data), int(svm[-1].n_iter_ >= max_iter), threading.get_ident()


def svm_probe(train_x: np.ndarray, train_t: np.ndarray, test_x: np.ndarray, costs: Sequence[float] = GOYAL_COSTS,
              folds: int = GOYAL_FOLDS, positive_weight: float = GOYAL_POSITIVE_WEIGHT, max_iter: int = 0,
              n_jobs: int = -1, seed: int = 0, solver: str = "newton") -> dict[str, Any]:
    """Goyal et al.'s per-class linear SVMs (see `goyal_svm`), the cost picked per class by k-fold CV.

    Per class c: labels +1 where train_t[:, c] == 1, else -1 (difficult-only images too, as in their
    train_svm_kfold.py); unshuffled StratifiedKFold(folds) over all training rows, as cross_val_score(cv=folds)
    splits; mean validation AP per cost; the first cost (in the order of `costs`) with the highest mean, as
    their np.argmax picks (a class whose CV could not fit, e.g. one positive image, gets the first cost as
    their argmax over nan does; so does one with fewer positives and fewer negatives than folds, where
    their StratifiedKFold stops with an error); that cost's SVM refitted on all training rows scores the
    test rows.
    A class with no positive or no negative training image is not fitted (its scores stay 0).

    Solvers, both of LinearSVC's objective on L2-normalised rows: "newton" solves it exactly from the N x N
    kernel (`l2svm_path`, `l2svm_newton`); "liblinear" runs their Normalizer -> LinearSVC pipeline itself,
    which stops at `max_iter` epochs (theirs: 2000) before the optimum at large costs and is far slower.

    Args:
        train_x: (N, D) training features; test_x: (M, D) test features (raw: rows are normalised here).
        train_t: (N, C) targets in {1, 0, -1}.
        costs: the SVM costs C tried, in the order that breaks ties.
        max_iter: Newton steps or liblinear epochs per fit; 0: DEFAULT_MAX_ITER.
        n_jobs: joblib worker threads over the (class, fold) cost paths, then over the final per-class fits.
        seed: liblinear's random coordinate order.

    Returns:
        dict(scores=(M, C) decision values, best_C={class index: C}, cv_ap={class index: [mean CV AP per cost,
        in the order of `costs`]}, fits, unconverged, workers (ids of the threads that ran fits)).
    """
    if solver not in SVM_SOLVERS:
        raise ValueError(f"--svm-solver {solver!r}: choose one of {SVM_SOLVERS}")
    costs = tuple(float(c) for c in costs)
    if not costs or min(costs) <= 0:
        raise ValueError(f"--costs {list(costs)}: give one or more positive SVM costs")
    if folds < 2 or folds > len(train_x):
        raise ValueError(f"--cv-folds {folds}: use 2 to {len(train_x)} (the number of training images)")
    max_iter = max_iter or DEFAULT_MAX_ITER[solver]
    if solver == "newton":
        # Normalizer has nothing to fit (each row is divided by its own norm), so normalising once here
        # equals normalising inside every fold as the pipeline does.
        xtr = Normalizer().transform(train_x.astype(np.float64))  # (N, D) unit rows
        xte = Normalizer().transform(test_x.astype(np.float64))  # (M, D)
        data, test_data = xtr @ xtr.T + 1.0, xte @ xtr.T + 1.0  # (N, N), (M, N) kernels; +1: the bias
    else:
        data, test_data = train_x.astype(np.float64), test_x.astype(np.float64)
    labels = np.where(train_t == 1, 1, -1)  # (N, C)
    fitted = [c for c in range(labels.shape[1]) if np.unique(labels[:, c]).size == 2]
    jobs, plan = [], []
    with warnings.catch_warnings():
        # expected with few positives, and handled as cross_val_score handles them: a fold without a
        # positive to score (AP 0), fewer members than folds; liblinear's iteration cap is counted instead
        warnings.filterwarnings("ignore", message="No positive class found in y_true")
        warnings.filterwarnings("ignore", message="The least populated class in y has only")
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        for c in fitted:
            if np.bincount(labels[:, c] > 0).max() < folds:  # StratifiedKFold refuses to split: no CV score
                continue
            for fit_idx, val_idx in StratifiedKFold(n_splits=folds).split(data, labels[:, c]):
                plan.append(c)
                jobs.append(delayed(_cv_fold)(solver, data, labels[:, c], fit_idx, val_idx, costs, positive_weight,
                                              max_iter, seed))
        # Threads, not processes: both solvers spend their time in code that releases the GIL, and threads
        # share the features instead of copying them. BLAS is kept to one thread per worker: OpenBLAS
        # threads inside parallel workers oversubscribe the cores and spin (30x slower Cholesky here).
        parallel = Parallel(n_jobs=n_jobs, prefer="threads")
        with threadpool_limits(limits=1 if effective_n_jobs(n_jobs) > 1 else None, user_api="blas"):
            results = parallel(jobs) if jobs else []
            fold_aps: dict[int, list[list[float]]] = {}
            for c, (aps, _, _, _) in zip(plan, results):
                fold_aps.setdefault(c, []).append(aps)
            nan = [float("nan")] * len(costs)
            cv_ap = {c: np.mean(fold_aps[c], axis=0).tolist() if c in fold_aps else nan for c in fitted}  # nan: a fold failed
            best_cost = {c: costs[int(np.argmax(cv_ap[c]))] for c in fitted}  # argmax: the first max, or the first nan
            finals = parallel(delayed(_final_fit)(solver, data, test_data, labels[:, c], best_cost[c], positive_weight,
                                                  max_iter, seed) for c in fitted)
    scores = np.zeros((len(test_x), labels.shape[1]))
    for c, (s, _, _) in zip(fitted, finals):
        scores[:, c] = s
    return {"scores": scores, "best_C": best_cost, "cv_ap": cv_ap,
            "fits": sum(r[1] for r in results) + len(finals),
            "unconverged": sum(r[2] for r in results) + sum(f[1] for f in finals),
            "workers": {r[3] for r in results} | {f[2] for f in finals}}


def svm_protocol(costs: Sequence[float] = GOYAL_COSTS, folds: int = GOYAL_FOLDS,
                 positive_weight: float = GOYAL_POSITIVE_WEIGHT, solver: str = "newton", max_iter: int = 0) -> str:
    """Caption of `svm_probe`'s SVM scores: the protocol, then exactly where it differs from Goyal et al.'s code."""
    differs = []
    if solver == "newton":
        differs.append("LinearSVC's objective solved to its exact optimum by Newton steps (theirs: liblinear, tol 1e-4, "
                       "at most 2000 epochs, which stops short of the optimum at large costs)")
    elif (max_iter or DEFAULT_MAX_ITER[solver]) != GOYAL_LINEAR_SVC["max_iter"]:
        differs.append(f"liblinear at most {max_iter} epochs (theirs 2000)")  # max_iter is non-zero here
    if tuple(float(c) for c in costs) != GOYAL_COSTS:
        differs.append(f"costs {', '.join(f'{c:g}' for c in costs)} (theirs: 1e-7, 1e-6, ..., 10, 100, then 0.5^4 ... "
                       "0.5^19; 26 values)")
    if folds != GOYAL_FOLDS:
        differs.append(f"{folds}-fold CV (theirs 3-fold)")
    if positive_weight != GOYAL_POSITIVE_WEIGHT:
        differs.append(f"positives weighted {positive_weight:g} (theirs 2)")
    differs.append("rows divided by |x| (theirs by |x| + 1e-5)")
    return (f"Linear SVM per class after Goyal et al. 2019 (fair_self_supervision_benchmark tools/svm): feature rows "
            f"L2-normalised; LinearSVC (squared hinge, L2 penalty, dual, bias with intercept_scaling 1, positives "
            f"weighted {positive_weight:g}), difficult-only training images as negatives; cost per class from "
            f"{len(costs)} values by unshuffled stratified {folds}-fold cross-validation scored by sklearn's "
            f"average_precision (first best in grid order); refit on the whole training split; test AP without "
            f"difficult-only images. Differs: {'; '.join(differs)}.")


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


def main(cfg: ProbeConfig) -> dict[str, Any]:
    """Probe the trunk on the centre crops of whole images (VOC classification labels); returns metrics.json's
    content (per-layer details under "layers")."""
    exp = setup(cfg, "probe", voc_task="classification", splits=(cfg.train_split, cfg.test_split))
    train_voc = VOCDataset(exp.root, cfg.train_split, "classification", strict=cfg.strict_images)
    test_voc = VOCDataset(exp.root, cfg.test_split, "classification", strict=cfg.strict_images)
    return probe_images(cfg, exp, train_voc, test_voc, eval_targets(train_voc), eval_targets(test_voc),
                        list(train_voc.classes), "images")


def probe_images(cfg: ProbeConfig, exp: Experiment, train_images: Dataset, test_images: Dataset, train_targets: np.ndarray,
                 test_targets: np.ndarray, classes: list[str], unit: str) -> dict[str, Any]:
    """Extract the frozen trunk's features of both splits, fit and score the probes per layer, write the results.

    `train_images[i]` / `test_images[i]` are `(PIL image, ...)` items (or None: skipped); `*_targets` their (N, C)
    labels in {1, 0, -1}; `unit` names what an item is in the printed lines ("images", "objects").
    Returns metrics.json's content (per-layer details under "layers").
    """
    device = exp.device
    trunk, checkpoint = build_trunk(cfg.init, cfg.seed)
    calibration = None
    if cfg.rescale:  # the same protocol as the fine-tuning tasks; on frozen features it is the within-layer init
        calib = calibration_batch(train_images, cfg.calib_images, cfg.input_size, cfg.seed)  # (n, 3, S, S)
        calibration = calibrate_network_(trunk, trunk, [], lambda: trunk(calib), trunk_is_fresh=cfg.init == "random")
    trunk.to(device)
    features = ProbeFeatures(trunk, cfg.layers).to(device)
    if cfg.channels_last:
        features.to(memory_format=torch.channels_last)
    dims = features.dims(cfg.input_size)
    print(f"{exp.task} init={cfg.init} on {exp.root}: {len(train_images)} {cfg.train_split} / {len(test_images)} "
          f"{cfg.test_split} {unit}, {len(classes)} classes; feature dims "
          + ", ".join(f"{k} {d}" for k, d in dims.items()), flush=True)

    split_feats = {}
    for name, images in (("train", train_images), ("test", test_images)):
        loader = DataLoader(CentreCrops(images, cfg.input_size, cfg.resize), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.workers, collate_fn=skip_none_collate)
        t0 = time.perf_counter()
        split_feats[name] = extract_features(features, loader, device, cfg.amp, cfg.channels_last)
        print(f"features of {len(split_feats[name][1])} {name} {unit} in {time.perf_counter() - t0:.0f} s", flush=True)
    (train_feats, train_index), (test_feats, test_index) = split_feats["train"], split_feats["test"]
    train_t, test_t = train_targets[train_index], test_targets[test_index]  # (N, C), (M, C)

    protocol = svm_protocol(cfg.costs, cfg.cv_folds, cfg.positive_weight, cfg.svm_solver, cfg.svm_max_iter)
    print(protocol, flush=True)
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
            "best_C": best, "dim": dims[layer], "svm_fits": svm["fits"], "svm_unconverged": svm["unconverged"],
            "svm_seconds": svm_seconds, "skipped_classes": svm_report["skipped"], "svm_protocol": protocol,
        }
        for s_row, k_row in zip(svm_report["per_class"], knn["per_class"]):
            per_class.append({"layer": layer, "class": s_row["class"], "svm_ap_11point": s_row["ap_11point"],
                              "svm_ap_all_point": s_row["ap_all_point"], "knn_ap_11point": k_row["ap_11point"],
                              "knn_ap_all_point": k_row["ap_all_point"], "best_C": best.get(s_row["class"]),
                              "num_positives": s_row["num_positives"]})
        cs = list(best.values())
        top1 = f", top-1 {100 * knn['top1']:.1f}" if knn["top1"] is not None else ""
        unconverged = f", {svm['unconverged']} unconverged" if svm["unconverged"] else ""
        print(f"{exp.task} init={init_label(cfg.init)} seed={cfg.seed} {layer} ({dims[layer]}-d): "
              f"SVM mAP 11pt {100 * svm_report['mAP_11point']:.1f} / all-point {100 * svm_report['mAP_all_point']:.1f} "
              f"(median C {np.median(cs) if cs else float('nan'):g}, {svm['fits']} fits in {svm_seconds:.0f} s"
              f"{unconverged}) | kNN k={cfg.knn_k} mAP 11pt "
              f"{100 * knn['mAP_11point']:.1f} / all-point {100 * knn['mAP_all_point']:.1f}{top1}", flush=True)

    scores = {f"{layer}/{key}": m[key] for layer, m in metrics.items()
              for key in ("svm_mAP_11point", "svm_mAP_all_point", "knn_mAP_11point", "knn_mAP_all_point", "knn_top1")
              if m[key] is not None}  # knn_top1: single-label data only
    result = write_results(exp, scores, {"layers": metrics, "svm_protocol": protocol, "calibration": calibration},
                           per_class, checkpoint=checkpoint)
    skipped = sorted({c for m in metrics.values() for c in m["skipped_classes"]})
    if skipped:
        print(f"classes without a positive test image (left out of every mAP): {', '.join(skipped)}")
    print(f"{exp.task} init={init_label(cfg.init)} seed={cfg.seed}: {len(features.layers)} layers on {cfg.test_split} "
          f"({len(test_index)} {unit}) in {result['wall_seconds'] / 60:.1f} min -> {exp.out}/")
    return result


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(main, ProbeConfig, argv, description=__doc__ or "")


if __name__ == "__main__":
    cli(sys.argv[1:])
