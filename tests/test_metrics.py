"""The reference metrics against hand-computed vectors and against Kaggle's own `apk` (ml_metrics)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from recsys import metrics as M


def kaggle_apk(actual, predicted, k=12):
    """Verbatim logic of ml_metrics.average_precision.apk, which the H&M competition used."""
    if len(predicted) > k:
        predicted = predicted[:k]
    score, num_hits = 0.0, 0.0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            num_hits += 1.0
            score += num_hits / (i + 1.0)
    if not actual:
        return 0.0
    return score / min(len(actual), k)


def test_one_customer_by_hand():
    recs, bought = ["a", "b", "c", "d"], ["b", "d", "d", "x"]  # 'd' bought twice: one relevant article
    assert M.recall_at_k(recs, bought, 12) == pytest.approx(2 / 3)
    assert M.precision_at_k(recs, bought, 12) == pytest.approx(2 / 12)
    assert M.average_precision_at_k(recs, bought, 12) == pytest.approx((1 / 2 + 2 / 4) / 3)
    ndcg = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    assert M.ndcg_at_k(recs, bought, 12) == pytest.approx(ndcg)
    assert M.hit_rate_at_k(recs, bought, 12) == 1.0
    assert M.recall_at_k(recs, bought, 1) == 0.0 and M.hit_rate_at_k(recs, bought, 1) == 0.0


def test_repeated_recommendation_counts_once_and_uses_a_slot():
    recs, bought = ["b", "b", "d"], ["b", "d"]
    assert M.average_precision_at_k(recs, bought, 2) == pytest.approx(0.5)
    assert M.precision_at_k(recs, bought, 2) == pytest.approx(0.5)
    assert M.recall_at_k(recs, bought, 3) == pytest.approx(1.0)
    assert M.average_precision_at_k(recs, bought, 3) == pytest.approx((1 + 2 / 3) / 2)


def test_fewer_than_k_recommendations():
    assert M.precision_at_k(["a"], ["a"], 12) == pytest.approx(1 / 12)
    assert M.recall_at_k(["a"], ["a"], 12) == 1.0
    assert M.average_precision_at_k(["a"], ["a"], 12) == 1.0
    assert M.ndcg_at_k(["a"], ["a"], 12) == 1.0
    assert M.average_precision_at_k([], ["a"], 12) == 0.0


def test_more_than_twelve_purchases_divide_by_twelve():
    bought = [f"p{i}" for i in range(20)]
    assert M.average_precision_at_k(bought[:12], bought, 12) == 1.0
    assert M.recall_at_k(bought[:12], bought, 12) == pytest.approx(12 / 20)


def test_average_precision_matches_kaggle_apk_on_random_lists():
    rng = random.Random(3)
    for _ in range(500):
        catalogue = [f"a{i}" for i in range(30)]
        recs = [rng.choice(catalogue) for _ in range(rng.randint(0, 20))]  # repeats and short lists
        bought = [rng.choice(catalogue) for _ in range(rng.randint(1, 15))]
        assert M.average_precision_at_k(recs, bought, 12) == pytest.approx(kaggle_apk(set(bought), recs, 12))


def test_aggregate_counts_buyers_only_and_missing_lists_as_zero():
    recs = {"c1": ["a", "b", "c", "d"], "c3": ["z"]}
    bought = {"c1": ["b", "d", "d", "x"], "c2": ["a"], "c3": []}
    out = M.evaluate(recs, bought, [12], catalogue=["a", "b", "c", "d", "x", "z"],
                     train_counts={"a": 5, "b": 1, "c": 1})
    assert out["customers"] == 2
    assert out["map_at_12"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["recall_at_12"] == pytest.approx((2 / 3) / 2)
    assert out["hit_rate_at_12"] == pytest.approx(0.5)
    assert out["coverage_at_12"] == pytest.approx(4 / 6)  # c3 bought nothing: its list is not evaluated
    # training counts over the catalogue sorted: 0 0 0 1 1 5 -> a: 5/6, b and c: 3/6, d: 0
    assert out["popularity_bias_at_12"] == pytest.approx((5 / 6 + 0.5 + 0.5 + 0) / 4)


def test_recall_curve_by_hand():
    recs = {"c1": ["a", "b", "c", "d"]}
    bought = {"c1": ["b", "d", "x"], "c2": ["a"]}
    curve = M.recall_curve(recs, bought, 5)
    np.testing.assert_allclose(curve, [0, 1 / 6, 1 / 6, 1 / 3, 1 / 3])
    assert M.recall_curve(recs, bought, 5)[3] == pytest.approx(M.evaluate(recs, bought, [4])["recall_at_4"])
