"""`recsys evaluate`: every recommender (the baselines, the registry's systems) on the same test week, back-tested
over earlier weeks; the `evaluation_runs` table, the models' MLflow runs, the report and, with `--gate`, the gate.

The metrics are in `recsys.spark_metrics`, the report in `recsys.report`, the gate in `recsys.gate`.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys import metrics as M
from recsys.config import Config
from recsys.gate import apply_gate, describe_gate
from recsys.registry import CHALLENGER, CHAMPION, Registry, system_label, system_versions
from recsys.report import build_report, default_report_path, write_html_report
from recsys.spark import described
from recsys.spark_metrics import ALL, catalogue_popularity, customer_segments, evaluate_models
from recsys.split import as_date, backtest_starts, default_test_start, evaluation_customers, split
from recsys.tables import ARTICLES, CUSTOMERS, EVALUATION_RUNS, EVALUATION_RUNS_SCHEMA, TRANSACTIONS, Lakehouse

log = logging.getLogger(__name__)

RUN_COLUMNS = ["model", "version", "test_week", "segment", "metric", "value"]
TWO_TOWER = "two_tower"          # the challenger's two-tower alone, evaluated beside the full system
MODEL_NAMES = (CHALLENGER, CHAMPION, TWO_TOWER)


@dataclass
class Week:
    """One test week and what it is evaluated against."""

    test_start: dt.date
    train: DataFrame
    test: DataFrame
    target: DataFrame          # customer_id: the buyers of the week, who need a list
    segments: DataFrame        # customer_id, segment: the buyers' segments
    popularity: DataFrame      # article_id, pct, n_catalogue: the catalogue's sales before the week

    def release(self) -> None:
        for cached in (self.test, self.target, self.segments, self.popularity):
            cached.unpersist()


def load_week(lake: Lakehouse, test_start: dt.date | str, test_days: int | None = None) -> Week:
    config = lake.config
    start = as_date(test_start, "test_start")
    transactions = lake.read(TRANSACTIONS)
    train, test = split(transactions, start, test_days or config.split.test_days)
    customers = (
        lake.read(CUSTOMERS) if lake.exists(CUSTOMERS)
        else train.select("customer_id").distinct().withColumn("age", F.lit(None).cast("int"))
    )
    test = test.cache()
    if test.isEmpty():
        raise ValueError(f"transactions: no rows in the test week starting {start}; "
                         "pick a --test-start inside the data")
    catalogue = (
        lake.read(ARTICLES).select("article_id") if lake.exists(ARTICLES)
        else transactions.select("article_id").distinct()
    )
    target = evaluation_customers(test).cache()
    # The same for every model of the week: computed once (each reads two years of sales), for the buyers alone
    # (a customer's segments read only that customer's rows: the week's buyers are a few % of everyone)
    buyers = F.broadcast(target.select("customer_id"))
    segments = customer_segments(train.join(buyers, "customer_id", "left_semi"),
                                 customers.join(buyers, "customer_id", "left_semi"),
                                 config.evaluation.short_history_max).join(target, "customer_id").cache()
    return Week(start, train, test, target, segments, catalogue_popularity(catalogue, train).cache())


def evaluate_week(
    week: Week, recommenders: Mapping[str, DataFrame], config: Config, versions: Mapping[str, str] | None = None,
    curves: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """(metrics: model, version, test_week, segment, metric, value, seconds; curves: model, k, recall; the
    seconds of the one metrics job for every model). `seconds`: computing the model's lists (what was left lazy
    of them)."""
    ks = sorted(set(config.evaluation.ks) | {config.evaluation.k})
    lists, made, kept = {}, {}, []
    for name, recs in recommenders.items():
        started = time.perf_counter()
        version = (versions or {}).get(name) or _version_of(recs)
        if not recs.is_cached:
            # the metrics job reads the lists more than once: compute them once, and cut the plan behind them
            # (candidates, ranker); only the columns the metrics read are kept
            recs = recs.select("customer_id", "article_id", "rank", "score").localCheckpoint()
            kept.append(recs)
        lists[name] = recs
        made[name] = (version, round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    try:
        scores, curve = evaluate_models(lists, week.test, ks, week.segments, week.popularity,
                                        curve_max_k=config.evaluation.curve_max_k if curves else 0)
    finally:
        for recs in kept:
            recs.unpersist()
    seconds = round(time.perf_counter() - started, 1)
    scores = scores.assign(
        version=scores["model"].map(lambda m: made[m][0]), test_week=week.test_start,
        seconds=scores["model"].map(lambda m: made[m][1]))
    for name in lists:
        log.info("evaluated %s on %s: map@%d = %.5f", name, week.test_start, config.evaluation.k,
                 _value(scores[scores["model"] == name], ALL, M.metric_name("map", config.evaluation.k)))
    curve_columns = ["k", "recall", "model", "test_week"]
    return (
        scores[RUN_COLUMNS + ["seconds"]].reset_index(drop=True),
        curve.assign(test_week=week.test_start)[curve_columns] if curves else pd.DataFrame(columns=curve_columns),
        seconds,
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
    with described(lake.spark, "metrics"):
        metrics, curves, metric_seconds = evaluate_week(week, recommenders, lake.config, versions)
    if write:
        write_runs(lake, metrics)
    spread = None
    if history is not None and len(history):
        comparable = metrics[metrics["model"].isin(set(history["model"]))]
        spread = spread_of(pd.concat([history, comparable], ignore_index=True))
    report = build_report(lake.config, week.test_start, metrics, curves, spread)
    report["seconds"]["metrics"] = metric_seconds  # every model's, one job
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
        recommenders = recommenders_for(week)
        metrics, _, _ = evaluate_week(week, recommenders, lake.config, baseline_versions(recommenders, start),
                                      curves=False)
        if write:
            write_runs(lake, metrics)
        frames.append(metrics)
        week.release()
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
    starts = backtest_starts(last_test_start, weeks, lake.config.split.test_days)
    every = backtest_metrics(lake, recommenders_for, starts, write)
    return every, spread_of(every)


def baseline_recommenders(lake: Lakehouse, names: list[str] | None = None) -> Callable[[Week], dict[str, DataFrame]]:
    """For `backtest`/`run`: the configured baselines, trained on the week's past, for the week's buyers."""
    from recsys import baselines

    customers = lake.read(CUSTOMERS)
    articles = lake.read(ARTICLES)

    def make(week: Week) -> dict[str, DataFrame]:
        return baselines.recommend(lake.config, week.train, customers, articles, week.target, week.test_start, names)

    return make


def baseline_versions(recommenders: Mapping[str, DataFrame], as_of: dt.date) -> dict[str, str]:
    """The versions of the baselines among `recommenders`, known without reading their lists."""
    from recsys import baselines

    return {name: baselines.version(name, as_of) for name in recommenders if name in baselines.BASELINES}


def system_models(config: Config, system: Mapping[str, str]) -> tuple[Any, Any]:
    """(the system's ranker or None, its two-tower encoder), from the registry."""
    from recsys import two_stage
    from recsys.model import load_encoder

    ranker = (two_stage.load_ranker(config, system[config.mlflow.ranker_model])
              if config.mlflow.ranker_model in system else None)
    encoder = load_encoder(f"models:/{config.mlflow.registered_model}/{system[config.mlflow.registered_model]}",
                           config.tracking_uri, config.registry_uri)
    return ranker, encoder


def system_recommender(lake: Lakehouse, system: Mapping[str, str], as_of: dt.date,
                       customers: DataFrame | None, write_candidates: str = "", models: tuple | None = None
                       ) -> DataFrame:
    """The lists of one registered system as of `as_of` (the two stages, or the two-tower alone), for
    `customers` (None: everyone). `write_candidates` ("replace" / "append" a slice of customers): keep the first
    stage's lists in `candidates` (publishing). `models`: `system_models` already loaded (the slices of a
    publish)."""
    from recsys import score, two_stage

    config = lake.config
    ranker, encoder = models or system_models(config, system)
    if ranker is not None:
        return two_stage.recommend(lake, encoder, ranker, as_of=as_of, customers=customers,
                                   model_version=system_label(config, system), write_candidates=write_candidates)
    return score.recommend(lake, encoder, as_of=as_of, customers=customers)


def model_recommenders(lake: Lakehouse, week: Week) -> tuple[dict[str, DataFrame], dict[str, str], list[str]]:
    """The registry's challenger and champion systems, and the challenger's two-tower alone (`two_tower`), scored
    for the week's buyers as of the week's start (so nothing from the test week leaks in; a model trained on
    later features is refused). Returns (name -> recommendations, name -> versions, notes).

    The two-tower alone is cut from the challenger's own candidates (its nearest articles are among them), so
    its search is not run twice."""
    from recsys import score, two_stage

    config = lake.config
    systems = system_versions(config)
    if not systems:
        return {}, {}, [f"models skipped: {config.mlflow.registered_model!r} has no challenger/champion yet"]
    recs, labels = {}, {}
    for alias, system in systems.items():
        if alias == CHAMPION and system == systems.get(CHALLENGER):
            continue  # one system under two aliases: evaluate it once
        labels[alias] = system_label(config, system)
        if alias != CHALLENGER or config.mlflow.ranker_model not in system:
            recs[alias] = system_recommender(lake, system, week.test_start, week.target)
            continue
        ranker, encoder = system_models(config, system)
        lists = two_stage.system_lists(lake, encoder, ranker, as_of=week.test_start, customers=week.target,
                                       model_version=labels[alias])
        alone = two_stage.two_tower_lists(lake, lists, encoder)
        recs[alias] = lists.lists
        recs[TWO_TOWER] = alone if alone is not None else score.recommend(lake, encoder, as_of=week.test_start,
                                                                          customers=week.target)
        labels[TWO_TOWER] = system[config.mlflow.registered_model]
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
    with described(lake.spark, "back-test"):
        history = backtest_metrics(lake, make_baselines, earlier)
    week = load_week(lake, start)
    started = time.perf_counter()
    with described(lake.spark, "baselines"):
        recommenders = dict(make_baselines(week))
    built = {"baselines": round(time.perf_counter() - started, 1)}  # what is computed as the lists are made
    notes: list[str] = []
    versions: dict[str, str] = {}
    if models is None or any(m in MODEL_NAMES for m in models):
        started = time.perf_counter()
        with described(lake.spark, "models"):
            model_recs, versions, notes = model_recommenders(lake, week)
        built["models"] = round(time.perf_counter() - started, 1)
        model_recs = {k: v for k, v in model_recs.items() if models is None or k in models}
        versions = {k: v for k, v in versions.items() if k in model_recs}
        recommenders.update(model_recs)
    if not recommenders:
        raise ValueError("nothing to evaluate: no baseline selected and no model in the registry")
    run_ids = run_ids_of(config, versions) if versions else {}
    report = evaluate_all(lake, recommenders, start, versions={**baseline_versions(recommenders, start), **versions},
                          run_ids=run_ids, history=history, week=week)
    report["seconds"] = {**{f"building {what}": s for what, s in built.items()}, **report["seconds"]}
    report["notes"] = notes
    if gate_challenger:
        report["gate"] = apply_gate(lake, report, start).as_dict()
        report["notes"].append(describe_gate(report["gate"]))
    return report
