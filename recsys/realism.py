"""The realism report: any folder of Kaggle-format CSVs measured with DATA.md's statistics, beside DATA.md and
the real sample files, each flagged when it is outside ±20 %.

Why: `recsys synth` claims its data is shaped like H&M's; this is where that claim is checked (`recsys synth
--compare DIR`). It streams the transactions file once, so it runs on 31.8 M rows in bounded memory.
"""
from __future__ import annotations

import functools
import math
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.config import PROJECT_ROOT
from recsys.synth import REAL_N_ARTICLES, REAL_N_CUSTOMERS
from recsys.tables import ARTICLES, CUSTOMERS, RAW_COLUMNS, RAW_FILES, TRANSACTIONS

REAL_DIR = PROJECT_ROOT.parent / "shared" / "data" / "hm-real"
TOLERANCE = 0.20
HEAD_STATS = {"top1_share", "top10_share", "recall12_top_sellers"}
_WEEK = "last 7 days"
_TWO_YEARS = "two years"
# key, section, label, DATA.md value, flagged (False: shown for information only, e.g. maxima of a sample)
REAL_STATS: list[tuple[str, str, str, float, bool]] = [
    ("active_share", _WEEK, "active customers / all customers", 68_984 / REAL_N_CUSTOMERS, True),
    ("distinct_article_share", _WEEK, "distinct articles / catalogue", 17_986 / REAL_N_ARTICLES, True),
    ("rows_per_active_mean", _WEEK, "rows per active customer: mean", 3.48, True),
    ("rows_per_active_median", _WEEK, "rows per active customer: median", 2, True),
    ("rows_per_active_p90", _WEEK, "rows per active customer: p90", 7, True),
    ("rows_per_active_p99", _WEEK, "rows per active customer: p99", 17, True),
    ("rows_per_active_max", _WEEK, "rows per active customer: max", 104, False),
    ("duplicate_share", _WEEK, "exact duplicate rows", 0.093, True),
    ("basket_rows", _WEEK, "rows per same-day basket", 3.12, True),
    ("days_per_active", _WEEK, "purchase days per active customer", 1.12, True),
    ("top1_share", _WEEK, "share of rows: top-1 article (k scaled to catalogue)", 0.0035, True),
    ("top10_share", _WEEK, "share of rows: top-10 articles (scaled)", 0.024, True),
    ("top100_share", _WEEK, "share of rows: top-100 articles (scaled)", 0.134, True),
    ("top1000_share", _WEEK, "share of rows: top-1000 articles (scaled)", 0.50, True),
    ("gini", _WEEK, "Gini of rows over sold articles", 0.74, True),
    ("channel2_share", _WEEK, "sales channel 2 share", 0.69, True),
    ("daily_rows_min_per_1k", _WEEK, "daily rows per 1,000 customers: min", 27_028 / 1371.98, True),
    ("daily_rows_max_per_1k", _WEEK, "daily rows per 1,000 customers: max", 40_718 / 1371.98, True),
    ("price_p5", _WEEK, "price p5", 0.0098, True),
    ("price_p25", _WEEK, "price p25", 0.0186, True),
    ("price_p50", _WEEK, "price p50", 0.0339, True),
    ("price_p75", _WEEK, "price p75", 0.0424, True),
    ("price_p95", _WEEK, "price p95", 0.0678, True),
    ("price_p99", _WEEK, "price p99", 0.119, True),
    ("price_max", _WEEK, "price max", 0.507, False),
    ("recency_share", _WEEK, "rows of last 3 days whose article sold in the 4 days before", 0.955, True),
    ("recall12_top_sellers", _WEEK, "recall@12 of the 4 days' best sellers over the next 3 (k scaled)", 0.024, True),
    ("rows_per_customer_mean", _TWO_YEARS, "rows per customer: mean", 23.2, True),
    ("rows_per_customer_median", _TWO_YEARS, "rows per customer: median", 9, True),
    ("rows_per_customer_p90", _TWO_YEARS, "rows per customer: p90", 61, True),
    ("fn_empty", "customers", "FN empty", 0.67, True),
    ("active_empty", "customers", "Active empty", 0.68, True),
    ("age_p10", "customers", "age p10", 21, True),
    ("age_p25", "customers", "age p25", 24, True),
    ("age_p50", "customers", "age p50", 31, True),
    ("age_p75", "customers", "age p75", 48, True),
    ("age_p90", "customers", "age p90", 56, True),
    ("club_active", "customers", "club_member_status ACTIVE", 0.92, True),
    ("club_pre_create", "customers", "club_member_status PRE-CREATE", 0.075, True),
    ("news_none", "customers", "fashion_news_frequency NONE", 0.66, True),
    ("news_regularly", "customers", "fashion_news_frequency Regularly", 0.33, True),
    ("articles_per_product", "articles", "articles per product code", REAL_N_ARTICLES / 47_224, True),
    ("share_ladieswear", "articles", "index group Ladieswear", 39_737 / REAL_N_ARTICLES, True),
    ("share_baby_children", "articles", "index group Baby/Children", 34_711 / REAL_N_ARTICLES, True),
    ("share_divided", "articles", "index group Divided", 15_149 / REAL_N_ARTICLES, True),
    ("share_menswear", "articles", "index group Menswear", 12_553 / REAL_N_ARTICLES, True),
    ("share_sport", "articles", "index group Sport", 3_392 / REAL_N_ARTICLES, True),
    ("empty_detail_desc", "articles", "empty detail_desc", 416 / REAL_N_ARTICLES, False),
]


def week_stats(week: pd.DataFrame, n_customers: int, n_articles: int) -> dict[str, float]:
    """DATA.md's one-week statistics for any week of transactions (t_dat ISO strings or dates).

    Customer and catalogue counts make them comparable across scales: shares of all customers, daily rows per
    1,000 customers, and top-k with k scaled to the catalogue (k * n_articles / 105,542, read off the
    cumulative-share curve, so a 10,000-article catalogue's "top-1000" is its top 95).
    """
    week = week.assign(t_dat=week["t_dat"].astype(str))
    per_customer = week.groupby("customer_id").size().to_numpy()
    counts = np.sort(week["article_id"].value_counts().to_numpy())[::-1]
    curve = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    scale = n_articles / REAL_N_ARTICLES
    asc = counts[::-1].astype(float)
    lorenz = np.cumsum(asc) / asc.sum()
    gini = float((len(asc) + 1 - 2 * lorenz.sum()) / len(asc))
    daily = week.groupby("t_dat").size()
    days = sorted(daily.index)
    split = days[-3] if len(days) >= 4 else days[-1]
    before, after = week[week["t_dat"] < split], week[week["t_dat"] >= split]
    # recall@k of the best sellers for k = 1..12, read at k = 12 * scale (like top-k above)
    sellers = before["article_id"].value_counts().index[:12]
    bought = after.drop_duplicates(["customer_id", "article_id"])
    rank = bought["article_id"].map({a: i for i, a in enumerate(sellers)})
    per_k = [0.0] + [(rank < k).groupby(bought["customer_id"]).mean().mean() for k in range(1, len(sellers) + 1)]
    recall = float(np.interp(12 * n_articles / REAL_N_ARTICLES, np.arange(len(per_k)), per_k)) if len(bought) else 0.0
    stats = {
        "active_share": len(per_customer) / n_customers,
        "distinct_article_share": len(counts) / n_articles,
        "rows_per_active_mean": per_customer.mean(),
        "rows_per_active_median": np.median(per_customer),
        "rows_per_active_p90": np.percentile(per_customer, 90),
        "rows_per_active_p99": np.percentile(per_customer, 99),
        "rows_per_active_max": per_customer.max(),
        "duplicate_share": week.duplicated().mean(),
        "basket_rows": week.groupby(["customer_id", "t_dat"]).size().mean(),
        "days_per_active": week.groupby("customer_id")["t_dat"].nunique().mean(),
        "gini": gini,
        "channel2_share": (week["sales_channel_id"].astype(int) == 2).mean(),
        "daily_rows_min_per_1k": daily.min() / n_customers * 1000,
        "daily_rows_max_per_1k": daily.max() / n_customers * 1000,
        "recency_share": after["article_id"].isin(set(before["article_id"])).mean(),
        "recall12_top_sellers": recall,
        "price_max": week["price"].max(),
    }
    for k in (1, 10, 100, 1000):
        stats[f"top{k}_share"] = float(np.interp(k * scale, np.arange(len(curve)), curve))
    for q in (5, 25, 50, 75, 95, 99):
        stats[f"price_p{q}"] = float(np.percentile(week["price"], q))
    return {k: float(v) for k, v in stats.items()}


def customer_stats(customers: pd.DataFrame) -> dict[str, float]:
    """Empty-field shares, age quantiles and status shares of customers.csv (read with empty as NaN)."""
    age = customers["age"].dropna()
    club = customers["club_member_status"].fillna("")
    news = customers["fashion_news_frequency"].fillna("")
    stats = {
        "fn_empty": customers["FN"].isna().mean(),
        "active_empty": customers["Active"].isna().mean(),
        "club_active": (club == "ACTIVE").mean(),
        "club_pre_create": (club == "PRE-CREATE").mean(),
        "news_none": (news == "NONE").mean(),
        "news_regularly": (news == "Regularly").mean(),
    }
    for q in (10, 25, 50, 75, 90):
        stats[f"age_p{q}"] = float(np.percentile(age, q)) if len(age) else float("nan")
    return {k: float(v) for k, v in stats.items()}


def catalogue_stats(articles: pd.DataFrame) -> dict[str, float]:
    """Index group shares, colour variants per product and empty descriptions of a catalogue."""
    group = articles["index_group_name"].value_counts(normalize=True)
    stats = {
        "articles_per_product": len(articles) / articles["product_code"].nunique(),
        "empty_detail_desc": articles["detail_desc"].isna().mean(),
    }
    for name in ("Ladieswear", "Baby/Children", "Divided", "Menswear", "Sport"):
        stats["share_" + name.lower().replace("/", "_")] = float(group.get(name, 0.0))
    return {k: float(v) for k, v in stats.items()}


def history_stats(rows_per_customer: np.ndarray) -> dict[str, float]:
    """Two-year rows per customer, customers without purchases included as zeros."""
    return {
        "rows_per_customer_mean": float(np.mean(rows_per_customer)),
        "rows_per_customer_median": float(np.median(rows_per_customer)),
        "rows_per_customer_p90": float(np.percentile(rows_per_customer, 90)),
    }


def _scan_transactions(path: Path, sampled: set[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Stream transactions_train.csv once: keep the last 7 days (the file is sorted by date) and count the
    rows of a sample of customers, so that compare works on 31.8 M rows in bounded memory."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv as pacsv

    types = {"t_dat": pa.string(), "customer_id": pa.string(), "article_id": pa.string(),
             "price": pa.float64(), "sales_channel_id": pa.int8()}
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=64 << 20),
                            convert_options=pacsv.ConvertOptions(column_types=types))
    header = reader.schema.names
    if header != RAW_COLUMNS[TRANSACTIONS]:
        raise ValueError(f"{path}: header {header} is not the Kaggle header {RAW_COLUMNS[TRANSACTIONS]}")
    sample_set = pa.array(sorted(sampled), pa.string())
    kept: list[pa.Table] = []
    latest = ""
    counts: dict[str, int] = {}
    for batch in reader:
        table = pa.Table.from_batches([batch])
        if table.num_rows == 0:
            continue
        mine = table.filter(pc.is_in(table["customer_id"], value_set=sample_set))
        for cid, n in zip(*np.unique(mine["customer_id"].to_numpy(zero_copy_only=False), return_counts=True)):
            counts[cid] = counts.get(cid, 0) + int(n)
        latest = max(latest, pc.max(table["t_dat"]).as_py())
        floor = str(date.fromisoformat(latest) - timedelta(days=6))
        kept = [t.filter(pc.greater_equal(t["t_dat"], floor)) for t in kept]
        kept.append(table.filter(pc.greater_equal(table["t_dat"], floor)))
    week = pa.concat_tables(kept).to_pandas() if kept else pd.DataFrame(columns=header)
    return week, counts


def measure(directory: str) -> dict:
    """Every statistic of REAL_STATS measured on a folder holding the three Kaggle-format CSVs."""
    root = Path(directory)
    for name in (ARTICLES, CUSTOMERS, TRANSACTIONS):
        if not (root / RAW_FILES[name]).exists():
            raise FileNotFoundError(f"{root / RAW_FILES[name]} not found (compare needs the three Kaggle CSVs)")
    articles = pd.read_csv(root / RAW_FILES[ARTICLES], dtype={"article_id": str},
                           usecols=["article_id", "product_code", "index_group_name", "detail_desc"])
    customers = pd.read_csv(root / RAW_FILES[CUSTOMERS], dtype={"customer_id": str, "postal_code": str})
    n_customers, n_articles = len(customers), len(articles)
    # Customers of the two-year statistic: all of them up to 200k, else those whose id starts with '0'
    # (ids are hashes, so this is a random 1/16).
    ids = customers["customer_id"]
    sample = ids if len(ids) <= 200_000 else ids[ids.str.startswith("0")]
    week, counts = _scan_transactions(root / RAW_FILES[TRANSACTIONS], set(sample))
    rows = np.array([counts.get(c, 0) for c in sample])
    stats = {**week_stats(week, n_customers, n_articles), **history_stats(rows),
             **customer_stats(customers), **catalogue_stats(articles)}
    return {"dir": str(root), "n_articles": n_articles, "n_customers": n_customers,
            "week": [str(week["t_dat"].min()), str(week["t_dat"].max())], "week_rows": len(week),
            "history_customers": len(sample), "stats": stats}


@functools.lru_cache(maxsize=4)
def measure_real(real_dir: Path = REAL_DIR) -> dict[str, float]:
    """The same statistics on the real files in ../shared/data/hm-real, where present (never copied)."""
    stats: dict[str, float] = {}
    week_file = real_dir / "transactions_2020-09-16_to_22.parquet"
    if week_file.exists():
        week = pd.read_parquet(week_file)
        stats.update(week_stats(week, REAL_N_CUSTOMERS, REAL_N_ARTICLES))
    if (real_dir / "articles.parquet").exists():
        stats.update(catalogue_stats(pd.read_parquet(
            real_dir / "articles.parquet", columns=["article_id", "product_code", "index_group_name", "detail_desc"])))
    head = real_dir / "raw-head" / "customers_head10k.csv"
    if head.exists():
        stats.update(customer_stats(pd.read_csv(head)))
    return stats


def compare(directory: str, real_dir: Path | None = None) -> dict:
    """DIR's statistics next to DATA.md's (and the real files' when present); flags those outside ±20 %."""
    measured = measure(directory)
    real = measure_real(real_dir or REAL_DIR) if (real_dir or REAL_DIR).is_dir() else {}
    rows = []
    for key, section, label, reference, flagged in REAL_STATS:
        value = measured["stats"].get(key, float("nan"))
        deviation = value / reference - 1 if reference else float("nan")
        # The extreme head ("the top-1 / top-10 / 12 best sellers of 105,542") has no counterpart in a much
        # smaller catalogue (a 10,000-article catalogue's scaled "top-10" is one article): shown, judged only
        # from half the real catalogue size up.
        measurable = key not in HEAD_STATS or measured["n_articles"] >= REAL_N_ARTICLES / 2
        ok = bool(abs(deviation) <= TOLERANCE) if flagged and measurable else None
        rows.append({"key": key, "section": section, "label": label, "synthetic": value, "data_md": reference,
                     "real_files": real.get(key), "deviation": deviation, "ok": ok})
    outside = [r["key"] for r in rows if r["ok"] is False]
    return {**{k: v for k, v in measured.items() if k != "stats"}, "tolerance": TOLERANCE, "rows": rows,
            "outside": outside, "passed": not outside}


def format_report(report: dict) -> str:
    """A plain table: statistic, this data, DATA.md, real files, deviation, and OK / OUT / info."""
    def num(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"

    lines = [f"synthetic data: {report['dir']}  ({report['n_articles']:,} articles, {report['n_customers']:,} "
             f"customers; week {report['week'][0]} .. {report['week'][1]}, {report['week_rows']:,} rows; "
             f"two-year counts over {report['history_customers']:,} customers)",
             f"week rows per catalogue article: {report['week_rows'] / max(report['n_articles'], 1):.2f} (real "
             f"{240_311 / REAL_N_ARTICLES:.2f}); far below that, the popularity and recency statistics reflect "
             f"sparse sampling rather than the generator",
             f"{'statistic':<66} {'this data':>10} {'DATA.md':>10} {'real files':>10} {'dev':>7}  check"]
    section = None
    for r in report["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines.append(f"-- {section}")
        check = "info" if r["ok"] is None else ("ok" if r["ok"] else "OUT")
        dev = "-" if math.isnan(r["deviation"]) else f"{r['deviation']:+.0%}"
        lines.append(f"{r['label'][:66]:<66} {num(r['synthetic']):>10} {num(r['data_md']):>10} "
                     f"{num(r['real_files']):>10} {dev:>7}  {check}")
    verdict = ("all flagged statistics within ±{:.0%}".format(report["tolerance"]) if report["passed"] else
               f"{len(report['outside'])} outside ±{report['tolerance']:.0%}: {', '.join(report['outside'])}")
    lines.append(verdict)
    return "\n".join(lines)
