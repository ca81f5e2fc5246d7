"""Candidate sources on hand-made days: each list is what the rule says, ranked, scored, and blind to the future."""
from __future__ import annotations

import datetime as dt
import math

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys import candidates as cand
from recsys.candidates import CANDIDATE_COLUMNS, CANDIDATE_SCHEMA

D = dt.date.fromisoformat
AS_OF = D("2020-09-23")
TX = "t_dat date, customer_id string, article_id string"


def table(spark, rows: list[tuple], schema: str | T.StructType):
    """A literal table, like spark.createDataFrame(rows, schema) but with no Python RDD behind it: no Python
    worker feeds the scans and Spark knows the size (joins broadcast), so each query costs a fraction."""
    empty = spark.createDataFrame([], schema)
    if not rows:
        return empty
    structs = [
        F.struct(*[F.lit(v).cast(f.dataType).alias(f.name) for v, f in zip(row, empty.schema.fields)]) for row in rows
    ]
    return spark.range(1).select(F.inline(F.array(*structs)))


def check(spark, result, source: str, expected: list[tuple]) -> None:
    """expected: (customer, rank, article, score) rows; the result must be exactly these, in the schema."""
    want = table(spark, [(c, a, source, r, float(s)) for c, r, a, s in expected], CANDIDATE_SCHEMA)
    assert_approx_df_equality(result, want, 1e-9, ignore_row_order=True, ignore_nullable=True)


def customers_df(spark, *ids: str):
    return table(spark, [(c,) for c in ids], "customer_id string")


def test_schema_constant():
    assert CANDIDATE_COLUMNS == ("customer_id", "article_id", "source", "source_rank", "source_score")


def test_repurchase_ranks_recency_then_count_then_article(spark):
    tx = table(
        spark,
        [
            (D("2020-09-22"), "c1", "C"), (D("2020-09-22"), "c1", "C"),  # newest day, two rows: first
            (D("2020-09-22"), "c1", "A"),                               # newest day, one row: ties with D...
            (D("2020-09-22"), "c1", "D"),                               # ... and loses on article_id
            *[(D("2020-09-21"), "c1", "B")] * 3,                       # more rows, older day: 4th, cut by n=3
            (D("2020-09-23"), "c1", "E"), (D("2020-09-25"), "c1", "E"),  # on/after as_of: the future, never used
            (D("2020-09-21"), "c2", "B"),                               # 2 days before: weight 0.5
            (D("2020-09-16"), "c2", "A"),                               # 7 days before: in the window, 0.5 ** 6
            (D("2020-09-15"), "c2", "A"),                               # 8 days before: outside
            (D("2020-09-22"), "c3", "A"),                               # c3 is not a target customer
        ],
        TX,
    )
    target = customers_df(spark, "c1", "c1", "c2", "c4")  # a repeated target row; c4 has no history
    result = cand.repurchase(tx, target, "2020-09-23", window_days=7, n=3, half_life_days=1.0)
    check(spark, result, "repurchase", [
        ("c1", 1, "C", 2.0), ("c1", 2, "A", 1.0), ("c1", 3, "D", 1.0),
        ("c2", 1, "B", 0.5), ("c2", 2, "A", 0.5 ** 6),
    ])


@pytest.fixture(scope="module")
def catalogue(spark):
    return table(
        spark,
        [("A1", 1), ("A2", 1), ("A3", 1), ("A4", 1), ("A5", 1), ("B1", 2), ("B2", 2), ("C1", 3)],
        "article_id string, product_code int",
    )


def test_same_product_offers_unbought_siblings_ranked_by_recent_sales(spark, catalogue):
    tx = table(
        spark,
        [
            (D("2020-09-22"), "c1", "A1"),   # product 1: A2..A5 are siblings
            (D("2020-09-18"), "c1", "A3"),   # bought in the window: not offered back
            (D("2020-09-23"), "c1", "B1"),   # on as_of: the future, so no B2 for c1 (and no B1 sale)
            (D("2020-09-20"), "c2", "B2"),
            (D("2020-09-21"), "s1", "A4"), (D("2020-09-22"), "s2", "A4"),  # A4: 2 sales in the last 3 days
            (D("2020-09-17"), "s1", "A2"),   # older than sales_days: A2 counts 0, as A5 (never sold)
            (D("2020-09-22"), "s2", "B1"),   # B1: 1 sale
        ],
        TX,
    )
    target = customers_df(spark, "c1", "c2")  # s1, s2 bought too but are not targets
    result = cand.same_product(tx, catalogue, target, AS_OF, window_days=7, n=2, sales_days=3)
    check(spark, result, "same_product", [
        ("c1", 1, "A4", 2.0), ("c1", 2, "A2", 0.0),  # A2/A5 tie at 0 sales: article_id, and n=2 cuts A5
        ("c2", 1, "B1", 1.0),
    ])


def test_bought_together_counts_distinct_customers_and_normalises_by_buyers(spark):
    # pair window (pair_days=3): 09-20..09-22. pair counts: A-B 2 (u1 twice counts once, u2), A-C 2 (u2, u3),
    # A-D 1, B-C 1; buyers: A 4, B 3, C 2, D 1. neighbours=2: A keeps B and C (D is third).
    tx = table(
        spark,
        [
            (D("2020-09-20"), "u1", "A"), (D("2020-09-20"), "u1", "B"),
            (D("2020-09-21"), "u1", "A"), (D("2020-09-21"), "u1", "B"),
            (D("2020-09-21"), "u2", "A"), (D("2020-09-21"), "u2", "B"), (D("2020-09-21"), "u2", "C"),
            (D("2020-09-22"), "u3", "A"), (D("2020-09-22"), "u3", "C"),
            (D("2020-09-22"), "u4", "A"), (D("2020-09-22"), "u4", "D"),
            (D("2020-09-22"), "u5", "B"),
            (D("2020-09-23"), "u5", "A"),   # on as_of: would make A-B 3 and buyers(A) 5
            # targets' history (history_days=7: 09-16..09-22), before the pair window
            (D("2020-09-18"), "t1", "A"),
            (D("2020-09-17"), "t2", "A"), (D("2020-09-17"), "t2", "B"),
            (D("2020-09-16"), "t3", "D"),
            (D("2020-09-23"), "t3", "C"),   # the future
            (D("2020-09-10"), "t3", "B"),   # older than history_days
        ],
        TX,
    )
    target = customers_df(spark, "t1", "t2", "t3")  # u1..u5 would get candidates too, but are not targets
    result = cand.bought_together(tx, target, AS_OF, pair_days=3, history_days=7, neighbours=2, n=3)
    check(spark, result, "bought_together", [
        ("t1", 1, "B", 2 / 4), ("t1", 2, "C", 2 / 4),   # tie: article_id; D is not among A's 2 neighbours
        ("t2", 1, "C", 2 / 4 + 1 / 3),                  # via A and via B; A and B themselves were bought
        ("t3", 1, "A", 1 / 1),
    ])


def test_bought_together_keeps_only_the_most_recent_basket(spark):
    tx = table(
        spark,
        [
            (D("2020-09-20"), "u", "P"), (D("2020-09-21"), "u", "Q"), (D("2020-09-22"), "u", "R"),
            (D("2020-09-17"), "t", "R"),
        ],
        TX,
    )
    result = cand.bought_together(
        tx, customers_df(spark, "t"), AS_OF, pair_days=3, history_days=7, neighbours=5, n=5, max_basket=2
    )
    check(spark, result, "bought_together", [("t", 1, "Q", 1.0)])  # P fell out of u's basket


@pytest.fixture(scope="module")
def shoppers(spark):
    return table(
        spark,
        [("y1", 20), ("y2", 22), ("o1", 60), ("o1", 40), ("m1", 30), ("x1", None)],
        "customer_id string, age int",
    )


def test_popularity_per_bucket_with_global_fill(spark, shoppers):
    # half-life 1 day: weight 1 the day before, 0.5 two days before
    tx = table(
        spark,
        [
            (D("2020-09-22"), "y1", "A"), (D("2020-09-22"), "y1", "A"),   # 16-24: A 2.0
            (D("2020-09-21"), "y2", "B"),                                 # 16-24: B 0.5
            (D("2020-09-22"), "o1", "C"), (D("2020-09-21"), "o1", "A"),   # 55+ (largest age): C 1.0, A 0.5
            (D("2020-09-22"), "ghost", "D"),                              # no customer row: D 1.0
            (D("2020-09-23"), "y1", "E"), (D("2020-09-12"), "y1", "E"),   # the future; outside the window
        ],
        TX,
    )
    # global: A 2.5, then C 1.0 and D 1.0 (tie: article_id), B 0.5
    target = customers_df(spark, "y2", "o1", "x1", "m1", "nobody")
    result = cand.popularity(tx, shoppers, target, AS_OF, window_days=7, n=3, half_life_days=1.0)
    check(spark, result, "popularity", [
        ("y2", 1, "A", 2.0), ("y2", 2, "B", 0.5), ("y2", 3, "C", 1.0),       # short bucket: A not repeated
        ("o1", 1, "C", 1.0), ("o1", 2, "A", 0.5), ("o1", 3, "D", 1.0),       # the bucket's own scores first
        ("x1", 1, "A", 2.5), ("x1", 2, "C", 1.0), ("x1", 3, "D", 1.0),       # unknown age: global
        ("m1", 1, "A", 2.5), ("m1", 2, "C", 1.0), ("m1", 3, "D", 1.0),       # 25-34 sold nothing: global
        ("nobody", 1, "A", 2.5), ("nobody", 2, "C", 1.0), ("nobody", 3, "D", 1.0),  # not in customers
    ])


def long_rows(spark, rows):
    return table(spark, rows, CANDIDATE_SCHEMA)


def test_combine_one_wide_row_per_pair_credited_to_the_first_source(spark):
    rows = long_rows(spark, [
        ("c1", "A", "repurchase", 1, 3.0), ("c1", "B", "repurchase", 2, 1.0),
        ("c1", "B", "popularity", 1, 10.0), ("c1", "C", "popularity", 2, 5.0), ("c2", "C", "popularity", 1, 5.0),
        ("c1", "C", "same_product", 1, 2.0),
        ("c2", "D", "two_tower", 1, 0.9),   # not a listed source: dropped
    ])
    sources = ["repurchase", "same_product", "bought_together", "popularity"]
    result = cand.combine(rows, sources)
    expected = table(
        spark,
        [
            ("c1", "A", 1, 3.0, None, None, None, None, None, None, 1, "repurchase"),
            ("c1", "B", 2, 1.0, None, None, None, None, 1, 10.0, 2, "repurchase"),
            ("c1", "C", None, None, 1, 2.0, None, None, 2, 5.0, 2, "same_product"),
            ("c2", "C", None, None, None, None, None, None, 1, 5.0, 1, "popularity"),
        ],
        "customer_id string, article_id string, repurchase_rank int, repurchase_score double, "
        "same_product_rank int, same_product_score double, bought_together_rank int, bought_together_score double, "
        "popularity_rank int, popularity_score double, n_sources int, source string",
    )
    assert_df_equality(result, expected, ignore_row_order=True, ignore_nullable=True)
    with pytest.raises(ValueError, match="sources"):
        cand.combine(rows, "repurchase")
    with pytest.raises(ValueError, match="sources"):
        cand.combine(rows, ["popularity", "popularity"])


def test_coverage_recall_against_a_hand_made_truth(spark):
    rows = long_rows(spark, [
        ("c1", "A", "repurchase", 1, 1.0), ("c1", "B", "repurchase", 2, 1.0),
        ("c1", "B", "popularity", 1, 1.0), ("c1", "C", "popularity", 2, 1.0), ("c2", "C", "popularity", 1, 1.0),
        ("c9", "A", "popularity", 1, 1.0),   # not a target customer: not counted
    ])
    target = customers_df(spark, "c1", "c2", "c3")   # c3 has no candidates
    truth = table(
        spark,
        [("c1", "A"), ("c1", "A"), ("c1", "D"), ("c2", "C"), ("c3", "E"), ("c9", "A")],
        "customer_id string, article_id string",
    )  # distinct target pairs: c1-A, c1-D, c2-C, c3-E = 4
    report = cand.coverage(rows, target, truth)
    assert list(report.columns) == ["source", "candidates_per_customer", "customers_covered", "recall", "pairs"]
    got = {r.source: (r.candidates_per_customer, r.customers_covered, r.recall, r.pairs) for r in report.itertuples()}
    assert list(got) == ["popularity", "repurchase", "all"]
    assert got["repurchase"] == pytest.approx((2 / 3, 1 / 3, 1 / 4, 4))   # hits c1-A
    assert got["popularity"] == pytest.approx((3 / 3, 2 / 3, 1 / 4, 4))   # hits c2-C
    assert got["all"] == pytest.approx((4 / 3, 2 / 3, 2 / 4, 4))          # c1-A, c1-B, c1-C, c2-C

    named = cand.coverage(rows, target, truth, sources=["repurchase", "same_product"])
    got = {r.source: (r.candidates_per_customer, r.customers_covered, r.recall) for r in named.itertuples()}
    assert list(got) == ["repurchase", "same_product", "all"]
    assert got["same_product"] == (0.0, 0.0, 0.0)
    assert got["all"] == pytest.approx((2 / 3, 1 / 3, 1 / 4))           # popularity left out

    nothing = cand.coverage(rows.limit(0), target, truth.limit(0))
    assert list(nothing.source) == ["all"] and nothing.candidates_per_customer[0] == 0.0
    assert math.isnan(nothing.recall[0]) and nothing.pairs[0] == 0


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda tx, t: cand.repurchase(tx, t, AS_OF, window_days=0, n=3, half_life_days=1.0), "window_days"),
        (lambda tx, t: cand.repurchase(tx, t, AS_OF, window_days=7, n=0, half_life_days=1.0), "n"),
        (lambda tx, t: cand.repurchase(tx, t, AS_OF, window_days=7, n=3, half_life_days=0.0), "half_life_days"),
        (lambda tx, t: cand.repurchase(tx, t, "yesterday", window_days=7, n=3, half_life_days=1.0), "as_of"),
        (lambda tx, t: cand.same_product(tx, tx, t, AS_OF, window_days=7, n=3, sales_days=0), "sales_days"),
        (lambda tx, t: cand.bought_together(tx, t, AS_OF, 0, 7, 5, 3), "pair_days"),
        (lambda tx, t: cand.bought_together(tx, t, AS_OF, 7, 0, 5, 3), "history_days"),
        (lambda tx, t: cand.bought_together(tx, t, AS_OF, 7, 7, 0, 3), "neighbours"),
        (lambda tx, t: cand.bought_together(tx, t, AS_OF, 7, 7, 5, 3, max_basket=0), "max_basket"),
        (lambda tx, t: cand.popularity(tx, tx, t, AS_OF, window_days=7, n=2.5, half_life_days=1.0), "n"),
    ],
)
def test_arguments_are_validated_by_name(spark, call, name):
    tx = table(spark, [], TX)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call(tx, customers_df(spark))
