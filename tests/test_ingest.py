"""Ingest: real Kaggle formatting, every kind of bad row, all-or-nothing writes, idempotence, `--since`."""
from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from recsys import ingest
from recsys.config import load_config
from recsys.tables import (
    ARTICLES,
    CUSTOMERS,
    INGEST_RUNS,
    QUARANTINE,
    RAW_COLUMNS,
    TRANSACTIONS,
    Lakehouse,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hm-real"
TODAY = date(2020, 9, 30)
DATA_TABLES = (ARTICLES, CUSTOMERS, TRANSACTIONS)


# --- helpers ----------------------------------------------------------------------------------------------
def make_lake(spark, folder: Path) -> Lakehouse:
    return Lakehouse(spark, load_config("tiny", [f"paths.tables_dir={folder}/delta", f"paths.data_dir={folder}"]))


def cid(n: int) -> str:
    return f"{n:064x}"


def article_line(article_id: str = "108775015", **values: str) -> str:
    """One articles.csv line in Kaggle formatting; `values` override raw field texts."""
    row = {c: "1" for c in RAW_COLUMNS[ARTICLES]}
    row.update(article_id=article_id, prod_name="Strap top", product_type_name="Vest top", index_code="A",
               detail_desc="Jersey top.")
    row.update(values)
    return ",".join(row[c] for c in RAW_COLUMNS[ARTICLES])


def write_raw(folder: Path, articles: list[str], customers: list[str], transactions: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for table, lines in ((ARTICLES, articles), (CUSTOMERS, customers), (TRANSACTIONS, transactions)):
        text = "\n".join([",".join(RAW_COLUMNS[table]), *lines]) + "\n"
        (folder / ingest.RAW_FILES[table]).write_text(text)
    return folder


def rows(lake: Lakehouse, table: str, drop: tuple[str, ...] = ()) -> list[tuple]:
    df = lake.read(table).drop(*drop)
    return sorted(tuple(r) for r in df.collect())


def quarantine_by_line(lake: Lakehouse, source: str) -> dict[int, tuple[str, str]]:
    df = lake.read(QUARANTINE).where(f"source_file = '{source}'")
    return {r.line_number: (r.reason, r.raw_line) for r in df.collect()}


# --- pure parsing -------------------------------------------------------------------------------------------
def test_parse_records_handles_quotes_multiline_and_stray_quotes():
    text = (
        "a,b,c\r\n"                      # 1 header (CRLF)
        '1,"x, ""y""",z\n'               # 2 quoted comma and doubled quote
        '2,"two\nlines",z\n'             # 3-4 one record over two lines
        "\n"                             # 5 empty
        '3,bad"quote,z\n'                # 6 stray quote: reported alone, must not swallow line 7
        "4,ok,z\n"                       # 7
        '5,"unclosed,z\n'                # 8 never closed
        "6,,\n"                          # 9 empty fields
    )
    got = ingest.parse_records(text, 3)
    assert [(n, f, r) for n, _, f, r in got] == [
        (1, ["a", "b", "c"], None),
        (2, ["1", 'x, "y"', "z"], None),
        (3, ["2", "two\nlines", "z"], None),
        (5, None, ingest.EMPTY_LINE),
        (6, None, ingest.BAD_QUOTES),
        (7, ["4", "ok", "z"], None),
        (8, None, ingest.BAD_QUOTES),
        (9, ["6", "", ""], None),
    ]
    assert got[2][1] == '2,"two\nlines",z' and got[4][1] == '3,bad"quote,z'


def test_header_is_read_without_bom_and_line_break(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_bytes("\ufeffcustomer_id,FN\r\nx,1\r\n".encode())
    assert ingest.read_header(None, str(path)) == ["customer_id", "FN"]
    assert ingest.read_header(None, str(tmp_path / "absent.csv")) is None


def test_spark_line_parser_agrees_with_the_python_one(spark):
    lines = ['a,b,c', '"a,1","b ""q""",', ',,', 'x"y,1,2', '"open,1,2', '', '"",x,"z"']
    df = spark.createDataFrame(list(enumerate(lines, 2)), "line_number long, raw_line string")
    got = {r.line_number: (r.fields, r.reason) for r in df.transform(ingest.parse_lines).collect()}
    for n, line in enumerate(lines, 2):
        ((_, _, fields, reason),) = ingest.parse_records(line, 3)
        assert got[n] == (fields, reason), line


def test_line_numbers_are_exact_across_file_splits(spark, tmp_path):
    lines = [f"{i}," + "x" * (i % 37) if i % 11 else "" for i in range(1, 400)]
    path = tmp_path / "lines.csv"
    path.write_text("head\n" + "\n".join(lines) + "\n")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "1024")  # about ten splits
    try:
        df, n = ingest.read_lines(spark, str(path))
        got = {r.line_number: r.raw_line for r in df.collect()}
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    assert n == len(lines)
    assert got == {i + 2: line for i, line in enumerate(lines)}


# --- bad rows -----------------------------------------------------------------------------------------------
BROKEN_ARTICLES = {  # line -> (raw line, reason or None)
    2: (article_line("108775015", detail_desc='"Jersey top, with ""straps""."'), None),
    3: (article_line("110065001", detail_desc='"Soft bra.\nTwo lines."'), None),  # lines 3-4
    5: (article_line("108775015"), ingest.duplicate("article_id")),
    6: (article_line("111565001", product_code="abc"), ingest.wrong_type("product_code", "int")),
    7: (article_line("111586001", prod_name=""), ingest.missing("prod_name")),
    8: (article_line("111593001", prod_name='Strap "top'), ingest.BAD_QUOTES),
    9: ("111609001,1,Strap top", ingest.WRONG_FIELD_COUNT),
    10: ("", ingest.EMPTY_LINE),
    11: (article_line("A12"), ingest.wrong_type("article_id", "article_id")),
    12: (article_line("0111609001", detail_desc=""), None),  # leading zero kept, empty description allowed
}
GOOD_CUSTOMER = f"{cid(1)},1.0,1.0,ACTIVE,Regularly,49.0,{cid(99)}"
BROKEN_CUSTOMERS = {
    2: (GOOD_CUSTOMER, None),
    3: (f"{cid(2)},,,,,,", None),
    4: (f'"{cid(3)}",,,"ACTIVE","NONE",25.0,"{cid(98)}"', None),  # quoted fields are fine
    5: (f"{cid(0xABC4).upper()},,,ACTIVE,NONE,30.0,{cid(97)}", ingest.BAD_CUSTOMER_ID),
    6: (f"{cid(5)[1:]},,,ACTIVE,NONE,30.0,{cid(97)}", ingest.BAD_CUSTOMER_ID),
    7: (GOOD_CUSTOMER.replace("49.0", "50.0"), ingest.duplicate("customer_id")),
    8: (f"{cid(6)},,,ACTIVE,NONE,abc,{cid(97)}", ingest.wrong_type("age", "int")),
    9: (f"{cid(7)},yes,,ACTIVE,NONE,30.0,{cid(97)}", ingest.wrong_type("FN", "int")),
    10: (f"{cid(8)},,,ACTIVE,NONE,30.0,{cid(97)},extra", ingest.WRONG_FIELD_COUNT),
    11: (f",,,ACTIVE,NONE,30.0,{cid(97)}", ingest.missing("customer_id")),
    12: (f'"{cid(9)},x",,,ACTIVE,NONE,30.0,{cid(97)}', ingest.BAD_CUSTOMER_ID),  # a quoted comma stays inside
    13: (f'{cid(10)},,,ACT"IVE,NONE,30.0,{cid(97)}', ingest.BAD_QUOTES),
    14: ("", ingest.EMPTY_LINE),
}


def tx(day: str = "2020-09-20", customer: str = cid(1), article: str = "108775015", price: str = "0.0508",
       channel: str = "2") -> str:
    return ",".join([day, customer, article, price, channel])


BROKEN_TRANSACTIONS = {
    2: (tx(), None),
    3: (tx(), None),  # exact duplicates are real purchases
    4: (tx("2020-09-21", article="0110065001", channel="1"), None),
    5: (tx(price="abc"), ingest.wrong_type("price", "double")),
    6: (tx(day="2020-13-01"), ingest.wrong_type("t_dat", "date")),
    7: (tx(day="20-09-2020"), ingest.wrong_type("t_dat", "date")),
    8: (tx(customer=cid(1)[:-2] + "zz"), ingest.BAD_CUSTOMER_ID),
    9: (tx(article="999999999"), ingest.UNKNOWN_ARTICLE),
    10: (tx(article="111565001"), ingest.UNKNOWN_ARTICLE),  # its catalogue line was quarantined
    11: (tx(price="-0.01"), ingest.NEGATIVE_PRICE),
    12: (tx(price="5.0"), ingest.absurd_price(1.0)),
    13: (tx(day="2017-12-31"), ingest.date_too_early("2018-01-01")),
    14: (tx(day="2020-10-01"), ingest.FUTURE_DATE),
    15: (tx(channel="3"), ingest.UNKNOWN_CHANNEL),
    16: (tx(channel="x"), ingest.wrong_type("sales_channel_id", "short")),
    17: (tx(price=""), ingest.missing("price")),
    18: ("2020-09-20,abc,1", ingest.WRONG_FIELD_COUNT),
    19: ("", ingest.EMPTY_LINE),
    20: (tx(article='"108775015'), ingest.BAD_QUOTES),
    21: (tx(price="NaN"), ingest.wrong_type("price", "double")),
}


def _file_lines(spec: dict[int, tuple[str, str | None]]) -> list[str]:
    return [raw for _, (raw, _) in sorted(spec.items())]


@pytest.fixture(scope="module")
def broken(spark, tmp_path_factory):
    """One ingest of hand-written files with every kind of bad row."""
    folder = tmp_path_factory.mktemp("broken")
    raw = write_raw(folder / "raw", _file_lines(BROKEN_ARTICLES), _file_lines(BROKEN_CUSTOMERS),
                    _file_lines(BROKEN_TRANSACTIONS))
    lake = make_lake(spark, folder)
    return lake, ingest.run(lake, str(raw), today=TODAY)


@pytest.mark.parametrize("table,spec", [
    (ARTICLES, BROKEN_ARTICLES), (CUSTOMERS, BROKEN_CUSTOMERS), (TRANSACTIONS, BROKEN_TRANSACTIONS),
])
def test_every_bad_row_lands_in_quarantine_with_its_reason(broken, table, spec):
    lake, report = broken
    expected = {n: (reason, raw) for n, (raw, reason) in spec.items() if reason}
    assert quarantine_by_line(lake, ingest.RAW_FILES[table]) == expected
    good = [n for n, (_, reason) in spec.items() if reason is None]
    f = report.file(table)
    assert (f.rows_read, f.rows_written, f.rows_quarantined, f.rows_skipped) == (
        len(spec), len(good), len(expected), 0
    )
    assert lake.read(table).count() == len(good)
    counts: dict[str, int] = {}
    for reason, _ in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert f.reasons == counts


def test_valid_rows_have_canonical_types_and_values(broken):
    lake, report = broken
    articles = {r.article_id: r for r in lake.read(ARTICLES).collect()}
    assert set(articles) == {"0108775015", "0110065001", "0111609001"}
    assert articles["0108775015"].detail_desc == 'Jersey top, with "straps".'
    assert articles["0110065001"].detail_desc == "Soft bra.\nTwo lines."
    assert articles["0111609001"].detail_desc is None and articles["0111609001"].product_code == 1
    customers = {r.customer_id: r for r in lake.read(CUSTOMERS).collect()}
    assert customers[cid(1)].asDict() == dict(
        customer_id=cid(1), FN=1, Active=1, club_member_status="ACTIVE", fashion_news_frequency="Regularly",
        age=49, postal_code=cid(99),
    )
    assert customers[cid(2)].FN is None and customers[cid(2)].age is None
    assert customers[cid(3)].club_member_status == "ACTIVE" and customers[cid(3)].age == 25
    tx_schema = dict(lake.read(TRANSACTIONS).dtypes)
    assert tx_schema == {"t_dat": "date", "customer_id": "string", "article_id": "string", "price": "double",
                         "sales_channel_id": "smallint", "unit": "int", "t_month": "string"}
    assert rows(lake, TRANSACTIONS) == [  # identical rows are units 1, 2, ... of one purchase: the row key
        (date(2020, 9, 20), cid(1), "0108775015", 0.0508, 2, 1, "2020-09"),
        (date(2020, 9, 20), cid(1), "0108775015", 0.0508, 2, 2, "2020-09"),
        (date(2020, 9, 21), cid(1), "0110065001", 0.0508, 1, 1, "2020-09"),
    ]
    text = report.format()
    assert "transactions_train.csv" in text and ingest.UNKNOWN_ARTICLE in text
    runs = lake.read(INGEST_RUNS).where(f"run_id = '{report.run_id}'").collect()
    assert {r.source_file: (r.rows_read, r.rows_written, r.rows_quarantined) for r in runs} == {
        f.source_file: (f.rows_read, f.rows_written, f.rows_quarantined) for f in report.files
    }


# --- stops before writing -----------------------------------------------------------------------------------
@pytest.fixture()
def clean_raw(tmp_path):
    return write_raw(
        tmp_path / "raw", [article_line("108775015")], [GOOD_CUSTOMER],
        [tx("2020-09-20"), tx("2020-09-21"), tx("2020-09-22")],
    )


def test_header_mismatch_stops_before_anything_is_written(lake, clean_raw):
    path = clean_raw / "transactions_train.csv"
    path.write_text(path.read_text().replace("price,sales_channel_id", "sales_channel_id,price", 1))
    with pytest.raises(ingest.IngestError) as error:
        ingest.run(lake, clean_raw.as_uri(), today=TODAY)  # a URI: the header is read by Spark
    message = str(error.value)
    assert path.as_uri() in message
    assert "expected columns: t_dat, customer_id, article_id, price, sales_channel_id" in message
    assert "found: t_dat, customer_id, article_id, sales_channel_id, price" in message
    assert lake.existing() == []


def test_missing_file_stops_before_anything_is_written(lake, clean_raw):
    (clean_raw / "customers.csv").unlink()
    with pytest.raises(FileNotFoundError, match="customers.csv: file not found"):
        ingest.run(lake, str(clean_raw), today=TODAY)
    assert lake.existing() == []


# --- idempotence, --since, atomicity ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dated(spark, tmp_path_factory):
    """A lake after one full ingest of three days (one bad row on day 1 and one on day 3)."""
    folder = tmp_path_factory.mktemp("dated")
    base = [tx("2020-09-20"), tx("2020-09-20", price="-1"), tx("2020-09-21", price="0.02"),
            tx("2020-09-22", price="0.03"), tx("2020-09-22", channel="9")]
    raw = write_raw(folder / "raw", [article_line("108775015"), article_line("110065001")], [GOOD_CUSTOMER], base)
    lake = make_lake(spark, folder)
    ingest.run(lake, str(raw), today=TODAY)
    return lake, raw


def test_since_replaces_exactly_those_dates(dated, tmp_path):
    lake, _ = dated
    raw = tmp_path / "raw"
    nightly = [
        tx("2020-09-20", price="0.99"),                 # an old day, changed: must be left alone
        tx("2020-09-21", price="0.02"),
        tx("2020-09-22", price="0.04", channel="1"),    # day 3 restated
        tx("2020-09-23", article="110065001"),          # the new day
        tx("2020-09-23", price="abc"),                  # a new bad row
    ]
    write_raw(raw, [article_line("108775015"), article_line("110065001")], [GOOD_CUSTOMER], nightly)
    before = rows(lake, TRANSACTIONS)
    report = ingest.run(lake, str(raw), since="2020-09-22", today=TODAY)
    f = report.file(TRANSACTIONS)
    assert (f.rows_read, f.rows_written, f.rows_quarantined, f.rows_skipped) == (5, 2, 1, 2)
    after = rows(lake, TRANSACTIONS)
    assert [r for r in after if r[0] < date(2020, 9, 22)] == [r for r in before if r[0] < date(2020, 9, 22)]
    assert [(r[0], r[2], r[3], r[4]) for r in after if r[0] >= date(2020, 9, 22)] == [
        (date(2020, 9, 22), "0108775015", 0.04, 1), (date(2020, 9, 23), "0110065001", 0.0508, 2),
    ]
    bad = lake.read(QUARANTINE).where("source_file = 'transactions_train.csv'").collect()
    assert sorted((str(r.t_dat), r.reason) for r in bad) == [
        ("2020-09-20", ingest.NEGATIVE_PRICE),       # from the first run, outside the replaced dates
        ("2020-09-23", ingest.wrong_type("price", "double")),
    ]


def test_failure_half_way_leaves_every_table_as_it_was(dated, monkeypatch):
    lake, raw = dated
    before = {t: rows(lake, t) for t in (*DATA_TABLES, QUARANTINE, INGEST_RUNS)}
    real_write = Lakehouse.write

    def failing_write(self, df, name, *args, **kwargs):
        if name == QUARANTINE:  # articles, customers and transactions are already written by then
            raise RuntimeError("disk full")
        return real_write(self, df, name, *args, **kwargs)

    monkeypatch.setattr(Lakehouse, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest.run(lake, str(raw), since="2020-09-21", today=TODAY)
    monkeypatch.undo()
    for table, old in before.items():
        assert rows(lake, table) == old, table


# --- the real Kaggle formatting -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(spark, tmp_path_factory):
    heads = REAL / "raw-head"
    if not (heads / "transactions_train_head10k.csv").exists() or not (REAL / "articles.parquet").exists():
        pytest.skip("real H&M files not present under ../shared/data/hm-real")
    folder = tmp_path_factory.mktemp("real")
    raw = folder / "raw"
    raw.mkdir()
    shutil.copy(heads / "transactions_train_head10k.csv", raw / "transactions_train.csv")
    shutil.copy(heads / "customers_head10k.csv", raw / "customers.csv")
    truth = pd.read_csv(raw / "transactions_train.csv", dtype=str)
    articles = pd.read_parquet(REAL / "articles.parquet")
    # the catalogue the head needs, plus every description with quotes and some empty ones
    keep = (articles.article_id.isin(truth.article_id.str.zfill(10))
            | articles.detail_desc.str.contains('"', na=False)
            | articles.index.isin(articles.index[articles.detail_desc.isna()][:20]))
    articles = articles[keep].assign(article_id=lambda a: a.article_id.astype("int64"))
    articles.to_csv(raw / "articles.csv", index=False)  # Kaggle formatting: no leading zero, quoted text
    lake = make_lake(spark, folder)
    report = ingest.run(lake, raw.as_uri(), today=TODAY)  # a URI: the catalogue is read by Spark
    return lake, raw, report, truth, articles


def test_real_heads_ingest_completely_with_canonical_ids(real):
    lake, raw, report, truth, articles = real
    assert [(f.rows_read, f.rows_written, f.rows_quarantined) for f in report.files] == [
        (len(articles), len(articles), 0), (10_000, 10_000, 0), (10_000, 10_000, 0),
    ]
    tx = lake.read(TRANSACTIONS).toPandas()
    assert sorted(tx.article_id) == sorted(truth.article_id.str.zfill(10))
    assert tx.price.sum() == pytest.approx(truth.price.astype(float).sum())
    assert sorted(tx.customer_id) == sorted(truth.customer_id)
    got = lake.read(ARTICLES).toPandas().set_index("article_id").sort_index()
    want = articles.assign(article_id=articles.article_id.astype(str).str.zfill(10)).set_index("article_id")
    assert got.detail_desc.fillna("<none>").equals(want.detail_desc.sort_index().fillna("<none>"))
    customers = lake.read(CUSTOMERS).toPandas()
    real_ages = pd.read_csv(raw / "customers.csv").age
    assert customers.age.isna().sum() == real_ages.isna().sum()
    assert customers.age.sum() == real_ages.sum()


def test_rerun_gives_the_same_tables(real):
    lake, raw, report, _, _ = real
    before = {t: rows(lake, t, drop=("run_id", "ingested_at")) for t in (*DATA_TABLES, QUARANTINE)}
    again = ingest.run(lake, str(raw), today=TODAY)
    assert [f.rows_written for f in again.files] == [f.rows_written for f in report.files]
    for table, old in before.items():
        assert rows(lake, table, drop=("run_id", "ingested_at")) == old, table
    assert lake.read(INGEST_RUNS).select("run_id").distinct().count() == 2
