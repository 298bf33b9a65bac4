"""Nearest neighbours on frozen features: context retrieval with NN-inpainting, and patch retrieval.

`python -m transfer.retrieve [--flag value ...]` (`--help` lists every option). Pathak et al. 2016, Sec. 5.1
and Table 1: the features of an image's *context* (its centre hole dropped) retrieve other images whose
corresponding region fits the hole; filling the hole with that region (NN-inpainting) and scoring it with
L1 / L2 / PSNR over the hole measures how much the features know about what the context implies.

(a) context retrieval: every image's centre crop, hole at its centre (1/4 of the area), encoded with the
    hole set to the mean colour; each query image is matched against the others (leave-one-out) and its
    hole is filled with the same region of its nearest neighbour's crop. A context-encoder checkpoint's own
    prediction of the hole is scored beside it, and so is filling with the context's mean colour.
(b) patch retrieval: each crop's own (unmasked) features, scored with precision@k. With class labels that
    occur more than once (VOC image labels; a class-per-subfolder image tree) a neighbour is correct when
    it shares at least one class with the query. Where every image is its own class (imagenet-sample: one
    photo per class), labels are degenerate, so the database holds several random crops of every image and
    a held-out query crop is correct when its neighbour was cut from the same source image.

Outputs in --out (default runs/transfer/retrieve/<label>-seed<seed>): config.json, metrics.json, table.md,
index_context/ and index_patch/ (reloadable FeatureIndex folders), gallery/ (PNG grids and a static HTML
gallery; open gallery/index.html in any browser).
"""
from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pretrain.config import field
from pretrain.data import DatasetNotFoundError, VOCDataset, find_year_dir, list_images, load_rgb, resolve_voc_root
from pretrain.dataset import denormalize, normalize
from pretrain.engine import hole_errors
from pretrain.errors import BadOptionError, run_cli
from pretrain.hub import NotAnInpainterError, load_generator
from pretrain.masks import apply_mask, central_square_mask
from pretrain.models import FEATURE_KEYS
from transfer.crops import EntryMetadata, center_square_box, load_crops, paste, random_square_box
from transfer.experiment import TransferConfig, calibration_batch, init_label, setup, write_results
from transfer.gallery import build_retrieval_gallery
from transfer.index import FLAT_MAX_ENTRIES, INDEX_KINDS, METRICS, FeatureIndex
from transfer.trunk import build_trunk, calibrate_network_

# ------------------------------------------------------------------------------------------------ data


@dataclass
class RetrievalImages:
    """The images to retrieve among, with class labels when the data has them.

    `labels`: (N, C) multi-hot for VOC layouts, (N,) class index for image folders, None when unknown.
    """

    paths: list[Path]
    root: Path
    labels: np.ndarray | None
    class_names: list[str]

    @property
    def multilabel(self) -> bool:
        return self.labels is not None and self.labels.ndim == 2

    def labels_repeat(self) -> bool:
        """True when some class covers more than one image, i.e. precision@k on labels means something."""
        if self.labels is None:
            return False
        counts = self.labels.sum(0) if self.multilabel else np.bincount(self.labels[self.labels >= 0])
        return bool((counts > 1).any())


_WNID = re.compile(r"^(n\d{8})_")


def _readable(paths: list[Path]) -> np.ndarray:
    """(N,) bool: the file's image header can be read. Unreadable files are reported and left out, so one bad
    file in a folder of thousands does not stop a run (a truncated body still fails later, naming the file)."""
    ok = np.ones(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                ok[i] = min(im.size) >= 16
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            ok[i] = False
            warnings.warn(f"skipping {path}: not a readable image ({type(err).__name__}: {err})", stacklevel=3)
    return ok


def open_retrieval_images(data: str, split: str = "trainval", max_images: int = 0, cache_dir: str = "",
                          builtin_images: int = 2000) -> RetrievalImages:
    """`builtin` or a VOC root (the `split` list, image labels) or a folder of images (class = subfolder,
    else the ImageNet wnid prefix of the file name, e.g. n01440764_tench.JPEG -> n01440764)."""
    root = resolve_voc_root(data, cache_dir or None, builtin_images) if data == "builtin" else Path(data).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(root, "'builtin', a Pascal VOC root, or a folder of images")
    try:
        find_year_dir(root)
        is_voc = True
    except (FileNotFoundError, ValueError):
        is_voc = False
    if is_voc:
        voc = VOCDataset(root, split=split, task="classification")
        n = len(voc) if not max_images else min(max_images, len(voc))
        files = [voc.image_path(i) for i in range(n)]
        ok = _readable(files)
        return RetrievalImages([f for f, keep in zip(files, ok) if keep], root, voc.labels[:n][ok].astype(np.int64),
                               list(voc.classes))
    files = list_images(root)
    files = files[:max_images] if max_images else files
    files = [f for f, keep in zip(files, _readable(files)) if keep]
    tops = [p.relative_to(root).parts for p in files]
    if all(len(parts) > 1 for parts in tops):  # ImageFolder tree: root/<class>/<image>
        names = [parts[0] for parts in tops]
    elif all(_WNID.match(p.name) for p in files):
        names = [_WNID.match(p.name).group(1) for p in files]
    else:
        return RetrievalImages(files, root, None, [])
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return RetrievalImages(files, root, np.array([index[c] for c in names], dtype=np.int64), classes)


def entries_for(images: RetrievalImages, crops_per_image: int = 0, seed: int = 0) -> EntryMetadata:
    """One centre square per image (crops_per_image = 0), or that many random squares per image."""
    rng = np.random.default_rng(seed)
    source, boxes = [], []
    for i, path in enumerate(images.paths):
        with Image.open(path) as im:  # header only: the size, without decoding
            w, h = im.size
        for _ in range(max(1, crops_per_image)):
            boxes.append(center_square_box(w, h) if crops_per_image == 0 else random_square_box(w, h, rng))
            source.append(i)
    return EntryMetadata([str(p) for p in images.paths], np.array(source), np.array(boxes))


# ------------------------------------------------------------------------------------------------ features


class TrunkFeatures:
    """Flattened features of one AlexNet layer; the hole (if any) is set to the mean colour, as in pretraining."""

    def __init__(self, trunk: nn.Module, layer: str, device: torch.device) -> None:
        self.trunk, self.layer, self.device = trunk.eval().to(device), layer, device

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
        x = normalize(images01.to(self.device))  # (B, 3, S, S)
        if mask is not None:
            x = apply_mask(x, mask.to(self.device))
        return self.trunk(x, [self.layer])[0].flatten(1).float().cpu().numpy()  # (B, C*H*W)


class HogFeatures:
    """scikit-image HOG (the paper's non-learned baseline) of the image with the hole set to the mean colour."""

    def __init__(self, cell: int = 16, orientations: int = 9, block: int = 2) -> None:
        self.cell, self.orientations, self.block = cell, orientations, block

    def __call__(self, images01: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
        from skimage.feature import hog  # imported lazily: only --init hog needs scikit-image

        x = normalize(images01)
        if mask is not None:
            x = apply_mask(x, mask)
        pixels = denormalize(x).permute(0, 2, 3, 1).numpy()  # (B, S, S, 3): hole = mean colour
        return np.stack([hog(p, orientations=self.orientations, pixels_per_cell=(self.cell, self.cell),
                             cells_per_block=(self.block, self.block), channel_axis=-1) for p in pixels]
                        ).astype(np.float32)  # (B, D)


Featurizer = Callable[[torch.Tensor, "torch.Tensor | None"], np.ndarray]


def encode(featurizer: Featurizer, metadata: EntryMetadata, size: int, mask: torch.Tensor | None = None,
           batch_size: int = 32, ids: Sequence[int] | None = None) -> np.ndarray:
    """Features (len(ids), D) of the entries' crops (all entries by default), in batches."""
    ids = list(range(len(metadata))) if ids is None else list(ids)
    out = [featurizer(load_crops(metadata, ids[i:i + batch_size], size), mask) for i in range(0, len(ids), batch_size)]
    return np.concatenate(out)


def load_inpainting_model(init: str) -> nn.Module | None:
    """The whole context encoder (encoder + bottleneck + decoder) of a checkpoint init, rebuilt from its config.

    None for random / torchvision / hog inits, which have no decoder to fill the hole with, and for
    checkpoints of an objective without one (e.g. supervised).
    """
    path = Path(init)
    if init in ("random", "hog") or init.startswith("torchvision:") or not path.exists():
        return None
    try:
        return load_generator(path).model
    except NotAnInpainterError as err:
        print(f"{err}: only NN-inpainting is scored", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------------ scoring


def hole_metrics(l1_sum: float, l2_sum: float, count: float) -> dict[str, float]:
    """Pooled mean L1, mean L2 and PSNR = 10 log10(1 / mean L2) (inf when L2 is exactly 0), as pretrain.engine."""
    l1, l2 = l1_sum / max(count, 1.0), l2_sum / max(count, 1.0)
    return {"l1": l1, "l2": l2, "psnr": math.inf if l2 == 0 else 10 * math.log10(1.0 / l2)}


@dataclass
class ContextRetrieval:
    """Result of NN-inpainting: the neighbours of each query and the pooled hole errors of each fill."""

    query_ids: np.ndarray  # (Q,)
    distances: np.ndarray  # (Q, k)
    neighbour_ids: np.ndarray  # (Q, k)
    scores: dict[str, dict[str, float]]  # fill name -> {"l1", "l2", "psnr"}
    per_query: dict[str, np.ndarray]  # fill name -> (Q, 3) per-query l1, l2, psnr


@torch.no_grad()
def nn_inpaint(index: FeatureIndex, query_features: np.ndarray, query_ids: Sequence[int], size: int,
               mask: torch.Tensor, k: int = 5, leave_one_out: bool = True, model: nn.Module | None = None,
               device: torch.device | None = None, batch_size: int = 32) -> ContextRetrieval:
    """Fill each query's hole with the same region of its nearest context neighbour and score it.

    The queries are database entries `query_ids` (features: their context features). With `leave_one_out`
    each query's own entry is excluded; without it, a query finds itself at distance ~0 and scores L1 = 0,
    PSNR = inf. Also scored: the mean colour of each query's context, and `model`'s own prediction (a
    context encoder taking the normalised masked image) when given.
    """
    qids = np.asarray(query_ids, dtype=np.int64)
    k = min(k, index.ntotal - (1 if leave_one_out else 0))
    if k < 1:
        raise BadOptionError("context retrieval needs at least 2 database images with --leave-one-out")
    dist, nbr = index.search(query_features, k, exclude=qids if leave_one_out else None)  # (Q, k)
    sums: dict[str, list[float]] = {}
    per_query: dict[str, list[list[float]]] = {}
    meta = index.metadata
    for start in range(0, len(qids), batch_size):
        ids = qids[start:start + batch_size]
        target = load_crops(meta, ids, size)  # (B, 3, S, S) in [0, 1]
        neighbour = load_crops(meta, nbr[start:start + batch_size, 0], size)  # same crop geometry: the box
        visible = (~mask).float()  # (S, S)
        context_mean = (target * visible).sum((2, 3), keepdim=True) / visible.sum().clamp_min(1)  # (B, 3, 1, 1)
        fills = {"nn": paste(neighbour, target, mask), "mean_fill": context_mean.expand_as(target)}
        if model is not None:
            dev = device or torch.device("cpu")
            x_in = apply_mask(normalize(target), mask).to(dev)  # (B, 3, S, S)
            fills["ce"] = paste(denormalize(model.to(dev)(x_in).float()).cpu(), target, mask)
        for name, filled in fills.items():
            total = sums.setdefault(name, [0.0, 0.0, 0.0])
            for b in range(len(ids)):
                l1, l2, n = hole_errors(filled[b:b + 1], target[b:b + 1], mask[None])
                total[0] += l1
                total[1] += l2
                total[2] += n
                m = hole_metrics(l1, l2, n)
                per_query.setdefault(name, []).append([m["l1"], m["l2"], m["psnr"]])
    return ContextRetrieval(qids, dist, nbr, {name: hole_metrics(*s) for name, s in sums.items()},
                            {name: np.array(v) for name, v in per_query.items()})


def label_hits(labels: np.ndarray, query_ids: np.ndarray, neighbour_ids: np.ndarray) -> np.ndarray:
    """(Q, k) bool: neighbour shares at least one class with the query (multi-hot) or has its class (index)."""
    if labels.ndim == 2:
        return (labels[neighbour_ids] * labels[query_ids][:, None]).sum(-1) > 0
    return labels[neighbour_ids] == labels[query_ids][:, None]


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class RetrieveConfig(TransferConfig):
    """Every option of `python -m transfer.retrieve`; written to <out>/config.json."""

    init: str = field("random", "features: hog (scikit-image HOG), random, a runs/<name>/ context-encoder or "
                                "autoencoder folder (or checkpoint .pth), or torchvision:PATH")
    data: str = field("builtin", "'builtin', a Pascal VOC root, or a folder of images (e.g. ../shared/data/imagenet-sample)")
    split: str = field("trainval", "VOC split used as database and queries (image folders use every image)")
    max_images: int = field(0, "use only the first N images (0: all)")
    size: int = field(227, "side of the square crop the features see (227 for AlexNet)")
    hole: float = field(0.25, "area fraction of the central square hole (paper: 1/4)")
    layer: str = field("pool5", "AlexNet layer whose flattened features are indexed", choices=FEATURE_KEYS)
    hog_cell: int = field(16, "HOG pixels per cell (--init hog)")
    pca_dim: int = field(0, "reduce features to this many dimensions with FAISS PCA (0: no PCA)")
    metric: str = field("l2", "distance", choices=METRICS)
    index: str = field("auto", f"FAISS index; auto = flat below {FLAT_MAX_ENTRIES:,} entries, else ivf",
                       choices=INDEX_KINDS)
    nprobe: int = field(64, "IVF lists visited per query (64: recall@10 ~0.95 at 1M entries)")
    ef_search: int = field(128, "HNSW candidate list size per query (128: recall@10 ~0.95 at 1M)")
    queries: int = field(200, "context-retrieval / patch-retrieval queries (0: every image)")
    k: int = field(5, "neighbours retrieved per query (precision@k, gallery columns)")
    leave_one_out: bool = field(True, "exclude each query image from its own neighbours (off: it finds itself)")
    patch_mode: str = field("auto", "patch retrieval scoring: labels (shares a class), crops (same source image), "
                                    "off; auto = labels when some class covers 2+ images, else crops",
                            choices=("auto", "labels", "crops", "off"))
    crops_per_image: int = field(5, "crops mode: random crops of every image in the database (queries: one more)")
    gallery: int = field(12, "queries drawn in PNG grids and the HTML gallery (0: none)")
    batch_size: int = field(32, "images per forward pass")


def feature_label(cfg: RetrieveConfig) -> str:
    if cfg.init == "hog":
        return "hog"
    return init_label(cfg.init) + ("" if cfg.layer == "pool5" else f"-{cfg.layer}")


def build_featurizer(cfg: RetrieveConfig, images: RetrievalImages, device: torch.device
                     ) -> tuple[Featurizer, dict | None, dict | None]:
    """(the featurizer, where a pretrained trunk came from, the rescaling report): HOG, or the trunk after the
    same rescaling protocol as every other task."""
    if cfg.init == "hog":
        return HogFeatures(cfg.hog_cell), None, None
    trunk, checkpoint = build_trunk(cfg.init, cfg.seed)
    calibration = None
    if cfg.rescale:
        calib = calibration_batch([load_rgb(p) for p in images.paths[:4 * cfg.calib_images]], n=cfg.calib_images,
                                  size=cfg.size, seed=cfg.seed)  # (n, 3, S, S)
        calibration = calibrate_network_(trunk, trunk, [], lambda: trunk(calib),
                                         trunk_is_fresh=cfg.init == "random")
    return TrunkFeatures(trunk, cfg.layer, device), checkpoint, calibration


def choose_queries(n: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct image indices (all when count is 0 or >= n), seeded, in sorted order."""
    if count <= 0 or count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def patch_retrieval(cfg: RetrieveConfig, images: RetrievalImages, featurizer: Featurizer, query_images: np.ndarray,
                    context_entries: EntryMetadata, out: Path) -> dict[str, float | str | int]:
    """Precision@k of unmasked crop features (see the module docstring for the two criteria)."""
    mode = cfg.patch_mode
    if mode == "auto":
        mode = "labels" if images.labels_repeat() else "crops"
    if mode == "off":
        return {}
    if mode == "labels":
        if images.labels is None:
            raise BadOptionError(f"--patch-mode labels: {cfg.data} has no class labels; use --patch-mode crops")
        entries = context_entries
        feats = encode(featurizer, entries, cfg.size, None, cfg.batch_size)
        index = FeatureIndex.build(feats, entries, cfg.index, cfg.metric, min(cfg.pca_dim, *feats.shape),
                                   cfg.nprobe, cfg.ef_search, seed=cfg.seed)
        labels = images.labels
        has_label = labels.sum(1) > 0 if labels.ndim == 2 else labels >= 0
        qids = query_images[has_label[query_images]]  # a query with no class cannot be right or wrong
        k = min(cfg.k, index.ntotal - 1)
        _, nbr = index.search(feats[qids], k, exclude=qids)  # leave-one-out: the image itself is trivially right
        hits = label_hits(labels, qids, nbr)
        everyone = np.arange(len(labels))
        chance = float(np.mean([(label_hits(labels, np.array([q]), everyone[everyone != q][None])).mean() for q in qids]))
        criterion = "shares at least one class" if labels.ndim == 2 else "same class"
    else:
        entries = entries_for(images, cfg.crops_per_image, seed=cfg.seed + 1)
        feats = encode(featurizer, entries, cfg.size, None, cfg.batch_size)
        index = FeatureIndex.build(feats, entries, cfg.index, cfg.metric, min(cfg.pca_dim, *feats.shape),
                                   cfg.nprobe, cfg.ef_search, seed=cfg.seed)
        held_out = entries_for(RetrievalImages([images.paths[i] for i in query_images], images.root, None, []), 1,
                               seed=cfg.seed + 2)  # one fresh random crop per query image, not in the database
        qfeats = encode(featurizer, held_out, cfg.size, None, cfg.batch_size)
        k = min(cfg.k, cfg.crops_per_image)  # at most crops_per_image neighbours can be right
        _, nbr = index.search(qfeats, k)
        hits = entries.source[nbr] == query_images[:, None]  # (Q, k): cut from the same source image
        qids = query_images
        chance = 1.0 / len(images.paths)
        criterion = f"neighbour crop from the query crop's source image ({cfg.crops_per_image} crops per image)"
    index.save(out / "index_patch")
    return {"precision_at_k": float(hits.mean()), "precision_k": int(k), "precision_mode": mode,
            "precision_criterion": criterion, "precision_chance": chance, "precision_queries": int(len(qids)),
            "precision_database": index.ntotal}


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A Table-1-style Markdown table: L1 and L2 in percent of the [0, 1] range, PSNR in dB."""
    lines = ["| method | mean L1 (%) | mean L2 (%) | PSNR (dB) |", "| --- | ---: | ---: | ---: |"]
    for name, m in rows:
        lines.append(f"| {name} | {100 * m['l1']:.2f} | {100 * m['l2']:.2f} | {m['psnr']:.2f} |")
    return "\n".join(lines)


def main(cfg: RetrieveConfig) -> dict[str, object]:
    if cfg.k < 1 or not 0 < cfg.hole < 1:
        raise BadOptionError("--k must be >= 1 and --hole in (0, 1)")
    exp = setup(cfg, "retrieve")
    device, out, label = exp.device, exp.out, feature_label(cfg)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    images = open_retrieval_images(cfg.data, cfg.split, cfg.max_images, cfg.data_cache, cfg.builtin_images)
    if len(images.paths) < 2:
        raise BadOptionError(f"{cfg.data}: retrieval needs at least 2 images, found {len(images.paths)}")
    featurizer, checkpoint, calibration = build_featurizer(cfg, images, device)
    model = load_inpainting_model(cfg.init)
    if model is not None and cfg.size != 227:
        print(f"--size {cfg.size}: the context encoder was built for 227 px crops, so its fill is not scored",
              file=sys.stderr)
        model = None
    mask = central_square_mask(cfg.size, cfg.hole)  # (S, S), True = hole

    # (a) context retrieval: index every image's context features; queries are some of those images.
    entries = entries_for(images)
    context_feats = encode(featurizer, entries, cfg.size, mask, cfg.batch_size)  # (N, D)
    timings["encode_context_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pca_dim = min(cfg.pca_dim, *context_feats.shape)
    index = FeatureIndex.build(context_feats, entries, cfg.index, cfg.metric, pca_dim, cfg.nprobe, cfg.ef_search,
                               seed=cfg.seed)
    timings["build_index_s"] = time.perf_counter() - t0
    index.save(out / "index_context")
    query_images = choose_queries(len(images.paths), cfg.queries, cfg.seed)
    t0 = time.perf_counter()
    result = nn_inpaint(index, context_feats[query_images], query_images, cfg.size, mask, cfg.k, cfg.leave_one_out,
                        model, device, cfg.batch_size)
    timings["nn_inpaint_s"] = time.perf_counter() - t0

    # (b) patch retrieval
    t0 = time.perf_counter()
    patch = patch_retrieval(cfg, images, featurizer, query_images, entries, out)
    timings["patch_retrieval_s"] = time.perf_counter() - t0

    rows = [(f"NN-inpainting, {label} features", result.scores["nn"])]
    if "ce" in result.scores:
        rows.append((f"{label} context encoder (own fill)", result.scores["ce"]))
    rows.append(("mean colour of the context", result.scores["mean_fill"]))
    table = format_table(rows)
    loo = "leave-one-out" if cfg.leave_one_out else "query image kept in the database"
    header = (f"Context retrieval on {cfg.data} ({len(images.paths)} images, {len(query_images)} queries, {loo}, "
              f"centre hole {cfg.hole:g} of {cfg.size}x{cfg.size}); features {label} "
              f"({context_feats.shape[1]} dims{f', PCA {pca_dim}' if pca_dim else ''}, {cfg.metric}, {index.kind} index)")
    lines = [header, "", table]
    if patch:
        lines += ["", f"Patch retrieval ({patch['precision_mode']}: {patch['precision_criterion']}): precision@"
                      f"{patch['precision_k']} = {patch['precision_at_k']:.3f} (chance {patch['precision_chance']:.3f}, "
                      f"{patch['precision_queries']} queries, {patch['precision_database']} database entries)"]
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")

    if cfg.gallery:
        t0 = time.perf_counter()
        build_retrieval_gallery(out / "gallery", result, index.metadata, cfg.size, mask, cfg.gallery, model, device,
                                distance_name="cosine similarity" if cfg.metric == "cosine" else "squared L2 distance",
                                title=f"Context retrieval: {label} features on {cfg.data}")
        timings["gallery_s"] = time.perf_counter() - t0
        print(f"gallery: {out / 'gallery' / 'index.html'}")

    scores: dict[str, float] = {}
    for name, prefix in (("nn", ""), ("ce", "ce_"), ("mean_fill", "mean_fill_")):
        if name in result.scores:
            scores.update({prefix + key: value for key, value in result.scores[name].items()})
    scores.update({k: v for k, v in patch.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    details = {"features": label, "layer": None if cfg.init == "hog" else cfg.layer,
               "dims": int(context_feats.shape[1]), "pca_dim": pca_dim, "metric": cfg.metric, "index": index.kind,
               "database": index.ntotal, "queries": int(len(query_images)), "leave_one_out": cfg.leave_one_out,
               "k": int(result.neighbour_ids.shape[1]), **patch, "calibration": calibration,
               "timings": {k: round(v, 2) for k, v in timings.items()}}
    metrics = write_results(exp, scores, details, checkpoint=checkpoint)
    print(f"outputs in {out}/")
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, object]:
    return run_cli(main, RetrieveConfig, argv, description=__doc__ or "")


if __name__ == "__main__":
    cli()
