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
    """Tiny data whose last two days are held back, so that two nightly runs can add them."""
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
    held = sorted({line[:10] for line in lines[1:]})[-2:]
    (raw / RAW_FILES[TRANSACTIONS]).write_text("".join(line for line in lines if line[:10] not in held))
    messages: list[str] = []
    summary = pipeline.run(config, out=messages.append)
    return config, Lakehouse(spark, config), summary, messages, generated, [dt.date.fromisoformat(d) for d in held]


def land(config, generated, day: dt.date) -> int:
    """Write day `day`'s purchases from the generated file as its drop; returns their count."""
    lines = (generated / RAW_FILES[TRANSACTIONS]).read_text().splitlines(keepends=True)
    landing = config.path(config.landing_dir) / "transactions"
    landing.mkdir(parents=True, exist_ok=True)
    day_lines = [line for line in lines if line.startswith(str(day))]
    (landing / f"{day}.csv").write_text(lines[0] + "".join(day_lines))
    return len(day_lines)


def published_lists(lake) -> dict[str, tuple]:
    """customer_id -> (articles in rank order, model_version, generated_at, run_ids)."""
    rows = lake.read(RECOMMENDATIONS).groupBy("customer_id").agg(
        F.sort_array(F.collect_list(F.struct("rank", "article_id"))).alias("items"),
        F.first("model_version").alias("model_version"), F.max("generated_at").alias("generated_at"),
        F.collect_set("run_id").alias("run_ids")).collect()
    return {r.customer_id: (tuple(i.article_id for i in r["items"]), r.model_version, r.generated_at,
                            tuple(r.run_ids)) for r in rows}


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


def test_the_evaluation_snapshots_hold_the_buyers_they_are_read_for_and_the_publish_one_everyone(setup):
    from recsys.features import read_snapshot
    from recsys.tables import CUSTOMER_FEATURES, CUSTOMERS, PARTIAL

    config, lake, summary, _, _, _ = setup
    publish = max(dt.date.fromisoformat(d) for d in summary["features"] if d[0].isdigit())
    test_start = publish - dt.timedelta(days=config.split.test_days)
    train_as_of = test_start - dt.timedelta(days=config.ranker.label_days)
    bought = lake.read(TRANSACTIONS)

    def customers(as_of: dt.date) -> set[str]:
        rows = read_snapshot(lake, CUSTOMER_FEATURES, as_of).select("customer_id", PARTIAL).collect()
        return {r.customer_id for r in rows if r[PARTIAL] == (as_of != publish)}

    for as_of, end in ((train_as_of, test_start), (test_start, publish)):
        buyers = bought.filter((F.col("t_dat") >= F.lit(as_of)) & (F.col("t_dat") < F.lit(end)))
        assert customers(as_of) == {r.customer_id for r in buyers.select("customer_id").distinct().collect()}
        assert summary["features"][as_of.isoformat()]["partial"]
    assert customers(publish) == {r.customer_id for r in lake.read(CUSTOMERS).select("customer_id").collect()}


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
    ("features", "recsys.features.run_snapshots"),
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


def test_a_nightly_between_full_runs_relists_the_day_s_buyers_and_keeps_every_other_list(setup):
    from recsys.publish import RELIST, history

    config, lake, _, _, generated, (day, _) = setup
    day_rows = land(config, generated, day)
    before = published_lists(lake)
    messages: list[str] = []
    summary = pipeline.nightly(config, day.isoformat(), out=messages.append)
    assert summary["ingest"]["drop"] == "loaded" and summary["mode"] == {"relist": True, "since": day.isoformat()}
    assert [summary[s]["status"] for s in pipeline.STAGES] == ["done", "done", "skipped", "skipped", "skipped",
                                                               "done"]
    assert [m for m in messages if m.startswith("[ nightly]")] == [
        f"[ nightly] a relist night: the customers who bought since {day} get new lists from the champion, the "
        f"others keep theirs; train, rank and evaluate wait for the next full run (publish date "
        f"{day + dt.timedelta(days=config.nightly.full_every_days)} or later, nightly.full_every_days; --full runs "
        "one now)"]
    assert any(m.startswith("[   score] done") and f"customers relisted (bought since {day})" in m
               for m in messages)
    snapshots = [key for key in summary["features"] if key not in ("status", "seconds")]
    assert snapshots == [(day + dt.timedelta(days=1)).isoformat()]  # P only, no training rows
    buyers = {r.customer_id for r in lake.read(TRANSACTIONS).filter(F.col("t_dat") == day)
              .select("customer_id").distinct().collect()}
    assert lake.read(TRANSACTIONS).filter(F.col("t_dat") == day).count() == day_rows and buyers
    assert summary["score"]["relisted"] == len(buyers)
    after = published_lists(lake)
    assert set(after) == set(before) and all(len(v[0]) == config.scoring.k == len(set(v[0])) for v in after.values())
    run_id = summary["score"]["run_id"]
    assert {v[3] for v in after.values()} == {(run_id,)}  # one publish, one run
    for customer, (articles, version, generated_at, _) in after.items():
        if customer in buyers:  # computed tonight, by the model the last gate chose
            assert generated_at > before[customer][2] and version == summary["score"]["model_version"]
        else:  # kept exactly as published, with when and by what it was made
            assert (articles, version, generated_at) == before[customer][:3]
    last = history(lake)[-1]
    assert last["scope"] == RELIST and last["as_of"] == (day + dt.timedelta(days=1)).isoformat()
    from recsys import status

    assert (f"a relist as of {day + dt.timedelta(days=1)} (the buyers since the last publish), everyone else's "
            f"from the full publish as of {day}") in status.format_text(status.collect(lake))
    published = lake.version(RECOMMENDATIONS)
    messages = []
    again = pipeline.nightly(config, day.isoformat(), out=messages.append)
    assert again["ingest"]["drop"] == "unchanged" and again["mode"]["relist"]
    assert [again[s]["status"] for s in ("features", "score")] == ["up to date", "up to date"]
    assert messages[-1].endswith("every stage it runs is up to date: nothing new is published")
    assert lake.version(RECOMMENDATIONS) == published
    # a bundle task runs one step alone (`pipeline --steps train --date latest --nightly`): the same decision
    alone = pipeline.run(config, steps=["train"], drop_day="latest", nightly=True, out=lambda m: None)
    assert alone["train"]["status"] == "skipped" and alone["mode"] == {"relist": True, "since": day.isoformat()}


@pytest.mark.slow  # a second whole pipeline (8 min here); `benchmarks/nightly_full.py --prime --full` checks the same
def test_a_full_nightly_merges_the_day_s_drop_retrains_and_republishes_then_a_rerun_changes_nothing(setup):
    config, lake, _, _, generated, (_, day) = setup
    assert lake.read(TRANSACTIONS).filter(F.col("t_dat") == day).count() == 0
    before = lake.version(RECOMMENDATIONS)
    day_rows = land(config, generated, day)
    config.model.refresh = "warm"  # from the champion when the first run's gate promoted one, else full
    summary = pipeline.nightly(config, day.isoformat(), full=True, out=lambda m: None)
    assert summary["ingest"]["drop"] == "loaded" and summary["score"]["status"] == "done"
    assert summary["mode"] == {"relist": False}
    assert summary["train"]["refresh"].startswith(("warm from the champion", "no 'recsys-two-tower@champion'"))
    assert lake.read(TRANSACTIONS).filter(F.col("t_dat") == day).count() == day_rows
    assert lake.version(RECOMMENDATIONS) > before
    assert str(summary["score"]["as_of"]) == (day + dt.timedelta(days=1)).isoformat()
    published = lake.version(RECOMMENDATIONS)
    messages: list[str] = []
    again = pipeline.nightly(config, day.isoformat(), full=True, out=messages.append)
    assert again["ingest"]["drop"] == "unchanged"
    assert all(again[s]["status"] == "up to date" for s in pipeline.STAGES[1:])
    assert messages[-1].endswith("every stage it runs is up to date: nothing new is published")
    assert lake.version(RECOMMENDATIONS) == published


def test_unknown_stage_is_an_error(setup):
    config = setup[0]
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run(config, steps=["trian"])
