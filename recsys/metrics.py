"""Ranking metrics in plain Python/numpy: the reference the Spark implementation (recsys.evaluate) is tested against.

Definitions, written down once (they follow Kaggle's H&M `apk`/`mapk` and Spark's `RankingMetrics`):

- `recommended` is an ordered list, position 1 first; only the first `k` positions count. A repeated article
  keeps its first position and never counts twice (Kaggle: `p not in predicted[:i]`), but it still uses a slot.
- `purchased` is what the customer bought in the test week; duplicates (several units, several days) are one
  relevant article: relevance is binary over the DISTINCT purchased articles.
- Averages run over the customers who bought something in the test week. A customer without recommendations
  scores 0 on every metric; a customer with recommendations and no purchase is not counted.
- Recall@K = hits / #purchased, Precision@K = hits / K (a short list is padded with misses), hit rate = any hit,
  NDCG@K = DCG / ideal DCG with gain 1 and discount log2(position + 1), ideal over min(#purchased, K) hits,
  AP@K = sum over hit positions i of (hits up to i / i), divided by min(#purchased, K)  (Kaggle's MAP@12 with K=12).
- Catalogue coverage@K = distinct catalogue articles in the top K of the evaluated customers / catalogue size.
- Popularity bias@K = mean, over the (customer, article) pairs in those top K lists, of the article's popularity
  percentile in the training window: the share of catalogue articles bought strictly fewer times (0 = among the
  least bought, close to 1 = a best seller).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np

RANKING_METRICS = ("recall", "precision", "ndcg", "map", "hit_rate")
LIST_METRICS = ("coverage", "popularity_bias")


def metric_name(metric: str, k: int) -> str:
    """The one spelling of a metric at a cut-off, shared with the Spark side and the gate (`map_at_12`)."""
    return f"{metric}_at_{k}"


def _first_positions(recommended: Sequence[str], k: int) -> dict[str, int]:
    """Article -> its first 1-based position within the top k (later repeats ignored)."""
    positions: dict[str, int] = {}
    for i, article in enumerate(list(recommended)[:k], start=1):
        positions.setdefault(article, i)
    return positions


def _hit_positions(recommended: Sequence[str], purchased: Collection[str], k: int) -> list[int]:
    relevant = set(purchased)
    return sorted(pos for article, pos in _first_positions(recommended, k).items() if article in relevant)


def recall_at_k(recommended: Sequence[str], purchased: Iterable[str], k: int) -> float:
    relevant = set(purchased)
    if not relevant:
        return 0.0
    return len(_hit_positions(recommended, relevant, k)) / len(relevant)


def precision_at_k(recommended: Sequence[str], purchased: Iterable[str], k: int) -> float:
    return len(_hit_positions(recommended, set(purchased), k)) / k


def hit_rate_at_k(recommended: Sequence[str], purchased: Iterable[str], k: int) -> float:
    return 1.0 if _hit_positions(recommended, set(purchased), k) else 0.0


def ideal_dcg(n_relevant: int, k: int) -> float:
    return sum(1.0 / math.log2(i + 1) for i in range(1, min(n_relevant, k) + 1))


def ndcg_at_k(recommended: Sequence[str], purchased: Iterable[str], k: int) -> float:
    relevant = set(purchased)
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(pos + 1) for pos in _hit_positions(recommended, relevant, k))
    return dcg / ideal_dcg(len(relevant), k)


def average_precision_at_k(recommended: Sequence[str], purchased: Iterable[str], k: int = 12) -> float:
    """Kaggle's `apk`: precision at each hit, summed, over min(#distinct purchased, k)."""
    relevant = set(purchased)
    if not relevant:
        return 0.0
    positions = _hit_positions(recommended, relevant, k)
    return sum(n / pos for n, pos in enumerate(positions, start=1)) / min(len(relevant), k)


CUSTOMER_METRICS = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "ndcg": ndcg_at_k,
    "map": average_precision_at_k,
    "hit_rate": hit_rate_at_k,
}


def popularity_percentiles(train_counts: Mapping[str, int], catalogue: Collection[str]) -> dict[str, float]:
    """Article -> share of catalogue articles bought strictly fewer times in the training window."""
    counts = np.array([train_counts.get(a, 0) for a in catalogue], dtype=np.int64)
    ordered = np.sort(counts)
    below = np.searchsorted(ordered, counts, side="left")
    return {a: float(b) / len(counts) for a, b in zip(catalogue, below)}


def evaluate(
    recommendations: Mapping[str, Sequence[str]],
    purchases: Mapping[str, Iterable[str]],
    ks: Iterable[int],
    catalogue: Collection[str] | None = None,
    train_counts: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Every metric at every K, averaged over the customers with at least one purchase.

    `catalogue` defaults to every article seen in the recommendations, the purchases and `train_counts`.
    """
    buyers = {c: set(p) for c, p in purchases.items() if set(p)}
    ks = sorted(set(ks))
    result: dict[str, float] = {"customers": float(len(buyers))}
    if catalogue is None:
        catalogue = set(train_counts or {})
        for articles in list(recommendations.values()) + list(buyers.values()):
            catalogue |= set(articles)
    catalogue = list(dict.fromkeys(sorted(catalogue)))
    in_catalogue = set(catalogue)
    percentiles = popularity_percentiles(train_counts or {}, catalogue) if catalogue else {}
    for k in ks:
        for metric, fn in CUSTOMER_METRICS.items():
            values = [fn(recommendations.get(c, []), bought, k) for c, bought in buyers.items()]
            result[metric_name(metric, k)] = float(np.mean(values)) if values else 0.0
        listed = [
            a for c in buyers for a in _first_positions(recommendations.get(c, []), k) if a in in_catalogue
        ]
        result[metric_name("coverage", k)] = len(set(listed)) / len(catalogue) if catalogue else 0.0
        result[metric_name("popularity_bias", k)] = (
            float(np.mean([percentiles[a] for a in listed])) if listed else 0.0
        )
    return result


def recall_curve(
    recommendations: Mapping[str, Sequence[str]], purchases: Mapping[str, Iterable[str]], max_k: int = 100
) -> np.ndarray:
    """Recall@K for K = 1..max_k (index 0 is K=1), over the customers with a purchase."""
    buyers = {c: set(p) for c, p in purchases.items() if set(p)}
    curve = np.zeros(max_k)
    for customer, bought in buyers.items():
        for pos in _hit_positions(recommendations.get(customer, []), bought, max_k):
            curve[pos - 1:] += 1.0 / len(bought)
    return curve / len(buyers) if buyers else curve


def purchases_by_customer(rows: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(customer_id, article_id) rows -> customer -> purchased articles (duplicates kept)."""
    out: dict[str, list[str]] = {}
    for customer, article in rows:
        out.setdefault(customer, []).append(article)
    return out


def counts(articles: Iterable[str]) -> dict[str, int]:
    return dict(Counter(articles))
