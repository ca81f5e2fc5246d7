"""The time-aware split: train strictly before the cut-off, test the days from it, nothing in between lost."""
from __future__ import annotations

import datetime as dt

import pytest
from chispa import assert_df_equality
from pyspark.sql import types as T

from recsys.split import as_date, backtest_starts, before, default_test_start, evaluation_customers, split

D = dt.date.fromisoformat
TX_SCHEMA = T.StructType([
    T.StructField("t_dat", T.DateType(), False),
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("article_id", T.StringType(), False),
])


@pytest.fixture()
def transactions(spark):
    rows = [
        # t_dat            customer  article
        (D("2020-09-01"), "c1", "0000000001"),
        (D("2020-09-15"), "c1", "0000000002"),  # the last day before the test week
        (D("2020-09-16"), "c2", "0000000003"),  # first test day
        (D("2020-09-16"), "c2", "0000000003"),  # duplicate row: two units
        (D("2020-09-22"), "c3", "0000000001"),  # last test day
        (D("2020-09-23"), "c4", "0000000001"),  # after the test week
    ]
    return spark.createDataFrame(rows, TX_SCHEMA)


def test_split_train_before_test_week_and_evaluation_customers(spark, transactions):
    train, test = split(transactions, "2020-09-16", test_days=7)
    expected_train = spark.createDataFrame(
        [(D("2020-09-01"), "c1", "0000000001"), (D("2020-09-15"), "c1", "0000000002")], TX_SCHEMA
    )
    expected_test = spark.createDataFrame(
        [
            (D("2020-09-16"), "c2", "0000000003"),
            (D("2020-09-16"), "c2", "0000000003"),
            (D("2020-09-22"), "c3", "0000000001"),
        ],
        TX_SCHEMA,
    )
    assert_df_equality(train, expected_train, ignore_row_order=True)
    assert_df_equality(test, expected_test, ignore_row_order=True)
    customers = evaluation_customers(test)
    assert sorted(r.customer_id for r in customers.collect()) == ["c2", "c3"]


def test_default_test_start_is_last_week_of_data(transactions):
    assert default_test_start(transactions, 7) == D("2020-09-17")
    assert default_test_start(transactions, 1) == D("2020-09-23")


def test_default_test_start_on_empty_table_is_an_error(spark):
    with pytest.raises(ValueError, match="empty"):
        default_test_start(spark.createDataFrame([], TX_SCHEMA))


def test_before_is_strict_and_window_counts_whole_days(transactions):
    dates = sorted({r.t_dat for r in before(transactions, "2020-09-16").collect()})
    assert dates == [D("2020-09-01"), D("2020-09-15")]  # the cut-off day itself is excluded
    window = sorted({r.t_dat for r in before(transactions, "2020-09-23", days=7).collect()})
    assert window == [D("2020-09-16"), D("2020-09-22")]  # 7 days: 09-16 .. 09-22


def test_backtest_starts_oldest_first_without_overlap():
    assert backtest_starts("2020-09-16", 3, 7) == [D("2020-09-02"), D("2020-09-09"), D("2020-09-16")]
    assert backtest_starts(D("2020-09-16"), 1) == [D("2020-09-16")]
    with pytest.raises(ValueError, match="at least 1"):
        backtest_starts("2020-09-16", 0)


def test_bad_dates_name_the_parameter(transactions):
    with pytest.raises(ValueError, match="test_start: '16/09/2020'"):
        split(transactions, "16/09/2020")
    with pytest.raises(ValueError, match="test_days"):
        split(transactions, "2020-09-16", test_days=0)
    assert as_date(dt.datetime(2020, 9, 16, 12)) == D("2020-09-16")
