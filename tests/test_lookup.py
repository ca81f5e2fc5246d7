"""Reading the published lists without Spark (recsys.lookup): the same rows as Spark, from one pinned version,
decoding only the row groups the file statistics point to; the `recsys recommend` command on top of it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import published_lake
import scoring_data as data
from cli_state import restore_cli_state  # noqa: F401 - fixture: cli.main changes process-wide output settings
from recsys import cli, lookup, publish
from recsys.tables import RECOMMENDATIONS_SCHEMA, Lakehouse

K = 12
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lake_dir(spark, tmp_path_factory):
    return published_lake.build(spark, tmp_path_factory)


@pytest.fixture(scope="module")
def lake_config(lake_dir):
    return published_lake.config_for(lake_dir)


@pytest.fixture(scope="module")
def spark_lists(spark, lake_config):
    """What Spark reads, version by version: {version: {customer_id: [(rank, article_id, source)]}}."""
    lake = Lakehouse(spark, lake_config)
    out = {}
    for version in (0, 1):
        rows = lake.read("recommendations", version=version).select("customer_id", "rank", "article_id", "source")
        lists: dict[str, list] = {}
        for r in rows.collect():
            lists.setdefault(r.customer_id, []).append((r.rank, r.article_id, r.source))
        out[version] = {c: sorted(v) for c, v in lists.items()}
    return out


def as_tuples(entry: lookup.CustomerList) -> list[tuple]:
    return [(i["rank"], i["article_id"], i["source"]) for i in entry.items]


def test_the_module_agrees_with_the_table_definitions():
    assert lookup.NAME_COLUMNS == publish.NAME_COLUMNS
    assert list(lookup.LIST_COLUMNS) == [f.name for f in RECOMMENDATIONS_SCHEMA.fields]


def test_both_readers_return_what_spark_reads_for_each_version(lake_config, spark_lists):
    uri = lookup.table_uri(lake_config, "recommendations")
    catalogue = lookup.Catalogue(lookup.table_uri(lake_config, "articles"))
    assert len(catalogue) == data.N_ARTICLES
    for version in (0, 1):
        files = lookup.PublishedVersion(uri, version)
        memory = files.load()
        assert files.version == memory.version == version
        assert files.commit["run_id"] and files.commit["action"] == "publish"
        assert memory.customers == len(data.CUSTOMER_IDS) and memory.rows == files.rows == len(data.CUSTOMER_IDS) * K
        for reader in (files, memory):
            one = lookup.lists(reader, catalogue, [data.CUSTOMER_IDS[7]])
            assert as_tuples(one[data.CUSTOMER_IDS[7]]) == spark_lists[version][data.CUSTOMER_IDS[7]]
            every = lookup.lists(reader, catalogue, data.CUSTOMER_IDS)
            assert {c: as_tuples(e) for c, e in every.items()} == spark_lists[version]
            entry = every[data.CUSTOMER_IDS[0]]
            assert entry.version == version and entry.run_id == files.commit["run_id"]
            assert entry.model_version == f"popularity@{published_lake.CUTOFFS[version]}"
            assert entry.items[0]["prod_name"].startswith("Article") and entry.items[0]["colour_group_name"] == "Black"
            assert lookup.lists(reader, catalogue, [data.CUSTOMER_IDS[3]], k=5)[data.CUSTOMER_IDS[3]].items == \
                every[data.CUSTOMER_IDS[3]].items[:5]
            assert lookup.lists(reader, catalogue, ["f" * 64, "x"]) == {}
    # The latest version is the default; it is the one readers get after a publish.
    assert lookup.PublishedVersion(uri).version == 1
    assert lookup.history(uri)[-1]["run_id"] == lookup.PublishedVersion(uri).commit["run_id"]
    with pytest.raises(ValueError, match="cannot read version 7"):
        lookup.PublishedVersion(uri, 7)


def test_a_lookup_decodes_only_the_row_groups_that_can_hold_the_id(lake_config, monkeypatch):
    uri = lookup.table_uri(lake_config, "recommendations")
    published = lookup.PublishedVersion(uri)
    groups = sum(pq.ParquetFile(f.path).metadata.num_row_groups for f in published.files)
    assert groups >= 4  # serving.row_group_bytes=1: publish wrote small row groups
    decoded = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **kw: decoded.append(i) or original(self, i, *a, **kw))
    for customer_id in (data.CUSTOMER_IDS[0], data.CUSTOMER_IDS[17], data.CUSTOMER_IDS[29]):
        decoded.clear()
        assert published.rows_for([customer_id]).num_rows == K
        assert 1 <= len(decoded) <= 2  # a list can straddle two row groups, never more
    decoded.clear()
    published.rows_for(data.CUSTOMER_IDS)
    assert len(decoded) == groups  # a batch decodes each row group once


def test_file_statistics_skip_files_on_real_ids(spark, tmp_path, monkeypatch):
    """With 64-hex ids (as in H&M's data) Delta's min/max per file leave one file per lookup to open."""
    config = published_lake.config_for(tmp_path, "scoring.partitions=4")
    lake = Lakehouse(spark, config)
    ids = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(200))
    rows = spark.createDataFrame([(c, r, f"{r:010d}", 1.0 / r, "two_tower") for c in ids for r in (1, 2, 3)],
                                 "customer_id string, rank int, article_id string, score double, source string")
    publish.write_for_lookup(lake, publish.conform(rows, "m1", "run-1"))
    published = lookup.PublishedVersion(lookup.table_uri(config, "recommendations"))
    assert len(published.files) == 4
    opened = []
    original = lookup._DataFile.parquet
    monkeypatch.setattr(lookup._DataFile, "parquet", lambda self, fs: opened.append(self.path) or original(self, fs))
    for customer_id in (ids[0], ids[77], ids[-1]):
        opened.clear()
        assert published.rows_for([customer_id])["rank"].to_pylist() == [1, 2, 3]
        assert len(set(opened)) == 1


def test_tables_the_reader_cannot_read_correctly_are_refused(spark, tmp_path):
    path = tmp_path / "with_deletion_vectors"
    spark.sql(f"CREATE TABLE delta.`{path}` (customer_id STRING) USING delta "
              "TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    with pytest.raises(lookup.UnsupportedTable, match="deletionVectors.*--spark"):
        lookup.open_table(str(path))
    with pytest.raises(FileNotFoundError, match="table 'nothing' does not exist"):
        lookup.open_table(str(tmp_path / "nothing"))


def test_recent_purchases_read_the_newest_months_only(lake_config):
    catalogue = lookup.Catalogue(lookup.table_uri(lake_config, "articles"))
    customer = data.WITH_HISTORY[4]
    mine = sorted(((d, a) for d, c, a, _, _ in data.transactions_rows() if c == customer), reverse=True)
    september = lookup.recent_purchases(lake_config, customer, catalogue, months=1)
    assert [(p["t_dat"], p["article_id"]) for p in september] == [(d.isoformat(), a) for d, a in mine if d.month == 9]
    both = lookup.recent_purchases(lake_config, customer, catalogue, months=2)
    assert len(both) == len(mine) and both[-1]["t_dat"] == "2020-08-10" and both[0]["prod_name"].startswith("Article")
    assert lookup.recent_purchases(lake_config, data.NEW[0], catalogue) == []


def test_recommend_command_reads_without_spark(lake_dir, capsys):
    customer = data.CUSTOMER_IDS[3]
    settings = [arg for o in published_lake.overrides(lake_dir) for arg in ("--set", o)]
    assert cli.main(["--profile", "tiny", *settings, "recommend", customer]) == 0
    out = capsys.readouterr().out
    assert customer in out and "recommendations version 1" in out and "Article" in out
    assert len([line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]) == K
    assert cli.main(["--profile", "tiny", *settings, "recommend", customer, data.CUSTOMER_IDS[4], "--json",
                     "--k", "3", "--table-version", "0"]) == 0
    lists = json.loads(capsys.readouterr().out)
    assert [x["customer_id"] for x in lists] == [customer, data.CUSTOMER_IDS[4]]
    assert all(x["version"] == 0 and len(x["items"]) == 3 for x in lists)
    assert cli.main(["--profile", "tiny", *settings, "recommend", "f" * 64]) == 2
    assert "is not in the customers table" in capsys.readouterr().err
    assert cli.main(["--profile", "tiny", "--set", f"paths.tables_dir={lake_dir}/nowhere", "recommend", customer]) == 2
    assert "table 'recommendations' does not exist" in capsys.readouterr().err

    # A fresh process answers without ever importing Spark.
    code = ("import sys; from recsys.cli import main; rc = main(sys.argv[1:]); "
            "assert 'pyspark' not in sys.modules, 'Spark was imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "--profile", "tiny", *settings, "recommend", customer],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert customer in done.stdout and done.stderr == ""


def test_format_list_is_a_readable_table(lake_config):
    (entry,) = lookup.lookup(lake_config, [data.CUSTOMER_IDS[2]])
    lines = lookup.format_list(entry).splitlines()
    assert lines[0].startswith(f"customer {data.CUSTOMER_IDS[2]}") and "model popularity@2020-09-22" in lines[0]
    assert lines[1].split() == list(lookup.ITEM_COLUMNS) and len(lines) == 2 + K
    assert lines[2].split()[0] == "1" and lines[-1].split()[0] == str(K)
