"""The full system, for any date and any customers: candidates from several sources, then the learned ranker.

`rows(as_of, target)` is the one place that turns the lake into ranker rows: the candidate sources of
recsys.candidates plus the two-tower's FAISS neighbours (and its similarity to every other candidate), combined
into one row per (customer, article), with the features of recsys.ranker. Training and scoring both go through
it, only the date and the customers differ:

    ranker training     as of A = T - ranker.label_days, the customers who bought in A .. T-1, labels from then
    evaluation          as of T (the evaluation week's first day), that week's buyers
    publishing          as of the publish date, every customer

The two-tower model used here is always trained on features as of A or earlier, so none of its candidates or
similarities were fitted on the purchases the ranker learns from.
"""
from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys import candidates as C
from recsys import ranker as R
from recsys.config import Config
from recsys.publish import conform
from recsys.recommend import complete_lists, popularity_lists
from recsys.registry import CHALLENGER, Registry
from recsys.score import (
    check_model_date, customer_rows, model_candidates, model_lists, model_version_of, neighbours, retrieval,
    scored_customers, snapshot_of,
)
from recsys.spark import described
from recsys.tables import ARTICLES, CANDIDATES, CUSTOMERS, TRANSACTIONS, Lakehouse

TWO_TOWER = "two_tower"
SIMILARITY = "similarity"  # long rows carrying the two-tower similarity of a pair the model did not pick: a feature


# --- candidates -----------------------------------------------------------------------------------------
def source_candidates(config: Config, transactions: DataFrame, articles: DataFrame, customers: DataFrame,
                      target: DataFrame, as_of: dt.date, shared: Callable[[str, Callable[[], DataFrame]], DataFrame]
                      | None = None) -> DataFrame:
    """The rule-based sources named in `candidates.sources` (long rows, recsys.candidates.CANDIDATE_COLUMNS).

    `shared(name, build)`: where the parts that are the same for every customer (co-purchase edges, the age
    bucket lists, article sales) come from: built here by default, or kept and handed out again by the caller
    (the slices of one publish)."""
    cc, half_life = config.candidates, config.features.decay_half_life_days
    shared = shared or (lambda name, build: build())

    def edges() -> DataFrame:
        return shared(f"edges {cc.pair_days} {cc.pair_neighbours}",
                      lambda: C.co_purchase_edges(transactions, as_of, cc.pair_days, cc.pair_neighbours))

    def lists() -> DataFrame:
        return shared(f"bucket lists {cc.popularity_days} {cc.popularity_n} {half_life}",
                      lambda: C.bucket_lists(transactions, customers, as_of, cc.popularity_days, cc.popularity_n,
                                             half_life))

    def sales() -> DataFrame:
        return shared(f"sales {cc.sales_days}", lambda: C.article_sales(transactions, as_of, cc.sales_days))

    build = {
        C.REPURCHASE: lambda: C.repurchase(transactions, target, as_of, cc.repurchase_days, cc.repurchase_n,
                                           half_life),
        C.SAME_PRODUCT: lambda: C.same_product(transactions, articles, target, as_of, cc.same_product_days,
                                               cc.same_product_n, cc.sales_days, sales=sales()),
        C.BOUGHT_TOGETHER: lambda: C.bought_together(transactions, target, as_of, cc.pair_days,
                                                     cc.pair_history_days, cc.pair_neighbours, cc.bought_together_n,
                                                     edges=edges()),
        C.POPULARITY: lambda: C.popularity(transactions, customers, target, as_of, cc.popularity_days,
                                           cc.popularity_n, half_life, lists=lists()),
    }
    unknown = [s for s in cc.sources if s not in build and s != TWO_TOWER]
    if unknown:
        raise ValueError(f"candidates.sources: unknown source(s) {unknown}; known: {sorted([*build, TWO_TOWER])}")
    parts = [build[s]() for s in cc.sources if s in build]
    out = parts[0] if parts else None
    for part in parts[1:]:
        out = out.unionByName(part)
    return out


def two_tower_rows(lake: Lakehouse, encoder: Any, snapshot: dt.date, target: DataFrame, others: DataFrame | None,
                   n: int) -> DataFrame:
    """customer_id, article_id, score (similarity), pos: the model's `n` nearest articles (pos 1..n) and its
    similarity to every pair in `others` (pos null)."""
    check_model_date(encoder, snapshot, "used for candidates")
    index, vectors, _ = retrieval(lake, encoder, snapshot)
    features, _ = customer_rows(lake, snapshot, target)
    scoring = lake.config.scoring
    return model_candidates(features, encoder, index, n, threads=scoring.threads_per_task,
                            partitions=scoring.partitions, extra=others, articles=vectors)


def two_tower_long(model: DataFrame) -> DataFrame:
    """`two_tower_rows` -> long rows: the picks as source `two_tower`, the other pairs' similarity as `similarity`."""
    return model.select("customer_id", "article_id",
                        F.when(F.col("pos").isNotNull(), F.lit(TWO_TOWER)).otherwise(F.lit(SIMILARITY)).alias("source"),
                        F.coalesce(F.col("pos"), F.lit(0)).alias("source_rank"), F.col("score").alias("source_score"))


def shared(lake: Lakehouse, as_of: dt.date) -> Callable[[str, Callable[[], DataFrame]], DataFrame]:
    """What is the same for every customer as of `as_of`, computed once per lake and date and handed to every
    slice of customers (recsys.tables.Lakehouse.derived: rebuilt when a table it reads has changed)."""
    def get(name: str, build: Callable[[], DataFrame]) -> DataFrame:
        return lake.derived(name, build, TRANSACTIONS, ARTICLES, CUSTOMERS, key=(as_of,))
    return get


REPLACE, APPEND = "replace", "append"  # how a computation keeps its candidates in the `candidates` table


# --- customer keys: the ranking rows carry a number, not the 64-character id ----------------------------------
def customer_keys(target: DataFrame) -> DataFrame:
    """customer_id, customer_key: one 64-bit number per target customer, fixed once computed (materialised).

    A customer's ~115 ranking rows go through a shuffle, an aggregation, a sort and into Python; a 64-character
    id is most of such a row's bytes and its slowest comparison, a number neither. The keys are broadcast to
    the rows (a slice of a publish is ~690,000 customers), so no shuffle carries the id."""
    return target.select("customer_id").distinct().withColumn("customer_key", F.monotonically_increasing_id()
                                                              ).localCheckpoint()


def keyed(df: DataFrame, keys: DataFrame) -> DataFrame:
    """`df` with its customer_id replaced by the customer's key (rows of customers without one dropped)."""
    return (df.join(F.broadcast(keys), "customer_id").drop("customer_id")
            .withColumnRenamed("customer_key", "customer_id"))


def unkeyed(df: DataFrame, keys: DataFrame) -> DataFrame:
    """The inverse of `keyed`: the customer_id of each key back in place."""
    return df.withColumnRenamed("customer_id", "customer_key").join(F.broadcast(keys), "customer_key").drop(
        "customer_key")


def build_candidates(lake: Lakehouse, encoder: Any | None, as_of: dt.date, target: DataFrame,
                     write: str = "") -> DataFrame:
    """Every source's candidates for `target` as of `as_of`, long, with the two-tower's similarity to the pairs
    it did not pick kept aside in `source = 'similarity'` rows (not a source: a feature; a pick's similarity is
    its source_score, not repeated: at 100 picks a customer that would double the rows). Computed once: with
    `write` into the `candidates` table (partition as_of; REPLACE it, or APPEND a slice of customers to it: what
    the ranker trained on and what was published), else persisted in memory (evaluations, which must not
    replace the recorded lists)."""
    config = lake.config
    transactions = lake.read(TRANSACTIONS).select("t_dat", "customer_id", "article_id", "price", "sales_channel_id")
    customers, articles = lake.read(CUSTOMERS), lake.read(ARTICLES)
    long = source_candidates(config, transactions, articles, customers, target, as_of, shared(lake, as_of))
    if encoder is not None and TWO_TOWER in config.candidates.sources:
        n = config.candidates.two_tower_n
        others = long.select("customer_id", "article_id").distinct() if long is not None else None
        model = two_tower_long(two_tower_rows(lake, encoder, as_of, target, others, n))
        long = model if long is None else long.unionByName(model)
    if long is None:
        raise ValueError("candidates.sources: no source left (the two-tower source needs a model)")
    long = long.select(*C.CANDIDATE_COLUMNS)
    if not write:
        with described(lake.spark, "candidates"):
            return long.localCheckpoint()  # computed now, and the long plan behind it is cut off
    if write not in (REPLACE, APPEND):
        raise ValueError(f"build_candidates: write must be {REPLACE!r} or {APPEND!r}, got {write!r}")
    rows = long.withColumn("as_of", F.lit(as_of))
    with described(lake.spark, "candidates"):
        if write == APPEND and lake.exists(CANDIDATES):
            lake.write(rows, CANDIDATES, mode="append")
        else:
            lake.write(rows, CANDIDATES,
                       replace_where=f"as_of = DATE'{as_of.isoformat()}'" if lake.exists(CANDIDATES) else None)
    # this computation's rows only: after an APPEND the partition also holds the slices written before
    written = lake.read(CANDIDATES).filter(F.col("as_of") == F.lit(as_of)).drop("as_of")
    if write == APPEND:  # the target's id range: the files of other slices (`score.customer_slices`) are skipped
        low, high = target.agg(F.min("customer_id"), F.max("customer_id")).first()
        written = written.filter(F.col("customer_id").between(F.lit(low), F.lit(high)))
    # broadcast: the target ids (a slice of a publish at most) rather than a shuffle of every long row by id
    return written.join(F.broadcast(target.select("customer_id")), "customer_id", "left_semi")


def wide_rows(long: DataFrame, sources: list[str]) -> DataFrame:
    """Long candidates -> one row per (customer, article) proposed by a source, with the two-tower similarity
    (a pick's own score, or the pair's `similarity` row), in one aggregation."""
    similar = F.col("source").isin(TWO_TOWER, SIMILARITY)
    # partitioned by customer: the aggregation by (customer, article), the features' customer join and the top K
    # then share this one shuffle
    return C.combine(R.by_customer(long), sources,
                     extra={R.TWO_TOWER_SIMILARITY: F.max(F.when(similar, F.col("source_score")))})


def featured(lake: Lakehouse, wide: DataFrame, target: DataFrame, as_of: dt.date, keys: DataFrame | None = None
             ) -> DataFrame:
    """`wide` rows with the ranker's features: the article side computed once per date and shared (every slice
    of a publish needs the same), the target customers' purchase history read once and materialised. With
    `keys`, `wide` is keyed (`keyed`) and so is the customer side."""
    transactions, articles, customers = lake.read(TRANSACTIONS), lake.read(ARTICLES), lake.read(CUSTOMERS)
    article = shared(lake, as_of)("ranker article table",
                                  lambda: R.article_table(transactions, articles, customers, as_of))
    history = R.purchase_history(transactions, articles, target, as_of)
    ranked = target.select("customer_id")
    if keys is not None:
        history, customers = keyed(history, keys), keyed(customers, keys)
        ranked = keys.select(F.col("customer_key").alias("customer_id"))
    # materialised partitioned by customer: the checkpoint keeps that partitioning, so the customer side of the
    # features reads it without a shuffle (checkpointed unpartitioned, each aggregation shuffled its own copy)
    with described(lake.spark, "purchase history"):
        history = R.by_customer(history).localCheckpoint()
    return R.ranker_features(wide, transactions, articles, customers, as_of, article=article, history=history,
                             ranked=ranked)


def ranking_rows(lake: Lakehouse, encoder: Any | None, as_of: dt.date, target: DataFrame, write: str = "",
                 materialise: bool = True, keys: DataFrame | None = None) -> tuple[DataFrame, DataFrame]:
    """(long candidates, ranker rows with features) for `target` as of `as_of`. `materialise=False`: the rows
    stay lazy, partitioned and sorted by customer as the features' join leaves them, for `R.predict_top_k` to
    use as they are (a checkpoint forgets that partitioning, and the rows would be shuffled again). With
    `keys` (`customer_keys` of the target) the rows' customer_id is the customer's key (`unkeyed` undoes it)."""
    long = build_candidates(lake, encoder, as_of, target, write)
    wide = wide_rows(long if keys is None else keyed(long, keys), lake.config.candidates.sources)
    features = featured(lake, wide, target, as_of, keys)
    # computed once, plan cut off: the rows feed a fit (several passes), and the plan behind them (every source,
    # every aggregate) is long enough that Spark's own plan strings exhaust a small driver
    return long, features.localCheckpoint() if materialise else features


# --- training -------------------------------------------------------------------------------------------
@dataclass
class RankerFit:
    model: R.RankerModel
    facts: dict[str, Any]
    coverage: pd.DataFrame


def label_window(config: Config, until: dt.date) -> tuple[dt.date, dt.date]:
    """(as_of of the ranker's training rows, first day after the label window): A = until - label_days, until."""
    days = config.ranker.label_days
    if days < 1:
        raise ValueError(f"ranker.label_days must be at least 1, got {days}")
    return until - dt.timedelta(days=days), until


def xgboost_params(config: Config) -> dict[str, Any]:
    rc = config.ranker
    return {"objective": rc.objective, "n_estimators": rc.n_estimators, "max_depth": rc.max_depth,
            "learning_rate": rc.learning_rate, "subsample": rc.subsample, "colsample_bytree": rc.colsample_bytree,
            "min_child_weight": rc.min_child_weight, "random_state": rc.seed, "tree_method": "hist"}


def ranker_rows(lake: Lakehouse, encoder: Any | None, until: dt.date) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(long candidates, labelled ranker rows, the label window's purchases) for training the ranker that will
    rank as of `until`: candidates and features as of A = until - label_days for the customers who bought in
    A .. until-1, label 1 for what they bought then. Nothing on or after `until` is read."""
    config = lake.config
    start, end = label_window(config, until)
    if encoder is not None:
        check_model_date(encoder, start, "used for the ranker's training rows")
    transactions = lake.read(TRANSACTIONS).filter(F.col("t_dat") < F.lit(end))
    window = transactions.filter(F.col("t_dat") >= F.lit(start))
    buyers = window.select("customer_id").distinct()
    long, rows = ranking_rows(lake, encoder, start, buyers, write=REPLACE)
    return long, R.with_labels(rows, window, start, (end - start).days), window


def fit_ranker(lake: Lakehouse, encoder: Any | None, until: dt.date) -> RankerFit:
    """Train the ranker on `ranker_rows` (a sample of the negatives per customer); report the candidates' reach.

    `until` is the evaluation week's first day (or the publish date): the label window ends the day before.
    """
    config = lake.config
    start, end = label_window(config, until)
    long, labelled, window = ranker_rows(lake, encoder, until)
    with described(lake.spark, "ranker rows"):
        train_rows = R.training_rows(labelled, config.ranker.negatives_per_customer,
                                     config.ranker.seed).localCheckpoint()
    try:
        stats = train_rows.agg(F.count(F.lit(1)).alias("rows"), F.sum(R.LABEL).alias("positives"),
                               F.countDistinct("customer_id").alias("customers")).first().asDict()
        features = R.feature_columns(config.candidates.sources)
        started = time.perf_counter()
        with described(lake.spark, "ranker fit"):
            model = R.fit(train_rows, features, xgboost_params(config), config.ranker.workers)
        fit_seconds = round(time.perf_counter() - started, 1)
    finally:
        train_rows.unpersist()
    report = C.coverage(long.filter(F.col("source") != SIMILARITY), window.select("customer_id"), window,
                        config.candidates.sources)
    facts = {"candidates_as_of": start.isoformat(), "label_days": (end - start).days,
             "label_window": f"{start} .. {end - dt.timedelta(days=1)}", "rows": int(stats["rows"]),
             "positives": int(stats["positives"] or 0), "customers": int(stats["customers"]),
             "fit_seconds": fit_seconds}
    return RankerFit(model, facts, report)


# --- scoring --------------------------------------------------------------------------------------------
@dataclass
class SystemLists:
    """The two stages' lists, and what they were ranked from."""

    lists: DataFrame           # the `recommendations` schema, lazy
    candidates: DataFrame      # the long candidates (`build_candidates`), computed
    snapshot: dt.date
    target: DataFrame          # customer_id: who got lists


def system_lists(lake: Lakehouse, encoder: Any | None, model: R.RankerModel, as_of: dt.date | str | None = None,
                 customers: DataFrame | None = None, model_version: str = "", write_candidates: str = ""
                 ) -> SystemLists:
    """The ranker's top K of each customer's candidates as of `as_of` (default: the latest snapshot), filled to
    exactly K from popularity; `source` names the candidate source each row is credited to.

    `customers`: who gets lists (default: every customer). The lists are in the `recommendations` schema.
    """
    config = lake.config
    snapshot = snapshot_of(lake, as_of)
    everyone = customers is None
    target = lake.read(CUSTOMERS).select("customer_id").distinct() if everyone else customers.select(
        "customer_id").distinct()
    keys = customer_keys(target)
    long, rows = ranking_rows(lake, encoder, snapshot, target, write_candidates, materialise=False, keys=keys)
    # computed once (what follows may read it more than once), 12 rows a customer
    with described(lake.spark, "ranking"):
        ranked = unkeyed(R.predict_top_k(model, rows, config.scoring.k), keys).localCheckpoint()
    _, segments = customer_rows(lake, snapshot, None if everyone else target)
    popular = popularity_lists(lake, snapshot, config.scoring.k)
    lists = complete_lists(ranked, segments, popular, config.scoring.k)
    return SystemLists(conform(lists, model_version or model.version or "ranker", run_id=""), long, snapshot,
                       target)


def recommend(lake: Lakehouse, encoder: Any | None, model: R.RankerModel, as_of: dt.date | str | None = None,
              customers: DataFrame | None = None, model_version: str = "", write_candidates: str = ""
              ) -> DataFrame:
    """`system_lists`' lists alone."""
    return system_lists(lake, encoder, model, as_of, customers, model_version, write_candidates).lists


def two_tower_lists(lake: Lakehouse, system: SystemLists, encoder: Any) -> DataFrame | None:
    """The two-tower model's own lists (`score.recommend`) for the same customers and date, cut from the picks
    the system's candidates already hold rather than from a second search: its first picks of the customers it
    scores itself, completed as it completes them. None when the candidates hold fewer picks than its lists are
    cut from (`candidates.two_tower_n` below `score.neighbours`), or none at all."""
    config = lake.config
    n = neighbours(config)
    if TWO_TOWER not in config.candidates.sources or config.candidates.two_tower_n < n:
        return None
    features, _ = customer_rows(lake, system.snapshot, system.target)
    scored = scored_customers(features, config.scoring.min_history).select("customer_id")
    picks = (
        system.candidates.filter((F.col("source") == TWO_TOWER) & (F.col("source_rank") <= n))
        .join(scored, "customer_id", "left_semi")
        .select("customer_id", "article_id", F.col("source_score").alias("score"), F.col("source_rank").alias("pos"))
    )
    lists, _ = model_lists(lake, picks, system.snapshot, system.target)
    return conform(lists, model_version_of(encoder), run_id="")


def merged(lake: Lakehouse, encoder: Any | None, as_of: dt.date | str | None = None,
           customers: DataFrame | None = None) -> DataFrame:
    """The same candidates without the ranker: each source's list in `candidates.sources` order (the first
    source's articles first, by its rank), filled to exactly K. What the learned ranking has to beat."""
    config = lake.config
    snapshot = snapshot_of(lake, as_of)
    everyone = customers is None
    target = lake.read(CUSTOMERS).select("customer_id").distinct() if everyone else customers.select(
        "customer_id").distinct()
    long = build_candidates(lake, encoder, snapshot, target).filter(F.col("source") != SIMILARITY)
    order = F.create_map(*[x for i, s in enumerate(config.candidates.sources) for x in (F.lit(s), F.lit(i))])
    # one position per row: source order first, then the source's own rank
    ranked = long.select("customer_id", "article_id", "source", (order[F.col("source")] * 100000 + F.col(
        "source_rank")).alias("pos"), F.col("source_score").alias("score"))
    _, segments = customer_rows(lake, snapshot, None if everyone else target)
    lists = complete_lists(ranked, segments, popularity_lists(lake, snapshot, config.scoring.k), config.scoring.k)
    return conform(lists, "merge", run_id="")


# --- MLflow ---------------------------------------------------------------------------------------------
def log_ranker(config: Config, fit: RankerFit, two_tower_version: str, until: dt.date) -> dict[str, str]:
    """One MLflow run for the ranker (params, facts, candidate coverage, feature importances as artifacts),
    registered as a new version of `mlflow.ranker_model` with alias `challenger`, tagged with the two-tower
    version it was trained with. Returns run_id, version, model_uri."""
    import mlflow

    from recsys.train import configure_mlflow

    configure_mlflow(config)
    registry = Registry.of(config)
    client = registry.client
    importances = fit.model.importances()
    with mlflow.start_run(run_name=f"ranker until {until}") as active:
        run_id = active.info.run_id
        mlflow.log_params({f"ranker.{k}": v for k, v in vars(config.ranker).items()})
        mlflow.log_params({f"candidates.{k}": (",".join(v) if isinstance(v, list) else v)
                           for k, v in vars(config.candidates).items()})
        mlflow.log_params({"two_tower_version": two_tower_version, "until": until.isoformat(),
                           **{k: v for k, v in fit.facts.items() if k != "fit_seconds"}})
        mlflow.log_metric("fit_seconds", fit.facts["fit_seconds"])
        for row in fit.coverage.itertuples():
            mlflow.log_metric(f"candidate_recall_{row.source}", float(row.recall))
            mlflow.log_metric(f"candidates_per_customer_{row.source}", float(row.candidates_per_customer))
        mlflow.set_tags({"stage": "ranker", "two_tower_version": two_tower_version})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            importances.to_csv(folder / "feature_importances.csv", index=False)
            fit.coverage.to_csv(folder / "candidate_coverage.csv", index=False)
            (folder / "ranker.json").write_text(fit.model.to_json())
            for name in ("feature_importances.csv", "candidate_coverage.csv"):
                mlflow.log_artifact(str(folder / name), "ranker")
            mlflow.log_artifact(str(folder / "ranker.json"), "model")
    name = config.mlflow.ranker_model
    registry.ensure_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                          tags={"two_tower_version": two_tower_version, "until": until.isoformat()})
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {"run_id": run_id, "version": str(version.version), "model_uri": f"models:/{name}/{version.version}"}


def load_ranker(config: Config, version: str) -> R.RankerModel:
    """A registered ranker version -> RankerModel (its `version` set)."""
    from mlflow.artifacts import download_artifacts

    registered = Registry.of(config).version(config.mlflow.ranker_model, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifacts(run_id=registered.run_id, artifact_path="model/ranker.json", dst_path=tmp,
                                  tracking_uri=config.tracking_uri)
        model = R.RankerModel.from_json(Path(path).read_text())
    model.version = str(version)
    return model


def describe(fit: RankerFit) -> str:
    """A few lines for the terminal: the training rows and the candidate sources' reach."""
    lines = [f"ranker: {fit.facts['rows']:,} rows ({fit.facts['positives']:,} bought) of "
             f"{fit.facts['customers']:,} customers, candidates as of {fit.facts['candidates_as_of']}, labels "
             f"{fit.facts['label_window']}, fitted in {fit.facts['fit_seconds']} s",
             "candidates (label window): " + json.dumps({r.source: {"per_customer": round(r.candidates_per_customer, 1),
                                                                     "recall": round(r.recall, 4)}
                                                          for r in fit.coverage.itertuples()})]
    top = fit.model.importances().head(8)
    lines.append("top features (gain share): " + ", ".join(f"{r.feature} {r.gain_share:.2f}"
                                                            for r in top.itertuples()))
    return "\n".join(lines)
