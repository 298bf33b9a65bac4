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

import functools
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from pretrain.checkpoint import load_latest_checkpoint, load_state_dict_checked
from pretrain.config import field, parse_config
from pretrain.data import DatasetNotFoundError, VOCDataset, find_year_dir, list_images, load_rgb, resolve_voc_root
from pretrain.dataset import denormalize, normalize
from pretrain.engine import hole_errors
from pretrain.masks import apply_mask, central_square_mask
from pretrain.models import FEATURE_KEYS
from transfer.experiment import calibration_batch, seed_everything, select_device, write_results
from transfer.trunk import build_trunk, init_label

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
METRICS = ("l2", "cosine")
# Below this many entries exact search is fast enough (and exact); above it `auto` picks an approximate index.
FLAT_MAX_ENTRIES = 50_000
HNSW_M = 32


# ------------------------------------------------------------------------------------------------ index


def choose_index_kind(n: int) -> str:
    """`auto`'s choice: exact (flat) below FLAT_MAX_ENTRIES entries, IVF-Flat above.

    On 1M real-image features (results/retrieval_bench.md) IVF (nprobe 64) and HNSW (efSearch 128) both gave
    ~26x exact search's queries/s at recall@10 0.95, but IVF built 2.3x faster and needs no graph links
    (HNSW: +256 B per entry); use --index hnsw for many more queries per build.
    """
    return "flat" if n < FLAT_MAX_ENTRIES else "ivf"


def ivf_nlist(n: int) -> int:
    """IVF lists ~ 4 sqrt(N) (1,000 -> 126, 1M -> 4,000), and at least 39 training points per list (FAISS)."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


@dataclass
class EntryMetadata:
    """Where each index entry came from, stored column-wise so 1M entries cost ~20 MB, not a JSON of dicts.

    `paths[source[i]]` is entry i's image file; `boxes[i]` = (left, top, right, bottom) in that file's pixels
    is the crop that was resized to the encoder's input. `paths` holds each source image once.
    """

    paths: list[str]
    source: np.ndarray  # (N,) int64 index into paths
    boxes: np.ndarray  # (N, 4) float32

    def __post_init__(self) -> None:
        self.source = np.asarray(self.source, dtype=np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if len(self.source) != len(self.boxes):
            raise ValueError(f"EntryMetadata: {len(self.source)} sources but {len(self.boxes)} boxes")
        if len(self.source) and (self.source.min() < 0 or self.source.max() >= len(self.paths)):
            raise ValueError(f"EntryMetadata: source indices must be in [0, {len(self.paths)})")

    def __len__(self) -> int:
        return len(self.source)

    def path(self, i: int) -> str:
        return self.paths[int(self.source[i])]

    def save(self, folder: Path) -> None:
        (folder / "images.json").write_text(json.dumps(self.paths))
        np.savez(folder / "entries.npz", source=self.source, boxes=self.boxes)

    @classmethod
    def load(cls, folder: Path) -> EntryMetadata:
        with np.load(folder / "entries.npz", allow_pickle=False) as z:
            return cls(json.loads((folder / "images.json").read_text()), z["source"], z["boxes"])


class FeatureIndex:
    """A FAISS index of feature vectors plus, per entry, which image and which crop it came from.

    The FAISS index owns its input transforms (PCA, then L2 normalisation for cosine), so `search` takes
    raw features, and one `faiss.write_index` file restores all of it.

    Distances returned by `search`: squared L2 for metric "l2" (smaller is nearer), cosine similarity for
    metric "cosine" (larger is nearer), both in the (PCA-reduced) space the index searches.

    Attributes:
        index: The FAISS index (an IndexPreTransform when PCA or cosine is used).
        metadata: EntryMetadata of the N entries, or None for bare vectors.
        kind: "flat" (exact), "ivf" (IVF-Flat, nlist ~ 4 sqrt(N)) or "hnsw" (HNSW-Flat, M = 32).
        metric: "l2" or "cosine".
        pca_dim: Output dimension of the PCA (0: none).
        nprobe: IVF lists visited per query (recall vs speed).
        ef_search: HNSW candidate-list size per query (recall vs speed).
    """

    def __init__(self, index: faiss.Index, metadata: EntryMetadata | None, kind: str, metric: str,
                 pca_dim: int = 0, nprobe: int = 64, ef_search: int = 128) -> None:
        if metadata is not None and len(metadata) != index.ntotal:
            raise ValueError(f"FeatureIndex: {index.ntotal} vectors but metadata for {len(metadata)} entries")
        self.index, self.metadata, self.kind, self.metric, self.pca_dim = index, metadata, kind, metric, pca_dim
        self.nprobe, self.ef_search = nprobe, ef_search
        self.set_search_params(nprobe, ef_search)

    @classmethod
    def build(cls, features: npt.ArrayLike, metadata: EntryMetadata | None = None, kind: str = "auto",
              metric: str = "l2", pca_dim: int = 0, nprobe: int = 64, ef_search: int = 128,
              ef_construction: int = 40, seed: int = 0) -> FeatureIndex:
        """Index `features` (N, D): optional PCA to `pca_dim`, then flat / IVF / HNSW for `metric`.

        `kind="auto"` picks by N (choose_index_kind). IVF centroids are trained on at most 64 points per list
        (a seeded subsample), which keeps training at 1M entries to seconds with no measurable recall loss.
        """
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"FeatureIndex.build: features must be a non-empty (N, D) array, got shape {x.shape}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
        n, d = x.shape
        kind = choose_index_kind(n) if kind == "auto" else kind
        transforms: list[faiss.VectorTransform] = []
        if pca_dim:
            if not 0 < pca_dim <= min(n, d):
                raise ValueError(f"--pca-dim {pca_dim} must be in 1..min(entries, dims) = {min(n, d)}; "
                                 f"lower it or use 0 for no PCA")
            pca = faiss.PCAMatrix(d, pca_dim)
            pca.train(x)
            transforms.append(pca)
            d = pca_dim
        if metric == "cosine":  # cosine = inner product of unit vectors; normalise after the PCA
            transforms.append(faiss.NormalizationTransform(d, 2.0))
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        if kind == "flat":
            base = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        elif kind == "ivf":
            nlist = ivf_nlist(n)
            quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
            base = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)  # keeps a Python ref to its quantizer
            base.cp.seed = seed
            base.cp.niter = 10  # vs FAISS's 25: recall within 0.004 on 20k conv5 vectors, 2.5x less training
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(d, HNSW_M, faiss_metric)
            base.hnsw.efConstruction = ef_construction
        else:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS[1:]}")
        index = base
        if transforms:
            index = faiss.IndexPreTransform(base)
            for t in reversed(transforms):  # prepend: the first transform applied ends up first
                index.prepend_transform(t)  # (FAISS's wrapper keeps Python refs to base and transforms)
        if kind == "ivf":
            sample = x
            if n > 64 * base.nlist:
                sample = x[np.random.default_rng(seed).choice(n, 64 * base.nlist, replace=False)]
            index.train(sample)
        elif not index.is_trained:
            index.train(x)
        index.add(x)
        return cls(index, metadata, kind, metric, pca_dim, nprobe, ef_search)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Speed/recall knobs: IVF `nprobe`, HNSW `efSearch` (ParameterSpace reaches through the PCA wrapper)."""
        params = faiss.ParameterSpace()
        if nprobe is not None:
            self.nprobe = nprobe
            if self.kind == "ivf":
                params.set_index_parameter(self.index, "nprobe", nprobe)
        if ef_search is not None:
            self.ef_search = ef_search
            if self.kind == "hnsw":
                params.set_index_parameter(self.index, "efSearch", ef_search)

    def search(self, queries: npt.ArrayLike, k: int, exclude: npt.ArrayLike | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest entries of each query: (distances (Q, k) float32, ids (Q, k) int64).

        `exclude` (Q,) gives one entry id per query to leave out (leave-one-out when the query is itself in
        the database; -1 = none). Ids are -1 where fewer than k entries exist.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if exclude is None:
            return self.index.search(q, k)
        exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
        if len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} ids for {len(q)} queries")
        dist, ids = self.index.search(q, k + 1)  # (Q, k + 1): one spare in case the excluded entry is found
        keep = ids != exclude[:, None]  # (Q, k + 1)
        keep &= np.cumsum(keep, axis=1) <= k  # when it was not found, drop the spare instead
        return dist[keep].reshape(len(q), k), ids[keep].reshape(len(q), k)

    def save(self, folder: str | Path) -> Path:
        """index.faiss (FAISS's own format) + index.json (settings) + images.json/entries.npz (metadata)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        info = {"kind": self.kind, "metric": self.metric, "pca_dim": self.pca_dim, "nprobe": self.nprobe,
                "ef_search": self.ef_search, "ntotal": self.ntotal, "has_metadata": self.metadata is not None}
        (folder / "index.json").write_text(json.dumps(info, indent=2))
        if self.metadata is not None:
            self.metadata.save(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureIndex:
        folder = Path(folder)
        if not (folder / "index.faiss").is_file() or not (folder / "index.json").is_file():
            raise FileNotFoundError(f"{folder} is not a saved FeatureIndex (needs index.faiss and index.json); "
                                    f"write one with FeatureIndex.save or python -m transfer.retrieve")
        info = json.loads((folder / "index.json").read_text())
        metadata = EntryMetadata.load(folder) if info.get("has_metadata") else None
        return cls(faiss.read_index(str(folder / "index.faiss")), metadata, info["kind"], info["metric"],
                   info["pca_dim"], info["nprobe"], info["ef_search"])


def recall_at_k(approx_ids: npt.ArrayLike, exact_ids: npt.ArrayLike) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (k = the exact list's width)."""
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(f"recall_at_k: expected (Q, k) id arrays with equal Q, got {a.shape} and {e.shape}")
    k = e.shape[1]
    hits = sum(len(np.intersect1d(ai[:k][ai[:k] >= 0], ei)) for ai, ei in zip(a, e))
    return hits / (len(e) * k)


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


def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square: resize short side to S then centre-crop S x S, as one box."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def random_square_box(width: int, height: int, rng: np.random.Generator, min_area: float = 0.3
                      ) -> tuple[float, float, float, float]:
    """A random square covering `min_area`..1 of the largest square's area, anywhere in the image."""
    side = min(width, height) * math.sqrt(rng.uniform(min_area, 1.0))
    left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    return left, top, left + side, top + side


@functools.lru_cache(maxsize=16)
def _cached_rgb(path: str) -> Image.Image:
    return load_rgb(path)  # consecutive crops of one image decode it once


def load_crop(path: str | Path, box: Sequence[float], size: int) -> torch.Tensor:
    """Crop `box` of the image at `path`, resized to size x size: (3, size, size) in [0, 1]."""
    image = _cached_rgb(str(path))
    return TF.to_tensor(image.resize((size, size), Image.BILINEAR, box=tuple(float(b) for b in box)))


def load_crops(metadata: EntryMetadata, ids: Sequence[int], size: int) -> torch.Tensor:
    """(len(ids), 3, size, size) crops in [0, 1]."""
    return torch.stack([load_crop(metadata.path(i), metadata.boxes[i], size) for i in ids])


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

    None for random / rescaled / torchvision / hog inits, which have no decoder to fill the hole with.
    """
    path = Path(init)
    if init in ("random", "rescaled", "hog") or init.startswith("torchvision:") or not path.exists():
        return None
    from pretrain.main_pretrain import PretrainConfig, build_models  # only checkpoint inits need these

    found = load_latest_checkpoint(path) if path.is_dir() else (torch.load(path, map_location="cpu", weights_only=False),
                                                                 path)
    if found is None:
        return None
    ckpt, source = found
    known = {f.name for f in fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    cfg.lambda_adv = 0.0  # the discriminator is not needed to fill holes
    model, _ = build_models(cfg)
    load_state_dict_checked(model, ckpt["model"], str(source))
    return model.eval()


# ------------------------------------------------------------------------------------------------ scoring


def hole_metrics(l1_sum: float, l2_sum: float, count: float) -> dict[str, float]:
    """Pooled mean L1, mean L2 and PSNR = 10 log10(1 / mean L2) (inf when L2 is exactly 0), as pretrain.engine."""
    l1, l2 = l1_sum / max(count, 1.0), l2_sum / max(count, 1.0)
    return {"l1": l1, "l2": l2, "psnr": math.inf if l2 == 0 else 10 * math.log10(1.0 / l2)}


def paste(fill01: torch.Tensor, target01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`fill` inside the hole, `target` outside: (B, 3, S, S)."""
    return torch.where(mask.unsqueeze(-3), fill01, target01)


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
        raise ValueError("context retrieval needs at least 2 database images with --leave-one-out")
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
class RetrieveConfig:
    """Every option of `python -m transfer.retrieve`; written to <out>/config.json."""

    init: str = field("random", "features: hog (scikit-image HOG), random, rescaled, a runs/<name>/ context-encoder "
                                "or autoencoder folder (or checkpoint .pth), or torchvision:PATH")
    data: str = field("builtin", "'builtin', a Pascal VOC root, or a folder of images (e.g. ../shared/data/imagenet-sample)")
    data_cache: str = field("", "where the built-in data is generated (default: $CTXENC_DATA_CACHE or ~/.cache/ctxenc)")
    builtin_images: int = field(2000, "size of the built-in dataset")
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
    device: str = field("auto", "auto, cpu or cuda")
    seed: int = field(0, "seed for the random trunk, query choice and crops")
    out: str = field("", "output folder (default runs/transfer/retrieve/<label>-seed<seed>)")


def feature_label(cfg: RetrieveConfig) -> str:
    if cfg.init == "hog":
        return "hog"
    return init_label(cfg.init) + ("" if cfg.layer == "pool5" else f"-{cfg.layer}")


def build_featurizer(cfg: RetrieveConfig, images: RetrievalImages, device: torch.device) -> Featurizer:
    if cfg.init == "hog":
        return HogFeatures(cfg.hog_cell)
    calib = None
    if cfg.init == "rescaled":
        calib = calibration_batch([load_rgb(p) for p in images.paths[:64]], n=32, size=cfg.size, seed=cfg.seed)
    return TrunkFeatures(build_trunk(cfg.init, cfg.seed, calib), cfg.layer, device)


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
            raise ValueError(f"--patch-mode labels: {cfg.data} has no class labels; use --patch-mode crops")
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
        raise ValueError("--k must be >= 1 and --hole in (0, 1)")
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    label = feature_label(cfg)
    out = Path(cfg.out or f"runs/transfer/retrieve/{label}-seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    images = open_retrieval_images(cfg.data, cfg.split, cfg.max_images, cfg.data_cache, cfg.builtin_images)
    if len(images.paths) < 2:
        raise ValueError(f"{cfg.data}: retrieval needs at least 2 images, found {len(images.paths)}")
    featurizer = build_featurizer(cfg, images, device)
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
        from transfer.gallery import build_retrieval_gallery  # drawing is kept out of the metric code

        t0 = time.perf_counter()
        build_retrieval_gallery(out / "gallery", result, index.metadata, cfg.size, mask, cfg.gallery, model, device,
                                distance_name="cosine similarity" if cfg.metric == "cosine" else "squared L2 distance",
                                title=f"Context retrieval: {label} features on {cfg.data}")
        timings["gallery_s"] = time.perf_counter() - t0
        print(f"gallery: {out / 'gallery' / 'index.html'}")

    metrics: dict[str, object] = {"features": label, "layer": None if cfg.init == "hog" else cfg.layer,
                                  "dims": int(context_feats.shape[1]), "pca_dim": pca_dim, "metric": cfg.metric,
                                  "index": index.kind, "database": index.ntotal, "queries": int(len(query_images)),
                                  "leave_one_out": cfg.leave_one_out, "k": int(result.neighbour_ids.shape[1])}
    for name, prefix in (("nn", ""), ("ce", "ce_"), ("mean_fill", "mean_fill_")):
        if name in result.scores:
            metrics.update({prefix + key: value for key, value in result.scores[name].items()})
    metrics.update(patch)
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    write_results(out, metrics, config=cfg)
    print(f"outputs in {out}/")
    return metrics


def cli(argv: list[str] | None = None) -> dict[str, object]:
    return main(parse_config(RetrieveConfig, argv, description=__doc__ or ""))


if __name__ == "__main__":
    cli()
