"""Time-aware split: train on everything before a cut-off, test on the days from it (Kaggle's rule).

A random split would leak the future into training; every date boundary in the project is "strictly before"
the cut-off, and the helpers here are the one place that turns a date into that filter.
"""
from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F


def as_date(value: dt.date | str, name: str = "date") -> dt.date:
    """'2020-09-22' or a date -> date; anything else is an error that names the parameter."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a date in YYYY-MM-DD form") from None


def days_before(as_of: dt.date | str, date_col: str = "t_dat") -> Column:
    """Whole days from `date_col` to the cut-off: 1 for the day before `as_of`, 0 on `as_of` itself."""
    return F.datediff(F.lit(as_date(as_of, "as_of")), F.col(date_col))


def before(df: DataFrame, as_of: dt.date | str, days: int | None = None, date_col: str = "t_dat") -> DataFrame:
    """Rows strictly before `as_of` (and, with `days`, no older than `days` days: the last `days` dates)."""
    cutoff = as_date(as_of, "as_of")
    out = df.filter(F.col(date_col) < F.lit(cutoff))
    if days is not None:
        out = out.filter(F.col(date_col) >= F.lit(cutoff - dt.timedelta(days=days)))
    return out


def split(transactions: DataFrame, test_start: dt.date | str, test_days: int = 7) -> tuple[DataFrame, DataFrame]:
    """(train, test): train is every row before `test_start`, test the `test_days` days from it."""
    if test_days < 1:
        raise ValueError(f"test_days must be at least 1, got {test_days}")
    start = as_date(test_start, "test_start")
    end = start + dt.timedelta(days=test_days)
    train = transactions.filter(F.col("t_dat") < F.lit(start))
    test = transactions.filter((F.col("t_dat") >= F.lit(start)) & (F.col("t_dat") < F.lit(end)))
    return train, test


def evaluation_customers(test_df: DataFrame) -> DataFrame:
    """The customers scored by MAP@12: those who bought something in the test window (Kaggle's rule)."""
    return test_df.select("customer_id").distinct()


def last_date(transactions: DataFrame) -> dt.date:
    """The last transaction date; an empty table is an error, not a silent None."""
    last = transactions.agg(F.max("t_dat").alias("last")).first()["last"]
    if last is None:
        raise ValueError("transactions: the table is empty, so there is no last date to split on")
    return last


def day_after_last_purchase(transactions: DataFrame) -> dt.date:
    """The snapshot date that sees every purchase: what scoring, publishing and the nightly run use."""
    return last_date(transactions) + dt.timedelta(days=1)


def default_test_start(transactions: DataFrame, test_days: int = 7) -> dt.date:
    """The first day of the last `test_days` days of data (2020-09-16 on the real data)."""
    return last_date(transactions) - dt.timedelta(days=test_days - 1)


def backtest_starts(last_test_start: dt.date | str, weeks: int, test_days: int = 7) -> list[dt.date]:
    """`weeks` back-test windows ending with `last_test_start`, oldest first, `test_days` apart (no overlap)."""
    if weeks < 1:
        raise ValueError(f"backtest weeks must be at least 1, got {weeks}")
    last = as_date(last_test_start, "last_test_start")
    return [last - dt.timedelta(days=test_days * (weeks - 1 - i)) for i in range(weeks)]
