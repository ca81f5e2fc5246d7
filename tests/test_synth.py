"""The synthetic generator: Kaggle formatting byte for byte, determinism, realism, and the compare report."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys import synth
from recsys.config import PROJECT_ROOT, load_config
from recsys.tables import RAW_COLUMNS

REAL_HEAD = PROJECT_ROOT.parent / "shared" / "data" / "hm-real" / "raw-head"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _cfg(**changes):
    return dataclasses.replace(load_config("tiny").synth, **changes)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_tiny")
    stats = synth.generate(_cfg(), str(out))
    return out, stats


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_three_kaggle_files_with_exact_headers(tiny_dir):
    out, stats = tiny_dir
    for name, columns in RAW_COLUMNS.items():
        path = out / {"articles": "articles.csv", "customers": "customers.csv",
                      "transactions": "transactions_train.csv"}[name]
        assert path.read_text().split("\n", 1)[0] == ",".join(columns)
    assert stats["rows"]["articles"] == 400 and stats["rows"]["customers"] == 1500
    assert stats["rows"]["transactions"] > 10_000
    assert stats["seconds"] < 30


def test_transactions_lines_follow_the_kaggle_format(tiny_dir):
    out, _ = tiny_dir
    line = re.compile(r"^\d{4}-\d{2}-\d{2},[0-9a-f]{64},[1-9]\d{0,8},0\.\d{1,16},[12]$")
    lines = (out / "transactions_train.csv").read_text().splitlines()[1:]
    bad = [x for x in lines if not line.match(x)]
    assert not bad, bad[:3]
    dates = [x[:10] for x in lines]
    assert dates == sorted(dates) and dates[0] >= "2018-09-20" and dates[-1] <= "2020-09-22"


@pytest.mark.skipif(not REAL_HEAD.is_dir(), reason="real raw heads not present")
def test_parsed_the_same_way_as_the_real_heads(tiny_dir):
    out, _ = tiny_dir
    for real_name, ours in [("transactions_train_head10k.csv", "transactions_train.csv"),
                            ("customers_head10k.csv", "customers.csv")]:
        real = pd.read_csv(REAL_HEAD / real_name)
        mine = pd.read_csv(out / ours)
        assert list(real.columns) == list(mine.columns)
        assert dict(real.dtypes.astype(str)) == dict(mine.dtypes.astype(str)), real_name
    # the same textual conventions for empty fields and floats in customers.csv
    real_rows = list(csv.reader((REAL_HEAD / "customers_head10k.csv").open()))[1:]
    my_rows = list(csv.reader((out / "customers.csv").open()))[1:]
    for column in (1, 2, 5):
        assert {r[column] for r in my_rows if not r[column].replace(".", "").isdigit()} <= {""}
        assert {r[column][-2:] for r in my_rows if r[column]} == {r[column][-2:] for r in real_rows if r[column]}


def test_customers_follow_the_empty_field_conventions(tiny_dir):
    out, _ = tiny_dir
    rows = list(csv.reader((out / "customers.csv").open()))[1:]
    assert all(HEX64.match(r[0]) and HEX64.match(r[6]) for r in rows)
    assert {r[1] for r in rows} == {"", "1.0"} and {r[2] for r in rows} == {"", "1.0"}
    assert all(r[5] == "" or re.fullmatch(r"\d{2}\.0", r[5]) for r in rows)
    assert {r[3] for r in rows} <= {"ACTIVE", "PRE-CREATE", "LEFT CLUB", ""}
    assert {r[4] for r in rows} <= {"NONE", "Regularly", "Monthly", "None", ""}
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_articles_csv_quotes_free_text_and_keeps_25_columns(tiny_dir):
    out, _ = tiny_dir
    text = (out / "articles.csv").read_text()
    rows = list(csv.reader(text.splitlines()))
    assert all(len(r) == 25 for r in rows)
    descs = [r[24] for r in rows[1:]]
    assert any("," in d for d in descs) and any('"' in d for d in descs)
    assert '""' in text  # quotes inside a quoted field are doubled, as Kaggle's file does
    ids = [r[0] for r in rows[1:]]
    assert all(re.fullmatch(r"[1-9]\d{8}", i) for i in ids) and len(set(ids)) == len(ids)
    frame = pd.read_csv(out / "articles.csv")
    assert frame["product_code"].eq(frame["article_id"] // 1000).all()


def test_every_transaction_article_is_in_the_catalogue(tiny_dir):
    out, _ = tiny_dir
    t = pd.read_csv(out / "transactions_train.csv", dtype={"article_id": str, "customer_id": str})
    a = pd.read_csv(out / "articles.csv", dtype={"article_id": str})
    c = pd.read_csv(out / "customers.csv", dtype={"customer_id": str})
    assert t["article_id"].isin(set(a["article_id"])).all()
    assert t["customer_id"].isin(set(c["customer_id"])).all()


def test_price_text_is_sek_over_590_truncated_like_kaggle():
    assert synth.format_price(2999) == "0.0508305084745762"
    assert synth.format_price(499) == "0.008457627118644"
    assert synth.format_price(2124) == "0.036"
    assert synth.format_price(999) == "0.0169322033898305"


def test_same_seed_same_bytes_other_seed_differs(tiny_dir, tmp_path):
    out, _ = tiny_dir
    small = _cfg(n_customers=300, n_articles=120)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.generate(small, str(a))
    synth.generate(small, str(b))
    synth.generate(dataclasses.replace(small, seed=7), str(c))
    for name in ("articles.csv", "customers.csv", "transactions_train.csv"):
        assert _sha(a / name) == _sha(b / name), name
        assert _sha(a / name) != _sha(c / name), name
