"""Checks before publishing: each measurement on hand-made lists, and the thresholds. (A hard threshold that
blocks a real publish, and drift between real snapshots, are in test_score.py, on its scored lake.)"""
from __future__ import annotations

import pytest

from recsys import monitor, publish
from recsys.config import MonitoringConfig
LISTS = "customer_id string, rank int, article_id string, score double, source string"


def lists(spark, rows):
    return spark.createDataFrame(rows, LISTS)


def test_list_stats_measure_fallback_coverage_and_concentration(spark):
    rows = [("c1", 1, "a1", 0.9, "two_tower"), ("c1", 2, "a2", 0.5, "repurchase"),
            ("c2", 1, "a1", 0.8, "two_tower"), ("c2", 2, "a3", None, "popularity_global"),
            ("c3", 1, "a1", 0.1, "popularity_age_bucket"), ("c3", 2, "a4", 0.2, "popularity")]
    stats = monitor.list_stats(lists(spark, rows), catalogue_size=10, top=1)
    assert stats["rows"] == 6
    assert stats["fallback_share"] == pytest.approx(2 / 6)  # the fill, not the `popularity` candidate source
    assert stats["catalogue_coverage"] == pytest.approx(4 / 10)
    assert stats["concentration"] == pytest.approx(3 / 6)   # a1 holds half of all rows
    assert stats["score_null_share"] == pytest.approx(1 / 6)


def test_overlap_counts_the_previous_articles_still_recommended(spark):
    before = lists(spark, [("c1", 1, "a1", 1.0, "x"), ("c1", 2, "a2", 1.0, "x"), ("c2", 1, "a1", 1.0, "x"),
                           ("gone", 1, "a9", 1.0, "x")])
    after = lists(spark, [("c1", 1, "a2", 1.0, "x"), ("c1", 2, "a3", 1.0, "x"), ("c2", 1, "a1", 1.0, "x"),
                          ("new", 1, "a1", 1.0, "x")])
    assert monitor.overlap(after, before) == pytest.approx(2 / 3)  # c1 kept a2 of (a1, a2); c2 kept a1
    assert monitor.overlap(after, None) is None


def test_feature_drift_is_small_for_the_same_population_and_large_for_a_shift(spark):
    previous = spark.range(2000).selectExpr("cast(id % 50 as double) AS num_x", "cast(id % 7 as double) AS num_y")
    same = spark.range(2000).selectExpr("cast((id + 1) % 50 as double) AS num_x", "cast(id % 7 as double) AS num_y")
    shifted = spark.range(2000).selectExpr("cast(id % 50 + 40 as double) AS num_x", "cast(id % 7 as double) AS num_y")
    stable = monitor.feature_drift(same, previous, ["num_x", "num_y"])
    moved = monitor.feature_drift(shifted, previous, ["num_x", "num_y"])
    assert stable["num_x"] < 0.05 and stable["num_y"] < 0.05
    assert moved["num_x"] > 1.0 and moved["num_y"] < 0.05
    assert monitor.feature_drift(same, None, ["num_x"]) == {}


def test_thresholds_warn_and_block_in_their_direction():
    mc = MonitoringConfig(fallback_share_warn=0.5, fallback_share_block=0.9, coverage_warn=0.1, coverage_block=0.01)
    got = {c.name: c.status for c in monitor.checks(
        mc, {"fallback_share": 0.6, "catalogue_coverage": 0.005, "concentration": 0.1, "score_null_share": 0.0},
        None, {"num_x": 3.0})}
    assert got == {"fallback_share": "warn", "catalogue_coverage": "block", "concentration": "ok",
                   "score_null_share": "ok", "overlap_with_previous": "ok", "psi_num_x": "block"}


def test_fill_sources_are_the_ones_recommend_writes():
    from recsys.recommend import SOURCE_AGE_BUCKET, SOURCE_GLOBAL

    assert set(monitor.FILL_SOURCES) == {SOURCE_AGE_BUCKET, SOURCE_GLOBAL}


def test_popularity_only_lists_record_their_fallback_share_without_blocking():
    mc = MonitoringConfig()
    stats = {"fallback_share": 1.0, "catalogue_coverage": 0.5, "concentration": 0.1, "score_null_share": 0.0}
    model = {c.name: c.status for c in monitor.checks(mc, stats, None, {})}
    skeleton = {c.name: (c.status, c.direction) for c in monitor.checks(mc, stats, None, {}, popularity_only=True)}
    assert model["fallback_share"] == "block"  # a model whose every row is a fill produced nothing
    assert skeleton["fallback_share"] == ("ok", "none")


def test_check_lists_counts_every_kind_of_broken_list(spark):
    """Each customer breaks the contract (K=3 distinct articles, ranks 1..3, 10-character ids) one way; a list
    that is whole passes, a customer without a list and a list for an unknown customer are counted apart."""
    def whole(customer, articles=("0000000001", "0000000002", "0000000003"), ranks=(1, 2, 3)):
        return [(customer, r, a, 1.0, "x") for r, a in zip(ranks, articles)]

    broken = {
        "dup_article": whole("dup_article", articles=("0000000001", "0000000001", "0000000003")),
        "dup_rank": whole("dup_rank", ranks=(1, 3, 3)),  # rows, articles, min and max rank as whole
        "rank_0": whole("rank_0", ranks=(0, 1, 2)),
        "rank_4": whole("rank_4", ranks=(1, 2, 4)),
        "short_id": whole("short_id", articles=("0000000001", "000000002", "0000000003")),
        "null_article": whole("null_article", articles=("0000000001", None, "0000000003")),
        "null_rank": whole("null_rank", ranks=(1, 2, None)),
        "too_few": whole("too_few")[:2],
        "too_many": whole("too_many") + [("too_many", 3, "0000000004", 1.0, "x")],
    }
    rows = [row for rows in broken.values() for row in rows] + whole("fine") + whole("stranger")
    customers = spark.createDataFrame([(c,) for c in [*broken, "fine", "no_list"]], "customer_id string")
    report = publish.check_lists(lists(spark, rows), customers, k=3)
    assert report == {"customers": len(broken) + 2, "without_list": 1, "unknown_customers": 1,
                      "bad_lists": len(broken), "example": "dup_article", "rows": len(rows)}
    fine = spark.createDataFrame([("fine",)], "customer_id string")
    assert publish.check_lists(lists(spark, whole("fine")), fine, k=3)["bad_lists"] == 0
    # K above the ranks' bit set: the distinct ranks are counted another way, to the same effect
    big = [("c", r, f"{r:010d}", 1.0, "x") for r in range(1, 71)]
    one = spark.createDataFrame([("c",)], "customer_id string")
    assert publish.check_lists(lists(spark, big), one, k=70)["bad_lists"] == 0
    twice = [big[0], ("c", 3, "0000000002", 1.0, "x"), *big[2:]]  # rank 3 twice, no rank 2
    assert publish.check_lists(lists(spark, twice), one, k=70)["bad_lists"] == 1
