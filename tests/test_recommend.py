"""The walking skeleton (popularity -> recommendations), the fill-to-K rule, lookup, submission export, CLI."""
from __future__ import annotations

import csv
import datetime as dt

import pytest
from pyspark.sql import functions as F

import scoring_data as data
from recsys import cli, publish, recommend
from recsys.recommend import SOURCE_AGE_BUCKET, SOURCE_GLOBAL, SOURCE_MODEL
from recsys.tables import RECOMMENDATIONS, RECOMMENDATIONS_NAMED

K = 12


@pytest.fixture(scope="module")
def seed(spark, tmp_path_factory):
    return data.build_seed(spark, tmp_path_factory.mktemp("recommend-seed") / "delta")


@pytest.fixture()
def lake(spark, seed, tmp_path):
    return data.copy_lake(spark, seed, tmp_path)


def popular_rows(spark, rows):
    return spark.createDataFrame(
        [(dt.date(2020, 9, 22), t, s, r, a, float(sc), 7) for t, s, r, a, sc in rows],
        "as_of date, segment_type string, segment string, rank int, article_id string, score double, window_days int",
    )


def test_complete_lists_by_hand(spark):
    """k=3. c1: two own candidates, one also the bucket's best seller; c2: no candidates, bucket of 1 article."""
    own = spark.createDataFrame([("c1", "a9", 0.9, 1), ("c1", "a1", 0.8, 2)], recommend.CANDIDATE_COLUMNS)
    segments = spark.createDataFrame([("c1", "25-34"), ("c2", "55+")], "customer_id string, age_bucket string")
    popular = popular_rows(spark, [
        ("age_bucket", "25-34", 1, "a1", 5), ("age_bucket", "25-34", 2, "a2", 4),
        ("age_bucket", "55+", 1, "a3", 3),
        ("global", "all", 1, "a1", 9), ("global", "all", 2, "a3", 8), ("global", "all", 3, "a4", 7),
    ])
    got = {
        (r.customer_id, r.rank): (r.article_id, r.source)
        for r in recommend.complete_lists(own, segments, popular, 3).collect()
    }
    assert got == {
        ("c1", 1): ("a9", SOURCE_MODEL), ("c1", 2): ("a1", SOURCE_MODEL), ("c1", 3): ("a2", SOURCE_AGE_BUCKET),
        ("c2", 1): ("a3", SOURCE_AGE_BUCKET), ("c2", 2): ("a1", SOURCE_GLOBAL), ("c2", 3): ("a4", SOURCE_GLOBAL),
    }
    # Excluding what c2 bought (a1, a4) leaves the global list short: the unfiltered global list completes it.
    exclude = spark.createDataFrame([("c2", "a1"), ("c2", "a4")], "customer_id string, article_id string")
    c2 = recommend.complete_lists(own, segments, popular, 3, exclude).filter("customer_id = 'c2'").orderBy("rank")
    assert [(r.article_id, r.source) for r in c2.collect()] == [
        ("a3", SOURCE_AGE_BUCKET), ("a1", SOURCE_GLOBAL), ("a4", SOURCE_GLOBAL),
    ]
    with pytest.raises(ValueError, match="only 3 globally popular articles.*k=4"):
        recommend.complete_lists(own, segments, popular, 4)


def test_run_popularity_gives_every_customer_12_recent_best_sellers(lake):
    summary = recommend.run_popularity(lake)
    assert summary["cutoff"] == "2020-09-22" and summary["customers"] == 30 and summary["rows"] == 30 * K
    got = data.lists(lake)
    assert set(got) == set(data.CUSTOMER_IDS)
    recent = set(data.ARTICLE_IDS[:20])  # sold in the last 7 days; A20..A29 sold in August only
    for rows in got.values():
        assert [r[0] for r in rows] == list(range(1, K + 1)) and len({r[1] for r in rows}) == K
        assert {r[1] for r in rows} <= recent and rows[0][2] == SOURCE_AGE_BUCKET
    # Everyone bought A00 on the day before the cut-off: it leads every list.
    assert {rows[0][1] for rows in got.values()} == {data.ARTICLE_IDS[0]}
    table = lake.read(RECOMMENDATIONS)
    assert table.schema.simpleString() == publish.RECOMMENDATIONS_SCHEMA.simpleString()
    assert table.select("model_version").distinct().first()[0] == "popularity@2020-09-22"
    # An earlier cut-off sees only the 7 days before it: 09-12..09-18 hold 12 articles, and not A00.
    recommend.run_popularity(lake, cutoff="2020-09-19")
    window = {a for d, _, a, _, _ in data.transactions_rows() if dt.date(2020, 9, 12) <= d < dt.date(2020, 9, 19)}
    assert data.ARTICLE_IDS[0] not in window and len(window) == K
    assert {r[1] for rows in data.lists(lake).values() for r in rows} == window
    # In August only 10 articles sold: not enough to fill 12, an error, and the published table stays.
    with pytest.raises(ValueError, match="only 10 globally popular articles"):
        recommend.run_popularity(lake, cutoff="2020-08-11")
    assert publish.current_run(lake)["model_version"] == "popularity@2020-09-19"
    assert publish.rollback(lake)["model_version"] == "popularity@2020-09-22"


def test_lookup_export_and_cli(lake, tmp_path, capsys, monkeypatch):
    recommend.run_popularity(lake)
    customer = data.CUSTOMER_IDS[3]
    pdf = recommend.lookup(lake, customer)
    assert pdf["rank"].tolist() == list(range(1, K + 1)) and pdf["prod_name"].str.startswith("Article").all()
    text = recommend.format_list(pdf)
    assert customer in text and "Article 00" in text and SOURCE_AGE_BUCKET in text
    with pytest.raises(ValueError, match="not in the customers table"):
        recommend.lookup(lake, "f" * 64)
    named = lake.read(RECOMMENDATIONS_NAMED)
    assert named.count() == 30 * K and named.filter(F.col("prod_name").isNull()).count() == 0

    out = tmp_path / "sub" / "submission.csv"
    result = recommend.export_submission(lake, out)
    assert result == {"path": str(out), "rows": 30, "customers_without_list": 0}
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["customer_id", "prediction"] and len(rows) == 31
    expected = {c: " ".join(r[1] for r in rs) for c, rs in data.lists(lake).items()}
    assert {c: p for c, p in rows[1:]} == expected
    assert all(len(p.split(" ")) == K and all(len(a) == 10 and a.isdigit() for a in p.split(" ")) for _, p in rows[1:])

    # The CLI commands are thin calls into these functions, on the lake's tables.
    monkeypatch.setattr(cli, "_spark", lambda config, name: (lake.spark, lake))
    assert cli.main(["recommend", "--spark", customer]) == 0  # without --spark: recsys.lookup (test_lookup.py)
    assert "Article 00" in capsys.readouterr().out
    assert cli.main(["recommend", "--spark", "f" * 64]) == 2
    assert cli.main(["export-submission", "--out", str(tmp_path / "cli.csv")]) == 0
    assert (tmp_path / "cli.csv").read_text().startswith("customer_id,prediction\n")
    assert cli.main(["publish", "--rollback"]) == 2  # only one published version: nothing to go back to
    assert "no earlier published version" in capsys.readouterr().err
