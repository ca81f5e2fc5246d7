"""Recent best sellers, globally and per segment: what the cold-start fallback and the baselines recommend.

On H&M data "what sold in the last week" is a strong baseline (95 % of the last days' rows are articles that
also sold in the days before), so the scores are time-decayed counts over a short window. The age-bucket
definition lives here too: it is THE one definition, shared with the customer features.
"""
from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from recsys.split import as_date, before, days_before

AGE_BUCKETS = ("16-24", "25-34", "35-44", "45-54", "55+")  # code i+1 in cat_age_bucket; 0 = 'unknown'
UNKNOWN = "unknown"
MIN_AGE, MAX_AGE = 0, 120  # outside this range an age is a data error and counts as unknown
SEGMENT_TYPES = ("global", "age_bucket", "index_group")
GLOBAL_SEGMENT = "all"


def age_bucket(age: Column | str) -> Column:
    """Age -> '16-24' | '25-34' | '35-44' | '45-54' | '55+' | 'unknown' (null or implausible age).

    H&M members are 16 or older, so the (rare) younger ages fall into the first bucket.
    """
    age = F.col(age) if isinstance(age, str) else age
    valid = age.isNotNull() & (age >= MIN_AGE) & (age <= MAX_AGE)
    return (
        F.when(~valid, F.lit(UNKNOWN))
        .when(age < 25, F.lit("16-24"))
        .when(age < 35, F.lit("25-34"))
        .when(age < 45, F.lit("35-44"))
        .when(age < 55, F.lit("45-54"))
        .otherwise(F.lit("55+"))
    )


def decay_weight(days: Column, half_life_days: float) -> Column:
    """0.5 ** ((days - 1) / half_life): 1.0 for a purchase on the day before the cut-off, halving every half-life."""
    if half_life_days <= 0:
        raise ValueError(f"half_life_days must be positive, got {half_life_days}")
    return F.pow(F.lit(0.5), (days.cast("double") - 1.0) / F.lit(float(half_life_days)))


def customer_age_buckets(customers: DataFrame) -> DataFrame:
    """customer_id, age_bucket: one row per customer (a duplicated customer row takes its largest age, so the
    bucket is deterministic); the one definition every popularity list, fill-in and candidate source uses."""
    return customers.groupBy("customer_id").agg(age_bucket(F.max("age")).alias("age_bucket"))


def _article_segments(articles: DataFrame) -> DataFrame:
    return articles.groupBy("article_id").agg(F.max("index_group_name").alias("index_group"))


def popularity(
    transactions: DataFrame,
    customers: DataFrame,
    articles: DataFrame,
    as_of: dt.date | str,
    window_days: int,
    top_n: int,
    half_life_days: float,
) -> DataFrame:
    """Top `top_n` articles per segment by time-decayed count over the `window_days` days before `as_of`.

    Columns: as_of date, segment_type ('global' | 'age_bucket' | 'index_group'), segment ('all', the age
    bucket or the index_group_name; 'unknown' for buyers/articles missing from their table or with no age),
    rank int (1 = most popular; ties broken by article_id), article_id, score double, window_days int.
    Every row counts (several units of one article on one day are several sales).
    """
    if window_days < 1 or top_n < 1:
        raise ValueError(f"window_days and top_n must be at least 1, got {window_days} and {top_n}")
    cutoff = as_date(as_of, "as_of")
    weights = (
        before(transactions, cutoff, window_days)
        .select("customer_id", "article_id", decay_weight(days_before(cutoff), half_life_days).alias("w"))
    )
    # Pre-aggregate once to (age bucket, index group, article): every segment level is a roll-up of this.
    cells = (
        weights.join(customer_age_buckets(customers), "customer_id", "left")
        .join(F.broadcast(_article_segments(articles)), "article_id", "left")
        .groupBy(
            F.coalesce("age_bucket", F.lit(UNKNOWN)).alias("age_bucket"),
            F.coalesce("index_group", F.lit(UNKNOWN)).alias("index_group"),
            "article_id",
        )
        .agg(F.sum("w").alias("w"))
    )
    levels = {"global": F.lit(GLOBAL_SEGMENT), "age_bucket": F.col("age_bucket"), "index_group": F.col("index_group")}
    scored = None
    for segment_type in SEGMENT_TYPES:
        level = cells.groupBy(
            F.lit(segment_type).alias("segment_type"), levels[segment_type].alias("segment"), "article_id"
        ).agg(F.sum("w").alias("score"))
        scored = level if scored is None else scored.unionByName(level)
    order = Window.partitionBy("segment_type", "segment").orderBy(F.desc("score"), F.asc("article_id"))
    return (
        scored.withColumn("rank", F.row_number().over(order))
        .filter(F.col("rank") <= top_n)
        .select(
            F.lit(cutoff).alias("as_of"),
            "segment_type",
            "segment",
            F.col("rank").cast("int").alias("rank"),
            "article_id",
            F.col("score").cast("double").alias("score"),
            F.lit(int(window_days)).cast("int").alias("window_days"),
        )
    )
