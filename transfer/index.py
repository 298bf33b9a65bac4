"""A FAISS index of feature vectors that remembers which crop each entry is: exact, IVF or HNSW search.

`python -m transfer.retrieve` builds one per run and saves it; benchmarks/bench_retrieval.py measures its
speed and recall at 100k and 1M entries.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from transfer.crops import EntryMetadata

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
METRICS = ("l2", "cosine")
# Below this many entries exact search is fast enough (and exact); above it `auto` picks an approximate index.
FLAT_MAX_ENTRIES = 50_000
HNSW_M = 32


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
