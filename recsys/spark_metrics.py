"""Ranking metrics in Spark, for any recommender's lists on one test week.

The definitions are written down once, in `recsys.metrics` (the plain-Python reference this module is tested
against): Kaggle's MAP@12 over the customers who bought in the test week, binary Recall/Precision/NDCG@K, hit
rate, catalogue coverage and popularity bias. Every recommender, the baselines included, goes through
`evaluate_recommendations`, so the numbers compare like with like.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys import metrics as M
from recsys.popularity import UNKNOWN, age_bucket
from recsys.split import evaluation_customers

ALL = "all"  # the segment of every buyer of the test week


def first_positions(recs: DataFrame, max_k: int) -> DataFrame:
    """customer_id, article_id, pos: 1-based list position (rank order), first occurrence only, pos <= max_k.

    A repeated article keeps its first slot and its later slots stay used (as Kaggle's `apk`).
    """
    order = Window.partitionBy("customer_id").orderBy("rank", F.desc("score"), "article_id")
    return (
        recs.select("customer_id", "article_id", "rank", "score")
        .withColumn("pos", F.row_number().over(order))
        .filter(F.col("pos") <= max_k)
        .groupBy("customer_id", "article_id")
        .agg(F.min("pos").alias("pos"))
    )


def relevant(test: DataFrame) -> DataFrame:
    """Distinct (customer_id, article_id) bought in the test week: several units are one relevant article."""
    return test.select("customer_id", "article_id").distinct()


def _idcg(n_relevant: Any, k: int) -> Any:
    table = F.array(*[F.lit(M.ideal_dcg(i, k)) for i in range(1, k + 1)])
    return F.element_at(table, F.least(n_relevant, F.lit(k)).cast("int"))


def per_customer_metrics(recs: DataFrame, test: DataFrame, ks: list[int]) -> DataFrame:
    """One row per buyer of the test week: customer_id, n_relevant and every ranking metric at every K."""
    max_k = max(ks)
    truth = relevant(test)
    buyers = truth.groupBy("customer_id").agg(F.count(F.lit(1)).alias("n_relevant"))
    hits = (
        first_positions(recs, max_k)
        .join(truth, ["customer_id", "article_id"])
        .withColumn("nth_hit", F.row_number().over(Window.partitionBy("customer_id").orderBy("pos")))
    )
    sums = []
    for k in ks:
        at_k = F.col("pos") <= k
        sums += [
            F.sum(F.when(at_k, 1.0).otherwise(0.0)).alias(f"hits_{k}"),
            F.sum(F.when(at_k, 1.0 / F.log2(F.col("pos") + 1.0)).otherwise(0.0)).alias(f"dcg_{k}"),
            F.sum(F.when(at_k, F.col("nth_hit") / F.col("pos")).otherwise(0.0)).alias(f"ap_{k}"),
        ]
    per = buyers.join(hits.groupBy("customer_id").agg(*sums), "customer_id", "left").fillna(0.0)
    columns = [F.col("customer_id"), F.col("n_relevant")]
    for k in ks:
        h = F.col(f"hits_{k}")
        columns += [
            (h / F.col("n_relevant")).alias(M.metric_name("recall", k)),
            (h / F.lit(float(k))).alias(M.metric_name("precision", k)),
            (F.col(f"dcg_{k}") / _idcg(F.col("n_relevant"), k)).alias(M.metric_name("ndcg", k)),
            (F.col(f"ap_{k}") / F.least(F.col("n_relevant"), F.lit(k))).alias(M.metric_name("map", k)),
            F.when(h > 0, 1.0).otherwise(0.0).alias(M.metric_name("hit_rate", k)),
        ]
    return per.select(*columns)


def catalogue_popularity(catalogue: DataFrame, train: DataFrame | None) -> DataFrame:
    """article_id, pct, n_catalogue: pct is the share of catalogue articles bought strictly fewer times in
    `train` (see recsys.metrics); n_catalogue the catalogue size, on every row (no extra Spark job)."""
    articles = catalogue.select("article_id").distinct()
    if train is None:
        sold = articles.select("article_id", F.lit(0).alias("n")).limit(0)
    else:
        sold = train.groupBy("article_id").agg(F.count(F.lit(1)).alias("n"))
    # whole-catalogue count and rank on one partition, on purpose: one row per article (<= 105 K rows)
    whole = Window.partitionBy()
    return (
        articles.join(sold, "article_id", "left")
        .fillna(0, ["n"])
        .withColumn("n_catalogue", F.count(F.lit(1)).over(whole).cast("double"))
        .withColumn("pct", (F.rank().over(Window.orderBy("n")) - 1) / F.col("n_catalogue"))
        .select("article_id", "pct", "n_catalogue")
    )


def _population(test: DataFrame, segments: DataFrame | None) -> DataFrame:
    """customer_id, segment: every buyer in 'all', and in each of its segments."""
    buyers = evaluation_customers(test)
    everyone = buyers.withColumn("segment", F.lit(ALL))
    if segments is None:
        return everyone
    return everyone.unionByName(segments.select("customer_id", "segment").join(buyers, "customer_id"))


def evaluate_recommendations(
    recs: DataFrame,
    test: DataFrame,
    ks: list[int],
    segments: DataFrame | None = None,
    catalogue: DataFrame | None = None,
    train: DataFrame | None = None,
    popularity: DataFrame | None = None,
) -> pd.DataFrame:
    """Metrics of one recommender on one test week: pandas (segment, metric, value), 'all' plus each segment.

    `segments`: customer_id, segment (a customer may be in several). `catalogue`: article_id (default: every
    article in train, test and recs). `train`: the transactions before the test week, for popularity bias.
    `popularity`: `catalogue_popularity(catalogue, train)` already computed (it is the same for every model of
    a week, and counting two years of sales for each model was most of its evaluation time); then `catalogue`
    and `train` are not read.
    """
    return _metrics_table(_metric_rows(recs, test, ks, segments, catalogue, train, popularity).toPandas())


def recall_curve(recs: DataFrame, test: DataFrame, max_k: int = 100) -> pd.DataFrame:
    """Recall@K for K = 1..max_k over the test week's buyers: pandas (k, recall)."""
    return _curve_table(_curve_rows(recs, test, max_k).toPandas(), max_k)


_PART = "_part"  # which of the two result sets a row of the one job belongs to


def metrics_and_curve(
    recs: DataFrame, test: DataFrame, ks: list[int], curve_max_k: int, segments: DataFrame | None = None,
    popularity: DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`evaluate_recommendations` and `recall_curve` from one Spark job: both rank each list the same way, so
    with curve_max_k = max(ks) the plan shares that shuffle and sort, and the lists are read once."""
    rows = _metric_rows(recs, test, ks, segments, popularity=popularity).withColumn(_PART, F.lit("metrics"))
    curve = _curve_rows(recs, test, curve_max_k).withColumn(_PART, F.lit("curve"))
    both = rows.unionByName(curve, allowMissingColumns=True).toPandas()
    metrics = both[both[_PART] == "metrics"].drop(columns=[_PART, "pos", "gain"])
    return _metrics_table(metrics), _curve_table(both[both[_PART] == "curve"][["pos", "gain"]], curve_max_k)


def _metric_rows(
    recs: DataFrame, test: DataFrame, ks: list[int], segments: DataFrame | None = None,
    catalogue: DataFrame | None = None, train: DataFrame | None = None, popularity: DataFrame | None = None,
) -> DataFrame:
    """One row per segment: customers and every metric as a column."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"evaluation ks must be positive integers, got {ks}")
    population = _population(test, segments)
    per = per_customer_metrics(recs, test, ks)
    names = [c for c in per.columns if c not in ("customer_id", "n_relevant")]
    ranking = population.join(per, "customer_id").groupBy("segment").agg(
        F.count(F.lit(1)).cast("double").alias("customers"), *[F.avg(n).alias(n) for n in names]
    )
    if popularity is None:
        if catalogue is None:
            sources = [recs, test] + ([train] if train is not None else [])
            catalogue = sources[0].select("article_id")
            for other in sources[1:]:
                catalogue = catalogue.unionByName(other.select("article_id"))
        popularity = catalogue_popularity(catalogue, train)
    listed = (
        first_positions(recs, max(ks)).join(population, "customer_id")
        .join(F.broadcast(popularity), "article_id")
    )
    lists = listed.groupBy("segment").agg(*[
        agg
        for k in ks
        for agg in (
            (F.countDistinct(F.when(F.col("pos") <= k, F.col("article_id"))) / F.first("n_catalogue"))
            .alias(M.metric_name("coverage", k)),
            F.avg(F.when(F.col("pos") <= k, F.col("pct"))).alias(M.metric_name("popularity_bias", k)),
        )
    ])
    return ranking.join(lists, "segment", "left")


def _metrics_table(wide: pd.DataFrame) -> pd.DataFrame:
    long = wide.melt(id_vars="segment", var_name="metric", value_name="value")
    long["value"] = long["value"].astype(float).fillna(0.0)  # a segment with no lists: coverage and bias are 0
    return long.sort_values(["segment", "metric"]).reset_index(drop=True)


def _curve_rows(recs: DataFrame, test: DataFrame, max_k: int) -> DataFrame:
    """pos, gain: each list position's share of the buyers' relevant articles; position 0 the number of buyers."""
    truth = relevant(test)
    buyers = truth.groupBy("customer_id").agg(F.count(F.lit(1)).alias("n_relevant"))
    by_pos = (
        first_positions(recs, max_k).join(truth, ["customer_id", "article_id"]).join(buyers, "customer_id")
        .groupBy("pos").agg(F.sum(1.0 / F.col("n_relevant")).alias("gain"))
    )
    n_buyers_row = buyers.agg(F.lit(0).alias("pos"), F.count(F.lit(1)).cast("double").alias("gain"))
    return n_buyers_row.unionByName(by_pos)


def _curve_table(rows: pd.DataFrame, max_k: int) -> pd.DataFrame:
    n_buyers = float(rows.loc[rows["pos"] == 0, "gain"].iloc[0])
    hits = rows[rows["pos"] > 0]
    gains = pd.Series(0.0, index=range(1, max_k + 1))
    gains.loc[hits["pos"].astype(int).tolist()] = hits["gain"].astype(float).tolist()
    return pd.DataFrame({"k": gains.index, "recall": gains.cumsum().values / max(n_buyers, 1.0)})


def customer_segments(train: DataFrame, customers: DataFrame, short_history_max: int) -> DataFrame:
    """customer_id, segment: 'history:none|short|long' (purchases before the test week) and 'age:<bucket>'."""
    ids = customers.select("customer_id").unionByName(train.select("customer_id")).distinct()
    counts = train.groupBy("customer_id").agg(F.count(F.lit(1)).alias("n"))
    n = F.coalesce(F.col("n"), F.lit(0))
    history = ids.join(counts, "customer_id", "left").select(
        "customer_id",
        F.concat(
            F.lit("history:"), F.when(n == 0, "none").when(n <= short_history_max, "short").otherwise("long")
        ).alias("segment"),
    )
    ages = ids.join(customers.groupBy("customer_id").agg(F.max("age").alias("age")), "customer_id", "left").select(
        "customer_id", F.concat(F.lit("age:"), F.coalesce(age_bucket("age"), F.lit(UNKNOWN))).alias("segment")
    )
    return history.unionByName(ages)
