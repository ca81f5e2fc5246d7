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

from recsys import realism, synth
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


def test_tiny_statistics_are_roughly_real(tiny_dir):
    """The scale-free statistics already hold on 1,500 customers (wider bands than compare's ±20 %)."""
    out, _ = tiny_dir
    stats = realism.measure(str(out))["stats"]
    expect = {"rows_per_customer_mean": (23.2, 0.25), "rows_per_customer_median": (9, 0.35),
              "channel2_share": (0.69, 0.3), "basket_rows": (3.12, 0.3), "rows_per_active_mean": (3.48, 0.3),
              "fn_empty": (0.67, 0.1), "age_p25": (24, 0.15), "age_p50": (31, 0.15), "age_p75": (48, 0.15),
              "club_active": (0.92, 0.05), "news_none": (0.66, 0.1), "active_share": (0.05, 0.5)}
    for key, (real, tol) in expect.items():
        assert abs(stats[key] / real - 1) <= tol, (key, stats[key], real)
    assert 0.5 < stats["price_p50"] / 0.0339 < 1.5


def test_compare_flags_a_statistic_outside_the_band(tiny_dir, tmp_path):
    out, _ = tiny_dir
    report = realism.compare(str(out))
    assert {r["key"] for r in report["rows"]} == {s[0] for s in realism.REAL_STATS}
    assert "channel2_share" not in report["outside"] and "fn_empty" not in report["outside"]
    # the same data, but every sale in a store: channel 2 share drops to 0 and must be flagged
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("articles.csv", "customers.csv"):
        (broken / name).write_bytes((out / name).read_bytes())
    lines = (out / "transactions_train.csv").read_text().splitlines()
    (broken / "transactions_train.csv").write_text("\n".join([lines[0]] + [x[:-1] + "1" for x in lines[1:]]) + "\n")
    report = realism.compare(str(broken))
    assert "channel2_share" in report["outside"] and not report["passed"]
    row = next(r for r in report["rows"] if r["key"] == "channel2_share")
    assert row["synthetic"] == 0 and row["ok"] is False
    text = realism.format_report(report)
    assert "OUT" in text and "channel2_share" in text.splitlines()[-1]


def test_compare_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="articles.csv"):
        realism.compare(str(tmp_path))


def _catalogue_source(tiny_dir) -> pd.DataFrame:
    """A small 'real' catalogue: the generated one with other ids, product types and names."""
    out, _ = tiny_dir
    frame = pd.read_csv(out / "articles.csv", dtype=str, keep_default_na=False, na_values=[""]).head(150)
    frame["article_id"] = [f"{(500_000 + i // 2) * 1000 + 1 + i % 2:010d}" for i in range(len(frame))]
    frame["product_code"] = [str(500_000 + i // 2) for i in range(len(frame))]
    frame["product_type_name"] = frame["product_type_name"] + " X"
    return frame


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_articles_path_uses_the_given_catalogue(tiny_dir, tmp_path, fmt):
    source = _catalogue_source(tiny_dir)
    path = tmp_path / f"catalogue.{fmt}"
    if fmt == "parquet":
        source.to_parquet(path)  # article_id as a 10-digit string, as in the real articles.parquet
    else:
        written = source.assign(article_id=source["article_id"].astype(int))  # Kaggle CSV: no leading zero
        written.to_csv(path, index=False)
    out = tmp_path / "out"
    stats = synth.generate(_cfg(n_customers=300, articles_path=str(path)), str(out))
    assert stats["rows"]["articles"] == len(source)
    articles = pd.read_csv(out / "articles.csv", dtype=str, keep_default_na=False, na_values=[""])
    assert list(articles["article_id"]) == [a.lstrip("0") for a in source["article_id"]]
    assert list(articles["product_type_name"]) == list(source["product_type_name"])
    t = pd.read_csv(out / "transactions_train.csv", dtype={"article_id": str})
    assert len(t) > 1000 and t["article_id"].isin(set(articles["article_id"])).all()


def test_articles_path_errors_name_the_file_row_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        synth.generate(_cfg(articles_path=str(tmp_path / "nope.csv")), str(tmp_path / "o"))
    bad = tmp_path / "bad.csv"
    bad.write_text("article_id,product_code\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv.*missing article columns"):
        synth.generate(_cfg(articles_path=str(bad)), str(tmp_path / "o"))
    row = {c: "1" for c in RAW_COLUMNS["articles"]}
    frame = pd.DataFrame([row, {**row, "article_id": "2", "colour_group_code": "red"}])
    frame.to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad.csv: row 3: field colour_group_code 'red'"):
        synth.generate(_cfg(articles_path=str(bad)), str(tmp_path / "o"))


def test_planted_taste_is_learnable(tmp_path):
    """Customers' own history beats global popularity, and the planted segment taste explains purchases.

    The catalogue is sized so that 12 articles are a small share of it, as in the real data.
    """
    cfg = _cfg(n_customers=4000, n_articles=8000)
    synth.generate(cfg, str(tmp_path))
    t = pd.read_csv(tmp_path / "transactions_train.csv", dtype={"article_id": str})
    cut = "2020-09-09"
    train, test = t[t["t_dat"] < cut], t[t["t_dat"] >= cut]
    recent = train[train["t_dat"] >= "2020-08-26"]["article_id"].value_counts()
    popular = list(recent.index[:12])
    truth = test.groupby("customer_id")["article_id"].apply(set)

    def recall(recommend) -> float:
        return float(np.mean([len(set(recommend(c)) & bought) / len(bought) for c, bought in truth.items()]))

    history = train[train["t_dat"] >= "2020-06-01"].drop_duplicates(["customer_id", "article_id"], keep="last")
    past = history.groupby("customer_id")["article_id"].apply(lambda s: list(s)[::-1][:12])

    def with_history(customer):
        mine = past.get(customer, [])[:12]
        return mine + [a for a in popular if a not in mine][: 12 - len(mine)]

    baseline = recall(lambda c: popular)
    assert len(truth) > 200
    print("recall popularity", baseline, "history", recall(with_history))
    assert recall(with_history) > 1.2 * baseline

    # the segment of a customer (known only to the generator) sharpens the ranking of recent best sellers
    frame = synth.make_articles(cfg.n_articles, cfg.seed)
    cat = synth.build_catalogue(frame, cfg.seed, synth._n_days(cfg))
    affinity = synth.segment_affinity(cat, cfg.seed)
    segment = synth.customer_segments(cfg).set_index("customer_id")["segment"]
    position = pd.Series(np.arange(len(frame)), index=frame["article_id"].str.lstrip("0"))
    candidates = recent.index[:300]
    score = (np.log1p(recent.loc[candidates].to_numpy(float))[None, :]
             + np.log(affinity[segment.loc[truth.index].to_numpy()][:, position.loc[candidates].to_numpy()]))
    top = np.argsort(-score, axis=1)[:, :12]
    oracle = float(np.mean([len(set(candidates[r]) & bought) / len(bought) for r, bought in zip(top, truth)]))
    print("oracle", oracle)
    assert oracle > 1.15 * baseline


def test_short_date_ranges_and_tiny_sizes_work(tmp_path):
    """Other stages' tests generate a few days for a handful of customers: rows scale with the range."""
    short = _cfg(n_customers=200, n_articles=30, start_date="2020-09-01", end_date="2020-09-14")
    stats = synth.generate(short, str(tmp_path / "short"))
    t = pd.read_csv(tmp_path / "short" / "transactions_train.csv")
    assert t["t_dat"].min() >= "2020-09-01" and t["t_dat"].max() <= "2020-09-14"
    expected = 200 * 23.2 * 14 / 734
    assert expected / 3 < stats["rows"]["transactions"] < expected * 3
    one = synth.generate(_cfg(n_customers=1, n_articles=1), str(tmp_path / "one"))
    assert one["rows"]["customers"] == 1 and one["rows"]["transactions"] >= 1
    with pytest.raises(ValueError, match="end_date"):
        synth.generate(_cfg(start_date="2020-09-14", end_date="2020-09-01"), str(tmp_path / "bad"))
