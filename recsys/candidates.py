"""Candidate sources: the first stage of a two-stage recommender (cheap, high-recall lists, then a learned ranker).

A ranker can only reorder what it is given, so the candidates' recall is the ceiling of the whole system
(`coverage` measures it). Every source is a pure function of the past: transactions strictly before `as_of`
(through recsys.split.before, so a purchase on or after the cut-off never leaks in), rows only for the `target`
customers, and one long format for all of them, CANDIDATE_COLUMNS:

    customer_id string, article_id string, source string, source_rank int, source_score double

one row per (customer, article) per source, source_rank 1..n per customer (1 = best; ties broken by
article_id, so a rerun gives the same lists), at most n per customer. `combine` turns the union of the sources
into one wide row per (customer, article): what the ranker learns from (who proposed it, at what rank/score).
"""
from __future__ import annotations

import datetime as dt
import math
import numbers
from typing import Iterable

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.popularity import AGE_BUCKETS, GLOBAL_SEGMENT, UNKNOWN, customer_age_buckets, decay_weight
from recsys.split import as_date, before, days_before

__all__ = [
    "ALL", "BOUGHT_TOGETHER", "CANDIDATE_COLUMNS", "CANDIDATE_SCHEMA", "POPULARITY", "REPURCHASE", "SAME_PRODUCT",
    "bought_together", "combine", "coverage", "popularity", "repurchase", "same_product",
]

CANDIDATE_SCHEMA = T.StructType([
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("article_id", T.StringType(), False),
    T.StructField("source", T.StringType(), False),
    T.StructField("source_rank", T.IntegerType(), False),
    T.StructField("source_score", T.DoubleType(), False),
])
CANDIDATE_COLUMNS = tuple(f.name for f in CANDIDATE_SCHEMA.fields)

# source names: the value of `source` and the prefix of the wide columns in `combine`
REPURCHASE = "repurchase"
SAME_PRODUCT = "same_product"
BOUGHT_TOGETHER = "bought_together"
POPULARITY = "popularity"
ALL = "all"  # coverage's row for the union of the sources


# --- shared helpers -------------------------------------------------------------------------------------
def _whole(**values: int) -> None:
    """Sizes and windows are whole numbers >= 1; a 0 would silently give empty lists, so it is an error."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _half_life(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:  # NaN fails too
        raise ValueError(f"half_life_days must be positive, got {value!r}")


def _targets(target: DataFrame) -> DataFrame:
    """The target customers once each, to count them or start from them (a left-semi join filters by `target`
    as it is: a repeated target row does no harm there, so it skips this shuffle)."""
    return target.select("customer_id").distinct()


def _out(df: DataFrame, source: str) -> DataFrame:
    """customer_id, article_id, source_rank, source_score -> CANDIDATE_COLUMNS, typed, in order."""
    return df.select(
        F.col("customer_id").cast("string").alias("customer_id"),
        F.col("article_id").cast("string").alias("article_id"),
        F.lit(source).alias("source"),
        F.col("source_rank").cast("int").alias("source_rank"),
        F.col("source_score").cast("double").alias("source_score"),
    )


def _ranked(scored: DataFrame, source: str, n: int, *order: Column) -> DataFrame:
    """customer_id, article_id, source_score (+ the `order` columns) -> the top n per customer, ranked."""
    window = Window.partitionBy("customer_id").orderBy(*order, F.asc("article_id"))
    ranked = scored.withColumn("source_rank", F.row_number().over(window)).filter(F.col("source_rank") <= n)
    return _out(ranked, source)


# --- the sources ----------------------------------------------------------------------------------------
def repurchase(
    transactions: DataFrame, target: DataFrame, as_of: dt.date | str, window_days: int, n: int,
    half_life_days: float,
) -> DataFrame:
    """The customer's own purchases of the last `window_days` days: on H&M data the strongest single source.

    Ranked most recent purchase day first, then more purchase rows, then article_id; source_score is the
    time-decayed count (recsys.popularity.decay_weight per row), a smoother signal for the ranker.
    """
    _whole(window_days=window_days, n=n)
    _half_life(half_life_days)
    cutoff = as_date(as_of, "as_of")
    own = (
        before(transactions, cutoff, window_days)
        .join(target.select("customer_id"), "customer_id", "left_semi")
        .groupBy("customer_id", "article_id")
        .agg(
            F.max("t_dat").alias("last"),
            F.count(F.lit(1)).alias("rows"),
            F.sum(decay_weight(days_before(cutoff), half_life_days)).alias("source_score"),
        )
    )
    return _ranked(own, REPURCHASE, n, F.desc("last"), F.desc("rows"))


def article_sales(transactions: DataFrame, as_of: dt.date | str, sales_days: int) -> DataFrame:
    """article_id, sales: purchase rows over the last `sales_days` days before `as_of` (same_product's order)."""
    return before(transactions, as_of, sales_days).groupBy("article_id").agg(F.count(F.lit(1)).alias("sales"))


def same_product(
    transactions: DataFrame, articles: DataFrame, target: DataFrame, as_of: dt.date | str, window_days: int,
    n: int, sales_days: int, sales: DataFrame | None = None,
) -> DataFrame:
    """Other colours/sizes of what the customer just bought (same product_code): people re-buy a liked cut.

    Articles the customer bought in the window are left out (that is repurchase's job). Ranked by the
    article's sales (rows) over the last `sales_days` days, then article_id; never-sold siblings qualify with 0.
    `sales`: `article_sales` computed once, when several calls share a date.
    """
    _whole(window_days=window_days, n=n, sales_days=sales_days)
    cutoff = as_date(as_of, "as_of")
    # one product per article (a duplicated catalogue row takes the largest code: deterministic); the catalogue
    # is small (~100k rows), so it is broadcast rather than shuffled
    products = F.broadcast(
        articles.groupBy("article_id").agg(F.max("product_code").alias("product_code"))
        .filter(F.col("product_code").isNotNull())
    )
    bought = (
        before(transactions, cutoff, window_days)
        .join(target.select("customer_id"), "customer_id", "left_semi")
        .select("customer_id", "article_id")
        .distinct()
    )
    siblings = (
        bought.join(products, "article_id")
        .select("customer_id", "product_code")
        .distinct()
        .join(products, "product_code")
        .select("customer_id", "article_id")
        .join(bought, ["customer_id", "article_id"], "left_anti")
    )
    sales = article_sales(transactions, cutoff, sales_days) if sales is None else sales
    scored = siblings.join(sales, "article_id", "left").select(
        "customer_id", "article_id", F.coalesce(F.col("sales").cast("double"), F.lit(0.0)).alias("source_score")
    )
    return _ranked(scored, SAME_PRODUCT, n, F.desc("source_score"))


def co_purchase_edges(transactions: DataFrame, as_of: dt.date | str, pair_days: int, neighbours: int,
                      max_basket: int = 30) -> DataFrame:
    """a, b, p: bought_together's item-to-item edges as of `as_of` (see there); the same for every customer."""
    _whole(pair_days=pair_days, neighbours=neighbours, max_basket=max_basket)
    latest = (
        before(transactions, as_of, pair_days)
        .groupBy("customer_id", "article_id")
        .agg(F.max("t_dat").alias("last"))
    )
    buyers = latest.groupBy("article_id").agg(F.count(F.lit(1)).alias("buyers"))  # latest: one row per buyer
    recency = Window.partitionBy("customer_id").orderBy(F.desc("last"), F.asc("article_id"))
    baskets = (
        latest.withColumn("_i", F.row_number().over(recency))
        .filter(F.col("_i") <= max_basket)
        .select("customer_id", "article_id")
    )
    pairs = (
        baskets.withColumnRenamed("article_id", "a")
        .join(baskets.withColumnRenamed("article_id", "b"), "customer_id")
        .filter(F.col("a") != F.col("b"))
        .groupBy("a", "b")
        .agg(F.count(F.lit(1)).alias("pair_count"))  # baskets are distinct, so this counts distinct customers
    )
    strongest = Window.partitionBy("a").orderBy(F.desc("pair_count"), F.asc("b"))
    return (
        pairs.withColumn("_i", F.row_number().over(strongest))
        .filter(F.col("_i") <= neighbours)
        .join(buyers.withColumnRenamed("article_id", "a"), "a")
        .select("a", "b", (F.col("pair_count") / F.col("buyers")).alias("p"))
    )


def bought_together(
    transactions: DataFrame, target: DataFrame, as_of: dt.date | str, pair_days: int, history_days: int,
    neighbours: int, n: int, max_basket: int = 30, edges: DataFrame | None = None,
) -> DataFrame:
    """Item-to-item co-purchase: what other customers bought alongside the customer's recent articles.

    Over the last `pair_days` days, pair_count(a, b) = distinct customers who bought both a and b (a != b), from
    each customer's `max_basket` most recently bought articles (ties by article_id): the self-join is on
    customer_id within the window, so it costs at most max_basket ** 2 rows per customer, never customers ** 2.
    Each a keeps its top `neighbours` b (ties by b). A target customer's candidates are the neighbours of the
    articles they bought in the last `history_days` days, scored sum_a pair_count(a, b) / buyers(a) (buyers(a):
    distinct customers of a in the whole pair window, so a best seller does not drown everything: P(b | a)),
    minus what they bought in those days. `edges`: `co_purchase_edges` computed once, when several calls share
    a date.
    """
    _whole(pair_days=pair_days, history_days=history_days, neighbours=neighbours, n=n, max_basket=max_basket)
    cutoff = as_date(as_of, "as_of")
    if edges is None:
        edges = co_purchase_edges(transactions, cutoff, pair_days, neighbours, max_basket)
    history = (
        before(transactions, cutoff, history_days)
        .join(target.select("customer_id"), "customer_id", "left_semi")
        .select("customer_id", "article_id")
        .distinct()
    )
    scored = (
        history.withColumnRenamed("article_id", "a")
        .join(edges, "a")
        .groupBy("customer_id", F.col("b").alias("article_id"))
        .agg(F.sum("p").alias("source_score"))
        .join(history, ["customer_id", "article_id"], "left_anti")
    )
    return _ranked(scored, BOUGHT_TOGETHER, n, F.desc("source_score"))


def customer_buckets(customers: DataFrame) -> DataFrame:
    """customer_id, bucket: recsys.popularity's age bucket of each customer."""
    return customer_age_buckets(customers).withColumnRenamed("age_bucket", "bucket")


def bucket_lists(transactions: DataFrame, customers: DataFrame, as_of: dt.date | str, window_days: int, n: int,
                 half_life_days: float) -> DataFrame:
    """bucket, article_id, source_rank, source_score: popularity's list for every age bucket and for an unknown
    age (see there); the same for every customer of a bucket, at most 6 lists of n rows."""
    _whole(window_days=window_days, n=n)
    _half_life(half_life_days)
    cutoff = as_date(as_of, "as_of")
    buckets = customer_buckets(customers)
    sales = (
        before(transactions, cutoff, window_days)
        .select("customer_id", "article_id", decay_weight(days_before(cutoff), half_life_days).alias("w"))
        .join(buckets, "customer_id", "left")
        .groupBy(F.coalesce("bucket", F.lit(UNKNOWN)).alias("bucket"), "article_id")
        .agg(F.sum("w").alias("score"))
    )
    # the bucket lists and the global list, top n each (the global one is the roll-up of the buckets)
    per_list = Window.partitionBy("list").orderBy(F.desc("score"), F.asc("article_id"))
    tops = (
        sales.filter(F.col("bucket") != UNKNOWN).select(F.col("bucket").alias("list"), "article_id", "score")
        .unionByName(
            sales.groupBy("article_id").agg(F.sum("score").alias("score"))
            .select(F.lit(GLOBAL_SEGMENT).alias("list"), "article_id", "score")
        )
        .withColumn("pos", F.row_number().over(per_list))
        .filter(F.col("pos") <= n)
    )
    # at most 6 lists of n rows: fill each bucket's list once here, not per customer
    own = tops.filter(F.col("list") != GLOBAL_SEGMENT).select(
        F.col("list").alias("bucket"), "article_id", "score", "pos", F.lit(0).alias("priority")
    )
    fill = tops.filter(F.col("list") == GLOBAL_SEGMENT).select(
        F.explode(F.array(*[F.lit(b) for b in (*AGE_BUCKETS, UNKNOWN)])).alias("bucket"),
        "article_id", "score", "pos", F.lit(1).alias("priority"),
    )
    first = Window.partitionBy("bucket", "article_id").orderBy("priority")
    order = Window.partitionBy("bucket").orderBy("priority", "pos")
    return (
        own.unionByName(fill)
        .withColumn("_k", F.row_number().over(first))
        .filter(F.col("_k") == 1)
        .withColumn("source_rank", F.row_number().over(order))
        .filter(F.col("source_rank") <= n)
        .select("bucket", "article_id", "source_rank", F.col("score").alias("source_score"))
    )


def popularity(
    transactions: DataFrame, customers: DataFrame, target: DataFrame, as_of: dt.date | str, window_days: int,
    n: int, half_life_days: float, lists: DataFrame | None = None,
) -> DataFrame:
    """Recent best sellers of the customer's age bucket, filled with the global ones: the candidates every
    customer gets, cold start included.

    Decayed counts over the last `window_days` days; a sale counts in its buyer's bucket (recsys.popularity's
    age_bucket of the largest age per customer_id). A target customer with a known bucket gets that bucket's top
    n, topped up with the global top n (in global order, skipping articles already listed) when the bucket sold
    fewer; unknown age or missing from `customers` -> the global top n. So everyone gets exactly n when the
    window sold at least n articles. source_score is the decayed count in the list the row came from.
    `lists`: `bucket_lists` computed once, when several calls share a date.
    """
    if lists is None:
        lists = bucket_lists(transactions, customers, as_of, window_days, n, half_life_days)
    buckets = customer_buckets(customers)
    who = _targets(target).join(buckets, "customer_id", "left").select(
        "customer_id", F.coalesce("bucket", F.lit(UNKNOWN)).alias("bucket")
    )
    return _out(who.join(F.broadcast(lists), "bucket"), POPULARITY)


# --- putting them together ------------------------------------------------------------------------------
def _source_names(sources: Iterable[str]) -> list[str]:
    """The names become column prefixes: a non-empty list of distinct identifiers (a bare str is a mistake)."""
    if isinstance(sources, str):
        raise ValueError(f"sources must be a list of source names, got the string {sources!r}")
    names = list(sources)
    if not names:
        raise ValueError("sources must name at least one source")
    bad = [s for s in names if not isinstance(s, str) or not s.isidentifier()]
    if bad:
        raise ValueError(f"sources: {bad} are not valid names (letters, digits, underscores)")
    if len(set(names)) != len(names):
        raise ValueError(f"sources: names repeat in {names}")
    return names


def combine(candidates: DataFrame, sources: Iterable[str], extra: dict[str, Column] | None = None) -> DataFrame:
    """The union of the sources' rows -> one row per (customer_id, article_id): the ranker's input.

    Columns: customer_id, article_id, then <source>_rank int and <source>_score double for each name in
    `sources` (null where that source did not propose the pair; a source without rows still gets its columns),
    n_sources int (how many proposed it) and source (the first proposing name in `sources` order: the source a
    published row is credited to). Rows of sources not named in `sources` are dropped; with `extra` (name ->
    aggregate) they are read by those aggregates, in the same pass, and still make no row of their own: a pair
    only they name is left out.
    """
    names = _source_names(sources)
    rows = candidates if extra else candidates.filter(F.col("source").isin(names))
    aggs = [value.alias(name) for name, value in (extra or {}).items()]
    for name in names:
        mine = F.col("source") == F.lit(name)
        # one row per (customer, article, source) by contract; min/max only make a duplicate harmless
        aggs += [
            F.min(F.when(mine, F.col("source_rank"))).cast("int").alias(f"{name}_rank"),
            F.max(F.when(mine, F.col("source_score"))).cast("double").alias(f"{name}_score"),
        ]
    wide = rows.groupBy("customer_id", "article_id").agg(*aggs)
    proposed = [F.col(f"{name}_rank").isNotNull() for name in names]
    n_sources = sum((p.cast("int") for p in proposed[1:]), proposed[0].cast("int"))
    credited = F.coalesce(*[F.when(p, F.lit(name)) for p, name in zip(proposed, names)])
    out = wide.select(
        "customer_id", "article_id",
        *[c for name in names for c in (f"{name}_rank", f"{name}_score")],
        n_sources.cast("int").alias("n_sources"),
        credited.alias("source"),
        *(extra or {}),
    )
    return out.filter(F.col("n_sources") > 0) if extra else out


def coverage(
    candidates: DataFrame, target: DataFrame, truth: DataFrame, sources: Iterable[str] | None = None
) -> pd.DataFrame:
    """Per source and for ALL (their union): how many candidates, for how many customers, with what recall.

    The recall is the ceiling of any ranker on these candidates. `candidates` is the long format
    (CANDIDATE_COLUMNS; only customer_id, article_id, source are read), `truth` the purchases to hit
    (customer_id, article_id; e.g. the following week). Only target customers count, on both sides.
    Columns: source, candidates_per_customer (rows per target customer, customers without any counting as 0;
    for ALL the distinct (customer, article) pairs, so an article proposed twice counts once),
    customers_covered (share of target customers with at least one), recall (share of the distinct truth
    pairs among the candidates), pairs (distinct truth pairs). With `sources`, those rows in that order (a source
    with no rows reports zeros) and only their candidates count; without, every source found, by name. A share
    over nothing (no target customers, no truth pairs) is NaN. One Spark action: aggregate, then toPandas once.
    """
    names = _source_names(sources) if sources is not None else None
    if names is not None and ALL in names:
        raise ValueError(f"sources: {ALL!r} is the name of the union's row, not a source")
    who = target.select("customer_id")
    listed = candidates.select("customer_id", "article_id", "source").join(who, "customer_id", "left_semi")
    if names is not None:
        listed = listed.filter(F.col("source").isin(names))
    # every row once under its own source and once under ALL, in one scan of the candidates
    long = listed.select(
        "customer_id", "article_id", F.explode(F.array(F.col("source"), F.lit(ALL))).alias("source")
    ).distinct()
    truth_pairs = truth.select("customer_id", "article_id").join(who, "customer_id", "left_semi").distinct()
    stats = (
        long.join(truth_pairs.withColumn("_hit", F.lit(1)), ["customer_id", "article_id"], "left")
        .groupBy("source")
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.countDistinct("customer_id").alias("customers"),
            F.sum(F.coalesce("_hit", F.lit(0))).alias("hits"),
        )
    )
    totals = _targets(target).agg(F.count(F.lit(1)).alias("n_target")).crossJoin(
        truth_pairs.agg(F.count(F.lit(1)).alias("pairs"))
    )
    # a left join from the one totals row keeps the totals even when there are no candidates at all
    report = totals.join(stats, F.lit(True), "left").toPandas()
    n_target, pairs = int(report["n_target"].iloc[0]), int(report["pairs"].iloc[0])
    found = {
        row.source: (int(row.rows), int(row.customers), int(row.hits))
        for row in report.itertuples() if isinstance(row.source, str)
    }
    order = (names if names is not None else sorted(set(found) - {ALL})) + [ALL]

    def share(part: int, whole: int) -> float:
        return part / whole if whole else math.nan

    out = []
    for name in order:
        rows, customers, hits = found.get(name, (0, 0, 0))
        out.append({
            "source": name,
            "candidates_per_customer": share(rows, n_target),
            "customers_covered": share(customers, n_target),
            "recall": share(hits, pairs),
            "pairs": pairs,
        })
    return pd.DataFrame(out, columns=["source", "candidates_per_customer", "customers_covered", "recall", "pairs"])
