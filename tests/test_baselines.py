"""Baselines on a hand-made week: each list is what the rule says, K long, in the recommendations schema."""
from __future__ import annotations

import datetime as dt

import pytest

from recsys import baselines
from recsys.config import load_config
from recsys.tables import RECOMMENDATIONS_SCHEMA

AS_OF = dt.date(2020, 9, 29)


def a(n: int) -> str:
    return f"{n:010d}"


@pytest.fixture(scope="module")
def lists(spark):
    """name -> {customer: [article, ...]} for every baseline, K = 3."""
    config = load_config("tiny", ["evaluation.k=3", "evaluation.als_rank=4", "evaluation.als_max_iter=5"])
    day, fortnight = dt.date(2020, 9, 27), dt.date(2020, 9, 15)
    bought = {
        "young1": [1, 1, 2], "young2": [1, 2], "old1": [4, 1], "old2": [4, 4, 3], "other": [1, 1, 2, 3],
    }
    rows = [(day, c, a(n), 0.01) for c, arts in bought.items() for n in arts]
    rows += [(fortnight, "bulk", a(8), 0.01)] * 40                 # 14 days ago: outside the last week
    rows += [(AS_OF, "young1", a(7), 0.01)] * 9                     # on as_of itself: the future, never used
    train = spark.createDataFrame(rows, "t_dat date, customer_id string, article_id string, price double")
    customers = spark.createDataFrame(
        [("young1", 20), ("young2", 22), ("old1", 60), ("old2", 70), ("other", None), ("bulk", 40), ("cold", 30)],
        "customer_id string, age int",
    )
    articles = spark.createDataFrame(
        [(a(n), "Ladieswear") for n in range(1, 9)], "article_id string, index_group_name string"
    )
    target = spark.createDataFrame([(c,) for c in ("young1", "old2", "bulk", "cold")], "customer_id string")
    recs = baselines.recommend(config, train, customers, articles, target, AS_OF)
    out = {}
    for name, df in recs.items():
        assert [(f.name, f.dataType) for f in df.schema] == [(f.name, f.dataType) for f in RECOMMENDATIONS_SCHEMA], name
        rows = sorted(df.collect(), key=lambda r: (r.customer_id, r.rank))
        out[name] = {}
        for r in rows:
            out[name].setdefault(r.customer_id, []).append(r.article_id)
        assert {r.source for r in rows} == {f"baseline:{name}"}
        assert {r.model_version for r in rows} == {f"{name}@2020-09-29"}
    return out


def test_every_baseline_gives_each_target_customer_k_distinct_articles(lists):
    assert set(lists) == set(baselines.BASELINES)
    for name, by_customer in lists.items():
        assert set(by_customer) == {"young1", "old2", "bulk", "cold"}, name
        for customer, articles in by_customer.items():
            assert len(articles) == 3 and len(set(articles)) == 3, (name, customer, articles)
            assert a(7) not in articles, "a purchase on as_of leaked into the training data"


def test_popularity_last_week_counts_only_the_last_seven_days(lists):
    # last week: a1 x6, a2 x3, a4 x3 (tie broken by id), a3 x2; a8 sold 14 days ago does not count
    for articles in lists["popularity_last_week"].values():
        assert articles == [a(1), a(2), a(4)]


def test_decayed_popularity_remembers_the_older_bulk_sale(lists):
    assert lists["popularity_decayed"]["cold"][:2] == [a(8), a(1)]


def test_age_bucket_popularity_and_its_fill(lists):
    assert lists["popularity_age_bucket"]["old2"] == [a(4), a(1), a(3)]       # 55+: a4 x3, then a1 and a3
    assert lists["popularity_age_bucket"]["young1"] == [a(1), a(2), a(4)]     # 16-24 sold two articles: filled
    assert lists["popularity_age_bucket"]["cold"] == [a(1), a(2), a(4)]       # 25-34 bought nothing: global


def test_repurchase_puts_own_purchases_first(lists):
    assert lists["repurchase"]["old2"] == [a(4), a(3), a(1)]   # same day: bought twice first; then the fill
    assert lists["repurchase"]["young1"] == [a(1), a(2), a(4)]
    assert lists["repurchase"]["cold"] == [a(1), a(2), a(4)]   # no history: best sellers


def test_als_learns_from_history_and_falls_back_for_the_unknown(lists):
    assert lists["als"]["bulk"][0] == a(8)
    assert lists["als"]["cold"] == [a(1), a(2), a(4)]


def test_unknown_baseline_is_named(spark):
    config = load_config("tiny", ["evaluation.baselines=[popularity, als]"])
    empty = spark.createDataFrame([], "customer_id string")
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['popularity'\]"):
        baselines.recommend(config, empty, empty, empty, empty, AS_OF)


def test_als_with_nothing_in_its_window_gives_everyone_the_best_sellers(spark):
    """No purchase in the training window (a window shorter than the best sellers' week): nothing to factorise,
    every list is the fill, not an error."""
    config = load_config("tiny", ["evaluation.k=2", "features.training_window_weeks=1",
                                  "features.popularity_window_days=20"])
    ten_days_ago = AS_OF - dt.timedelta(days=10)
    rows = [(ten_days_ago, "old", a(n), 0.01) for n in (5, 5, 5, 6, 6, 7)]
    train = spark.createDataFrame(rows, "t_dat date, customer_id string, article_id string, price double")
    customers = spark.createDataFrame([("old", 30), ("cold", 40)], "customer_id string, age int")
    articles = spark.createDataFrame([(a(n), "Ladieswear") for n in (5, 6, 7)],
                                     "article_id string, index_group_name string")
    (recs,) = baselines.recommend(config, train, customers, articles, customers.select("customer_id"), AS_OF,
                                  ["als"]).values()
    got = sorted((r.customer_id, r.rank, r.article_id) for r in recs.collect())
    assert got == [("cold", 1, a(5)), ("cold", 2, a(6)), ("old", 1, a(5)), ("old", 2, a(6))]


def test_als_ids_number_the_distinct_values_in_order_from_zero(spark):
    df = spark.createDataFrame([("c",), ("a",), ("c",), ("b",)], "customer_id string")
    rows = baselines._index(df, "customer_id", "user").collect()
    assert sorted((r.customer_id, r.user) for r in rows) == [("a", 0), ("b", 1), ("c", 2)]
