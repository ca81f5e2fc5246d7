"""Honest baselines: what the two-tower model has to beat, through the same recommendations + evaluation path.

Each baseline sees only the training transactions (strictly before `as_of`) and returns a DataFrame with the
`recommendations` schema for the requested customers, exactly K articles each where the catalogue allows:
lists that come up short (a customer with two past purchases, an age bucket with few sales, a customer ALS has
never seen) are filled with the global best sellers, as a production system would.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys.config import Config
from recsys.popularity import UNKNOWN, age_bucket, popularity
from recsys.split import as_date, before
from recsys.tables import RECOMMENDATIONS_SCHEMA

FLAT = 1e9  # a half-life this long makes the decayed count a plain count


@dataclass
class BaselineInputs:
    """What every baseline may look at: the past, the catalogue, the customers to recommend for."""

    train: DataFrame        # transactions strictly before as_of
    customers: DataFrame    # the customers table (age for the age-bucket baseline)
    articles: DataFrame     # the articles table (the catalogue)
    target: DataFrame       # customer_id: who gets a list
    as_of: dt.date
    config: Config

    @property
    def k(self) -> int:
        return self.config.evaluation.k

    @cached_property
    def best_sellers(self) -> DataFrame:
        """Last week's top K by plain count: one list, computed once, shared by every fill."""
        return popular(self, self.config.features.popularity_window_days, FLAT).cache()


def to_recommendations(ranked: DataFrame, source: str, model_version: str, run_id: str = "") -> DataFrame:
    """customer_id, rank, article_id, score -> the `recommendations` schema, columns in its order."""
    extra = {
        "source": F.lit(source),
        "model_version": F.lit(model_version),
        "run_id": F.lit(run_id),
        "generated_at": F.current_timestamp(),
    }
    return ranked.select(*[
        (F.col(f.name) if f.name in ranked.columns else extra[f.name]).cast(f.dataType).alias(f.name)
        for f in RECOMMENDATIONS_SCHEMA.fields
    ])


def rank_lists(candidates: DataFrame, k: int) -> DataFrame:
    """customer_id, article_id, score, priority -> top k per customer; a repeated article keeps its best slot.

    `priority` orders the sources (0 = own list, 1 = fill); within one, higher score first, then article_id.
    """
    best = Window.partitionBy("customer_id", "article_id").orderBy("priority", F.desc("score"))
    order = Window.partitionBy("customer_id").orderBy("priority", F.desc("score"), "article_id")
    return (
        candidates.withColumn("_n", F.row_number().over(best))
        .filter("_n = 1")
        .withColumn("rank", F.row_number().over(order))
        .filter(F.col("rank") <= k)
        .select("customer_id", F.col("rank").cast("int").alias("rank"), "article_id", F.col("score").cast("double"))
    )


def popular(inputs: BaselineInputs, window_days: int, half_life_days: float, segment_type: str = "global") -> DataFrame:
    """segment, rank, article_id, score: the top K of `recsys.popularity.popularity` for one segment type."""
    return (
        popularity(inputs.train, inputs.customers, inputs.articles, inputs.as_of, window_days, inputs.k, half_life_days)
        .filter(F.col("segment_type") == segment_type)
        .select("segment", "rank", "article_id", "score")
    )


def _same_list_for_all(target: DataFrame, ranked: DataFrame, priority: int) -> DataFrame:
    return target.select("customer_id").distinct().crossJoin(
        F.broadcast(ranked.select("article_id", "score"))
    ).withColumn("priority", F.lit(priority))


def _fill(inputs: BaselineInputs, own: DataFrame) -> DataFrame:
    """Own candidates (customer_id, article_id, score) first, then last week's global best sellers."""
    fill = _same_list_for_all(inputs.target, inputs.best_sellers, 1)
    return rank_lists(own.withColumn("priority", F.lit(0)).unionByName(fill), inputs.k)


def popularity_last_week(inputs: BaselineInputs) -> DataFrame:
    """The same K best sellers of the last week (plain counts) for everyone."""
    return rank_lists(_same_list_for_all(inputs.target, inputs.best_sellers, 0), inputs.k)


def popularity_decayed(inputs: BaselineInputs) -> DataFrame:
    """Best sellers over the training window, each sale weighted down with its age (half-life in config)."""
    features = inputs.config.features
    top = popular(inputs, features.training_window_weeks * 7, features.decay_half_life_days)
    return rank_lists(_same_list_for_all(inputs.target, top, 0), inputs.k)


def popularity_age_bucket(inputs: BaselineInputs) -> DataFrame:
    """Last week's (decayed) best sellers among the customer's own age bucket; 'unknown' ages get theirs."""
    features = inputs.config.features
    by_bucket = popular(inputs, features.popularity_window_days, features.decay_half_life_days, "age_bucket")
    ages = inputs.customers.groupBy("customer_id").agg(F.max("age").alias("age"))
    buckets = inputs.target.select("customer_id").distinct().join(ages, "customer_id", "left").select(
        "customer_id", F.coalesce(age_bucket("age"), F.lit(UNKNOWN)).alias("segment")
    )
    own = buckets.join(F.broadcast(by_bucket), "segment").select("customer_id", "article_id", "score")
    return _fill(inputs, own)


def repurchase(inputs: BaselineInputs) -> DataFrame:
    """The customer's own recent purchases (most recent first, then most often), filled with best sellers."""
    recent = before(inputs.train, inputs.as_of, inputs.config.evaluation.repurchase_window_days)
    own = (
        recent.join(inputs.target.select("customer_id").distinct(), "customer_id")
        .groupBy("customer_id", "article_id")
        .agg(F.max("t_dat").alias("last"), F.count(F.lit(1)).alias("n"))
        # Recency in days dominates, the count breaks ties within a day: one sortable score.
        .select(
            "customer_id", "article_id",
            (F.datediff(F.col("last"), F.lit(dt.date(2000, 1, 1))) * 1000.0 + F.least("n", F.lit(999))).alias("score"),
        )
    )
    return _fill(inputs, own)


def als(inputs: BaselineInputs) -> DataFrame:
    """Spark MLlib ALS with implicit feedback (purchase counts) on the model's training window."""
    from pyspark.ml.recommendation import ALS

    ev = inputs.config.evaluation
    window = before(inputs.train, inputs.as_of, inputs.config.features.training_window_weeks * 7)
    # Computed once each: both indexes and the ratings read the counts, the lists read both indexes again (left
    # lazy, every one of them re-aggregated the window and re-ran the indexers).
    counts = window.groupBy("customer_id", "article_id").agg(F.count(F.lit(1)).cast("float").alias("n")).cache()
    # ALS wants int ids: index the ids present in the window.
    users = _index(counts, "customer_id", "user").cache()
    items = _index(counts, "article_id", "item").cache()
    ratings = counts.join(users, "customer_id").join(items, "article_id").select("user", "item", "n").cache()
    if ratings.isEmpty():  # nothing to factorise: everyone gets the fill
        own = ratings.sparkSession.createDataFrame([], "customer_id string, article_id string, score double")
    else:
        model = ALS(
            rank=ev.als_rank, maxIter=ev.als_max_iter, regParam=ev.als_reg, alpha=ev.als_alpha, implicitPrefs=True,
            userCol="user", itemCol="item", ratingCol="n", coldStartStrategy="drop", seed=inputs.config.model.seed,
        ).fit(ratings)
        known = inputs.target.select("customer_id").distinct().join(users, "customer_id")
        own = (
            model.recommendForUserSubset(known.select("user"), inputs.k)
            .select("user", F.explode("recommendations").alias("r"))
            .select("user", F.col("r.item").alias("item"), F.col("r.rating").cast("double").alias("score"))
            .join(known, "user")
            .join(F.broadcast(items), "item")
            .select("customer_id", "article_id", "score")
        )
    ranked = _fill(inputs, own).cache()
    ranked.count()  # materialise before the caches go
    for frame in (ratings, counts, users, items):
        frame.unpersist()
    return ranked


def _index(df: DataFrame, column: str, name: str) -> DataFrame:
    """Distinct values of `column` -> int ids 0..n-1 (`name`), in the values' order.

    A row number over the sorted values, on one partition on purpose (one short row per customer or article of
    the window, ~600 K at full size): StringIndexer gives the same ids but applies them through a closure that
    holds every value, so every task reading the ratings (each ALS iteration's) shipped a 47 MB binary."""
    return df.select(column).distinct().select(
        column, (F.row_number().over(Window.orderBy(column)) - 1).cast("int").alias(name))


BASELINES: dict[str, Callable[[BaselineInputs], DataFrame]] = {
    "popularity_last_week": popularity_last_week,
    "popularity_decayed": popularity_decayed,
    "popularity_age_bucket": popularity_age_bucket,
    "repurchase": repurchase,
    "als": als,
}


def recommend(
    config: Config,
    train: DataFrame,
    customers: DataFrame,
    articles: DataFrame,
    target: DataFrame,
    as_of: dt.date | str,
    names: list[str] | None = None,
) -> dict[str, DataFrame]:
    """name -> recommendations DataFrame for `target`, for each baseline in `names` (default: config)."""
    names = list(config.evaluation.baselines if names is None else names)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"evaluation.baselines: unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
    cutoff = as_date(as_of, "as_of")
    inputs = BaselineInputs(train.filter(F.col("t_dat") < F.lit(cutoff)), customers, articles, target, cutoff, config)
    return {
        name: to_recommendations(BASELINES[name](inputs), f"baseline:{name}", version(name, cutoff))
        for name in names
    }


def version(name: str, as_of: dt.date) -> str:
    """A baseline's version: its name and the day it was fitted up to (what its lists' `model_version` holds)."""
    return f"{name}@{as_of.isoformat()}"

