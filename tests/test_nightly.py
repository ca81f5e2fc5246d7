"""The nightly refresh from a daily drop: MERGE on the row key, idempotence, bad drops, quarantine, the warm start,
and the synthetic drops. One small lake, ingested once from hand-written raw files, serves the drop tests."""
from __future__ import annotations

import dataclasses
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from declared import with_declared_columns
from pyspark.sql import functions as F
from test_ingest import GOOD_CUSTOMER, article_line, cid, tx, write_raw
from test_train import configure, planted_taste, write_world

from recsys import drop, ingest, pipeline, synth, train
from recsys.config import load_config
from recsys.model import (
    Encoder,
    FeatureSpec,
    TwoTower,
    keep_scale,
    load_encoder,
    warm_start,
)
from recsys.tables import (
    ARTICLES,
    INGEST_RUNS,
    QUARANTINE,
    RAW_COLUMNS,
    TRANSACTION_KEY,
    TRANSACTIONS,
    Lakehouse,
    drop_file,
)

TODAY = date(2020, 9, 30)
FIRST = date(2020, 9, 23)              # the first drop after the raw files' last day
TABLES = (ARTICLES, TRANSACTIONS, QUARANTINE, INGEST_RUNS)
HEADER = ",".join(RAW_COLUMNS[TRANSACTIONS])


def write_drop(landing: Path, day: date, lines: list[str], header: str = HEADER) -> Path:
    path = landing / drop_file(day)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def day_rows(lake: Lakehouse, day: date) -> list[tuple]:
    rows = lake.read(TRANSACTIONS).where(F.col("t_dat") == F.lit(day)).select(*TRANSACTION_KEY).collect()
    return sorted(tuple(r) for r in rows)


def versions(lake: Lakehouse) -> dict[str, int | None]:
    return {t: lake.version(t) for t in TABLES}


def last_day(lake: Lakehouse) -> date:
    return lake.read(TRANSACTIONS).agg(F.max("t_dat")).first()[0]


def first_drop_lines() -> list[str]:
    """Two units of one article (identical rows) and one other purchase."""
    return [tx(FIRST.isoformat()), tx(FIRST.isoformat()), tx(FIRST.isoformat(), article="110065001", channel="1")]


@pytest.fixture(scope="module")
def loaded(spark, tmp_path_factory):
    """A lake after one full ingest of three days, then the drop of FIRST loaded twice."""
    root = tmp_path_factory.mktemp("nightly")
    raw = write_raw(root / "raw", [article_line("108775015"), article_line("110065001")], [GOOD_CUSTOMER],
                    [tx("2020-09-20"), tx("2020-09-21", price="0.02"), tx("2020-09-22", price="0.03")])
    config = load_config("tiny", [f"paths.tables_dir={root}/delta", f"paths.data_dir={root}",
                                  f"paths.raw_dir={raw}"])
    lake = Lakehouse(spark, config)
    ingest.run(lake, str(raw), today=TODAY)
    write_drop(Path(config.landing_dir), FIRST, first_drop_lines())
    before = versions(lake)
    first = drop.load_day(lake, config.landing_dir, FIRST.isoformat(), today=TODAY)
    after_first = versions(lake)
    again = drop.load_day(lake, config.landing_dir, FIRST.isoformat(), today=TODAY)
    return lake, config, first, again, before, after_first


# --- MERGE and idempotence ------------------------------------------------------------------------------------
def test_a_drop_is_merged_on_the_row_key_with_units_of_identical_rows(loaded):
    lake, config, first, _, before, after = loaded
    assert Path(config.landing_dir) == Path(config.paths.raw_dir).parent / "landing"
    assert first.outcome == drop.LOADED and first.diff.new == 3
    assert after[TRANSACTIONS] == before[TRANSACTIONS] + 1
    last = lake.history(TRANSACTIONS).orderBy(F.desc("version")).first()
    assert last["operation"] == "MERGE" and last["operationMetrics"]["numTargetRowsInserted"] == "3"
    assert day_rows(lake, FIRST) == [
        (FIRST, cid(1), "0108775015", 0.0508, 2, 1),
        (FIRST, cid(1), "0108775015", 0.0508, 2, 2),   # the second unit of the same purchase
        (FIRST, cid(1), "0110065001", 0.0508, 1, 1),
    ]
    assert lake.read(TRANSACTIONS).where(F.col("t_dat") < F.lit(FIRST)).count() == 3
    run = lake.read(INGEST_RUNS).where(F.col("run_id") == first.run_id).first()
    assert (run.source_file, run.since, run.rows_read, run.rows_written) == (drop_file(FIRST), FIRST, 3, 3)


def test_the_same_day_again_changes_nothing_and_says_so(loaded):
    lake, _, _, again, _, after = loaded
    assert again.outcome == drop.UNCHANGED and not again.changed
    assert versions(lake) == after
    assert lake.read(TRANSACTIONS).count() == 6
    text = again.format()
    assert f"day {FIRST} was already loaded with the same 3 rows" in text and "nothing new to publish" in text


# --- bad drops ------------------------------------------------------------------------------------------------
def _case(name: str, last: date):
    """(day, file lines, or the file's bytes, or neither for no file; error type; parts of its message), for a
    lake whose last day is `last`."""
    nxt, later = last + timedelta(days=1), last + timedelta(days=3)
    good = tx(nxt.isoformat())
    future = TODAY + timedelta(days=1)
    swapped = HEADER.replace("price,sales_channel_id", "sales_channel_id,price")
    return {
        "missing file": (nxt, None, None, FileNotFoundError, ["file not found", drop_file(nxt)]),
        "zero bytes": (nxt, None, b"", ingest.IngestError, ["empty file (0 bytes)", drop_file(nxt)]),
        "header only": (nxt, [], None, ingest.IngestError, ["no purchases", "only its header"]),
        "wrong header": (nxt, None, f"{swapped}\n{good}\n".encode(), ingest.IngestError,
                         ["expected columns: t_dat, customer_id, article_id, price, sales_channel_id",
                          "found: t_dat, customer_id, article_id, sales_channel_id, price"]),
        "another day": (nxt, [good, tx(later.isoformat()), good], None, ingest.IngestError,
                        [f"one day ({nxt})", f"{later} (1 row, first on line 3)"]),
        "a future row": (nxt, [good, tx("2030-01-01")], None, ingest.IngestError,
                         ["2030-01-01 (1 row, first on line 3, in the future)"]),
        "a future day": (future, [tx(future.isoformat())], None, ingest.IngestError,
                         [f"a day in the future (today is {TODAY})"]),
        "a gap": (later, [tx(later.isoformat())], None, ingest.IngestError,
                  ["would leave a gap", f"the last day in 'transactions' is {last}", f"load {nxt} first",
                   drop_file(nxt)]),
        "different rows": (FIRST, first_drop_lines()[1:] + [tx(FIRST.isoformat(), price="0.07")], None,
                           ingest.IngestError,
                           [f"day {FIRST} is already loaded with different rows", f"holds 3 rows of {FIRST}",
                            "3 valid rows (1 not in the table, 1 of the table's not in the file)", "--replace-day"]),
    }[name]


@pytest.mark.parametrize("name", ["missing file", "zero bytes", "header only", "wrong header", "another day",
                                  "a future row", "a future day", "a gap", "different rows"])
def test_a_bad_drop_is_refused_and_leaves_every_table_as_it_was(loaded, tmp_path, name):
    lake, _, _, _, _, _ = loaded
    day, lines, raw_bytes, error, parts = _case(name, last_day(lake))
    landing = tmp_path / "landing"
    if raw_bytes is not None:
        (landing / drop_file(day)).parent.mkdir(parents=True)
        (landing / drop_file(day)).write_bytes(raw_bytes)
    elif lines is not None:
        write_drop(landing, day, lines)
    before, first_day = versions(lake), day_rows(lake, FIRST)
    with pytest.raises(error) as raised:
        drop.load_day(lake, str(landing), day.isoformat(), today=TODAY)
    for part in parts:
        assert part in str(raised.value), str(raised.value)
    assert versions(lake) == before
    assert day_rows(lake, FIRST) == first_day


def test_a_failure_during_the_writes_restores_every_table(loaded, tmp_path, monkeypatch):
    lake, _, _, _, _, _ = loaded
    day = last_day(lake) + timedelta(days=1)
    write_drop(tmp_path, day, [tx(day.isoformat())])
    before = versions(lake)
    real_write = Lakehouse.write

    def failing(self, df, name, *args, **kwargs):
        if name == INGEST_RUNS:  # transactions and quarantine are written by then
            raise RuntimeError("disk full")
        return real_write(self, df, name, *args, **kwargs)

    monkeypatch.setattr(Lakehouse, "write", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        drop.load_day(lake, str(tmp_path), day, today=TODAY)
    monkeypatch.undo()
    assert versions(lake)[TRANSACTIONS] > before[TRANSACTIONS]  # restored by a new commit (Delta RESTORE)
    assert day_rows(lake, day) == []
    assert lake.read(QUARANTINE).where(F.col("source_file") == drop_file(day)).count() == 0


def test_replace_day_swaps_the_rows_in_one_merge(loaded, tmp_path):
    lake, _, _, _, _, _ = loaded
    day = last_day(lake) + timedelta(days=1)
    d = day.isoformat()
    write_drop(tmp_path, day, [tx(d), tx(d), tx(d, price="0.02")])
    assert drop.load_day(lake, str(tmp_path), day, today=TODAY).outcome == drop.LOADED
    others = lake.read(TRANSACTIONS).where(F.col("t_dat") != F.lit(day)).select(*TRANSACTION_KEY).collect()
    write_drop(tmp_path, day, [tx(d), tx(d, price="0.02"), tx(d, price="0.02"), tx(d, channel="1")])
    report = drop.load_day(lake, str(tmp_path), day, today=TODAY, replace=True)
    assert report.outcome == drop.REPLACED and (report.diff.new, report.diff.gone) == (2, 1)
    metrics = lake.history(TRANSACTIONS).orderBy(F.desc("version")).first()["operationMetrics"]
    assert (metrics["numTargetRowsInserted"], metrics["numTargetRowsDeleted"]) == ("2", "1")
    assert day_rows(lake, day) == [
        (day, cid(1), "0108775015", 0.02, 2, 1), (day, cid(1), "0108775015", 0.02, 2, 2),
        (day, cid(1), "0108775015", 0.0508, 1, 1), (day, cid(1), "0108775015", 0.0508, 2, 1),
    ]
    kept = lake.read(TRANSACTIONS).where(F.col("t_dat") != F.lit(day)).select(*TRANSACTION_KEY).collect()
    assert sorted(map(tuple, kept)) == sorted(map(tuple, others))


def test_drop_rows_are_validated_and_quarantined_like_ingest(loaded, tmp_path):
    lake, _, _, _, _, _ = loaded
    day = last_day(lake) + timedelta(days=1)
    d = day.isoformat()
    spec = {  # line -> (raw line, reason or None)
        2: (tx(d), None),
        3: (tx(d, price="abc"), ingest.wrong_type("price", "double")),
        4: (tx(d, article="999999999"), ingest.UNKNOWN_ARTICLE),
        5: (tx(d, customer="XYZ"), ingest.BAD_CUSTOMER_ID),
        6: (tx(d, channel="3"), ingest.UNKNOWN_CHANNEL),
        7: (tx(d, price="-0.01"), ingest.NEGATIVE_PRICE),
        8: (f"{d},{cid(1)},1", ingest.WRONG_FIELD_COUNT),
        9: (tx("2020-13-01"), ingest.wrong_type("t_dat", "date")),  # not a date: a bad row, not another day
        10: (tx(d, article="110065001"), None),
    }
    write_drop(tmp_path, day, [raw for _, (raw, _) in sorted(spec.items())])
    report = drop.load_day(lake, str(tmp_path), day, today=TODAY)
    bad = lake.read(QUARANTINE).where(F.col("source_file") == drop_file(day)).collect()
    assert {r.line_number: (r.reason, r.raw_line) for r in bad} == {
        n: (reason, raw) for n, (raw, reason) in spec.items() if reason}
    assert {r.t_dat for r in bad} == {day, None}
    f = report.file
    assert (f.rows_read, f.rows_written, f.rows_quarantined) == (9, 2, 7)
    assert len(day_rows(lake, day)) == 2
    assert ingest.UNKNOWN_ARTICLE in report.format() and drop_file(day) in report.format()
    assert drop.load_day(lake, str(tmp_path), day, today=TODAY).outcome == drop.UNCHANGED


def test_latest_is_the_newest_drop_file(tmp_path):
    folder = tmp_path / "transactions"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no drop file"):
        drop.resolve_day(str(tmp_path), "latest")
    for name in ("2020-09-23.csv", "2020-09-25.csv", "2020-09-26.csv.tmp", "notes.txt", "2020-09-24.csv"):
        (folder / name).write_text(HEADER + "\n")
    assert drop.resolve_day(str(tmp_path), "latest") == date(2020, 9, 25)
    assert drop.resolve_day(str(tmp_path), "2020-09-24") == date(2020, 9, 24)
    with pytest.raises(ingest.IngestError, match="expected a day YYYY-MM-DD or 'latest'"):
        drop.resolve_day(str(tmp_path), "yesterday")


def test_pipeline_skips_a_later_stage_when_the_day_was_already_loaded(loaded):
    """The second run of a day: ingest writes nothing, so features (fingerprinted on the table versions) finds
    its inputs unchanged, and the run says so."""
    lake, config, _, _, _, _ = loaded
    day = FIRST  # the only drop in the configured landing folder, so also what 'latest' finds
    first = pipeline.run(config, steps=["ingest", "features"], drop_day=day.isoformat(), out=lambda m: None)
    assert first["ingest"]["drop"] == drop.UNCHANGED and first["features"]["status"] == "done"
    version = lake.version(TRANSACTIONS)
    messages: list[str] = []
    again = pipeline.run(config, steps=["ingest", "features"], drop_day="latest", out=messages.append)
    assert again["ingest"]["drop"] == drop.UNCHANGED and again["features"]["status"] == "up to date"
    assert lake.version(TRANSACTIONS) == version
    assert any(f"day {day} was already loaded with the same" in m for m in messages)
    assert messages[-1] == (f"nightly {day}: the day was already loaded with the same rows; "
                            "ingest, features: nothing changed")
    with pytest.raises(ValueError, match="give one of them"):
        pipeline.run(config, since="2020-09-20", drop_day=day.isoformat())


# --- the warm start -------------------------------------------------------------------------------------------
def _two_specs() -> tuple[FeatureSpec, FeatureSpec]:
    """The champion's spec, and today's: 3 more customers, 1 more article, a grown category, a new category
    column sorted between the old ones (so the old `cat_b` moves from position 1 to 2)."""
    from recsys.model import SideSpec

    old = FeatureSpec(SideSpec.of("customer_idx", 5, {"cat_a": 3, "cat_b": 4}, {"num_x": (1.0, 2.0)}),
                      SideSpec.of("article_idx", 6, {"cat_product_type": 3}, {}))
    new = FeatureSpec(SideSpec.of("customer_idx", 8, {"cat_a": 3, "cat_aa": 2, "cat_b": 5}, {"num_x": (0.0, 1.0)}),
                      SideSpec.of("article_idx", 7, {"cat_product_type": 3}, {}))
    return old, new


def test_warm_start_copies_what_the_vocabularies_allow_and_leaves_the_rest_fresh():
    from recsys.model import TowerConfig

    torch.manual_seed(0)
    tower = TowerConfig(id_dim=4, attribute_dim=3, hidden_dim=8, output_dim=4)
    old, new = _two_specs()
    champion = Encoder.from_model(TwoTower(old, tower), "2020-09-16")
    model = TwoTower(new, tower)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    keep_scale(new, old)
    assert (new.customer.num_mean, new.customer.num_std) == ([1.0], [2.0])
    report = warm_start(model, champion)
    got = {k: v.numpy() for k, v in model.state_dict().items()}
    was = champion.state
    ids = "customer_tower.id_embedding.weight"
    np.testing.assert_array_equal(got[ids][:5], was[ids])                     # the champion's customers
    np.testing.assert_array_equal(got[ids][5:], fresh[ids][5:].numpy())       # three new ones: fresh rows
    items = "article_tower.id_embedding.weight"
    np.testing.assert_array_equal(got[items][:6], was[items])
    np.testing.assert_array_equal(got["customer_tower.cat_embeddings.2.weight"][:4],
                                  was["customer_tower.cat_embeddings.1.weight"])   # cat_b, matched by name
    assert "customer_tower.cat_embeddings.1.weight" in report.fresh               # cat_aa: new column
    for name in ("article_tower.mlp.0.weight", "article_tower.mlp.2.bias", "article_tower.cat_embeddings.0.weight"):
        np.testing.assert_array_equal(got[name], was[name])                       # same layout: copied
    np.testing.assert_array_equal(got["customer_tower.mlp.0.weight"], fresh["customer_tower.mlp.0.weight"].numpy())
    assert report.extended[ids] == (5, 8) and report.extended[items] == (6, 7)
    assert "embeddings extended" in report.describe()
    with pytest.raises(ValueError, match="same tower sizes"):
        warm_start(TwoTower(new, dataclasses.replace(tower, hidden_dim=16)), champion)


def test_warm_refresh_starts_from_the_champion_and_trains_on_the_recent_weeks(lake, tmp_path):
    from test_train import AS_OF

    world = planted_taste(n_customers=60, purchases=6)
    write_world(lake, world)
    configure(lake, tmp_path, epochs=1, loader="memory")
    config = lake.config
    first = train.run(lake, as_of=str(AS_OF))
    assert first["refresh"] == "model.refresh=full"
    config.model.refresh = "warm"
    assert train.warm_source(config)[0] is None  # no champion yet: a full refresh, said so
    config.mlflow_client().set_registered_model_alias(config.mlflow.registered_model, "champion",
                                                      first["model_version"])
    config.model.epochs = 0  # no step at all: the new model IS its initialisation
    warm = train.run(lake, as_of=str(AS_OF))
    assert warm["refresh"].startswith(f"warm from the champion, version {first['model_version']}, on the last 2 weeks")
    name = config.mlflow.registered_model
    champion = load_encoder(f"models:/{name}/{first['model_version']}", config.tracking_uri)
    refreshed = load_encoder(f"models:/{name}/{warm['model_version']}", config.tracking_uri)
    assert refreshed.state.keys() == champion.state.keys()
    for key, value in champion.state.items():
        np.testing.assert_array_equal(refreshed.state[key], value, err_msg=key)
    run = config.mlflow_client().get_run(warm["run_id"])
    assert run.data.tags["refresh"] == "warm" and run.data.tags["warm_start_from"] == first["model_version"]
    days = world["examples"]["t_dat"]
    held_out = AS_OF - timedelta(days=config.model.validation_days)
    recent = ((days >= held_out - timedelta(weeks=2)) & (days < held_out)).sum()
    assert int(run.data.params["train_examples"]) == recent < (days < held_out).sum()
    config.model.refresh = "sometimes"
    with pytest.raises(ValueError, match="model.refresh: unknown value 'sometimes'"):
        train.warm_source(config)


# --- synthetic drops ------------------------------------------------------------------------------------------
def test_synth_writes_daily_drops_that_continue_the_main_file(tmp_path):
    cfg = load_config("tiny").synth
    stats = synth.generate(cfg, str(tmp_path / "raw"), drop_days=3)
    folder = tmp_path / "landing" / "transactions"
    days = [date(2020, 9, 23) + timedelta(days=i) for i in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == [f"{d}.csv" for d in days]
    main = pd.read_csv(tmp_path / "raw" / "transactions_train.csv", dtype=str)
    customers = set(pd.read_csv(tmp_path / "raw" / "customers.csv", dtype=str).customer_id)
    articles = set(pd.read_csv(tmp_path / "raw" / "articles.csv", dtype=str).article_id)
    assert main.t_dat.max() == cfg.end_date
    for day in days:
        path = folder / f"{day}.csv"
        assert path.read_text().split("\n", 1)[0] == HEADER
        rows = pd.read_csv(path, dtype=str)
        assert len(rows) == stats["drops"][str(path)] > 0
        assert set(rows.t_dat) == {day.isoformat()}
        assert set(rows.customer_id) <= customers and set(rows.article_id) <= articles
        assert set(rows.customer_id) & set(main.customer_id)  # the same customers go on buying
    again = synth.generate(cfg, str(tmp_path / "again" / "raw"), drop_days=3)
    assert list(again["drops"].values()) == list(stats["drops"].values())
    assert (tmp_path / "again" / "landing" / "transactions" / f"{days[0]}.csv").read_bytes() == (
        folder / f"{days[0]}.csv").read_bytes()


def test_a_table_from_before_the_row_key_names_the_fix(lake, tmp_path):
    spark = lake.spark
    lake.write(with_declared_columns(spark.createDataFrame([("0108775015",)], "article_id string"), ARTICLES),
               ARTICLES)
    old = spark.createDataFrame([(date(2020, 9, 22), cid(1), "0108775015", 0.05, 2)],
                                "t_dat date, customer_id string, article_id string, price double, "
                                "sales_channel_id short").withColumn("t_month", F.lit("2020-09"))
    old.write.format("delta").partitionBy("t_month").save(lake.location(TRANSACTIONS))  # as the old code wrote it
    write_drop(tmp_path, FIRST, [tx(FIRST.isoformat())])
    before = lake.version(TRANSACTIONS)
    with pytest.raises(ingest.IngestError, match="has no 'unit' column .* run a full `recsys ingest` once"):
        drop.load_day(lake, str(tmp_path), FIRST, today=TODAY)
    assert lake.version(TRANSACTIONS) == before
