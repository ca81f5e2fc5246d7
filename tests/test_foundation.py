"""Config, session factory and Delta I/O: the ground every stage stands on."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import sys

import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F

from recsys.config import ConfigError, load_config, parse_override
from recsys.tables import RECOMMENDATIONS, RECOMMENDATIONS_SCHEMA, TRANSACTIONS, TRANSACTIONS_SCHEMA, SchemaMismatch


def test_profiles_load_with_their_sizes():
    tiny, full = load_config("tiny"), load_config("full")
    assert tiny.profile == "tiny" and full.synth.n_customers == 1_371_980
    assert full.synth.n_articles == 105_542
    assert tiny.synth.n_customers < load_config("small").synth.n_customers


def test_override_parses_types():
    config = load_config("tiny", ["model.epochs=5", "evaluation.ks=[6, 12]", "scoring.k=10"])
    assert config.model.epochs == 5 and config.evaluation.ks == [6, 12] and config.scoring.k == 10
    assert parse_override("a.b=1.5") == {"a": {"b": 1.5}}


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.epochz"):
        load_config("tiny", path=str(bad))


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'model.epochs' must be an integer"):
        load_config("tiny", path=str(bad))
    with pytest.raises(ConfigError, match=r"--set spark.ui=maybe"):
        load_config("tiny", ["spark.ui=maybe"])


def test_unknown_profile_is_an_error():
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge")


def test_a_profile_s_own_spark_settings_are_checked_and_reach_the_session(lake):
    assert lake.spark.conf.get("spark.sql.codegen.wholeStage") == "false"  # conf/tiny.yaml spark.conf
    assert lake.spark.conf.get("spark.sql.ui.retainedExecutions") == "50"  # no UI: few finished queries kept
    assert load_config("tiny", ['spark.conf={"spark.local.dir": /ssd}']).spark.conf == {"spark.local.dir": "/ssd"}
    with pytest.raises(ConfigError, match=r"'spark.conf' must be a mapping"):
        load_config("tiny", ["spark.conf=8"])


def test_a_step_names_the_spark_jobs_inside_it_and_the_step_around_it_comes_back(lake):
    from recsys.spark import STEP, described

    sc = lake.spark.sparkContext
    with described(lake.spark, "outside"):  # a description set by other code comes back as it was
        sc.setJobDescription("someone else's")
        with described(lake.spark, "inside"):
            assert sc.getLocalProperty(STEP) == "outside / inside"
        assert sc.getLocalProperty("spark.job.description") == "someone else's"
    with pytest.raises(RuntimeError, match="inner step fails"):
        with described(lake.spark, "score"):
            with described(lake.spark, "slice 2"):
                assert sc.getLocalProperty(STEP) == sc.getLocalProperty("spark.job.description") == "score / slice 2"
                raise RuntimeError("inner step fails")
    assert sc.getLocalProperty(STEP) is None and sc.getLocalProperty("spark.job.description") is None


def test_a_shipped_object_reaches_every_batch_and_its_pickled_bytes_are_let_go(lake):
    import pandas as pd

    from recsys.spark import Shipped

    shipped = Shipped(lake.spark, {"weights": list(range(1000))})

    def body(batches):
        for pdf in batches:
            value = shipped.value()
            yield pd.DataFrame({"total": [sum(value["weights"])] * len(pdf),
                                "bytes_kept": [hasattr(shipped.payload, "_value")] * len(pdf)})

    rows = lake.spark.range(0, 20, numPartitions=4).mapInPandas(body, "total long, bytes_kept boolean").collect()
    assert len(rows) == 20 and {r.total for r in rows} == {499500}
    assert not any(r.bytes_kept for r in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_hands_the_memory_python_freed_back_to_the_system(lake):
    from recsys.spark import release

    def rss_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    size = 4000  # below glibc's mmap threshold: each block is carved from its heap (a variable: no folded constant)
    blocks = [b"x" * size for _ in range(60_000)]  # ~230 MiB
    kept = blocks[::100]  # one block in a hundred stays: the freed ones lie between live ones, not at the top
    del blocks
    before = rss_mib()
    release(lake.spark)
    assert rss_mib() < before - 100, "the freed blocks' pages stayed with the process"
    assert len(kept) == 600


def test_spark_session_has_delta_and_round_trips(lake):
    df = lake.spark.createDataFrame([Row(a=1, b="x"), Row(a=2, b="y")])
    lake.write(df, "probe")
    assert lake.exists("probe") and lake.version("probe") == 0
    lake.write(df.filter("a = 1"), "probe")
    assert lake.read("probe").count() == 1
    assert lake.read("probe", version=0).count() == 2  # time travel: the old snapshot stays readable
    assert lake.sql("SELECT sum(a) AS s FROM probe").first().s == 1


def test_a_failure_half_way_puts_every_table_back(lake):
    spark = lake.spark
    lake.write(spark.createDataFrame([Row(a=1)]), "left")
    with pytest.raises(RuntimeError, match="fails half-way") as raised:
        with lake.restore_on_failure("left", "right"):
            lake.write(spark.createDataFrame([Row(a=2), Row(a=3)]), "left")
            lake.write(spark.createDataFrame([Row(a=9)]), "right")
            raise RuntimeError("fails half-way")
    assert [r.a for r in lake.read("left").collect()] == [1]
    assert not lake.exists("right")
    assert raised.value.__notes__ == ["after the failure: left: restored to version 0; "
                                      "right: dropped (it did not exist)"]


def test_a_failing_restore_still_restores_the_others_and_raises_the_original_error(lake, monkeypatch):
    spark = lake.spark
    lake.write(spark.createDataFrame([Row(a=1)]), "left")
    lake.write(spark.createDataFrame([Row(a=1)]), "right")
    real_restore = lake.restore

    def restore(name, version):
        if name == "left":
            raise OSError("storage throttled (injected)")
        real_restore(name, version)

    monkeypatch.setattr(lake, "restore", restore)
    with pytest.raises(ValueError, match="the write's own error") as raised:
        with lake.restore_on_failure("left", "right"):
            lake.write(spark.createDataFrame([Row(a=2)]), "left")
            lake.write(spark.createDataFrame([Row(a=2)]), "right")
            raise ValueError("the write's own error")
    assert [r.a for r in lake.read("right").collect()] == [1] and lake.version("right") == 2
    assert [r.a for r in lake.read("left").collect()] == [2]  # the one restore that failed
    (note,) = raised.value.__notes__
    assert "left: NOT restored to version 0: OSError: storage throttled (injected)" in note
    assert "right: restored to version 0" in note


def test_missing_table_error_names_it(lake):
    with pytest.raises(FileNotFoundError, match="'nothing'"):
        lake.read("nothing")


def test_a_contract_table_refuses_an_added_dropped_or_retyped_column(lake):
    spark = lake.spark
    row = ("c" * 64, 1, "0108775015", 0.5, "two_tower", "v1", "run1", dt.datetime(2020, 9, 22))
    good = spark.createDataFrame([row], RECOMMENDATIONS_SCHEMA)
    lake.write(good, RECOMMENDATIONS)
    refused = {
        "extra": (good.withColumn("extra", F.lit(1)), r"column 'extra' is not declared \(int\)"),
        "dropped": (good.drop("score"), r"column 'score' is missing \(double declared\)"),
        "retyped": (good.withColumn("rank", F.col("rank").cast("long")), r"column 'rank' is bigint, declared int"),
    }
    for df, message in refused.values():
        with pytest.raises(SchemaMismatch, match=rf"table 'recommendations' .*{message}"):
            lake.write(df, RECOMMENDATIONS)
    nullable = RECOMMENDATIONS_SCHEMA.simpleString()  # the same columns, none of them NOT NULL
    null_source = spark.createDataFrame([row[:4] + (None,) + row[5:]], nullable)
    with pytest.raises(Exception, match="table 'recommendations': null in column 'source', which is declared NOT NULL"):
        lake.write(null_source, RECOMMENDATIONS)
    assert lake.version(RECOMMENDATIONS) == 0 and lake.read(RECOMMENDATIONS).collect() == good.collect()
    # a declared partition column is part of the contract too
    with pytest.raises(SchemaMismatch, match="column 't_month' is missing"):
        lake.write(spark.createDataFrame([(dt.date(2020, 9, 1), "c", "a", 0.1, 1)], TRANSACTIONS_SCHEMA), TRANSACTIONS)


def test_a_schema_changes_only_when_asked_to(lake):
    spark = lake.spark
    lake.write(spark.createDataFrame([Row(a=1)]), "probe")
    with pytest.raises(Exception, match="schema mismatch"):  # Delta refuses: no silent overwriteSchema
        lake.write(spark.createDataFrame([Row(a=2, b="new")]), "probe")
    with pytest.raises(ValueError, match="evolve_schema replaces the whole table"):
        lake.write(spark.createDataFrame([Row(a=2, b="new")]), "probe", mode="append", evolve_schema=True)
    lake.write(spark.createDataFrame([Row(a=2, b="new")]), "probe", evolve_schema=True)
    assert lake.read("probe").columns == ["a", "b"] and lake.version("probe") == 1


def test_upsert_replaces_the_rows_with_the_same_key_and_keeps_the_others(lake):
    spark = lake.spark
    lake.upsert(spark.createDataFrame([("a", 1), ("b", 1)], "k string, v int"), "kv", ["k"])
    lake.upsert(spark.createDataFrame([("b", 2), ("c", 2)], "k string, v int"), "kv", ["k"])
    assert sorted(map(tuple, lake.read("kv").collect())) == [("a", 1), ("b", 2), ("c", 2)]
    assert lake.version("kv") == 1


def test_a_derived_table_is_built_once_and_again_after_its_source_changes(lake):
    builds = []

    def build():
        builds.append(1)
        return lake.read("things").groupBy().count()

    lake.write(lake.spark.createDataFrame([(1,), (2,)], "x int"), "things")
    first = lake.derived("n_things", build, "things", key=("a",)).first()[0]
    again = lake.derived("n_things", build, "things", key=("a",)).first()[0]
    assert (first, again, len(builds)) == (2, 2, 1)
    lake.write(lake.spark.createDataFrame([(3,)], "x int"), "things", mode="append")
    assert lake.derived("n_things", build, "things", key=("a",)).first()[0] == 3 and len(builds) == 2
    lake.derived("n_things", build, "things", key=("b",))  # another key: built again
    assert len(builds) == 3
    shutil.rmtree(lake.location("things"))  # deleted and written again: version 0 once more, other rows
    lake.write(lake.spark.createDataFrame([(5,)] * 5, "x int"), "things")
    lake.write(lake.spark.createDataFrame([(6,)], "x int"), "things", mode="append")
    assert lake.derived("n_things", build, "things", key=("b",)).first()[0] == 6
