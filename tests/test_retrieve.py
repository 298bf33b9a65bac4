import json
import math

import numpy as np
import pytest
import torch

from transfer.crops import EntryMetadata
from transfer.index import FeatureIndex, choose_index_kind, ivf_nlist, recall_at_k
from transfer.retrieve import (
    HogFeatures,
    RetrieveConfig,
    encode,
    entries_for,
    load_inpainting_model,
    main,
    nn_inpaint,
    open_retrieval_images,
)


def _clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Gaussian blobs: a stand-in for real features, which are clustered too (unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 3
    return (centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def _bruteforce(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    xt, qt = torch.from_numpy(x).double(), torch.from_numpy(q).double()
    if metric == "cosine":
        sim = torch.nn.functional.normalize(qt, dim=1) @ torch.nn.functional.normalize(xt, dim=1).T  # (Q, N)
        d, i = sim.topk(k, dim=1)
    else:
        dist = torch.cdist(qt, xt).pow(2)  # (Q, N) squared L2, as FAISS reports it
        d, i = dist.topk(k, dim=1, largest=False)
    return d.numpy(), i.numpy()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_flat_index_matches_bruteforce_search(metric):
    x, q = _clustered(800), _clustered(25, seed=1)
    index = FeatureIndex.build(x, kind="flat", metric=metric)
    dist, ids = index.search(q, 10)
    ref_d, ref_i = _bruteforce(x, q, 10, metric)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind,metric,pca_dim", [("flat", "l2", 0), ("flat", "cosine", 8), ("ivf", "l2", 16),
                                                  ("ivf", "cosine", 0), ("hnsw", "l2", 0), ("hnsw", "cosine", 16)])
def test_saved_index_reloads_and_answers_identically(tmp_path, kind, metric, pca_dim):
    x, q = _clustered(2000), _clustered(30, seed=2)
    meta = EntryMetadata([f"img{i}.jpg" for i in range(100)], np.arange(2000) % 100,
                         np.tile([0.0, 0.0, 10.0, 10.0], (2000, 1)))
    index = FeatureIndex.build(x, meta, kind=kind, metric=metric, pca_dim=pca_dim, nprobe=4, ef_search=32)
    dist, ids = index.search(q, 10)
    loaded = FeatureIndex.load(index.save(tmp_path / "idx"))
    dist2, ids2 = loaded.search(q, 10)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(dist, dist2)
    assert (loaded.kind, loaded.metric, loaded.pca_dim, loaded.nprobe, loaded.ef_search) == (kind, metric, pca_dim, 4, 32)
    assert loaded.metadata.paths == meta.paths
    np.testing.assert_array_equal(loaded.metadata.source, meta.source)
    np.testing.assert_array_equal(loaded.metadata.boxes, meta.boxes)


def test_search_with_exclusion_leaves_the_query_out():
    x = _clustered(300)
    index = FeatureIndex.build(x, kind="flat")
    _, with_self = index.search(x[:20], 4)
    assert (with_self[:, 0] == np.arange(20)).all()  # each vector is its own nearest neighbour
    _, ids = index.search(x[:20], 3, exclude=np.arange(20))
    assert ids.shape == (20, 3) and not (ids == np.arange(20)[:, None]).any()
    np.testing.assert_array_equal(ids, with_self[:, 1:])
    _, ids = index.search(x[:20], 3, exclude=np.full(20, -1))  # nothing to exclude: the plain top-3
    np.testing.assert_array_equal(ids, with_self[:, :3])


def test_approximate_indexes_have_high_recall_on_clustered_data():
    x, q = _clustered(6000, clusters=60), _clustered(200, clusters=60, seed=3)
    _, exact = FeatureIndex.build(x, kind="flat").search(q, 10)
    recalls = {}
    for kind in ("ivf", "hnsw"):
        index = FeatureIndex.build(x, kind=kind, nprobe=16, ef_search=128)
        recalls[kind] = recall_at_k(index.search(q, 10)[1], exact)
    print(f"recall@10 vs exact on 6,000 clustered vectors: {recalls}")
    assert recalls["ivf"] >= 0.9 and recalls["hnsw"] >= 0.9


def test_recall_at_k_and_index_sizing():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[3, 2, 9, -1], [7, 8, 9, 10]]), exact) == pytest.approx(3 / 8)
    assert choose_index_kind(1_000) == "flat" and choose_index_kind(1_000_000) == "ivf"
    assert ivf_nlist(1_000_000) == 4000 and ivf_nlist(100) == 2  # >= 39 training points per list


def test_nn_inpainting_of_an_image_in_the_database_finds_itself(tiny_voc):
    from pretrain.masks import central_square_mask

    images = open_retrieval_images(str(tiny_voc), split="trainval")
    entries = entries_for(images)
    mask = central_square_mask(64)
    feats = encode(HogFeatures(cell=8), entries, 64, mask)
    index = FeatureIndex.build(feats, entries, kind="flat")
    qids = np.arange(len(entries))
    result = nn_inpaint(index, feats, qids, 64, mask, k=2, leave_one_out=False)
    np.testing.assert_array_equal(result.neighbour_ids[:, 0], qids)
    assert np.abs(result.distances[:, 0]).max() < 1e-6
    assert result.scores["nn"]["l1"] == 0.0 and result.scores["nn"]["l2"] == 0.0
    assert math.isinf(result.scores["nn"]["psnr"])
    assert np.isinf(result.per_query["nn"][:, 2]).all()
    loo = nn_inpaint(index, feats, qids, 64, mask, k=2, leave_one_out=True)  # the scored setting
    assert not (loo.neighbour_ids == qids[:, None]).any() and loo.scores["nn"]["l1"] > 0


def test_cli_reports_inf_psnr_without_crashing(tiny_voc, tmp_path):
    cfg = RetrieveConfig(init="hog", data=str(tiny_voc), size=64, hog_cell=8, queries=0, k=2, leave_one_out=False,
                         gallery=1, out=str(tmp_path / "self"))
    metrics = main(cfg)
    assert metrics["scores"]["l1"] == 0.0 and math.isinf(metrics["scores"]["psnr"])
    saved = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert saved["scores"]["psnr"] == "inf"  # JSON has no inf: written as a string, never as a bare Infinity
    assert (tmp_path / "self" / "gallery" / "index.html").is_file()


@pytest.mark.parametrize("init", ["hog", "ce"])
def test_end_to_end_hog_and_context_encoder_features(tiny_voc, tiny_pretrain_run, tmp_path, init):
    cfg = RetrieveConfig(init="hog" if init == "hog" else str(tiny_pretrain_run), data=str(tiny_voc), queries=4, k=2,
                         gallery=2, out=str(tmp_path / init), pca_dim=3, metric="cosine")
    metrics = main(cfg)
    out = tmp_path / init
    for key in ("l1", "l2", "psnr", "mean_fill_l1", "precision_at_k"):
        assert np.isfinite(metrics["scores"][key]), key
    assert metrics["precision_mode"] == "labels" and metrics["precision_criterion"] == "shares at least one class"
    assert metrics["queries"] == 4 and metrics["database"] == 6 and metrics["pca_dim"] == 3
    if init == "ce":  # the context encoder's own fill is scored beside NN-inpainting
        assert 0 < metrics["scores"]["ce_l1"] < 1 and (out / "gallery" / "img" / "q000_ce.png").is_file()
        assert metrics["dims"] == 256 * 6 * 6
    # the saved context index reloads with its metadata and answers like the one the run used
    index = FeatureIndex.load(out / "index_context")
    assert index.ntotal == 6 and index.metadata.path(0).endswith(".jpg")
    assert (out / "gallery" / "grids" / "q001.png").is_file()
    assert "NN-inpainting" in (out / "table.md").read_text()


def test_imagenet_sample_uses_crops_of_the_same_image(shared_data, tmp_path):
    images = open_retrieval_images(str(shared_data / "imagenet-sample"), max_images=6)
    assert images.labels is not None and not images.labels_repeat()  # one photo per class: labels are degenerate
    cfg = RetrieveConfig(init="random", data=str(shared_data / "imagenet-sample"), max_images=6, queries=3, k=3,
                         crops_per_image=3, layer="conv2", gallery=0, out=str(tmp_path / "in"), pca_dim=8)
    metrics = main(cfg)
    assert metrics["precision_mode"] == "crops" and metrics["precision_database"] == 18
    assert metrics["precision_chance"] == pytest.approx(1 / 6)
    assert FeatureIndex.load(tmp_path / "in" / "index_patch").metadata.source.tolist() == [i // 3 for i in range(18)]


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        images = open_retrieval_images(str(tmp_path))
    assert [p.name for p in images.paths] == ["img0.png", "img1.png", "img2.png"] and images.labels is None


def test_inpainting_model_only_for_checkpoints_with_a_decoder(tiny_pretrain_run, tmp_path):
    from pretrain.models import AlexNetEncoder, ContextEncoder

    assert isinstance(load_inpainting_model(str(tiny_pretrain_run)), ContextEncoder)
    assert load_inpainting_model("hog") is None and load_inpainting_model("random") is None
    trunk_state = {f"encoder.{k}": v for k, v in AlexNetEncoder().state_dict().items()}
    supervised = tmp_path / "supervised.pth"  # a trunk and a classifier, no decoder
    torch.save({"model": {**trunk_state, "classifier.weight": torch.zeros(2, 9216)},
                "config": {"objective": "supervised", "model": "alexnet"}}, supervised)
    assert load_inpainting_model(str(supervised)) is None  # retrieval then scores NN-inpainting only
