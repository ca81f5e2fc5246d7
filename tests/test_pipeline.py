"""The whole pipeline on tiny generated data: every stage, idempotence, failure injection (a registry outage
included), and a nightly day."""
from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest
from pyspark.sql import functions as F

from recsys import pipeline
from recsys.config import load_config
from recsys.registry import RegistryUnavailable
from recsys.tables import (
    GATE_DECISIONS, PIPELINE_RUNS, PIPELINE_STATE, RAW_FILES, RECOMMENDATIONS, TRANSACTIONS, Lakehouse,
)


@pytest.fixture(scope="module")
def setup(spark, tmp_path_factory):
    """Tiny data whose last day is held back, so that the nightly run can add it."""
    from recsys import synth

    root = tmp_path_factory.mktemp("pipeline")
    config = load_config("tiny", [
        f"paths.data_dir={root}", f"paths.raw_dir={root}/raw", f"paths.tables_dir={root}/delta",
        f"paths.artifacts_dir={root}/artifacts", f"paths.checkpoint_dir={root}/checkpoints",
    ])
    generated = root / "generated"
    synth.generate(config.synth, str(generated))
    raw = root / "raw"
    raw.mkdir()
    for name in ("articles.csv", "customers.csv"):
        shutil.copy(generated / name, raw / name)
    lines = (generated / RAW_FILES[TRANSACTIONS]).read_text().splitlines(keepends=True)
    last_day = max(line[:10] for line in lines[1:])
    (raw / RAW_FILES[TRANSACTIONS]).write_text("".join(line for line in lines if not line.startswith(last_day)))
    messages: list[str] = []
    summary = pipeline.run(config, out=messages.append)
    return config, Lakehouse(spark, config), summary, messages, generated, dt.date.fromisoformat(last_day)


def test_every_stage_runs_and_publishes_k_per_customer(setup):
    config, lake, summary, messages, _, _ = setup
    assert [s for s in pipeline.STAGES if summary[s]["status"] == "done"] == list(pipeline.STAGES)
    recs = lake.read(RECOMMENDATIONS)
    k = config.scoring.k
    per_customer = recs.groupBy("customer_id").agg(
        F.count("*").alias("n"), F.countDistinct("article_id").alias("distinct"),
        F.min("rank").alias("lo"), F.max("rank").alias("hi"))
    assert per_customer.count() == lake.read("customers").count()
    assert per_customer.filter((F.col("n") != k) | (F.col("distinct") != k) | (F.col("lo") != 1)
                               | (F.col("hi") != k)).count() == 0
    assert any("gate:" in m for m in messages) and any("ranker:" in m for m in messages)
    gate = summary["evaluate"]["gate"]
    # a first model is promoted only if it beats every baseline; what gets published follows the decision
    assert gate["promote"] == (gate["challenger"] > gate["baseline"])
    sources = {r.source for r in recs.select("source").distinct().collect()}
    if gate["publish"] == "model":
        assert sources <= {"repurchase", "same_product", "bought_together", "two_tower", "popularity",
                           "popularity_age_bucket", "popularity_global"}
        assert {r.model_version for r in recs.select("model_version").distinct().collect()} == {
            f"two_tower={summary['rank']['two_tower_version']},ranker={summary['rank']['ranker_version']}"}
    else:
        assert gate["publish"] == f"baseline:{gate['best_baseline']}" and sources == {gate["publish"]}
    assert summary["score"]["published"] == gate["publish"]


def test_every_stage_run_is_recorded_and_the_status_says_what_is_published(setup):
    from recsys import status

    config, lake, summary, _, _, _ = setup
    runs = lake.read(PIPELINE_RUNS).filter(F.col("run_id") == summary["run_id"]).orderBy("started_at").collect()
    assert [r.stage for r in runs] == list(pipeline.STAGES) and {r.status for r in runs} == {"done"}
    score_run = runs[-1]
    assert json.loads(score_run.tables_written)[RECOMMENDATIONS] == lake.version(RECOMMENDATIONS)
    assert json.loads(runs[0].tables_read) == {}  # the first ingest found an empty lake
    state = status.collect(lake)
    assert state["published"]["version"] == lake.version(RECOMMENDATIONS)
    assert state["published"]["checks"] and [r["stage"] for r in state["runs"]] == list(pipeline.STAGES)
    text = status.format_text(state)
    assert f"published: version {lake.version(RECOMMENDATIONS)}" in text and "warnings:" in text
    assert config.path(summary["status_page"]).read_text().count("<tr>") > len(pipeline.STAGES)


def test_second_run_is_up_to_date(setup):
    config, lake, _, _, _, _ = setup
    version = lake.version(RECOMMENDATIONS)
    again = pipeline.run(config, out=lambda m: None)
    assert all(again[s]["status"] == "up to date" for s in pipeline.STAGES)
    assert lake.version(RECOMMENDATIONS) == version
    # the fingerprints live in the lake, next to the tables (a bare job cluster finds them), not in a local file
    assert set(pipeline.load_state(lake)) == set(pipeline.STAGES) and lake.exists(PIPELINE_STATE)
    assert not list(config.path(config.paths.data_dir).glob("pipeline_state*"))


@pytest.mark.parametrize("stage, target", [
    ("ingest", "recsys.ingest.run"),
    ("features", "recsys.features.run"),
    ("train", "recsys.train.run"),
    ("rank", "recsys.two_stage.fit_ranker"),
    ("evaluate", "recsys.evaluate.evaluate_all"),
    ("score", "recsys.score.publish"),
])
def test_a_failing_stage_leaves_the_published_table(setup, monkeypatch, stage, target):
    config, lake, _, _, _, _ = setup
    before = lake.version(RECOMMENDATIONS)
    rows = lake.read(RECOMMENDATIONS).orderBy("customer_id", "rank").collect()

    def broken(*args, **kwargs):
        raise RuntimeError(f"injected failure in {stage}")

    monkeypatch.setattr(target, broken)
    with pytest.raises(pipeline.StageFailed, match=f"stage '{stage}' failed.*injected failure"):
        pipeline.run(config, steps=[stage], force=True, out=lambda m: None)
    assert lake.version(RECOMMENDATIONS) == before
    failed = lake.read(PIPELINE_RUNS).orderBy(F.desc("started_at")).first()
    assert (failed.stage, failed.status) == (stage, "failed") and "injected failure" in failed.message
    assert lake.read(RECOMMENDATIONS).orderBy("customer_id", "rank").collect() == rows


@pytest.mark.parametrize("stage", ["evaluate", "score"])
def test_a_registry_outage_fails_the_stage_and_publishes_nothing(setup, registry_down, monkeypatch, stage):
    config, lake, summary, _, _, _ = setup
    before = {table: lake.version(table) for table in (RECOMMENDATIONS, GATE_DECISIONS)}
    if stage == "score":  # a decision to publish the model: scoring has to read the registry for it
        system = {config.mlflow.registered_model: summary["rank"]["two_tower_version"],
                  config.mlflow.ranker_model: summary["rank"]["ranker_version"]}
        decided = {"decided_at": dt.datetime.now(), "publish": "model", "champion": system, "test_week": None,
                   "reason": "injected"}
        monkeypatch.setattr("recsys.gate.latest_decision", lambda lake: decided)
    with pytest.raises(pipeline.StageFailed, match=f"stage '{stage}' failed: RegistryUnavailable.*"
                                                   "TEMPORARILY_UNAVAILABLE") as raised:
        pipeline.run(config, steps=[stage], force=True, out=lambda m: None)
    assert isinstance(raised.value.__cause__, RegistryUnavailable)
    assert {table: lake.version(table) for table in before} == before  # nothing decided, nothing published


def test_nightly_merges_the_day_s_drop_and_republishes_then_a_rerun_changes_nothing(setup):
    config, lake, _, _, generated, last_day = setup
    assert lake.read(TRANSACTIONS).filter(F.col("t_dat") == last_day).count() == 0
    before = lake.version(RECOMMENDATIONS)
    lines = (generated / RAW_FILES[TRANSACTIONS]).read_text().splitlines(keepends=True)
    landing = config.path(config.landing_dir) / "transactions"
    landing.mkdir(parents=True)
    last_day_lines = "".join(line for line in lines if line.startswith(str(last_day)))
    (landing / f"{last_day}.csv").write_text(lines[0] + last_day_lines)
    config.model.refresh = "warm"  # from the champion when the first run's gate promoted one, else full
    summary = pipeline.nightly(config, last_day.isoformat(), out=lambda m: None)
    assert summary["ingest"]["drop"] == "loaded" and summary["score"]["status"] == "done"
    assert summary["train"]["refresh"].startswith(("warm from the champion", "no 'recsys-two-tower@champion'"))
    day_rows = sum(1 for line in lines if line.startswith(str(last_day)))
    assert lake.read(TRANSACTIONS).filter(F.col("t_dat") == last_day).count() == day_rows
    assert lake.version(RECOMMENDATIONS) > before
    assert str(summary["score"]["as_of"]) == (last_day + dt.timedelta(days=1)).isoformat()
    published = lake.version(RECOMMENDATIONS)
    messages: list[str] = []
    again = pipeline.nightly(config, last_day.isoformat(), out=messages.append)
    assert again["ingest"]["drop"] == "unchanged"
    assert all(again[s]["status"] == "up to date" for s in pipeline.STAGES[1:])
    assert messages[-1].endswith("every stage is up to date: nothing new is published")
    assert lake.version(RECOMMENDATIONS) == published


def test_unknown_stage_is_an_error(setup):
    config = setup[0]
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run(config, steps=["trian"])
