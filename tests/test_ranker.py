"""The ranker's features by hand: one table of purchases, three candidate rows, every customer-side and pair
feature checked against a value worked out on paper (and nothing from on or after as_of)."""
from __future__ import annotations

import datetime as dt
import sys

import pytest

from pyspark import cloudpickle

from recsys import ranker as R

D = dt.date.fromisoformat
AS_OF = D("2020-09-23")


@pytest.fixture(scope="module", params=["inline", "shared"])
def rows(spark, request):
    """The features computed in one go, and from the parts a sliced publish shares or materialises (the article
    table, a purchase history read for more customers than the rows hold and materialised by customer, and those
    customers as the ones ranked): the same values by hand."""
    transactions = spark.createDataFrame([
        (D("2020-09-20"), "c1", "A", 0.02, 2),
        (D("2020-09-20"), "c1", "A", 0.02, 2),   # two units of A, 3 days before
        (D("2020-08-01"), "c1", "B", 0.04, 1),   # B: same product as A, 53 days before
        (D("2020-09-21"), "c2", "C", 0.10, 1),
        (D("2020-09-23"), "c1", "C", 0.50, 2),   # on as_of: the future
    ], "t_dat date, customer_id string, article_id string, price double, sales_channel_id int")
    articles = spark.createDataFrame([
        ("A", 1, "Ladieswear", 253), ("B", 1, "Ladieswear", 253), ("C", 2, "Menswear", 94),
    ], "article_id string, product_code int, index_group_name string, product_type_no int")
    customers = spark.createDataFrame([("c1", 30), ("c2", 50)], "customer_id string, age int")
    candidates = spark.createDataFrame([("c1", "A"), ("c1", "C"), ("new", "A")],
                                       "customer_id string, article_id string")
    parts = {}
    if request.param == "shared":
        everyone = spark.createDataFrame([("c1",), ("c2",), ("new",)], "customer_id string")
        history = R.by_customer(R.purchase_history(transactions, articles, everyone, AS_OF))
        parts = {"article": R.article_table(transactions, articles, customers, AS_OF).localCheckpoint(),
                 "history": history.localCheckpoint(), "ranked": everyone}
    out = R.ranker_features(candidates, transactions, articles, customers, AS_OF, **parts).collect()
    return {(r.customer_id, r.article_id): r for r in out}


def test_customer_and_pair_features_by_hand(rows):
    a, c = rows[("c1", "A")], rows[("c1", "C")]
    assert (a.cust_purchases_all, a.cust_purchases_7d, a.cust_purchases_28d) == (3.0, 2.0, 2.0)
    assert a.cust_days_since_last == 3.0 and a.cust_age == 30.0
    assert a.cust_price_mean == pytest.approx(0.08 / 3) and a.cust_online_share == pytest.approx(2 / 3)
    assert (a.pair_purchases, a.pair_days_since) == (2.0, 3.0)
    assert (a.product_purchases, a.product_days_since) == (3.0, 3.0)  # A twice and B, the same product_code
    assert a.share_index_group == 1.0 and a.share_product_type == 1.0
    assert (c.pair_purchases, c.pair_days_since, c.share_index_group) == (0.0, None, 0.0)  # the 09-23 C is future
    # A's buyers in the last 28 days: c1 (30); C's: c2 (50)
    assert a.age_gap == 0.0 and c.age_gap == pytest.approx(30 - 50)
    assert c.price_ratio == pytest.approx(0.10 / (0.08 / 3))


def test_a_customer_without_history_or_profile_gets_zeros_and_missing(rows):
    new = rows[("new", "A")]
    assert (new.cust_purchases_all, new.pair_purchases, new.product_purchases) == (0.0, 0.0, 0.0)
    assert new.cust_age is None and new.cust_days_since_last is None and new.share_index_group is None
    assert new.art_share_7d == pytest.approx(2 / 3)  # A: 2 of the 3 units sold in the 7 days before as_of


def test_training_rows_keep_every_positive_and_the_same_negatives_however_the_rows_are_partitioned(spark):
    rows = [(f"c{c}", f"a{a}", int(a == c % 7)) for c in range(30) for a in range(12)]
    rows += [("lost", f"a{a}", 0) for a in range(5)]  # no positive: teaches nothing, left out
    labelled = spark.createDataFrame(rows, "customer_id string, article_id string, label int")

    def kept(frame):
        return sorted((r.customer_id, r.article_id, r.label, r.qid) for r in R.training_rows(frame, 3, 7).collect())

    one, other = kept(labelled.coalesce(1)), kept(labelled.repartition(5, "article_id"))
    assert one == other
    assert {(c, a) for c, a, label, _ in one if label == 1} == {(f"c{c}", f"a{c % 7}") for c in range(30)}
    negatives = {}
    for c, _, label, _ in one:
        negatives[c] = negatives.get(c, 0) + (label == 0)
    assert set(negatives) == {f"c{c}" for c in range(30)} and set(negatives.values()) == {3}


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test double below travels to the workers


class _ByColumn:
    """A stand-in for the booster: the score is the row's `x` (what predict_top_k must cut, not what it learns)."""

    features = ["x"]

    def predict_arrow(self, batch):
        return batch.column("x").to_numpy()


@pytest.mark.parametrize("ties", [3, 1000, None])
def test_best_is_a_windows_top_k_ties_to_the_smaller_article(ties):
    """A customer's rows in any order, scores from heavily tied to untied: the k best by score, then article_id,
    numbered 1..k, as a window ordered by (score desc, article_id) gives them."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    rng = np.random.default_rng(11)
    n = 3000
    score = rng.integers(0, ties, n).astype(float) if ties else rng.random(n)
    scored = pd.DataFrame({"customer_id": rng.integers(0, 80, n),
                           "article_id": [f"a{a:04d}" for a in rng.permutation(n)],  # distinct, as a customer's are
                           "source": "src", "score": score})
    best = R._best(pa.Table.from_pandas(scored, preserve_index=False), 5).to_pandas()
    got = sorted(map(tuple, best[["customer_id", "article_id", "score", "pos"]].itertuples(index=False)))
    expected = []
    for customer, mine in scored.groupby("customer_id"):
        best = sorted(zip(mine["score"], mine["article_id"]), key=lambda r: (-r[0], r[1]))[:5]
        expected += [(customer, article, value, pos) for pos, (value, article) in enumerate(best, 1)]
    assert got == sorted(expected)
    assert R._best(pa.Table.from_pandas(scored.iloc[:0], preserve_index=False), 5).num_rows == 0


def test_predict_top_k_keeps_each_customers_best_k_across_arrow_batches_and_partitions(spark):
    """Batches of 3 rows split customers between batches (the carried customer), ties go to the smaller article,
    and the rows arrive in no particular order or partitioning: the result is a window's top k."""
    import random

    rng = random.Random(7)
    data = [(f"c{c}", f"a{a:02d}", "src", float(rng.randint(0, 4)))
            for c in range(9) for a in range(rng.randint(1, 8))]
    rng.shuffle(data)
    rows = spark.createDataFrame(data, "customer_id string, article_id string, source string, x double").repartition(3)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "3")
    try:
        got = sorted(tuple(r) for r in R.predict_top_k(_ByColumn(), rows, 3).collect())
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    expected = []
    for customer in sorted({d[0] for d in data}):
        mine = sorted((d for d in data if d[0] == customer), key=lambda d: (-d[3], d[1]))[:3]
        expected += [(customer, d[1], d[3], pos, "src") for pos, d in enumerate(mine, 1)]
    assert got == sorted(expected)


def test_the_booster_reads_arrow_columns_nulls_and_absent_columns_as_missing():
    """Scoring reads Arrow batches straight into the booster's matrix: an integer or double column's nulls and a
    feature the rows lack are all missing values, as in the matrix the booster was fitted on."""
    import numpy as np
    import pyarrow as pa
    import xgboost as xgb

    rng = np.random.default_rng(3)
    x = rng.random((200, 3))
    x[rng.random((200, 3)) < 0.2] = np.nan
    booster = xgb.train({"max_depth": 3, "objective": "reg:squarederror"}, xgb.DMatrix(x, label=rng.random(200),
                                                                                         missing=np.nan), 8)
    model = R.RankerModel(bytes(booster.save_raw("ubj")), ["a", "b", "c"])
    counts = [None if np.isnan(v) else int(v * 10) for v in x[:, 0]]
    batch = pa.RecordBatch.from_pydict({"b": pa.array(x[:, 1], from_pandas=True), "a": pa.array(counts, pa.int32()),
                                        "other": pa.array(["z"] * 200)})
    matrix = np.column_stack([[np.nan if c is None else c for c in counts], x[:, 1], np.full(200, np.nan)])
    expected = booster.inplace_predict(matrix.astype(np.float32), missing=np.nan)
    np.testing.assert_allclose(model.predict_arrow(batch), expected, rtol=1e-6)
    assert model.predict_arrow(batch.slice(0, 0)).shape == (0,)
