"""Batch scoring and publishing on the hand-made lake of `scoring_data` with a test-double encoder."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from pyspark import cloudpickle
from pyspark.sql import functions as F

import scoring_data as data
from recsys import monitor, publish, score
from recsys.index import build_index
from recsys.recommend import SOURCE_AGE_BUCKET, SOURCE_GLOBAL, SOURCE_MODEL
from recsys.tables import CUSTOMER_FEATURES, PUBLISH_CHECKS, RECOMMENDATIONS, RECOMMENDATIONS_NAMED

# Spark's Python workers cannot import the test folder: ship the test double by value.
cloudpickle.register_pickle_by_value(data)
cloudpickle.register_pickle_by_value(sys.modules[__name__])
K = 12


@pytest.fixture(scope="module")
def seed(spark, tmp_path_factory):
    return data.build_seed(spark, tmp_path_factory.mktemp("scoring-seed") / "delta")


@pytest.fixture()
def lake(spark, seed, tmp_path):
    return data.copy_lake(spark, seed, tmp_path)


@pytest.fixture(scope="module")
def scored(spark, seed, tmp_path_factory):
    """The seed lake after one successful scoring run (model version "good"), and that run's summary."""
    root = tmp_path_factory.mktemp("scored")
    lake = data.copy_lake(spark, seed, root)
    return lake.root, score.run(lake, encoder=data.HashEncoder(model_version="good"))


@pytest.fixture()
def scored_lake(spark, scored, tmp_path):
    return data.copy_lake(spark, scored[0], tmp_path)


def brute_force_top(encoder, customer_idx: list[int], article_ids: list[str], k: int) -> list[list[str]]:
    users = encoder.vectors(customer_idx, 0)
    items = encoder.vectors(range(1, len(article_ids) + 1), 100_000)
    order = np.argsort(-(users @ items.T), axis=1, kind="stable")[:, :k]
    return [[article_ids[j] for j in row] for row in order]


def test_model_candidates_match_brute_force(spark):
    encoder = data.HashEncoder()
    index = build_index(encoder.vectors(range(1, 41), 100_000), data.ARTICLE_IDS)
    customers = spark.createDataFrame(
        [(c, i + 1) for i, c in enumerate(data.CUSTOMER_IDS)], "customer_id string, customer_idx int"
    )
    rows = score.model_candidates(customers, encoder, index, n=5, partitions=3).toPandas()
    got = rows.sort_values(["customer_id", "pos"]).groupby("customer_id")["article_id"].apply(list).to_dict()
    want = brute_force_top(encoder, list(range(1, 31)), data.ARTICLE_IDS, 5)
    assert got == dict(zip(data.CUSTOMER_IDS, want))
    assert rows["score"].between(-1.0001, 1.0001).all() and set(rows["pos"]) == {1, 2, 3, 4, 5}


def test_every_customer_gets_exactly_k_with_sources(scored, scored_lake):
    lake, summary = scored_lake, scored[1]
    got = data.lists(lake)
    assert set(got) == set(data.CUSTOMER_IDS) and summary["customers"] == 30 and summary["rows"] == 30 * K
    for customer, rows in got.items():
        assert [r[0] for r in rows] == list(range(1, K + 1))
        assert len({r[1] for r in rows}) == K and all(len(r[1]) == 10 for r in rows)
    # Customers with history: the model's exact top-K over all 40 articles.
    want = brute_force_top(data.HashEncoder(), list(range(1, 21)), data.ARTICLE_IDS, K)
    for customer, expected in zip(data.WITH_HISTORY, want):
        assert [r[1] for r in got[customer]] == expected
        assert {r[2] for r in got[customer]} == {SOURCE_MODEL}
    # No history or no feature row yet: the age bucket's best sellers first, then global best sellers.
    for customer in data.NO_HISTORY + data.NEW:
        sources = [r[2] for r in got[customer]]
        assert SOURCE_MODEL not in sources and sources[0] == SOURCE_AGE_BUCKET
        assert sources == sorted(sources, key=[SOURCE_AGE_BUCKET, SOURCE_GLOBAL].index)
    assert summary["model_version"] == "good" and summary["index"]["articles"] == 40
    assert (lake.config.path(summary["index"]["path"]) / "index.faiss").exists()


def test_an_approximate_index_is_checked_against_exact_search_before_scoring(lake, monkeypatch):
    lake.config.scoring.index_type = "hnsw"
    lake.config.scoring.recall_sample = 7
    summary = score.run(lake, encoder=data.HashEncoder())
    assert summary["index"]["type"] == "hnsw" and summary["index"]["recall_queries"] == 7  # of 20 with history
    assert summary["index"]["recall"] >= 0.99 and "fallback" not in summary["index"]
    # an index that misses too much is replaced by exact search: the lists are the exact top K
    monkeypatch.setattr("recsys.index.compare_to_exact", lambda index, queries, k, exact=None: {
        "recall_at_k": 0.5, "k": k, "queries": len(queries), "speedup": 3.0})
    summary = score.run(lake, encoder=data.HashEncoder(model_version="again"))
    assert summary["index"]["type"] == "flat" and summary["index"]["fallback"] == "flat"
    assert summary["index"]["recall"] == 0.5 and summary["index"]["recall_k"] == 50  # candidates.two_tower_n
    got = data.lists(lake)
    want = brute_force_top(data.HashEncoder(), list(range(1, 21)), data.ARTICLE_IDS, K)
    assert [[r[1] for r in got[c]] for c in data.WITH_HISTORY] == want


def test_short_candidate_lists_are_filled_from_popularity(lake):
    # Only articles sold in the last 2 weeks are indexed (A00..A19); K neighbours are fetched and what the
    # customer bought is dropped, so model lists come up short and popularity fills them.
    lake.config.scoring.candidate_weeks = 2
    lake.config.scoring.exclude_purchased = True
    lake.config.scoring.candidates = 5  # fewer than K: K are fetched anyway
    summary = score.run(lake, encoder=data.HashEncoder())
    got = data.lists(lake)
    assert summary["index"]["articles"] == 20
    bought = {}
    for t in data.transactions_rows():
        bought.setdefault(t[1], set()).add(t[2])
    top = brute_force_top(data.HashEncoder(), list(range(1, 21)), data.ARTICLE_IDS[:20], K)
    short = 0
    for customer, nearest in zip(data.WITH_HISTORY, top):
        rows = got[customer]
        assert len(rows) == K and len({r[1] for r in rows}) == K
        assert not {r[1] for r in rows} & bought[customer]          # already bought: excluded everywhere
        model = [r[1] for r in rows if r[2] == SOURCE_MODEL]
        assert model == [a for a in nearest if a not in bought[customer]]
        assert [r[2] for r in rows[:len(model)]] == [SOURCE_MODEL] * len(model)  # model first, then the fill
        short += len(model) < K
    assert short > 0 and set(summary["sources"]) >= {SOURCE_MODEL, SOURCE_AGE_BUCKET}


def test_interrupted_scoring_leaves_previous_version(scored, scored_lake):
    lake = scored_lake
    before = sorted(map(tuple, lake.read(RECOMMENDATIONS).collect()))
    version = lake.version(RECOMMENDATIONS)
    with pytest.raises(Exception, match="injected failure"):
        score.run(lake, encoder=data.HashEncoder(model_version="bad", fail=True))  # fails inside mapInPandas
    assert lake.version(RECOMMENDATIONS) == version
    assert sorted(map(tuple, lake.read(RECOMMENDATIONS).collect())) == before
    assert publish.current_run(lake)["run_id"] == scored[1]["run_id"]
    # Lists that break the contract (11 articles each) are refused before anything is replaced.
    short = lake.read(RECOMMENDATIONS).filter("rank <= 11").select(
        "customer_id", "rank", "article_id", "score", "source"
    )
    with pytest.raises(ValueError, match="not published.*bad_lists.*30"):
        publish.publish(lake, short, model_version="broken")
    assert lake.version(RECOMMENDATIONS) == version


def test_failure_in_the_write_restores_both_tables(scored, scored_lake, monkeypatch):
    lake = scored_lake
    real_write = lake.write

    def failing_write(df, name, *args, **kwargs):
        if name == RECOMMENDATIONS_NAMED:  # after `recommendations` itself was replaced
            raise OSError("disk full (injected)")
        return real_write(df, name, *args, **kwargs)

    monkeypatch.setattr(lake, "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        score.run(lake, encoder=data.HashEncoder(model_version="bad"))
    assert publish.current_run(lake) == {"run_id": scored[1]["run_id"], "model_version": "good"}
    names = lake.read(RECOMMENDATIONS_NAMED).select("model_version").distinct().collect()
    assert {r.model_version for r in names} == {"good"}


def test_rollback_returns_to_the_previous_model(scored, scored_lake):
    lake, first = scored_lake, scored[1]
    second = score.run(lake, encoder=data.HashEncoder(dim=6, model_version="2"))
    assert publish.current_run(lake)["model_version"] == "2"
    result = publish.rollback(lake)
    assert result["run_id"] == first["run_id"] and result["rolled_back_run_id"] == second["run_id"]
    assert publish.current_run(lake) == {"run_id": first["run_id"], "model_version": "good"}
    names = lake.read(RECOMMENDATIONS_NAMED).select("model_version").distinct().collect()
    assert {r.model_version for r in names} == {"good"}
    # The history says which model produced which version, rollbacks included.
    commits = publish.history(lake)
    assert [(c.get("action"), c.get("model_version")) for c in commits if c.get("action")] == [
        ("publish", "good"), ("publish", "2"), ("rollback", "good"),
    ]
    with pytest.raises(ValueError, match="no earlier published version"):
        publish.rollback(lake)


def test_rollback_skips_withdrawn_runs():
    commits = [
        {"version": 0, "action": "publish", "run_id": "a"},
        {"version": 1, "action": "publish", "run_id": "b"},
        {"version": 2, "action": "rollback", "run_id": "a", "from_run_id": "b"},
        {"version": 3, "action": "publish", "run_id": "c"},
        {"version": 4},  # a commit without metadata (e.g. a restore after a failed publish)
    ]
    assert publish.rollback_target(commits, "c")["version"] == 0  # "b" was withdrawn: back to "a"
    assert publish.rollback_target(commits[:2], "b")["version"] == 0
    with pytest.raises(ValueError, match="no publish commit"):
        publish.rollback_target(commits, "zzz")


def test_the_last_publish_dates_skip_withdrawn_runs_and_fall_back_to_the_checks():
    import datetime as dt

    commits = [
        {"version": 0, "action": "publish", "run_id": "a"},  # before commits recorded their date
        {"version": 1, "action": "publish", "run_id": "b", "as_of": "2020-09-24", "scope": "relist"},
        {"version": 2, "action": "publish", "run_id": "c", "as_of": "2020-09-25", "scope": "relist"},
        {"version": 3, "action": "rollback", "run_id": "b", "from_run_id": "c"},
        {"version": 4},
    ]
    checked = {"a": dt.date(2020, 9, 23)}
    assert publish.last_as_of(commits, checked=checked) == dt.date(2020, 9, 24)  # "c" was rolled back
    assert publish.last_as_of(commits, publish.RELIST) == dt.date(2020, 9, 24)
    assert publish.last_as_of(commits, publish.EVERYONE, checked) == dt.date(2020, 9, 23)
    assert publish.last_as_of(commits, publish.EVERYONE) is None  # its date unknown: the nightly runs in full
    assert publish.last_as_of([], publish.EVERYONE, checked) is None
    # a RESTORE put "b" back (a failed publish, a benchmark): nothing after the run the table holds counts
    restored = commits[:2] + [{"version": 2, "action": "publish", "run_id": "d", "as_of": "2020-09-26",
                               "scope": "everyone"}, {"version": 3, "operation": "RESTORE"}]
    assert publish.last_as_of(restored, current_run_id="b") == dt.date(2020, 9, 24)
    assert publish.last_as_of(restored, publish.EVERYONE, checked, "b") == dt.date(2020, 9, 23)
    assert publish.last_as_of(restored, publish.EVERYONE, checked) == dt.date(2020, 9, 26)


def test_recommend_for_a_subset_without_publishing(scored, scored_lake):
    lake = scored_lake
    target = lake.spark.createDataFrame([(data.WITH_HISTORY[0],), (data.NEW[0],), ("e" * 64,)], "customer_id string")
    recs = score.recommend(lake, data.HashEncoder(model_version="eval"), customers=target).toPandas()
    assert recs.groupby("customer_id")["article_id"].nunique().to_dict() == {
        data.WITH_HISTORY[0]: K, data.NEW[0]: K, "e" * 64: K,  # an id unknown everywhere still gets K
    }
    assert list(recs.columns) == [f.name for f in publish.RECOMMENDATIONS_SCHEMA.fields]
    assert set(recs["model_version"]) == {"eval"}
    assert publish.current_run(lake)["run_id"] == scored[1]["run_id"]  # nothing published


def test_resolve_model_without_registry_names_the_fix(lake):
    with pytest.raises(ValueError, match="recsys train"):
        score.resolve_model(lake.config)


def test_real_two_tower_encoder_scores_through_spark(scored_lake):
    """An untrained TwoTower from recsys.model: the Spark path returns its own exact top-K."""
    model = pytest.importorskip("recsys.model")
    from recsys.tables import ARTICLE_FEATURES, CUSTOMER_FEATURES

    lake = scored_lake
    customers = lake.read(CUSTOMER_FEATURES).toPandas().sort_values("customer_idx")
    articles = lake.read(ARTICLE_FEATURES).toPandas().sort_values("article_idx")
    spec = model.FeatureSpec.fit(customers, articles)
    two_tower = model.TwoTower(spec, model.tower_config(lake.config.model))
    encoder = model.Encoder.from_model(two_tower, as_of=data.AS_OF.isoformat(), model_version="tt-0")
    target = lake.spark.createDataFrame([(c,) for c in data.WITH_HISTORY[:5]], "customer_id string")
    got = score.recommend(lake, encoder, customers=target).toPandas()
    history = customers[customers["customer_id"].isin(data.WITH_HISTORY[:5])]
    sims = encoder.encode_customers(history) @ encoder.encode_articles(articles).T
    for customer, row in zip(history["customer_id"], sims):
        rows = got[got["customer_id"] == customer].sort_values("rank")
        assert set(rows["source"]) == {SOURCE_MODEL} and len(rows) == K
        assert np.allclose(rows["score"].to_numpy(), np.sort(row)[::-1][:K], atol=1e-5)


def test_a_hard_threshold_blocks_the_publish_and_the_previous_lists_stay(scored, scored_lake):
    lake, first = scored_lake, scored[1]
    assert first["checks"].startswith("checks:")
    version, run_id = lake.version(RECOMMENDATIONS), first["run_id"]
    recorded = lake.read(PUBLISH_CHECKS).filter(f"run_id = '{run_id}'").collect()
    assert {r.check for r in recorded} >= {"fallback_share", "catalogue_coverage", "overlap_with_previous"}
    assert all(r.status != "block" for r in recorded)

    # the same lists again, with a fallback threshold that every list with a popularity fill crosses
    lake.config.monitoring.fallback_share_block = 0.0
    with pytest.raises(monitor.PublishBlocked, match="fallback_share"):
        score.run(lake, encoder=data.HashEncoder(model_version="blocked"))
    assert lake.version(RECOMMENDATIONS) == version
    assert publish.current_run(lake) == {"run_id": run_id, "model_version": "good"}
    blocked = lake.read(PUBLISH_CHECKS).filter("status = 'block'").collect()
    assert [r.check for r in blocked] == ["fallback_share"] and blocked[0].run_id != run_id


def test_customer_feature_drift_is_measured_against_the_previous_snapshot(lake):
    features = lake.read(CUSTOMER_FEATURES)
    as_of = features.agg({"as_of": "max"}).first()[0]
    numeric = [c for c in features.columns if c.startswith("num_")]
    assert numeric, "the seed lake has numeric customer features"
    earlier = features.withColumn("as_of", F.date_sub("as_of", 7))
    lake.write(earlier, CUSTOMER_FEATURES, mode="append")
    checked = monitor.check_before_publish(lake, data_lists(lake), "drift-test", as_of)
    drift = {c.name: c.value for c in checked if c.name.startswith(monitor.DRIFT_PREFIX)}
    assert set(drift) == {f"{monitor.DRIFT_PREFIX}{c}" for c in numeric}
    assert all(v is None or v < 0.01 for v in drift.values())  # the same rows a week earlier: no drift


def data_lists(lake):
    return lake.spark.createDataFrame(
        [(c, 1, data.ARTICLE_IDS[0], 1.0, "x") for c in data.CUSTOMER_IDS],
        "customer_id string, rank int, article_id string, score double, source string",
    )


def test_the_index_is_built_once_per_encoder_date_and_table_state(lake):
    """Every slice of a publish searches the same index: built once, and again only for another encoder or date,
    or once a table it reads has changed."""
    from recsys.tables import TRANSACTIONS

    encoder = data.HashEncoder()
    first = score.retrieval(lake, encoder, data.AS_OF)
    assert score.retrieval(lake, encoder, data.AS_OF) is first
    assert score.retrieval(lake, data.HashEncoder(), data.AS_OF) is not first
    again = score.retrieval(lake, encoder, data.AS_OF)
    assert again is not first and score.retrieval(lake, encoder, data.AS_OF) is again
    lake.write(lake.read(TRANSACTIONS).limit(1), TRANSACTIONS, mode="append")
    assert score.retrieval(lake, encoder, data.AS_OF) is not again
