"""Evaluation: ranking metrics in Spark, the `evaluation_runs` table, the HTML report and the champion gate.

The metric definitions are written down once, in `recsys.metrics` (the plain-Python reference this module is
tested against): Kaggle's MAP@12 over the customers who bought in the test week, binary Recall/Precision/NDCG@K,
hit rate, catalogue coverage and popularity bias. Every recommender, the baselines included, goes through
`evaluate_recommendations`, so the numbers compare like with like.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys import metrics as M
from recsys.config import Config
from recsys.popularity import UNKNOWN, age_bucket
from recsys.registry import CHALLENGER, CHAMPION, Registry
from recsys.split import as_date, backtest_starts, default_test_start, evaluation_customers, split
from recsys.tables import ARTICLES, CUSTOMERS, EVALUATION_RUNS, EVALUATION_RUNS_SCHEMA, TRANSACTIONS, Lakehouse

log = logging.getLogger(__name__)

ALL = "all"
RUN_COLUMNS = ["model", "version", "test_week", "segment", "metric", "value"]
HEADLINE = ("map", "recall", "ndcg", "precision", "hit_rate", "coverage", "popularity_bias")
TWO_TOWER = "two_tower"          # the challenger's two-tower alone, evaluated beside the full system
MODEL_NAMES = (CHALLENGER, CHAMPION, TWO_TOWER)


# --- Spark metrics ------------------------------------------------------------------------------------------
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
) -> pd.DataFrame:
    """Metrics of one recommender on one test week: pandas (segment, metric, value), 'all' plus each segment.

    `segments`: customer_id, segment (a customer may be in several). `catalogue`: article_id (default: every
    article in train, test and recs). `train`: the transactions before the test week, for popularity bias.
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"evaluation ks must be positive integers, got {ks}")
    population = _population(test, segments)
    per = per_customer_metrics(recs, test, ks)
    names = [c for c in per.columns if c not in ("customer_id", "n_relevant")]
    ranking = population.join(per, "customer_id").groupBy("segment").agg(
        F.count(F.lit(1)).cast("double").alias("customers"), *[F.avg(n).alias(n) for n in names]
    )
    if catalogue is None:
        sources = [recs, test] + ([train] if train is not None else [])
        catalogue = sources[0].select("article_id")
        for other in sources[1:]:
            catalogue = catalogue.unionByName(other.select("article_id"))
    listed = (
        first_positions(recs, max(ks)).join(population, "customer_id")
        .join(F.broadcast(catalogue_popularity(catalogue, train)), "article_id")
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
    wide = ranking.join(lists, "segment", "left").toPandas()  # the one Spark job
    long = wide.melt(id_vars="segment", var_name="metric", value_name="value")
    long["value"] = long["value"].astype(float).fillna(0.0)  # a segment with no lists: coverage and bias are 0
    return long.sort_values(["segment", "metric"]).reset_index(drop=True)


def recall_curve(recs: DataFrame, test: DataFrame, max_k: int = 100) -> pd.DataFrame:
    """Recall@K for K = 1..max_k over the test week's buyers: pandas (k, recall)."""
    truth = relevant(test)
    buyers = truth.groupBy("customer_id").agg(F.count(F.lit(1)).alias("n_relevant"))
    by_pos = (
        first_positions(recs, max_k).join(truth, ["customer_id", "article_id"]).join(buyers, "customer_id")
        .groupBy("pos").agg(F.sum(1.0 / F.col("n_relevant")).alias("gain"))
    )
    # One job: position 0 carries the number of buyers.
    rows = buyers.agg(F.lit(0).alias("pos"), F.count(F.lit(1)).cast("double").alias("gain")).unionByName(by_pos).toPandas()
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
        F.concat(F.lit("history:"), F.when(n == 0, "none").when(n <= short_history_max, "short").otherwise("long")).alias("segment"),
    )
    ages = ids.join(customers.groupBy("customer_id").agg(F.max("age").alias("age")), "customer_id", "left").select(
        "customer_id", F.concat(F.lit("age:"), F.coalesce(age_bucket("age"), F.lit(UNKNOWN))).alias("segment")
    )
    return history.unionByName(ages)


# --- Runs over the lake --------------------------------------------------------------------------------------
@dataclass
class Week:
    """One test week and what it is evaluated against."""

    test_start: dt.date
    train: DataFrame
    test: DataFrame
    target: DataFrame          # customer_id: the buyers of the week, who need a list
    segments: DataFrame
    catalogue: DataFrame


def load_week(lake: Lakehouse, test_start: dt.date | str, test_days: int | None = None) -> Week:
    config = lake.config
    start = as_date(test_start, "test_start")
    transactions = lake.read(TRANSACTIONS)
    train, test = split(transactions, start, test_days or config.split.test_days)
    customers = lake.read(CUSTOMERS) if lake.exists(CUSTOMERS) else train.select("customer_id").distinct().withColumn("age", F.lit(None).cast("int"))
    test = test.cache()
    if test.isEmpty():
        raise ValueError(f"transactions: no rows in the test week starting {start}; pick a --test-start inside the data")
    catalogue = lake.read(ARTICLES).select("article_id") if lake.exists(ARTICLES) else transactions.select("article_id").distinct()
    segments = customer_segments(train, customers, config.evaluation.short_history_max)
    return Week(start, train, test, evaluation_customers(test).cache(), segments, catalogue)


def evaluate_week(
    week: Week, recommenders: Mapping[str, DataFrame], config: Config, versions: Mapping[str, str] | None = None,
    curves: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics: model, version, test_week, segment, metric, value; curves: model, k, recall) for every model."""
    ks = sorted(set(config.evaluation.ks) | {config.evaluation.k})
    metrics, curve_frames = [], []
    for name, recs in recommenders.items():
        cached = recs.is_cached
        # several metric jobs read it: compute the lists once, and cut the plan behind them (candidates, ranker)
        recs = recs if cached else recs.localCheckpoint()
        version = (versions or {}).get(name) or _version_of(recs)
        scores = evaluate_recommendations(recs, week.test, ks, week.segments, week.catalogue, week.train)
        metrics.append(scores.assign(model=name, version=version, test_week=week.test_start))
        if curves:
            curve = recall_curve(recs, week.test, config.evaluation.curve_max_k)
            curve_frames.append(curve.assign(model=name, test_week=week.test_start))
        log.info("evaluated %s on %s: map@%d = %.5f", name, week.test_start, config.evaluation.k,
                 _value(metrics[-1], ALL, M.metric_name("map", config.evaluation.k)))
        if not cached:
            recs.unpersist()
    curve_columns = ["k", "recall", "model", "test_week"]
    return (
        pd.concat(metrics)[RUN_COLUMNS].reset_index(drop=True),
        pd.concat(curve_frames).reset_index(drop=True) if curve_frames else pd.DataFrame(columns=curve_columns),
    )


def _version_of(recs: DataFrame) -> str:
    if "model_version" not in recs.columns:
        return ""
    row = recs.select("model_version").limit(1).first()
    return str(row[0]) if row else ""


def _value(metrics: pd.DataFrame, segment: str, metric: str) -> float:
    hit = metrics[(metrics["segment"] == segment) & (metrics["metric"] == metric)]["value"]
    return float(hit.iloc[0]) if len(hit) else math.nan


def write_runs(lake: Lakehouse, metrics: pd.DataFrame) -> None:
    """Replace this run's (test week, model) slices of `evaluation_runs`; other weeks and models stay."""
    rows = metrics.assign(version=metrics["version"].astype(str), value=metrics["value"].astype(float))
    df = lake.spark.createDataFrame(rows[[f.name for f in EVALUATION_RUNS_SCHEMA.fields]], EVALUATION_RUNS_SCHEMA)
    if not lake.exists(EVALUATION_RUNS):
        lake.write(df, EVALUATION_RUNS)
        return
    weeks = ", ".join(f"DATE'{w}'" for w in sorted({str(w) for w in rows["test_week"]}))
    models = ", ".join("'" + m.replace("'", "''") + "'" for m in sorted(set(rows["model"])))
    lake.write(df, EVALUATION_RUNS, replace_where=f"test_week IN ({weeks}) AND model IN ({models})")


def log_to_mlflow(config: Config, run_id: str, metrics: pd.DataFrame, curve: pd.DataFrame | None = None,
                  report_path: str | Path | None = None) -> None:
    """Metrics of one model on one week into its MLflow run: `test_<metric>` ('all') and `test_<segment>_<metric>`."""
    import time

    from mlflow.entities import Metric

    client = config.mlflow_client()
    now = int(time.time() * 1000)
    entries = []
    for row in metrics.itertuples():
        prefix = "test" if row.segment == ALL else "test_" + re.sub(r"[^0-9A-Za-z_]+", "_", row.segment)
        entries.append(Metric(f"{prefix}_{row.metric}", float(row.value), now, 0))
    if curve is not None:
        entries += [Metric("test_recall_curve", float(r.recall), now, int(r.k)) for r in curve.itertuples()]
    for start in range(0, len(entries), 900):  # MLflow's batch limit is 1000 metrics
        client.log_batch(run_id, metrics=entries[start:start + 900])
    if report_path is not None and Path(report_path).exists():
        client.log_artifact(run_id, str(report_path), artifact_path="evaluation")


def evaluate_all(
    lake: Lakehouse,
    recommenders: Mapping[str, DataFrame],
    test_start: dt.date | str,
    versions: Mapping[str, str] | None = None,
    run_ids: Mapping[str, str] | None = None,
    write: bool = True,
    report_path: str | Path | None = None,
    history: pd.DataFrame | None = None,
    html_report: bool = True,
    week: Week | None = None,
) -> dict[str, Any]:
    """Evaluate every recommender on the week from `test_start`; write `evaluation_runs`, the report, MLflow.

    `run_ids`: model name -> MLflow run to log its metrics to. `history`: earlier weeks' metrics (from
    `backtest_metrics`); with it the report carries the back-test spread over those weeks and this one.
    `week`: the already loaded test week, if the caller has it. Returns the report (see `format_report`).
    """
    week = week if week is not None and week.test_start == as_date(test_start) else load_week(lake, test_start)
    metrics, curves = evaluate_week(week, recommenders, lake.config, versions)
    if write:
        write_runs(lake, metrics)
    spread = None
    if history is not None and len(history):
        spread = spread_of(pd.concat([history, metrics[metrics["model"].isin(set(history["model"]))]], ignore_index=True))
    report = build_report(lake.config, week.test_start, metrics, curves, spread)
    if html_report:
        report["report_path"] = str(write_html_report(report, report_path or default_report_path(lake.config)))
    for name, run_id in (run_ids or {}).items():
        if run_id and name in recommenders:
            log_to_mlflow(lake.config, run_id, metrics[metrics["model"] == name], curves[curves["model"] == name],
                          report.get("report_path"))
    return report


def backtest_metrics(
    lake: Lakehouse,
    recommenders_for: Callable[[Week], Mapping[str, DataFrame]],
    starts: list[dt.date],
    write: bool = True,
) -> pd.DataFrame:
    """Metrics on each week from `starts`, the recommenders re-fitted on each week's own past."""
    frames = []
    for start in starts:
        week = load_week(lake, start)
        metrics, _ = evaluate_week(week, recommenders_for(week), lake.config, curves=False)
        if write:
            write_runs(lake, metrics)
        frames.append(metrics)
        week.test.unpersist()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS)


def spread_of(metrics: pd.DataFrame) -> pd.DataFrame:
    """Across test weeks: model, segment, metric, mean, std, min, max, weeks."""
    spread = (
        metrics.groupby(["model", "segment", "metric"])["value"]
        .agg(mean="mean", std="std", min="min", max="max", weeks="count")
        .reset_index()
    )
    spread["std"] = spread["std"].fillna(0.0)
    return spread


def backtest(
    lake: Lakehouse,
    recommenders_for: Callable[[Week], Mapping[str, DataFrame]],
    last_test_start: dt.date | str,
    weeks: int,
    write: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate on `weeks` consecutive weeks ending at `last_test_start`: (every week's metrics, the spread)."""
    every = backtest_metrics(lake, recommenders_for, backtest_starts(last_test_start, weeks, lake.config.split.test_days), write)
    return every, spread_of(every)


def baseline_recommenders(lake: Lakehouse, names: list[str] | None = None) -> Callable[[Week], dict[str, DataFrame]]:
    """For `backtest`/`run`: the configured baselines, trained on the week's past, for the week's buyers."""
    from recsys import baselines

    customers = lake.read(CUSTOMERS)
    articles = lake.read(ARTICLES)

    def make(week: Week) -> dict[str, DataFrame]:
        return baselines.recommend(lake.config, week.train, customers, articles, week.target, week.test_start, names)

    return make


def system_versions(config: Config) -> dict[str, dict[str, str]]:
    """alias -> the system under it: {two-tower name: version[, ranker name: version]}.

    A ranker version carries the two-tower version it was trained with (tag `two_tower_version`): that pair is
    one system. A two-tower alias without a ranker is a system of its own (scored by the model alone). A
    registry that cannot answer raises `RegistryUnavailable`: it never reads as "no champion"."""
    registry = Registry.of(config)
    towers = registry.aliases(config.mlflow.registered_model)
    rankers = registry.aliases(config.mlflow.ranker_model)
    out: dict[str, dict[str, str]] = {}
    for alias in (CHALLENGER, CHAMPION):
        if alias in rankers:
            version = registry.version(config.mlflow.ranker_model, rankers[alias])
            tower = version.tags.get("two_tower_version") or towers.get(alias)
            out[alias] = {config.mlflow.registered_model: str(tower), config.mlflow.ranker_model: rankers[alias]}
        elif alias in towers:
            out[alias] = {config.mlflow.registered_model: towers[alias]}
    return out


def system_label(config: Config, system: Mapping[str, str]) -> str:
    """'two_tower=3,ranker=2': the versions a list came from (recorded with every publish)."""
    names = {config.mlflow.registered_model: "two_tower", config.mlflow.ranker_model: "ranker"}
    order = list(names)  # retrieval first, then the ranker over it, whatever order the versions came in
    models = sorted(system, key=lambda n: (order.index(n) if n in order else len(order), n))
    return ",".join(f"{names.get(n, n)}={system[n]}" for n in models)


def system_recommender(lake: Lakehouse, system: Mapping[str, str], as_of: dt.date,
                       customers: DataFrame | None, write_candidates: bool = False) -> DataFrame:
    """The lists of one registered system as of `as_of` (the two stages, or the two-tower alone), for
    `customers` (None: everyone). `write_candidates`: keep the first stage's lists in `candidates` (publishing)."""
    from recsys import score, two_stage
    from recsys.model import load_encoder

    config = lake.config
    ranker = (two_stage.load_ranker(config, system[config.mlflow.ranker_model])
              if config.mlflow.ranker_model in system else None)
    encoder = load_encoder(f"models:/{config.mlflow.registered_model}/{system[config.mlflow.registered_model]}",
                           config.tracking_uri, config.registry_uri)
    if ranker is not None:
        return two_stage.recommend(lake, encoder, ranker, as_of=as_of, customers=customers,
                                   model_version=system_label(config, system), write_candidates=write_candidates)
    return score.recommend(lake, encoder, as_of=as_of, customers=customers)


def model_recommenders(lake: Lakehouse, week: Week) -> tuple[dict[str, DataFrame], dict[str, str], list[str]]:
    """The registry's challenger and champion systems, and the challenger's two-tower alone (`two_tower`), scored
    for the week's buyers as of the week's start (so nothing from the test week leaks in; a model trained on
    later features is refused). Returns (name -> recommendations, name -> versions, notes)."""
    from recsys import score
    from recsys.model import load_encoder

    config = lake.config
    systems = system_versions(config)
    if not systems:
        return {}, {}, [f"models skipped: {config.mlflow.registered_model!r} has no challenger/champion yet"]
    recs, labels = {}, {}
    for alias, system in systems.items():
        if alias == CHAMPION and system == systems.get(CHALLENGER):
            continue  # one system under two aliases: evaluate it once
        recs[alias] = system_recommender(lake, system, week.test_start, week.target)
        labels[alias] = system_label(config, system)
        if alias == CHALLENGER and config.mlflow.ranker_model in system:
            tower = system[config.mlflow.registered_model]
            encoder = load_encoder(f"models:/{config.mlflow.registered_model}/{tower}", config.tracking_uri,
                                   config.registry_uri)
            recs[TWO_TOWER] = score.recommend(lake, encoder, as_of=week.test_start, customers=week.target)
            labels[TWO_TOWER] = tower
    return recs, labels, []


def run_ids_of(config: Config, versions: Mapping[str, str]) -> dict[str, str]:
    """name -> the MLflow run that produced it: the ranker's run for a system, else the two-tower's."""
    registry = Registry.of(config)
    systems = system_versions(config)
    out = {}
    for name in versions:
        system = systems.get(name) or {config.mlflow.registered_model: versions[name]}
        registered = config.mlflow.ranker_model if config.mlflow.ranker_model in system else \
            config.mlflow.registered_model
        out[name] = registry.version(registered, system[registered]).run_id
    return out


def run(lake: Lakehouse, test_start: str | dt.date | None = None, models: list[str] | None = None,
        gate_challenger: bool = False) -> dict[str, Any]:
    """`recsys evaluate`: the baselines and the registry's systems (challenger, champion, the challenger's
    two-tower alone) on the test week (default: the last `split.test_days` of data), back-tested over
    `split.backtest_weeks` weeks; writes `evaluation_runs`, logs to the models' MLflow runs and writes the HTML
    report. `models` picks names (baselines, challenger, champion, two_tower). `gate_challenger`: then apply the
    gate (beat every baseline and the champion) and record in `gate_decisions` what `score` publishes."""
    from recsys.baselines import BASELINES

    config = lake.config
    if test_start is None:
        test_start = default_test_start(lake.read(TRANSACTIONS), config.split.test_days)
    start = as_date(test_start, "test_start")
    unknown = [m for m in models or [] if m not in BASELINES and m not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; known: {sorted(BASELINES) + list(MODEL_NAMES)}")
    if gate_challenger and models is not None:
        raise ValueError("--gate compares the challenger with every baseline and the champion: leave out --models")
    make_baselines = baseline_recommenders(lake, None if models is None else [m for m in models if m in BASELINES])
    # Earlier weeks for the spread (baselines only: a model would need re-training per week).
    earlier = backtest_starts(start, config.split.backtest_weeks, config.split.test_days)[:-1]
    history = backtest_metrics(lake, make_baselines, earlier)
    week = load_week(lake, start)
    recommenders = dict(make_baselines(week))
    notes: list[str] = []
    versions: dict[str, str] = {}
    if models is None or any(m in MODEL_NAMES for m in models):
        model_recs, versions, notes = model_recommenders(lake, week)
        model_recs = {k: v for k, v in model_recs.items() if models is None or k in models}
        versions = {k: v for k, v in versions.items() if k in model_recs}
        recommenders.update(model_recs)
    if not recommenders:
        raise ValueError("nothing to evaluate: no baseline selected and no model in the registry")
    run_ids = run_ids_of(config, versions) if versions else {}
    report = evaluate_all(lake, recommenders, start, versions=versions, run_ids=run_ids, history=history, week=week)
    report["notes"] = notes
    if gate_challenger:
        report["gate"] = apply_gate(lake, report, start).as_dict()
        report["notes"].append(describe_gate(report["gate"]))
    return report


def apply_gate(lake: Lakehouse, report: Mapping[str, Any], start: dt.date) -> GateDecision:
    """The gate on an evaluated week: promote or not, record what `score` publishes (`gate_decisions`)."""
    from recsys.baselines import BASELINES

    config = lake.config
    systems = system_versions(config)
    if CHALLENGER not in systems:
        raise ValueError("--gate: no challenger in the registry: run `recsys train` and the ranker first")
    overall = report["metrics"][report["metrics"]["segment"] == ALL]
    scores = {m: dict(zip(g["metric"], g["value"].astype(float))) for m, g in overall.groupby("model")}
    if CHALLENGER not in scores:
        raise ValueError("--gate: the challenger was not evaluated: " + "; ".join(report.get("notes", [])))
    same = systems.get(CHAMPION) == systems[CHALLENGER]
    if CHAMPION in systems and not same and CHAMPION not in scores:
        raise ValueError("--gate: the champion must be evaluated on the same week")
    champion_scores = scores[CHALLENGER] if same else scores.get(CHAMPION)
    baseline_scores = {m: v for m, v in scores.items() if m in BASELINES}
    decision = promote_if_better(config, system_label(config, systems[CHALLENGER]), scores[CHALLENGER],
                                 champion_scores, baseline_scores, models=systems[CHALLENGER])
    published = systems[CHALLENGER] if decision.promote else systems.get(CHAMPION, {})
    write_decision(lake, start, decision, published)
    return decision


def describe_gate(gate: Mapping[str, Any]) -> str:
    """One plain sentence: promoted or not, and what gets published."""
    verdict = "promoted to champion" if gate["promote"] else "stays challenger"
    publish = gate["publish"]
    what = ("the champion's lists" if publish == "model" else
            f"the best baseline's lists ({publish.split(':', 1)[1]}): no model beats it on this week"
            if publish.startswith("baseline:") else "nothing")
    return f"gate: {gate['version']} {verdict} ({gate['reason']}); publishing {what}"


# --- Report --------------------------------------------------------------------------------------------------
def build_report(config: Config, test_start: dt.date, metrics: pd.DataFrame, curves: pd.DataFrame,
                 backtest: pd.DataFrame | None = None) -> dict[str, Any]:
    k = config.evaluation.k
    overall = metrics[metrics["segment"] == ALL]
    table = overall.pivot_table(index="model", columns="metric", values="value").reset_index()
    wanted = ["model", "customers"] + [M.metric_name(m, kk) for kk in sorted(set(config.evaluation.ks) | {k}) for m in HEADLINE]
    table = table[[c for c in wanted if c in table.columns]].sort_values(M.metric_name("map", k), ascending=False)
    return {
        "test_start": test_start.isoformat(),
        "test_end": (test_start + dt.timedelta(days=config.split.test_days - 1)).isoformat(),
        "k": k,
        "models": dict(zip(overall["model"], overall["version"])),
        "table": table.reset_index(drop=True),
        "metrics": metrics,
        "curves": curves,
        "backtest": backtest,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The evaluation table as text, best MAP@12 first, for the terminal."""
    table = report["table"].copy()
    header = f"Evaluation on {report['test_start']} .. {report['test_end']} (customers who bought that week)"
    lines = [header, "=" * len(header)]
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.4f}".format):
        lines.append(table.to_string(index=False))
        spread = report.get("backtest")
        if spread is not None and len(spread):
            metric = M.metric_name("map", report["k"])
            rows = spread[(spread["segment"] == ALL) & (spread["metric"] == metric)]
            lines += ["", f"Back-test {metric} over {int(rows['weeks'].max())} weeks (mean, std, min, max):",
                      rows[["model", "mean", "std", "min", "max"]].to_string(index=False)]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("report_path"):
        lines += ["", f"HTML report: {report['report_path']}"]
    return "\n".join(lines)


def default_report_path(config: Config) -> Path:
    return config.path(config.paths.artifacts_dir) / "evaluation" / "report.html"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _bars(ax, frame: pd.DataFrame, title: str) -> None:
    """Grouped bars: one group per index entry, one bar per column."""
    n = max(len(frame.columns), 1)
    width = 0.8 / n
    for i, column in enumerate(frame.columns):
        ax.bar([x + i * width for x in range(len(frame.index))], frame[column].values, width, label=str(column))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(frame.index))])
    ax.set_xticklabels([str(i) for i in frame.index], rotation=20, ha="right")
    ax.set_title(title)
    ax.legend(fontsize=7)


def report_figures(report: Mapping[str, Any]) -> dict[str, str]:
    """title -> base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, metrics, curves = report["k"], report["metrics"], report["curves"]
    overall = metrics[metrics["segment"] == ALL]
    figures = {}

    fig, ax = plt.subplots(figsize=(9, 4))
    wanted = [M.metric_name(m, k) for m in ("map", "recall", "ndcg", "precision", "hit_rate")]
    _bars(ax, overall[overall["metric"].isin(wanted)].pivot(index="metric", columns="model", values="value").reindex(wanted),
          f"Metrics by model (K={k})")
    figures["Metrics by model"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, curve in curves.groupby("model"):
        ax.plot(curve["k"], curve["recall"], label=name)
    ax.set_xlabel("K"), ax.set_ylabel("Recall@K"), ax.set_title("Recall@K, K = 1..%d" % curves["k"].max())
    ax.axvline(k, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=7)
    figures["Recall@K"] = _png(fig)

    map_k = M.metric_name("map", k)
    segs = metrics[(metrics["metric"] == map_k) & (metrics["segment"] != ALL)]
    if len(segs):
        kinds = sorted({s.split(":", 1)[0] for s in segs["segment"]})
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            part = segs[segs["segment"].str.startswith(kind + ":")]
            _bars(ax, part.pivot(index="segment", columns="model", values="value"), f"{map_k} by {kind}")
        figures["By customer segment"] = _png(fig)

    wide = overall.pivot(index="model", columns="metric", values="value")
    bias, coverage = M.metric_name("popularity_bias", k), M.metric_name("coverage", k)
    if bias in wide and coverage in wide:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].scatter(wide[bias], wide[map_k])
        for name, row in wide.iterrows():
            axes[0].annotate(name, (row[bias], row[map_k]), fontsize=7)
        axes[0].set_xlabel(f"{bias} (1 = only best sellers)"), axes[0].set_ylabel(map_k)
        axes[0].set_title("Accuracy against popularity bias")
        axes[1].barh(wide.index, wide[coverage])
        axes[1].set_title(f"Catalogue coverage@{k}")
        figures["Popularity bias and coverage"] = _png(fig)

    spread = report.get("backtest")
    if spread is not None and len(spread):
        rows = spread[(spread["segment"] == ALL) & (spread["metric"] == map_k)]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.errorbar(rows["model"], rows["mean"], yerr=rows["std"], fmt="o", capsize=4)
        ax.set_title(f"Back-test: {map_k} mean ± std over {int(rows['weeks'].max())} weeks")
        ax.tick_params(axis="x", rotation=20)
        figures["Back-test spread"] = _png(fig)
    return figures


def write_html_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """One self-contained HTML page: the table and the plots as embedded PNGs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = report_figures(report)
    versions = "".join(f"<li>{html.escape(m)}: {html.escape(str(v))}</li>" for m, v in report["models"].items())
    body = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'/>"
        for title, png in figures.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>recsys evaluation {report['test_start']}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{padding:3px 8px;border:1px solid #ccc}}</style>
</head><body><h1>Evaluation: test week {report['test_start']} .. {report['test_end']}</h1>
<p>Customers who bought in the test week; MAP@{report['k']} as Kaggle's H&amp;M competition defines it.
Customers without a list count as 0.</p><ul>{versions}</ul>
{report['table'].to_html(index=False, float_format=lambda v: f'{v:.4f}')}
{body}</body></html>"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


# --- Champion / challenger ---------------------------------------------------------------------------------
@dataclass
class GateDecision:
    promote: bool
    metric: str
    challenger: float
    champion: float | None
    required: float | None
    reason: str
    version: str = ""
    best_baseline: str = ""
    baseline: float | None = None
    publish: str = ""                    # "model" or "baseline:<name>": what `score` publishes after this gate
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_baseline(config: Config, baselines: Mapping[str, Mapping[str, float]]) -> tuple[str, float | None]:
    """(name, value) of the baseline with the best `gate_metric` on the evaluated week ('' and None: none)."""
    metric = config.evaluation.gate_metric
    scored = {name: float(m[metric]) for name, m in baselines.items()
              if m.get(metric) is not None and not math.isnan(float(m[metric]))}
    if not scored:
        return "", None
    name = max(sorted(scored), key=lambda n: scored[n])
    return name, scored[name]


def gate(config: Config, challenger_metrics: Mapping[str, float], champion_metrics: Mapping[str, float] | None,
         baselines: Mapping[str, Mapping[str, float]] | None = None) -> GateDecision:
    """Promote only a challenger that beats the best baseline of the same week (by more than
    gate_min_improvement) AND is not worse than the champion beyond gate_tolerance (on `gate_metric`).

    A first model is not promoted just because there is no champion: it still has to beat every heuristic.
    Then `publish` says what the lists should be: the model (the promoted challenger, or the champion kept)
    when it beats the best baseline on this week, else that baseline.
    """
    ev = config.evaluation
    metric = ev.gate_metric
    name, bar = best_baseline(config, baselines or {})
    value = challenger_metrics.get(metric)
    champion = None if champion_metrics is None else champion_metrics.get(metric)
    champion = None if champion is None or math.isnan(float(champion)) else float(champion)

    def decide(promote: bool, required: float | None, reason: str, value: float) -> GateDecision:
        kept = value if promote else champion
        publish = "model" if kept is not None and (bar is None or kept > bar) else f"baseline:{name}"
        if kept is None and bar is None:
            publish = ""  # nothing evaluated that could be published
        return GateDecision(promote, metric, value, champion, required, reason, best_baseline=name, baseline=bar,
                            publish=publish)

    if value is None or math.isnan(float(value)):
        return decide(False, None, f"challenger has no {metric}", math.nan)
    value = float(value)
    if bar is not None and not value > bar + ev.gate_min_improvement + 1e-12:
        return decide(False, bar + ev.gate_min_improvement,
                      f"{metric} {value:.5f} does not beat the best baseline {name} ({bar:.5f})", value)
    if champion is None:
        return decide(True, bar, f"{metric} {value:.5f} beats the best baseline "
                      f"{name or '(none)'} ({bar if bar is not None else float('nan'):.5f}); no champion yet", value)
    required = champion + ev.gate_min_improvement - ev.gate_tolerance
    promote = value >= required - 1e-12
    verdict = "not worse beyond tolerance" if promote else "worse than the champion beyond tolerance"
    return decide(promote, required, f"{metric} {value:.5f} vs champion {champion:.5f} (needs >= {required:.5f}) "
                  f"and best baseline {name} {bar if bar is not None else float('nan'):.5f}: {verdict}", value)


def promote_if_better(config: Config, challenger_version: str | int, challenger_metrics: Mapping[str, float],
                      champion_metrics: Mapping[str, float] | None,
                      baselines: Mapping[str, Mapping[str, float]] | None = None,
                      models: Mapping[str, str] | None = None) -> GateDecision:
    """Apply `gate`; on promote set the registry alias `champion` on the challenger version of every registered
    model of the system (`models`: registered name -> version; default the two-tower alone). The decision and
    the numbers go to the versions' tags and to their MLflow runs."""
    registry = Registry.of(config)
    client = registry.client
    models = dict(models or {config.mlflow.registered_model: str(challenger_version)})
    decision = gate(config, challenger_metrics, champion_metrics, baselines)
    decision.version = str(challenger_version)
    decision.extra["previous_champion"] = {name: registry.alias_version(name, CHAMPION) for name in models}
    decision.extra["models"] = models
    verdict = "promoted" if decision.promote else "rejected"
    tags = {"gate.decision": verdict, "gate.metric": decision.metric, "gate.reason": decision.reason,
            "gate.challenger": str(decision.challenger), "gate.champion": str(decision.champion),
            "gate.best_baseline": f"{decision.best_baseline} {decision.baseline}", "gate.publish": decision.publish}
    for name, version in models.items():
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, str(version))
        for key, value in {**tags, "gate.previous_champion": str(decision.extra["previous_champion"][name])}.items():
            client.set_model_version_tag(name, str(version), key, value)
        run_id = registry.version(name, version).run_id
        if run_id:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.log_metric(run_id, f"gate_challenger_{decision.metric}", decision.challenger)
            if decision.champion is not None:
                client.log_metric(run_id, f"gate_champion_{decision.metric}", decision.champion)
            if decision.baseline is not None:
                client.log_metric(run_id, f"gate_best_baseline_{decision.metric}", decision.baseline)
            client.log_dict(run_id, decision.as_dict(), "evaluation/gate_decision.json")
    log.info("champion/challenger: version %s %s (%s); publish %s", challenger_version, verdict, decision.reason,
             decision.publish)
    return decision


# --- the decision record that `score` acts on ----------------------------------------------------------------
def write_decision(lake: Lakehouse, test_start: dt.date, decision: GateDecision, published: Mapping[str, str]
                   ) -> None:
    """Append the gate's decision to `gate_decisions` (one row per evaluation): the numbers compared and what
    `score` must publish. `published`: registered model -> version of the champion system after the gate."""
    import datetime as _dt

    from recsys.tables import GATE_DECISIONS, GATE_DECISIONS_SCHEMA

    row = (test_start, _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None), decision.metric,
           json.dumps(decision.extra.get("models", {}), sort_keys=True),
           None if math.isnan(decision.challenger) else decision.challenger,
           json.dumps(decision.extra.get("previous_champion", {}), sort_keys=True), decision.champion,
           decision.best_baseline, decision.baseline, decision.promote, decision.publish,
           json.dumps(dict(published), sort_keys=True), decision.reason)
    df = lake.spark.createDataFrame([row], GATE_DECISIONS_SCHEMA)
    lake.write(df, GATE_DECISIONS, mode="append")


def latest_decision(lake: Lakehouse) -> dict[str, Any] | None:
    """The newest row of `gate_decisions` as a dict (model versions parsed), or None before any evaluation."""
    from recsys.tables import GATE_DECISIONS

    if not lake.exists(GATE_DECISIONS):
        return None
    row = lake.read(GATE_DECISIONS).orderBy(F.desc("decided_at")).limit(1).first()
    if row is None:
        return None
    out = row.asDict()
    for key in ("challenger", "champion_before", "champion"):
        out[key] = json.loads(out[key]) if out.get(key) else {}
    return out
