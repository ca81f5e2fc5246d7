"""The two stages on the hand-made lake of `scoring_data`: the ranker's label window, exact-K lists credited
to their candidate source, the two-tower similarity of any pair, and the gate's fallback to a baseline."""
from __future__ import annotations

import datetime as dt
import sys
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from pyspark import cloudpickle
from pyspark.sql import functions as F

import scoring_data as data
from declared import with_units
from recsys import gate, score, two_stage
from recsys.tables import RECOMMENDATIONS, TRANSACTIONS, TRANSACTIONS_SCHEMA

cloudpickle.register_pickle_by_value(data)
cloudpickle.register_pickle_by_value(sys.modules[__name__])
K = 12
RULES = "candidates.sources=[repurchase,same_product,bought_together,popularity]"  # no model needed
SETTINGS = [RULES, "ranker.label_days=2", "ranker.n_estimators=20", "ranker.max_depth=3", "candidates.popularity_n=12"]


@pytest.fixture(scope="module")
def seed(spark, tmp_path_factory):
    return data.build_seed(spark, tmp_path_factory.mktemp("two-stage-seed") / "delta")


@pytest.fixture()
def lake(spark, seed, tmp_path):
    return data.copy_lake(spark, seed, tmp_path, *SETTINGS)


def test_the_ranker_learns_only_from_the_label_window_before_the_evaluation_week(spark, lake, seed, tmp_path):
    until = data.AS_OF  # the evaluation week starts here; the label window is the two days before
    long, labelled, window = two_stage.ranker_rows(lake, None, until)
    rows = labelled.select("customer_id", "article_id", "label", "repurchase_rank", "pair_purchases").collect()
    assert rows and {r.label for r in rows} == {0, 1}
    days = {r.t_dat for r in window.select("t_dat").distinct().collect()}
    assert days == {until - dt.timedelta(days=2), until - dt.timedelta(days=1)}
    # features as of the window's start: a label-window purchase is never a feature of its own row
    bought = {(r.customer_id, r.article_id) for r in window.collect()}
    before = {(r.customer_id, r.article_id) for r in lake.read(TRANSACTIONS).filter(
        F.col("t_dat") < F.lit(until - dt.timedelta(days=2))).collect()}
    for r in rows:
        if (r.customer_id, r.article_id) in bought and (r.customer_id, r.article_id) not in before:
            assert r.pair_purchases == 0.0, r
    # purchases in the evaluation week (on or after `until`) change nothing
    future = [(until + dt.timedelta(days=d), c, data.ARTICLE_IDS[33], 0.05, 2) for d in range(3)
              for c in data.WITH_HISTORY]
    extra = with_units(spark.createDataFrame(future, TRANSACTIONS_SCHEMA)).withColumn(
        "t_month", F.date_format("t_dat", "yyyy-MM"))
    other = data.copy_lake(spark, seed, tmp_path / "with-future", *SETTINGS)
    other.write(extra, TRANSACTIONS, mode="append")
    _, again, _ = two_stage.ranker_rows(other, None, until)
    columns = sorted(labelled.columns)
    assert sorted(map(repr, again.select(*columns).collect())) == sorted(map(repr, labelled.select(*columns).collect()))
    assert data.ARTICLE_IDS[33] not in {r.article_id for r in rows}


def test_ranked_lists_hold_exactly_k_credited_to_their_candidate_source(lake):
    fit = two_stage.fit_ranker(lake, None, data.AS_OF)
    assert fit.facts["label_window"] == "2020-09-20 .. 2020-09-21" and fit.facts["positives"] > 0
    assert set(fit.coverage["source"]) == {"repurchase", "same_product", "bought_together", "popularity", "all"}
    importances = fit.model.importances()
    assert set(importances["feature"]) == set(fit.model.features) and importances["gain"].sum() > 0
    recs = two_stage.recommend(lake, None, fit.model, as_of=data.AS_OF, model_version="ranker-test").collect()
    by_customer: dict[str, list] = {}
    for r in recs:
        by_customer.setdefault(r.customer_id, []).append(r)
    assert set(by_customer) == set(data.CUSTOMER_IDS)  # new customers too (popularity fill)
    for customer, rows in by_customer.items():
        assert sorted(r.rank for r in rows) == list(range(1, K + 1)) and len({r.article_id for r in rows}) == K
    sources = {r.source for r in recs}
    assert sources <= {"repurchase", "same_product", "bought_together", "popularity", "popularity_age_bucket",
                       "popularity_global"} and "repurchase" in sources
    assert {r.model_version for r in recs} == {"ranker-test"}


def test_two_tower_rows_score_the_other_sources_pairs_by_the_same_vectors(lake):
    encoder = data.HashEncoder()
    target = lake.spark.createDataFrame([(c,) for c in data.WITH_HISTORY[:4]], "customer_id string")
    others = lake.spark.createDataFrame([(data.WITH_HISTORY[0], data.ARTICLE_IDS[35]),
                                         (data.WITH_HISTORY[1], "9999999999")], "customer_id string, article_id string")
    rows = two_stage.two_tower_rows(lake, encoder, data.AS_OF, target, others, n=5).collect()
    picks = [r for r in rows if r.pos is not None]
    assert len(picks) == 4 * 5 and {r.pos for r in picks} == set(range(1, 6))
    extra = {(r.customer_id, r.article_id): r.score for r in rows if r.pos is None}
    user = encoder.vectors([1], 0)[0]
    item = encoder.vectors([36], 100_000)[0]  # A35 is article_idx 36
    assert extra[(data.WITH_HISTORY[0], data.ARTICLE_IDS[35])] == pytest.approx(float(user @ item), abs=1e-5)
    unknown = extra[(data.WITH_HISTORY[1], "9999999999")]
    assert unknown is None or np.isnan(unknown)  # not in the index: missing (null), not zero
    with pytest.raises(ValueError, match="trained on features as of 2020-09-22.*before its training data ends"):
        two_stage.two_tower_rows(lake, encoder, data.AS_OF - dt.timedelta(days=3), target, None, n=5)


def test_wide_rows_carry_the_similarity_of_picks_and_of_the_other_sources_pairs(spark):
    from recsys.candidates import CANDIDATE_SCHEMA

    long = spark.createDataFrame([
        ("c1", "A", "two_tower", 1, 0.9),     # a pick: its score is its similarity
        ("c1", "B", "repurchase", 1, 2.0), ("c1", "B", "similarity", 0, 0.4),
        ("c1", "C", "popularity", 1, 7.0),    # outside the index: no similarity
        ("c2", "D", "similarity", 0, 0.8),    # similarity of a pair nobody proposed: no row
    ], CANDIDATE_SCHEMA)
    rows = two_stage.wide_rows(long, ["repurchase", "two_tower", "popularity"]).collect()
    got = {(r.customer_id, r.article_id): (r.source, r.n_sources, r.two_tower_similarity) for r in rows}
    assert got == {("c1", "A"): ("two_tower", 1, 0.9), ("c1", "B"): ("repurchase", 1, 0.4),
                   ("c1", "C"): ("popularity", 1, None)}


def test_when_no_model_beats_the_best_baseline_its_lists_are_published(lake):
    config = lake.config
    decision = gate.gate(config, {"map_at_12": 0.010}, None,
                             {"repurchase": {"map_at_12": 0.026}, "als": {"map_at_12": 0.017}})
    assert decision.publish == "baseline:repurchase"
    with pytest.raises(ValueError, match="nothing decided to publish"):
        score.publish_decided(lake)
    gate.write_decision(lake, data.AS_OF - dt.timedelta(days=7), decision, {})
    summary = score.publish_decided(lake, as_of=data.AS_OF)
    assert summary["published"] == "baseline:repurchase" and summary["customers"] == len(data.CUSTOMER_IDS)
    recs = lake.read(RECOMMENDATIONS)
    assert {r.source for r in recs.select("source").distinct().collect()} == {"baseline:repurchase"}
    assert {r.model_version for r in recs.select("model_version").distinct().collect()} == {"repurchase@2020-09-22"}
    assert recs.count() == K * len(data.CUSTOMER_IDS)
    latest = gate.latest_decision(lake)
    assert latest["publish"] == "baseline:repurchase" and latest["best_baseline"] == "repurchase"


def test_publishing_in_slices_gives_the_lists_and_candidates_of_one_pass(lake):
    """Slices of the customers (the disk a full-size publish needs follows the slice): every customer in exactly
    one slice, and the published lists and recorded candidates are those of the whole base in one pass."""
    from recsys.publish import publish

    fit = two_stage.fit_ranker(lake, None, data.AS_OF)
    slices = score.customer_slices(lake, size=len(data.CUSTOMER_IDS) // 3)
    members = [sorted(r.customer_id for r in s.collect()) for s in slices]
    assert len(slices) == 3 and sorted(sum(members, [])) == sorted(data.CUSTOMER_IDS)
    assert len(score.customer_slices(lake, size=0)) == 1
    with pytest.raises(ValueError, match="slice_customers"):
        score.customer_slices(lake, size=-1)

    whole = two_stage.recommend(lake, None, fit.model, as_of=data.AS_OF, write_candidates="replace")
    publish(lake, whole, model_version="whole")
    one_pass = published(lake)
    summary = publish(lake, (two_stage.recommend(lake, None, fit.model, as_of=data.AS_OF, customers=s,
                                                 write_candidates="append" if i else "replace")
                             for i, s in enumerate(slices)), model_version="sliced")
    assert published(lake) == one_pass
    assert len(summary["slice_seconds"]) == 3  # the stage summary says what each slice took
    with pytest.raises(ValueError, match="no recommendations"):
        publish(lake, [], model_version="nothing")
    # a slice reads back its own candidates, not the slices appended before it (ranked again, they cost twice)
    for i, (part, members_of_part) in enumerate(zip(slices, members)):
        kept = two_stage.build_candidates(lake, None, data.AS_OF, part, write="append" if i else "replace")
        assert {r.customer_id for r in kept.select("customer_id").distinct().collect()} <= set(members_of_part)
    # nor reads their files: each file holds one slice's ids, so its id statistics (what Delta skips files by)
    # span that slice alone
    ranges = [(m[0], m[-1]) for m in members]
    spans = candidate_file_spans(lake, data.AS_OF)
    assert spans and all(sum(low <= last and first <= high for first, last in ranges) == 1 for low, high in spans)


def candidate_file_spans(lake, as_of: dt.date) -> list[tuple[str, str]]:
    """(min, max) customer_id of each non-empty live file of `candidates` as of `as_of`."""
    import pyarrow.parquet as pq

    from recsys.tables import CANDIDATES

    files = [f for f in lake.read(CANDIDATES).inputFiles() if f"/as_of={as_of.isoformat()}/" in f]
    ids = [pq.read_table(unquote(urlparse(f).path), columns=["customer_id"])["customer_id"].to_pylist() for f in files]
    return [(min(i), max(i)) for i in ids if i]


def published(lake) -> tuple[set, list]:
    """The published lists and the candidates recorded for them (as of data.AS_OF)."""
    from recsys.tables import CANDIDATES

    lists = {(r.customer_id, r.rank, r.article_id) for r in lake.read(RECOMMENDATIONS).collect()}
    candidates = lake.read(CANDIDATES).filter(F.col("as_of") == F.lit(data.AS_OF)).drop("as_of")
    return lists, sorted(map(tuple, candidates.collect()))


def test_a_publish_that_fails_in_a_later_slice_leaves_lists_and_candidates_as_they_were(lake, monkeypatch):
    from recsys import evaluate
    from recsys.publish import publish

    fit = two_stage.fit_ranker(lake, None, data.AS_OF)
    publish(lake, two_stage.recommend(lake, None, fit.model, as_of=data.AS_OF, write_candidates="replace"),
            model_version="before")
    before = published(lake)
    decision = gate.gate(lake.config, {"map_at_12": 0.05}, None, {"repurchase": {"map_at_12": 0.01}})
    assert decision.publish == "model"
    gate.write_decision(lake, data.AS_OF - dt.timedelta(days=7), decision,
                        {lake.config.mlflow.registered_model: "1", lake.config.mlflow.ranker_model: "1"})
    lake.config.scoring.slice_customers = len(data.CUSTOMER_IDS) // 3

    def system(lake_, versions, snapshot, customers, write_candidates="", models=None):
        if write_candidates == "append":
            raise RuntimeError("the second slice broke")
        ranker, encoder = models
        return two_stage.recommend(lake_, encoder, ranker, as_of=snapshot, customers=customers,
                                   write_candidates=write_candidates)

    # the models come once for every slice (none is registered here: the fitted ranker, no two-tower)
    monkeypatch.setattr(evaluate, "system_models", lambda config, versions: (fit.model, None))
    monkeypatch.setattr(evaluate, "system_recommender", system)
    with pytest.raises(RuntimeError, match="second slice broke") as failure:
        score.publish_decided(lake, as_of=data.AS_OF)
    assert "candidates: restored" in str(failure.value.__notes__)
    assert published(lake) == before


def test_ranking_rows_keyed_by_a_number_are_the_rows_keyed_by_the_id(lake):
    """The publish ranks rows keyed by a number standing for the customer: every feature must be what the rows
    keyed by the id get (a join on ids of another type would match nothing and leave features missing)."""
    from recsys.tables import CUSTOMERS

    target = lake.read(CUSTOMERS).select("customer_id")
    keys = two_stage.customer_keys(target)
    _, by_id = two_stage.ranking_rows(lake, None, data.AS_OF, target)
    _, by_key = two_stage.ranking_rows(lake, None, data.AS_OF, target, keys=keys)
    assert dict(by_key.dtypes)["customer_id"] == "bigint"
    by_key = two_stage.unkeyed(by_key, keys)
    columns = sorted(by_id.columns)
    assert sorted(by_key.columns) == columns
    expected = sorted(map(repr, by_id.select(*columns).collect()))
    assert expected and sorted(map(repr, by_key.select(*columns).collect())) == expected
    assert by_id.filter(F.col("pair_purchases") > 0).count() > 0  # the customer side is not empty here


@pytest.mark.parametrize("setting", ["scoring.min_history=1", "scoring.min_history=2"])
def test_the_two_tower_alone_cut_from_the_systems_candidates_is_its_own_lists(spark, seed, tmp_path, setting):
    """`recsys evaluate` reports the challenger's two-tower alone from the system's candidates instead of a
    second search: the lists must be exactly those `score.recommend` makes (customers it does not score, short
    of picks or new, completed from popularity the same way)."""
    lake = data.copy_lake(spark, seed, tmp_path, *SETTINGS, "candidates.sources=[repurchase,two_tower]",
                          "candidates.two_tower_n=20", setting)
    encoder = data.HashEncoder()
    target = lake.spark.createDataFrame([(c,) for c in data.WITH_HISTORY[:6] + data.NO_HISTORY[:2] + data.NEW[:2]],
                                        "customer_id string")
    candidates = two_stage.build_candidates(lake, encoder, data.AS_OF, target)
    system = two_stage.SystemLists(None, candidates, data.AS_OF, target)

    def rows(df):
        return sorted(map(repr, df.select("customer_id", "rank", "article_id", "score", "source",
                                          "model_version").collect()))

    expected = rows(score.recommend(lake, encoder, as_of=data.AS_OF, customers=target))
    assert len(expected) == 10 * K
    assert rows(two_stage.two_tower_lists(lake, system, encoder)) == expected
    # fewer picks in the candidates than its lists are cut from: computed on its own instead
    fewer = data.copy_lake(spark, seed, tmp_path / "fewer", *SETTINGS, "candidates.sources=[repurchase,two_tower]",
                           "candidates.two_tower_n=5")
    assert two_stage.two_tower_lists(fewer, system, encoder) is None
