"""Recommendation lists that always hold K articles, the popularity path, and reading the published table.

Every recommender (the two-tower model, the walking-skeleton popularity path) ends here: its own ranked
candidates come first, then the best sellers of the customer's age bucket, then the global best sellers, so
that every customer in `customers` gets exactly K distinct articles and each row says where it came from.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys.popularity import customer_age_buckets, popularity
from recsys.publish import NAME_COLUMNS, publish, with_article_names
from recsys.split import as_date, day_after_last_purchase
from recsys.tables import ARTICLES, CUSTOMERS, POPULARITY, RECOMMENDATIONS, TRANSACTIONS, Lakehouse

SOURCE_MODEL = "model"
SOURCE_AGE_BUCKET = "popularity_age_bucket"
SOURCE_GLOBAL = "popularity_global"
SOURCES = (SOURCE_MODEL, SOURCE_AGE_BUCKET, SOURCE_GLOBAL)  # in priority order
CANDIDATE_COLUMNS = "customer_id string, article_id string, score double, pos int"


def _no_source():
    """A fill row's source: named by its priority in `rank_sources`."""
    return F.lit(None).cast("string").alias("source")


def _segment(popular: DataFrame, segment_type: str, limit: int | None) -> DataFrame:
    rows = popular.filter(F.col("segment_type") == segment_type)
    if limit is not None:
        rows = rows.filter(F.col("rank") <= limit)
    return rows.select("segment", F.col("rank").alias("pos"), "article_id", "score")


def complete_lists(
    candidates: DataFrame | None,
    segments: DataFrame,
    popular: DataFrame,
    k: int,
    exclude: DataFrame | None = None,
) -> DataFrame:
    """Exactly `k` distinct articles for every customer of `segments`: own candidates, then popularity.

    candidates: customer_id, article_id, score, pos (1 = best) from the model, or None.
    segments: customer_id, age_bucket for EVERY customer to serve.
    popular: the `popularity` table layout (segment_type, segment, rank, article_id, score).
    exclude: customer_id, article_id pairs not to recommend (already bought), or None to keep them.
    Returns customer_id, rank (1..k), article_id, score, source. Only customers short of `k` own candidates
    are joined with the popularity lists. Without `exclude` the first k of each list suffice (each list adds
    at least what the earlier ones lack); with it the whole lists are used, and the global list without the
    exclusion is the last resort, so the count is exact whenever the global list holds k articles.
    """
    n_global = popular.filter(F.col("segment_type") == "global").count()
    if n_global < k:
        raise ValueError(
            f"only {n_global} globally popular articles in the popularity window, need at least k={k} to fill every "
            "list; widen features.popularity_window_days or lower scoring.k"
        )
    spark = segments.sparkSession
    own = candidates if candidates is not None else spark.createDataFrame([], CANDIDATE_COLUMNS)
    own = own.join(segments.select("customer_id"), "customer_id", "left_semi")
    if exclude is not None:
        own = own.join(exclude, ["customer_id", "article_id"], "left_anti")
    credited = F.col("source") if "source" in own.columns else F.lit(None)
    own = own.select("customer_id", "article_id", "score", F.col("pos").cast("int"), F.lit(0).alias("priority"),
                     credited.cast("string").alias("source"))
    counts = own.groupBy("customer_id").agg(F.count(F.lit(1)).alias("n"))
    short = (
        segments.join(counts, "customer_id", "left")
        .filter(F.coalesce(F.col("n"), F.lit(0)) < k)
        .select("customer_id", "age_bucket")
    )
    limit = None if exclude is not None else k
    by_age = short.join(
        F.broadcast(_segment(popular, "age_bucket", limit)), F.col("age_bucket") == F.col("segment")
    ).select("customer_id", "article_id", "score", "pos", F.lit(1).alias("priority"), _no_source())
    overall = short.crossJoin(F.broadcast(_segment(popular, "global", limit))).select(
        "customer_id", "article_id", "score", "pos", F.lit(2).alias("priority"), _no_source()
    )
    fill = by_age.unionByName(overall)
    if exclude is not None:
        last_resort = short.crossJoin(F.broadcast(_segment(popular, "global", k))).select(
            "customer_id", "article_id", "score", "pos", F.lit(3).alias("priority"), _no_source()
        )
        fill = fill.join(exclude, ["customer_id", "article_id"], "left_anti").unionByName(last_resort)
    return rank_sources(own.unionByName(fill), k)


def rank_sources(rows: DataFrame, k: int) -> DataFrame:
    """customer_id, article_id, score, pos, priority -> top k per customer; a repeated article keeps its best slot.

    Order: priority (0 model, 1 age bucket, 2 global, 3 global ignoring exclusions), then pos within a source.
    A row's `source` is its own when it carries one (the candidate source a ranked row is credited to), else
    the name of its priority.
    """
    source = F.coalesce(F.col("source"), F.element_at(
        F.array(*[F.lit(s) for s in (*SOURCES, SOURCE_GLOBAL)]), F.col("priority") + 1
    ))
    # One shuffle on customer_id serves both windows (clustered by customer_id, and by customer_id + article).
    rows = rows.repartition("customer_id")
    best = Window.partitionBy("customer_id", "article_id").orderBy("priority", "pos")
    order = Window.partitionBy("customer_id").orderBy("priority", "pos", "article_id")
    return (
        rows.withColumn("_n", F.row_number().over(best))
        .filter("_n = 1")
        .withColumn("rank", F.row_number().over(order))
        .filter(F.col("rank") <= k)
        .select("customer_id", F.col("rank").cast("int").alias("rank"), "article_id",
                F.col("score").cast("double").alias("score"), source.alias("source"))
    )


def popularity_lists(lake: Lakehouse, as_of: dt.date, k: int) -> DataFrame:
    """The feature store's `popularity` snapshot for `as_of` when there is one, else computed the same way."""
    features = lake.config.features
    top_n = max(features.popularity_top_n, k)
    if lake.exists(POPULARITY):
        stored = lake.read(POPULARITY).filter(F.col("as_of") == F.lit(as_of))
        if stored.filter(F.col("segment_type") == "global").count() >= k:
            return stored
    return popularity(
        lake.read(TRANSACTIONS), lake.read(CUSTOMERS), lake.read(ARTICLES), as_of,
        features.popularity_window_days, top_n, features.decay_half_life_days,
    )


def default_cutoff(lake: Lakehouse) -> dt.date:
    """Recommend for the week that follows the data."""
    return day_after_last_purchase(lake.read(TRANSACTIONS))


def run_popularity(lake: Lakehouse, cutoff: dt.date | str | None = None) -> dict[str, Any]:
    """Walking skeleton: last-7-days best sellers (age bucket, then global) -> published `recommendations`."""
    cutoff = as_date(cutoff, "cutoff") if cutoff else default_cutoff(lake)
    k = lake.config.scoring.k
    popular = popularity_lists(lake, cutoff, k).cache()
    try:
        recs = complete_lists(None, customer_age_buckets(lake.read(CUSTOMERS)), popular, k)
        summary = publish(lake, recs, model_version=f"popularity@{cutoff.isoformat()}", k=k, popularity_only=True)
    finally:
        popular.unpersist()
    return {**summary, "cutoff": cutoff.isoformat()}


def lookup(lake: Lakehouse, customer_id: str) -> pd.DataFrame:
    """One customer's published list with article names, best first."""
    recs = lake.read(RECOMMENDATIONS).filter(F.col("customer_id") == customer_id)
    out = with_article_names(recs, lake.read(ARTICLES)).orderBy("rank").toPandas()
    if out.empty:
        known = lake.read(CUSTOMERS).filter(F.col("customer_id") == customer_id).limit(1).count() > 0
        why = "has no published list (re-run scoring)" if known else "is not in the customers table"
        raise ValueError(f"customer_id {customer_id!r} {why}")
    return out


def format_list(pdf: pd.DataFrame) -> str:
    """A customer's list as a small table for the terminal."""
    columns = ["rank", "article_id", *NAME_COLUMNS, "score", "source"]
    head = f"customer {pdf['customer_id'].iloc[0]}  (model {pdf['model_version'].iloc[0]}, run {pdf['run_id'].iloc[0]})"
    with pd.option_context("display.width", 200, "display.max_colwidth", 30):
        return head + "\n" + pdf[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def submission(recs: DataFrame) -> DataFrame:
    """customer_id, prediction: the article ids in rank order separated by spaces (Kaggle's format)."""
    ordered = F.array_sort(F.collect_list(F.struct("rank", "article_id")))
    return recs.groupBy("customer_id").agg(
        F.array_join(F.transform(ordered, lambda r: r["article_id"]), " ").alias("prediction")
    )


def export_submission(lake: Lakehouse, out: str | os.PathLike) -> dict[str, Any]:
    """Write the published lists as a Kaggle submission CSV (one file, replaced atomically)."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    recs = lake.read(RECOMMENDATIONS)
    sub = submission(recs).cache()
    try:
        missing = lake.read(CUSTOMERS).select("customer_id").distinct().join(sub, "customer_id", "left_anti").count()
        staging = Path(tempfile.mkdtemp(prefix=".submission-", dir=out.parent))
        try:
            single_file = sub.orderBy("customer_id").coalesce(1)
            single_file.write.mode("overwrite").option("header", True).csv(str(staging / "csv"))
            (part,) = list((staging / "csv").glob("part-*.csv"))
            os.replace(part, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        rows = sub.count()
    finally:
        sub.unpersist()
    return {"path": str(out), "rows": rows, "customers_without_list": missing}
