"""Ranking metrics in Spark, for any recommender's lists on one test week.

The definitions are written down once, in `recsys.metrics` (the plain-Python reference this module is tested
against): Kaggle's MAP@12 over the customers who bought in the test week, binary Recall/Precision/NDCG@K, hit
rate, catalogue coverage and popularity bias. Every recommender, the baselines included, goes through
`evaluate_models`, so the numbers compare like with like.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys import metrics as M
from recsys.popularity import UNKNOWN, age_bucket
from recsys.split import evaluation_customers

ALL = "all"  # the segment of every buyer of the test week


MODEL = "model"  # the column naming each recommender when several are evaluated in one job


def first_positions(recs: DataFrame, max_k: int, by: tuple[str, ...] = ()) -> DataFrame:
    """customer_id, article_id, pos: 1-based list position (rank order), first occurrence only, pos <= max_k.

    A repeated article keeps its first slot and its later slots stay used (as Kaggle's `apk`). `by`: columns
    that tell several recommenders' lists apart (each customer's list is ranked within its recommender).
    """
    order = Window.partitionBy(*by, "customer_id").orderBy("rank", F.desc("score"), "article_id")
    return (
        recs.select(*by, "customer_id", "article_id", "rank", "score")
        .withColumn("pos", F.row_number().over(order))
        .filter(F.col("pos") <= max_k)
        .groupBy(*by, "customer_id", "article_id")
        .agg(F.min("pos").alias("pos"))
    )


def relevant(test: DataFrame) -> DataFrame:
    """Distinct (customer_id, article_id) bought in the test week: several units are one relevant article."""
    return test.select("customer_id", "article_id").distinct()


def _idcg(n_relevant: Any, k: int) -> Any:
    table = F.array(*[F.lit(M.ideal_dcg(i, k)) for i in range(1, k + 1)])
    return F.element_at(table, F.least(n_relevant, F.lit(k)).cast("int"))


def _hits(positions: DataFrame, truth: DataFrame, buyers: DataFrame, by: tuple[str, ...]) -> DataFrame:
    """The listed articles the customer bought: by.., customer_id, article_id, pos, nth_hit (1 = best placed),
    n_relevant (the articles the customer bought that week)."""
    return positions.join(truth, ["customer_id", "article_id"]).join(buyers, "customer_id").withColumn(
        "nth_hit", F.row_number().over(Window.partitionBy(*by, "customer_id").orderBy("pos")))


def _hit_metrics(hits: DataFrame, ks: list[int], by: tuple[str, ...]) -> DataFrame:
    """One row per (recommender, customer) with at least one hit: every ranking metric at every K. A buyer
    without a hit scores 0 on each of them, so the averages need only these rows and the number of buyers."""
    sums = []
    for k in ks:
        at_k = F.col("pos") <= k
        sums += [
            F.sum(F.when(at_k, 1.0).otherwise(0.0)).alias(f"hits_{k}"),
            F.sum(F.when(at_k, 1.0 / F.log2(F.col("pos") + 1.0)).otherwise(0.0)).alias(f"dcg_{k}"),
            F.sum(F.when(at_k, F.col("nth_hit") / F.col("pos")).otherwise(0.0)).alias(f"ap_{k}"),
        ]
    per = hits.groupBy(*by, "customer_id", "n_relevant").agg(*sums)
    columns = [*by, "customer_id"]
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


def evaluate_models(
    lists: Mapping[str, DataFrame],
    test: DataFrame,
    ks: list[int],
    segments: DataFrame | None = None,
    popularity: DataFrame | None = None,
    catalogue: DataFrame | None = None,
    train: DataFrame | None = None,
    curve_max_k: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics of several recommenders on one test week from one Spark job: (model, segment, metric, value) for
    'all' and each segment, and with `curve_max_k` the Recall@K curve (model, k, recall) for K = 1..curve_max_k.

    One job for every model, not a few per model: on an evaluation week's buyers most of a model's metric time
    was the jobs' fixed cost. `segments`: customer_id, segment (a customer may be in several). `popularity`:
    `catalogue_popularity(catalogue, train)` already computed (the same for every model of a week); else it is
    computed from `catalogue` (default: every article in train, test and the lists) and `train` (the purchases
    before the test week, for popularity bias).
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"evaluation ks must be positive integers, got {ks}")
    if not lists:
        raise ValueError("evaluate_models: no lists to evaluate")
    names = list(lists)
    by = (MODEL,)
    recs = functools.reduce(DataFrame.unionByName, [
        frame.select(F.lit(name).alias(MODEL), "customer_id", "article_id", "rank", "score")
        for name, frame in lists.items()
    ])
    if popularity is None:
        if catalogue is None:
            catalogue = recs.select("article_id").unionByName(test.select("article_id"))
            if train is not None:
                catalogue = catalogue.unionByName(train.select("article_id"))
        popularity = catalogue_popularity(catalogue, train)
    max_k = max(ks)
    truth = relevant(test)
    buyers = truth.groupBy("customer_id").agg(F.count(F.lit(1)).alias("n_relevant"))
    population = _population(test, segments)
    positions = first_positions(recs, max(max_k, curve_max_k), by)
    hits = _hits(positions, truth, buyers, by)
    per = _hit_metrics(hits.where(F.col("pos") <= max_k), ks, by)
    metric_names = [c for c in per.columns if c not in (MODEL, "customer_id")]
    ranking = population.join(per, "customer_id").groupBy(MODEL, "segment").agg(
        *[F.sum(n).alias(n) for n in metric_names])
    # Coverage and popularity bias from one row per (model, segment, article): its best position and how often
    # it is listed at each K. Aggregated per listed row instead, the distinct counts at several K made Spark
    # copy every (list row x segment) once per K before the shuffle.
    listed = positions.where(F.col("pos") <= max_k).join(population, "customer_id").groupBy(
        MODEL, "segment", "article_id").agg(
        F.min("pos").alias("best"), *[F.sum((F.col("pos") <= k).cast("long")).alias(f"listed_{k}") for k in ks])
    listed = listed.join(F.broadcast(popularity), "article_id")
    shares = listed.groupBy(MODEL, "segment").agg(*[
        agg
        for k in ks
        for agg in (
            (F.sum((F.col("best") <= k).cast("long")) / F.first("n_catalogue")).alias(M.metric_name("coverage", k)),
            # the mean percentile over the listed rows (none listed at K: null, as an average of nothing)
            F.when(F.sum(f"listed_{k}") > 0, F.sum(F.col(f"listed_{k}") * F.col("pct")) / F.sum(f"listed_{k}"))
            .alias(M.metric_name("popularity_bias", k)),
        )
    ])
    sizes = population.groupBy("segment").agg(F.count(F.lit(1)).cast("double").alias("customers"))
    parts = [ranking.withColumn(_PART, F.lit("ranking")), shares.withColumn(_PART, F.lit("shares")),
             sizes.withColumn(_PART, F.lit("sizes"))]
    if curve_max_k:
        gains = hits.where(F.col("pos") <= curve_max_k).groupBy(MODEL, "pos").agg(
            F.sum(1.0 / F.col("n_relevant")).alias("gain"))
        parts.append(gains.withColumn(_PART, F.lit("curve")))
    rows = functools.reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), parts).toPandas()
    metrics = _metrics_table(rows, names, metric_names)
    curves = _curves_table(rows, names, curve_max_k) if curve_max_k else pd.DataFrame(
        columns=[MODEL, "k", "recall"])
    return metrics, curves


def evaluate_recommendations(
    recs: DataFrame,
    test: DataFrame,
    ks: list[int],
    segments: DataFrame | None = None,
    catalogue: DataFrame | None = None,
    train: DataFrame | None = None,
    popularity: DataFrame | None = None,
) -> pd.DataFrame:
    """Metrics of one recommender on one test week: pandas (segment, metric, value), 'all' plus each segment
    (`evaluate_models` for one)."""
    metrics, _ = evaluate_models({"": recs}, test, ks, segments, popularity, catalogue, train)
    return metrics.drop(columns=MODEL)


_PART = "_part"  # which of the result sets a row of the one job belongs to


def _metrics_table(rows: pd.DataFrame, names: list[str], ranking: list[str]) -> pd.DataFrame:
    """The job's parts -> model, segment, metric, value: the ranking metrics' sums over the buyers with a hit
    divided by the segment's buyers; coverage and bias 0 where a model listed nothing for a segment."""
    sizes = rows[rows[_PART] == "sizes"].set_index("segment")["customers"].astype(float)
    grid = pd.MultiIndex.from_product([names, sizes.index], names=[MODEL, "segment"])
    sums = rows[rows[_PART] == "ranking"].set_index([MODEL, "segment"])[ranking].astype(float)
    shares = [c for c in rows.columns if c.startswith(("coverage_", "popularity_bias_"))]
    wide = sums.reindex(grid).fillna(0.0).div(sizes, axis=0, level="segment")
    wide = wide.join(rows[rows[_PART] == "shares"].set_index([MODEL, "segment"])[shares].astype(float).reindex(grid))
    wide.insert(0, "customers", sizes.reindex(grid.get_level_values("segment")).to_numpy())
    long = wide.reset_index().melt(id_vars=[MODEL, "segment"], var_name="metric", value_name="value")
    long["value"] = long["value"].astype(float).fillna(0.0)  # a segment with no lists: coverage and bias are 0
    return long.sort_values([MODEL, "segment", "metric"]).reset_index(drop=True)


def _curves_table(rows: pd.DataFrame, names: list[str], max_k: int) -> pd.DataFrame:
    """Recall@K for K = 1..max_k per model: each position's share of the buyers' relevant articles, summed."""
    n_buyers = float(rows.loc[(rows[_PART] == "sizes") & (rows["segment"] == ALL), "customers"].iloc[0])
    gains = rows[rows[_PART] == "curve"]
    frames = []
    for name in names:
        mine = gains[gains[MODEL] == name]
        by_pos = pd.Series(0.0, index=range(1, max_k + 1))
        by_pos.loc[mine["pos"].astype(int).tolist()] = mine["gain"].astype(float).tolist()
        frames.append(pd.DataFrame({MODEL: name, "k": by_pos.index,
                                    "recall": by_pos.cumsum().to_numpy() / max(n_buyers, 1.0)}))
    return pd.concat(frames, ignore_index=True)


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
