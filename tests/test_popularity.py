"""Popularity: time-decayed counts over the window strictly before the cut-off, per segment, ranked."""
from __future__ import annotations

import datetime as dt

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.popularity import age_bucket, decay_weight, popularity

D = dt.date.fromisoformat
AS_OF = D("2020-09-23")
TX_SCHEMA = T.StructType([
    T.StructField("t_dat", T.DateType(), False),
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("article_id", T.StringType(), False),
])
OUT_SCHEMA = T.StructType([
    T.StructField("as_of", T.DateType(), False),
    T.StructField("segment_type", T.StringType(), False),
    T.StructField("segment", T.StringType(), False),
    T.StructField("rank", T.IntegerType(), False),
    T.StructField("article_id", T.StringType(), False),
    T.StructField("score", T.DoubleType(), False),
    T.StructField("window_days", T.IntegerType(), False),
])
A, B, C = "0000000001", "0000000002", "0000000003"


@pytest.fixture()
def inputs(spark):
    transactions = spark.createDataFrame(
        [
            # t_dat            customer  article
            (D("2020-09-22"), "young", A),   # day before the cut-off: weight 1
            (D("2020-09-22"), "young", A),   # duplicate row: a second unit counts
            (D("2020-09-21"), "old", B),     # weight 0.5 (half-life 1 day)
            (D("2020-09-20"), "nobody", C),  # buyer missing from customers: age 'unknown'; weight 0.25
            (D("2020-09-16"), "old", C),     # outside the 3-day window
            (D("2020-09-23"), "old", C),     # ON the cut-off: excluded
            (D("2020-09-30"), "old", C),     # after the cut-off: excluded
        ],
        TX_SCHEMA,
    )
    customers = spark.createDataFrame(
        [("young", 22), ("old", 61), ("ageless", None)], "customer_id string, age int"
    )
    articles = spark.createDataFrame(
        [(A, "Ladieswear"), (B, "Menswear"), (C, "Ladieswear")], "article_id string, index_group_name string"
    )
    return transactions, customers, articles


def test_popularity_ranks_decayed_counts_per_segment(spark, inputs):
    result = popularity(*inputs, as_of="2020-09-23", window_days=3, top_n=2, half_life_days=1.0)
    expected = spark.createDataFrame(
        [
            # segment_type   segment       rank article score
            (AS_OF, "global", "all", 1, A, 2.0, 3),
            (AS_OF, "global", "all", 2, B, 0.5, 3),   # top_n=2 cuts C (0.25)
            (AS_OF, "age_bucket", "16-24", 1, A, 2.0, 3),
            (AS_OF, "age_bucket", "55+", 1, B, 0.5, 3),
            (AS_OF, "age_bucket", "unknown", 1, C, 0.25, 3),
            (AS_OF, "index_group", "Ladieswear", 1, A, 2.0, 3),
            (AS_OF, "index_group", "Ladieswear", 2, C, 0.25, 3),
            (AS_OF, "index_group", "Menswear", 1, B, 0.5, 3),
        ],
        OUT_SCHEMA,
    )
    assert_approx_df_equality(
        result, expected, 1e-9, ignore_row_order=True, ignore_nullable=True
    )


def test_popularity_ties_break_by_article_id_and_empty_window_is_empty(spark, inputs):
    transactions, customers, articles = inputs
    tied = spark.createDataFrame([(D("2020-09-22"), "young", B), (D("2020-09-22"), "old", A)], TX_SCHEMA)
    result = popularity(tied, customers, articles, AS_OF, window_days=7, top_n=5, half_life_days=14.0)
    top = [(r.rank, r.article_id) for r in result.filter("segment_type = 'global'").orderBy("rank").collect()]
    assert top == [(1, A), (2, B)]
    assert popularity(transactions, customers, articles, "2019-01-01", 7, 5, 14.0).count() == 0


def test_popularity_rejects_bad_parameters(inputs):
    with pytest.raises(ValueError, match="window_days"):
        popularity(*inputs, as_of=AS_OF, window_days=0, top_n=5, half_life_days=1.0)
    with pytest.raises(ValueError, match="half_life_days"):
        popularity(*inputs, as_of=AS_OF, window_days=7, top_n=5, half_life_days=0.0)
    with pytest.raises(ValueError, match="as_of"):
        popularity(*inputs, as_of="yesterday", window_days=7, top_n=5, half_life_days=1.0)


def test_age_bucket_edges_and_decay(spark):
    ages = spark.createDataFrame(
        [(None,), (-1,), (15,), (16,), (24,), (25,), (34,), (35,), (44,), (45,), (54,), (55,), (99,), (200,)],
        "age int",
    )
    got = ages.select("age", age_bucket("age").alias("bucket"), decay_weight(F.lit(3), 2.0).alias("w"))
    expected = spark.createDataFrame(
        [
            (None, "unknown"), (-1, "unknown"), (15, "16-24"), (16, "16-24"), (24, "16-24"), (25, "25-34"),
            (34, "25-34"), (35, "35-44"), (44, "35-44"), (45, "45-54"), (54, "45-54"), (55, "55+"), (99, "55+"),
            (200, "unknown"),
        ],
        "age int, bucket string",
    ).withColumn("w", F.lit(0.5))  # 3 days before, half-life 2: 0.5 ** ((3 - 1) / 2)
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)
