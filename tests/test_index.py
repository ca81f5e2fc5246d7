"""The FAISS index: exact search equals brute force, ANN recall is measured, save/load and pickling keep ids."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from recsys.config import load_config
from recsys.index import build_from_config, build_index, checked, compare_to_exact, load_index, recall_at_k


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


ITEMS, QUERIES = unit(3000, 16, 0), unit(200, 16, 1)
IDS = [f"{700000000 + i:010d}" for i in range(len(ITEMS))]


def test_flat_search_is_exact_and_returns_article_ids():
    index = build_index(ITEMS, IDS)
    scores, ids = index.search(QUERIES, 12)
    truth = np.argsort(-(QUERIES @ ITEMS.T), axis=1, kind="stable")[:, :12]
    assert ids.tolist() == [[IDS[j] for j in row] for row in truth]
    assert np.allclose(scores, np.take_along_axis(QUERIES @ ITEMS.T, truth, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_k_larger_than_the_catalogue_returns_every_article_once():
    index = build_index(ITEMS[:5], IDS[:5])
    _, ids = index.search(QUERIES[:3], 12)
    assert ids.shape == (3, 5) and all(sorted(row) == IDS[:5] for row in ids.tolist())


@pytest.mark.parametrize("kind, options, floor", [
    ("ivf", {"ivf_lists": 32, "ivf_probe": 8}, 0.6),
    ("hnsw", {"hnsw_m": 16, "hnsw_ef_search": 64}, 0.9),
])
def test_ann_recall_against_exact_is_measured(kind, options, floor):
    index = build_index(ITEMS, IDS, kind, **options)
    report = compare_to_exact(index, QUERIES, k=12)
    assert floor <= report["recall_at_k"] <= 1.0 and report["queries"] == 200
    # More probes / a wider beam can only find more of the exact neighbours.
    wider = build_index(ITEMS, IDS, kind, **{**options, "ivf_probe": 32, "hnsw_ef_search": 256})
    assert compare_to_exact(wider, QUERIES, k=12)["recall_at_k"] >= report["recall_at_k"]
    assert compare_to_exact(build_index(ITEMS, IDS), QUERIES)["recall_at_k"] == 1.0
    given = compare_to_exact(index, QUERIES, k=12, exact=build_index(ITEMS, IDS))  # the truth handed in
    assert given["recall_at_k"] == report["recall_at_k"]


def test_an_approximate_index_is_kept_only_at_its_measured_recall():
    every_cell = build_index(ITEMS, IDS, "ivf", ivf_lists=32, ivf_probe=32)  # all cells probed: exact
    kept, facts = checked(every_cell, ITEMS, QUERIES, 12, 0.99)
    assert kept is every_cell and facts["recall"] == 1.0 and facts["recall_queries"] == 200
    assert facts["recall_k"] == 12 and "fallback" not in facts
    one_cell = build_index(ITEMS, IDS, "ivf", ivf_lists=64, ivf_probe=1, model_version="3", as_of="2020-09-23")
    exact, facts = checked(one_cell, ITEMS, QUERIES, 12, 0.99)
    assert facts["fallback"] == "flat" and facts["recall"] < 0.99 and exact.index_type == "flat"
    assert exact.meta["model_version"] == "3" and exact.meta["as_of"] == "2020-09-23"
    assert exact.search(QUERIES, 12)[1].tolist() == build_index(ITEMS, IDS).search(QUERIES, 12)[1].tolist()
    assert checked(one_cell, ITEMS, QUERIES, 12, 0.0)[0] is one_cell  # no floor: whatever it finds
    flat = build_index(ITEMS, IDS)
    assert checked(flat, ITEMS, QUERIES, 12, 0.99) == (flat, {})
    with pytest.raises(ValueError, match="scoring.min_recall must be a share between 0 and 1, got 1.5"):
        checked(every_cell, ITEMS, QUERIES, 12, 1.5)


def test_an_ivf_index_short_of_the_recall_searches_more_cells_before_searching_exactly(tmp_path):
    index = build_index(ITEMS, IDS, "ivf", ivf_lists=64, ivf_probe=1)
    kept, facts = checked(index, ITEMS, QUERIES, 12, 0.9)
    assert kept is index and "fallback" not in facts
    assert [cells for cells, _ in facts["tried"]] == [1, 2, 4, 8, 16] and facts["nprobe"] == 16 == kept.meta["nprobe"]
    recalls = [recall for _, recall in facts["tried"]]
    assert recalls == sorted(recalls) and recalls[-1] >= 0.9 > recalls[-2] and facts["recall"] == recalls[-1]
    assert compare_to_exact(kept, QUERIES, 12)["recall_at_k"] == pytest.approx(facts["recall"], abs=1e-4)
    assert load_index(kept.save(tmp_path / "kept")).meta["nprobe"] == 16  # saved as measured
    # a quarter of the cells (16 of 64) is the most it searches: short of the recall there, exact search
    exact, facts = checked(build_index(ITEMS, IDS, "ivf", ivf_lists=64, ivf_probe=1), ITEMS, QUERIES, 12, 0.99)
    assert exact.index_type == "flat" and facts["fallback"] == "flat" and facts["tried"][-1][0] == 16


def test_recall_at_k_by_hand():
    assert recall_at_k(np.array([["a", "b"], ["c", "x"]]), np.array([["b", "a"], ["c", "d"]]), k=2) == 0.75


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_and_pickle_keep_ids_and_search_params(kind, tmp_path):
    index = build_index(ITEMS, IDS, kind, ivf_lists=16, ivf_probe=3, hnsw_ef_search=20, model_version="7")
    _, want = index.search(QUERIES, 12)
    loaded = load_index(index.save(tmp_path / kind))
    shipped = pickle.loads(pickle.dumps(index))
    for other in (loaded, shipped):
        assert other.index_type == kind and other.meta["model_version"] == "7"
        assert other.search(QUERIES, 12)[1].tolist() == want.tolist()


def test_build_from_config_uses_the_scoring_section():
    scoring = load_config("tiny", ["scoring.index_type=ivf", "scoring.ivf_lists=8", "scoring.ivf_probe=2"]).scoring
    index = build_from_config(ITEMS, IDS, scoring)
    assert index.index_type == "ivf" and index.meta["lists"] == 8 and index.meta["nprobe"] == 2


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="3000 embeddings but 2 article ids"):
        build_index(ITEMS, IDS[:2])
    with pytest.raises(ValueError, match="distinct"):
        build_index(ITEMS[:2], ["a", "a"])
    with pytest.raises(ValueError, match="index_type must be one of flat, ivf, hnsw"):
        build_index(ITEMS, IDS, "lsh")
    bad = ITEMS[:4].copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="row 2 has a NaN"):
        build_index(bad, IDS[:4])
    with pytest.raises(ValueError, match="dimension 8, the index has 16"):
        build_index(ITEMS, IDS).search(unit(2, 8, 3), 12)
    with pytest.raises(FileNotFoundError, match="no index.faiss"):
        load_index(tmp_path)
