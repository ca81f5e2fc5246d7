"""Spark metrics against hand-computed vectors and the Python reference; the evaluation table, report and gate."""
from __future__ import annotations

import datetime as dt
import math
import random

import pandas as pd
import pytest
from declared import with_declared_columns, with_units
from pyspark.sql import functions as F

from recsys import evaluate as E
from recsys import gate as G
from recsys import metrics as M
from recsys import report as R
from recsys import spark_metrics as S
from recsys.config import load_config
from recsys.tables import ARTICLES, CUSTOMERS, EVALUATION_RUNS, TRANSACTIONS

RECS = "customer_id string, rank int, article_id string, score double"
BUYS = "customer_id string, article_id string"


def recs_df(spark, lists: dict[str, list[str]]):
    rows = [(c, r, a, float(-r)) for c, arts in lists.items() for r, a in enumerate(arts, start=1)]
    return spark.createDataFrame(rows, RECS)


def buys_df(spark, bought: dict[str, list[str]]):
    return spark.createDataFrame([(c, a) for c, arts in bought.items() for a in arts], BUYS)


def as_dict(frame: pd.DataFrame, segment: str = "all") -> dict[str, float]:
    part = frame[frame["segment"] == segment]
    return dict(zip(part["metric"], part["value"]))


def test_spark_metrics_match_hand_computed_vectors(spark):
    lists = {"c1": ["a", "b", "c", "d"], "c3": ["z"], "c4": ["b", "b", "d"]}
    bought = {"c1": ["b", "d", "d", "x"], "c2": ["a"], "c4": ["b", "d"]}  # c2: no list; c3: bought nothing
    catalogue = spark.createDataFrame([(a,) for a in "abcdxz"], "article_id string")
    train = buys_df(spark, {"old": ["a"] * 5 + ["b", "c"]})
    out = as_dict(
        S.evaluate_recommendations(recs_df(spark, lists), buys_df(spark, bought), [2, 12], None, catalogue, train)
    )
    assert out["customers"] == 3
    ap_c4_at_2 = 1 / 2                                                       # b hit at 1, repeat b wastes slot 2
    assert out["map_at_2"] == pytest.approx((0 / 3 * 0 + 1 / 2 / 2 + 0 + ap_c4_at_2) / 3)
    assert out["map_at_12"] == pytest.approx(((1 / 2 + 2 / 4) / 3 + 0 + (1 + 2 / 3) / 2) / 3)
    assert out["precision_at_2"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert out["recall_at_12"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    ndcg_c1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_c4 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert out["ndcg_at_12"] == pytest.approx((ndcg_c1 + 0 + ndcg_c4) / 3)
    assert out["hit_rate_at_12"] == pytest.approx(2 / 3)
    assert out["coverage_at_12"] == pytest.approx(4 / 6)                       # a b c d; z's list is c3's
    assert out["popularity_bias_at_12"] == pytest.approx((5 / 6 + 3 / 6 + 3 / 6 + 0 + 3 / 6 + 0) / 6)
    reference = M.evaluate(lists, bought, [2, 12], catalogue=list("abcdxz"), train_counts={"a": 5, "b": 1, "c": 1})
    assert out == pytest.approx(reference)
    # the week's catalogue popularity computed once, as `recsys evaluate` shares it between models
    shared = S.catalogue_popularity(catalogue, train)
    assert as_dict(S.evaluate_recommendations(
        recs_df(spark, lists), buys_df(spark, bought), [2, 12], None, popularity=shared)) == pytest.approx(reference)


def generated(seed: int, n_customers: int = 60, n_articles: int = 40):
    rng = random.Random(seed)
    articles = [f"{i:010d}" for i in range(n_articles)]
    weights = [1 / (i + 1) for i in range(n_articles)]  # a popularity skew, so lists and purchases overlap
    lists, bought, segments, train = {}, {}, [], []
    for i in range(n_customers):
        customer = f"cust{i:03d}"
        if rng.random() < 0.85:
            lists[customer] = rng.choices(articles, weights, k=rng.randint(0, 25))  # repeats, short and empty lists
        if rng.random() < 0.7:
            bought[customer] = rng.choices(articles, weights, k=rng.randint(1, 8))  # duplicate purchases
        segments.append((customer, rng.choice(["history:none", "history:short", "history:long"])))
        if rng.random() < 0.5:
            segments.append((customer, rng.choice(["age:16-24", "age:55+"])))
        train += [(customer, rng.choice(articles)) for _ in range(rng.randint(0, 5))]
    return articles, lists, bought, segments, train


@pytest.mark.parametrize("seed", [1])
def test_spark_agrees_with_reference_on_generated_data(spark, seed):
    articles, lists, bought, segments, train = generated(seed)
    ks = [1, 5, 12, 20]
    seg_df = spark.createDataFrame(segments, "customer_id string, segment string")
    catalogue = spark.createDataFrame([(a,) for a in articles], "article_id string")
    out = S.evaluate_recommendations(
        recs_df(spark, lists), buys_df(spark, bought), ks, seg_df, catalogue, spark.createDataFrame(train, BUYS)
    )
    train_counts = M.counts(a for _, a in train)
    for segment in ["all"] + sorted({s for _, s in segments}):
        members = {c for c, s in segments if s == segment} if segment != "all" else set(lists) | set(bought)
        reference = M.evaluate(
            {c: v for c, v in lists.items() if c in members}, {c: v for c, v in bought.items() if c in members},
            ks, catalogue=articles, train_counts=train_counts,
        )
        assert as_dict(out, segment) == pytest.approx(reference), segment
    popularity = S.catalogue_popularity(catalogue, spark.createDataFrame(train, BUYS))
    # the evaluation's one job for several models: each model's figures as if evaluated alone
    others = {c: list(reversed(v)) for c, v in lists.items()}
    both, curves = S.evaluate_models({"m1": recs_df(spark, lists), "m2": recs_df(spark, others)},
                                     buys_df(spark, bought), ks, seg_df, popularity, curve_max_k=30)
    pd.testing.assert_frame_equal(both[both["model"] == "m1"].drop(columns="model").reset_index(drop=True), out,
                                  check_exact=False)
    alone = S.evaluate_recommendations(recs_df(spark, others), buys_df(spark, bought), ks, seg_df,
                                       popularity=popularity)
    pd.testing.assert_frame_equal(both[both["model"] == "m2"].drop(columns="model").reset_index(drop=True), alone,
                                  check_exact=False)
    for name, recommended in (("m1", lists), ("m2", others)):
        curve = curves[curves["model"] == name]
        assert curve["k"].tolist() == list(range(1, 31))
        assert curve["recall"].tolist() == pytest.approx(M.recall_curve(recommended, bought, 30).tolist())
    m1 = curves[curves["model"] == "m1"]["recall"]
    assert m1.iloc[11] == pytest.approx(as_dict(out)["recall_at_12"])


def test_customer_segments_by_history_and_age(spark):
    train = spark.createDataFrame([("long", "a")] * 7 + [("short", "a")], BUYS)
    customers = spark.createDataFrame(
        [("long", 30), ("short", None), ("new", 60)], "customer_id string, age int"
    )
    rows = {(r.customer_id, r.segment) for r in S.customer_segments(train, customers, 5).collect()}
    assert rows == {
        ("long", "history:long"), ("short", "history:short"), ("new", "history:none"),
        ("long", "age:25-34"), ("short", "age:unknown"), ("new", "age:55+"),
    }


@pytest.fixture()
def week_lake(lake, spark):
    """Two weeks of purchases: 2020-09-01..07 in training, 09-08..14 the test week."""
    rows = []
    start = dt.date(2020, 9, 1)
    for day in range(14):
        for c in range(6):
            article = f"{(c + day) % 5:010d}" if day < 7 else f"{c % 3:010d}"
            rows.append((start + dt.timedelta(days=day), f"cust{c}", article, 0.01, 2))
    tx = spark.createDataFrame(
        rows, "t_dat date, customer_id string, article_id string, price double, sales_channel_id int"
    )
    tx = tx.withColumn("sales_channel_id", F.col("sales_channel_id").cast("short"))
    tx = tx.withColumn("t_month", F.date_format("t_dat", "yyyy-MM"))
    lake.write(with_units(tx), TRANSACTIONS)
    customers = spark.createDataFrame([(f"cust{c}", 20 + 10 * c) for c in range(7)], "customer_id string, age int")
    articles = spark.createDataFrame([(f"{i:010d}", "Ladieswear") for i in range(8)],
                                     "article_id string, index_group_name string")
    lake.write(with_declared_columns(customers, CUSTOMERS), CUSTOMERS)
    lake.write(with_declared_columns(articles, ARTICLES), ARTICLES)
    return lake


def test_evaluate_all_writes_table_and_report(week_lake, spark, tmp_path):
    perfect = recs_df(spark, {f"cust{c}": [f"{c % 3:010d}"] for c in range(6)})
    wrong = recs_df(spark, {f"cust{c}": [f"{7:010d}"] for c in range(6)})
    report_path = tmp_path / "report.html"
    report = E.evaluate_all(week_lake, {"perfect": perfect, "wrong": wrong}, "2020-09-08",
                            versions={"perfect": "v1"}, report_path=report_path)
    table = report["table"].set_index("model")
    assert table.loc["perfect", "map_at_12"] == pytest.approx(1.0) and table.loc["wrong", "map_at_12"] == 0.0
    runs = week_lake.read(EVALUATION_RUNS)
    assert set(runs.columns) == {"model", "version", "test_week", "metric", "value", "segment"}
    one = runs.filter("model = 'perfect' AND metric = 'map_at_12' AND segment = 'all'").collect()
    assert len(one) == 1 and one[0].version == "v1" and one[0].test_week == dt.date(2020, 9, 8)
    assert runs.filter("segment = 'history:long'").count() > 0
    # a re-run replaces its own slice instead of appending a second copy
    E.write_runs(week_lake, report["metrics"][report["metrics"]["model"] == "perfect"])
    assert week_lake.read(EVALUATION_RUNS).count() == runs.count()
    page = report_path.read_text()
    assert page.count("data:image/png;base64,") >= 4 and "Recall@K" in page and "perfect" in page
    text = R.format_report(report)
    assert "perfect" in text and "map_at_12" in text and "2020-09-08 .. 2020-09-14" in text
    assert set(report["seconds"]) == {"perfect", "wrong", "metrics"} and all(s >= 0 for s in report["seconds"].values())


def test_empty_test_week_is_a_clear_error(week_lake):
    with pytest.raises(ValueError, match="no rows in the test week starting 2021-01-01"):
        E.load_week(week_lake, "2021-01-01")


def test_gate_rule():
    config = load_config("tiny", ["evaluation.gate_tolerance=0.001"])
    base = {"repurchase": {"map_at_12": 0.0180}, "als": {"map_at_12": 0.0150}}
    within = G.gate(config, {"map_at_12": 0.0200}, {"map_at_12": 0.0205}, base)
    assert within.promote and within.publish == "model" and within.best_baseline == "repurchase"
    worse = G.gate(config, {"map_at_12": 0.0190}, {"map_at_12": 0.0205}, base)
    assert not worse.promote and worse.publish == "model"  # the champion stays, and it beats the baselines
    assert not G.gate(config, {"recall_at_12": 0.5}, {"map_at_12": 0.0}, base).promote  # metric missing
    strict = load_config("tiny", ["evaluation.gate_min_improvement=0.002"])
    assert not G.gate(strict, {"map_at_12": 0.021}, {"map_at_12": 0.020}).promote


def test_a_first_model_is_not_promoted_just_because_there_is_no_champion():
    config = load_config("tiny")
    base = {"repurchase": {"map_at_12": 0.0262}, "als": {"map_at_12": 0.0167}, "popularity": {"map_at_12": 0.0075}}
    first = G.gate(config, {"map_at_12": 0.0118}, None, base)
    assert not first.promote and first.publish == "baseline:repurchase"
    assert "does not beat the best baseline repurchase" in first.reason
    tie = G.gate(config, {"map_at_12": 0.0262}, None, base)
    assert not tie.promote and tie.publish == "baseline:repurchase"  # equal is not better
    winner = G.gate(config, {"map_at_12": 0.0300}, None, base)
    assert winner.promote and winner.publish == "model" and winner.baseline == pytest.approx(0.0262)


def test_a_champion_that_falls_behind_a_baseline_is_not_published():
    config = load_config("tiny")
    base = {"repurchase": {"map_at_12": 0.0300}}
    decision = G.gate(config, {"map_at_12": 0.0250}, {"map_at_12": 0.0280}, base)
    assert not decision.promote and decision.publish == "baseline:repurchase"
    sentence = G.describe_gate({**decision.as_dict(), "version": "two_tower=2,ranker=2"})
    assert "stays challenger" in sentence and "best baseline's lists (repurchase)" in sentence


def test_gate_sets_champion_alias_in_a_real_registry(tmp_path):
    import mlflow

    from recsys.train import configure_mlflow

    # configure_mlflow puts the artifacts under data_dir: nothing lands in ./mlruns of the working directory
    config = load_config("tiny", [f"paths.data_dir={tmp_path}", "mlflow.registered_model=gate-test",
                                  "mlflow.experiment=gate"])

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    previous = mlflow.get_tracking_uri()
    try:
        configure_mlflow(config)
        run_ids = []
        for _ in range(3):
            with mlflow.start_run() as active:
                mlflow.pyfunc.log_model(name="model", python_model=Constant(), registered_model_name="gate-test",
                                        pip_requirements=[])
                run_ids.append(active.info.run_id)
    finally:
        mlflow.set_tracking_uri(previous)
    client = config.mlflow_client()

    base = {"repurchase": {"map_at_12": 0.015}}
    first = G.promote_if_better(config, "1", {"map_at_12": 0.02}, None, base)
    assert first.promote and str(client.get_model_version_by_alias("gate-test", "champion").version) == "1"
    better = G.promote_if_better(config, "2", {"map_at_12": 0.03}, {"map_at_12": 0.02}, base)
    assert better.promote and str(client.get_model_version_by_alias("gate-test", "champion").version) == "2"
    worse = G.promote_if_better(config, "3", {"map_at_12": 0.01}, {"map_at_12": 0.03}, base)
    assert not worse.promote and str(client.get_model_version_by_alias("gate-test", "champion").version) == "2"
    assert client.get_model_version("gate-test", "3").tags["gate.decision"] == "rejected"
    run = client.get_run(run_ids[2])
    assert run.data.tags["gate.decision"] == "rejected" and run.data.metrics["gate_champion_map_at_12"] == 0.03
    assert run.data.metrics["gate_best_baseline_map_at_12"] == 0.015

    # evaluation metrics land in the model's run, the Recall@K curve as steps of one metric
    metrics = pd.DataFrame({"segment": ["all", "history:long"], "metric": ["map_at_12"] * 2, "value": [0.25, 0.5]})
    curve = pd.DataFrame({"k": range(1, 101), "recall": [k / 100 for k in range(1, 101)]})
    E.log_to_mlflow(config, run_ids[0], metrics, curve)
    logged = client.get_run(run_ids[0]).data.metrics
    assert logged["test_map_at_12"] == 0.25 and logged["test_history_long_map_at_12"] == 0.5
    history = client.get_metric_history(run_ids[0], "test_recall_curve")
    assert len(history) == 100 and {h.step: h.value for h in history}[12] == pytest.approx(0.12)


def test_run_back_tests_baselines_and_reports_the_spread(week_lake, spark, tmp_path):
    from recsys.tables import Lakehouse

    config = load_config("tiny", [
        f"paths.tables_dir={week_lake.root}", f"paths.data_dir={tmp_path}", f"paths.artifacts_dir={tmp_path}/artifacts",
        "split.backtest_weeks=2", "evaluation.k=3", "evaluation.ks=[3]",
    ])
    report = E.run(Lakehouse(spark, config), "2020-09-08", models=["popularity_last_week"])
    # week of 09-01 has no past: empty lists score 0; in the week of 09-08 the best seller a0..a4 pattern
    # of the week before gives each buyer one hit in three slots at most
    spread = report["backtest"]
    row = spread[(spread["segment"] == "all") & (spread["metric"] == "map_at_3")].iloc[0]
    assert row["weeks"] == 2 and row["min"] == 0.0
    latest = report["table"].set_index("model").loc["popularity_last_week", "map_at_3"]
    assert row["max"] == pytest.approx(latest) and row["mean"] == pytest.approx(latest / 2)
    runs = Lakehouse(spark, config).read(EVALUATION_RUNS)
    weeks = {r.test_week for r in runs.select("test_week").distinct().collect()}
    assert weeks == {dt.date(2020, 9, 1), dt.date(2020, 9, 8)}
    # each week's baseline carries the version its lists hold (fitted up to the week's first day)
    assert {(r.test_week, r.version) for r in runs.select("test_week", "version").distinct().collect()} == {
        (dt.date(2020, 9, 1), "popularity_last_week@2020-09-01"),
        (dt.date(2020, 9, 8), "popularity_last_week@2020-09-08"),
    }
    assert "Back-test map_at_3 over 2 weeks" in R.format_report(report)
    assert (tmp_path / "artifacts" / "evaluation" / "report.html").exists()
    # where the time went: building the lists (a baseline may fit a model then), each model's lists, the metrics
    assert list(report["seconds"]) == ["building baselines", "popularity_last_week", "metrics"]
    assert "time (s): building baselines " in R.format_report(report)
    with pytest.raises(ValueError, match="unknown \\['popular'\\]"):
        E.run(Lakehouse(spark, config), "2020-09-08", models=["popular"])
