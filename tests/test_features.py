"""The feature store on hand-written tables: every feature against a value computed by hand, the cut-off
(strictly before as_of), the leakage test, stable ids, and snapshots that replace / stay readable.

The data (as_of 2020-09-23 unless a test says otherwise):

    customer  purchases before as_of                                       profile
    c_many    A 09-20 x2 (0.01, ch1), A 08-30 (0.03, ch2), B 09-01 (0.04, ch2)  age 50, PRE-CREATE, NONE
    c_one     A 09-22 (0.02, ch2)   [+ B ON 09-23 and 09-30: excluded]      age 22, ACTIVE, Regularly (row twice)
    c_none    none                                                          everything missing
    ghost     B 09-10 (0.05, ch1)   (not in customers: indexed, no feature row)

    article A (Ladieswear / Garment Upper body / 1002), B (Menswear / Shoes / 1020), C never sold.
"""
from __future__ import annotations

import datetime as dt

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from declared import with_declared_columns, with_units
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys import features
from recsys.tables import (
    ARTICLE_FEATURES, ARTICLE_INDEX, ARTICLES, CATEGORY_INDEX, CUSTOMER_FEATURES, CUSTOMER_INDEX, CUSTOMERS,
    POPULARITY, TRAINING_EXAMPLES, TRANSACTIONS,
)

D = dt.date.fromisoformat
AS_OF = D("2020-09-23")
A, B, C = "0000000001", "0000000002", "0000000003"

CUSTOMERS_DDL = (
    "customer_id string, FN int, Active int, club_member_status string, fashion_news_frequency string, "
    "age int, postal_code string"
)
ARTICLES_DDL = (
    "article_id string, product_code int, product_type_no int, product_group_name string, graphical_appearance_no int, "
    "colour_group_code int, perceived_colour_value_id int, perceived_colour_master_id int, department_no int, "
    "index_code string, index_group_no int, index_group_name string, section_no int, garment_group_no int"
)
TX_SCHEMA = T.StructType([
    T.StructField("t_dat", T.DateType(), False),
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("article_id", T.StringType(), False),
    T.StructField("price", T.DoubleType(), False),
    T.StructField("sales_channel_id", T.ShortType(), False),
])
PAST = [
    # t_dat            customer   article price  channel
    (D("2020-09-20"), "c_many", A, 0.01, 1),
    (D("2020-09-20"), "c_many", A, 0.01, 1),  # duplicate row: a second unit
    (D("2020-08-30"), "c_many", A, 0.03, 2),
    (D("2020-09-01"), "c_many", B, 0.04, 2),
    (D("2020-09-22"), "c_one", A, 0.02, 2),   # the day before as_of
    (D("2020-09-10"), "ghost", B, 0.05, 1),
]
FUTURE = [
    (D("2020-09-23"), "c_one", B, 0.02, 2),   # exactly ON the cut-off: excluded
    (D("2020-09-30"), "c_one", B, 0.02, 2),
    (D("2020-09-24"), "stranger", C, 0.09, 2),  # a new buyer, and the never-sold article's first sale
]


@pytest.fixture(scope="module")
def frames(spark):
    customers = spark.createDataFrame(
        [
            ("c_many", 1, 1, "PRE-CREATE", "NONE", 50, "p1"),
            ("c_one", 1, None, "ACTIVE", "Regularly", 22, "p2"),
            ("c_one", 1, None, "ACTIVE", "Regularly", 22, "p2"),  # duplicate customer row
            ("c_none", None, None, None, None, None, None),       # missing age and everything else
        ],
        CUSTOMERS_DDL,
    )
    articles = spark.createDataFrame(
        [
            (A, 108775, 253, "Garment Upper body", 1010016, 9, 4, 5, 1676, "A", 1, "Ladieswear", 16, 1002),
            (B, 94001, 94, "Shoes", 1010016, 10, 3, 5, 3608, "F", 2, "Menswear", 21, 1020),
            (C, 108775, 253, "Garment Upper body", None, 9, 4, 5, 1676, "A", 1, "Ladieswear", 16, 1002),
        ],
        ARTICLES_DDL,
    )
    transactions = spark.createDataFrame(PAST + FUTURE, TX_SCHEMA)
    category_index = features.new_category_codes(None, articles).cache()
    customer_index = features.new_ids(None, customers.select("customer_id"), "customer_id", "customer_idx")
    article_index = features.new_ids(None, articles.select("article_id"), "article_id", "article_idx")
    return customers, articles, transactions, category_index, customer_index.cache(), article_index.cache()


def test_stable_codes_are_dense_per_feature_in_value_order(spark, frames):
    _, articles, _, category_index, customer_index, _ = frames
    assert sorted((r.customer_id, r.customer_idx) for r in customer_index.collect()) == [
        ("c_many", 1), ("c_none", 2), ("c_one", 3)  # 0 stays free for "unknown"
    ]
    got = {(r.feature, r.value): r.code for r in category_index.collect()}
    assert got[("cat_product_group", "Garment Upper body")] == 1 and got[("cat_product_group", "Shoes")] == 2
    assert got[("cat_colour_group", "10")] == 1 and got[("cat_colour_group", "9")] == 2  # string order
    assert ("cat_graphical_appearance", None) not in got  # a missing value is never coded
    codes = features.article_codes(articles, category_index)
    expected = spark.createDataFrame(
        [
            # article prod pt pg ga cg pcv pcm dep idx ig sec gg
            (A, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1),  # product codes in string order: '108775' < '94001'
            (B, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 2, 2),
            (C, 1, 1, 1, 0, 2, 2, 1, 1, 1, 1, 1, 1),  # graphical appearance missing -> 0; A's product
        ],
        ["article_id", *features.ARTICLE_CATEGORIES],
    ).select("article_id", *[F.col(c).cast("int").alias(c) for c in features.ARTICLE_CATEGORIES])
    assert_df_equality(codes, expected, ignore_row_order=True, ignore_nullable=True)


def test_customer_features_by_hand(spark, frames):
    customers, articles, transactions, category_index, customer_index, _ = frames
    result = features.customer_features(
        customers, transactions, articles, customer_index, category_index, AS_OF, windows_weeks=[4, 1]
    ).cache()
    profile = spark.createDataFrame(
        [
            # id        idx as_of  hist age   bucket     c_age club news fn active
            ("c_many", 1, AS_OF, 1, 50, "45-54", 4, 2, 1, 1, 1),
            ("c_one", 3, AS_OF, 1, 22, "16-24", 1, 1, 2, 1, 0),
            ("c_none", 2, AS_OF, 0, None, "unknown", 0, 0, 0, 0, 0),
        ],
        "customer_id string, customer_idx int, as_of date, has_history int, age int, age_bucket string, "
        "cat_age_bucket int, cat_club_status int, cat_news_frequency int, cat_fn int, cat_active int",
    )
    assert_df_equality(result.select(*profile.columns), profile, ignore_row_order=True, ignore_nullable=True)
    numbers = [
        "customer_id", "num_purchases_1w", "num_purchases_4w", "num_purchases_all", "num_days_since_last",
        "num_price_mean", "num_price_std", "num_channel2_share", "num_distinct_articles", "num_repeat_ratio",
        "num_share_index_group_1", "num_share_index_group_2", "num_share_product_group_1",
        "num_share_product_group_2", "num_share_garment_group_1", "num_share_garment_group_2",
    ]
    c_many_price_std = 0.012990381056767
    expected = spark.createDataFrame(
        [
            # id       1w   4w   all  last mean    std              ch2  dist rep  ig1   ig2   pg1   pg2   gg1   gg2
            ("c_many", 2.0, 4.0, 4.0, 3.0, 0.0225, c_many_price_std, 0.5, 2.0, 0.5, 0.75, 0.25, 0.75, 0.25, 0.75, 0.25),
            ("c_one", 1.0, 1.0, 1.0, 1.0, 0.02, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0),
            ("c_none", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        ],
        numbers,
    )
    assert_approx_df_equality(result.select(*numbers), expected, 1e-9, ignore_row_order=True, ignore_nullable=True)
    num_columns = [c for c in result.columns if c.startswith("num_")]
    assert sorted(num_columns) == sorted(numbers[1:])  # no hidden extras, and discoverable by prefix
    null_counts = [F.sum(F.col(c).isNull().cast("int")).alias(c) for c in result.columns if c != "age"]
    nulls = result.select(*null_counts).first()
    assert not any(nulls), "only age may be null"
    assert dict(result.dtypes)["num_purchases_all"] == "double" and dict(result.dtypes)["cat_fn"] == "int"
    result.unpersist()


def test_article_features_by_hand(spark, frames):
    _, articles, transactions, category_index, _, article_index = frames
    result = features.article_features(
        articles, transactions, article_index, category_index, AS_OF, windows_weeks=[1, 4], half_life_days=1.0
    )
    numbers = [
        "article_id", "article_idx", "cat_index_group", "num_sales_1w", "num_sales_4w", "num_sales_all", "num_trend",
        "num_decayed_popularity", "num_price_mean", "num_days_since_first_sale", "num_days_since_last_sale",
        "num_channel2_share", "num_distinct_buyers",
    ]
    expected = spark.createDataFrame(
        [
            # id idx ig 1w   4w   all  trend      decayed                   price  first last ch2 buyers
            (A, 1, 1, 3.0, 4.0, 4.0, 2.0, 2 * 0.25 + 0.5**23 + 1.0, 0.0175, 24.0, 1.0, 0.5, 2.0),
            (B, 2, 2, 0.0, 2.0, 2.0, 1 / 1.5, 0.5**21 + 0.5**12, 0.045, 22.0, 13.0, 0.5, 2.0),
            (C, 3, 1, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),  # never sold (its sale is after as_of)
        ],
        "article_id string, article_idx int, cat_index_group int, " + ", ".join(f"{c} double" for c in numbers[3:]),
    )
    assert_approx_df_equality(result.select(*numbers), expected, 1e-12, ignore_row_order=True, ignore_nullable=True)
    assert result.columns[:3] == ["article_id", "article_idx", "as_of"]
    assert set(features.ARTICLE_CATEGORIES) < set(result.columns)


def test_training_examples_window_dedup_and_weight(spark, frames):
    _, _, transactions, _, customer_index, article_index = frames
    ghost = spark.createDataFrame([("ghost", 4)], "customer_id string, customer_idx int")
    ghost_index = customer_index.unionByName(ghost)
    result = features.training_examples(
        transactions, ghost_index, article_index, AS_OF, window_weeks=2, half_life_days=1.0
    )
    expected = spark.createDataFrame(
        [
            # as_of  customer  article cidx aidx t_dat             weight days  sees the customer as of
            (AS_OF, "c_many", A, 1, 1, D("2020-09-20"), 0.25, 3, D("2020-09-16")),  # two units: one example
            (AS_OF, "c_one", A, 3, 1, D("2020-09-22"), 1.0, 1, D("2020-09-16")),
            (AS_OF, "ghost", B, 4, 2, D("2020-09-10"), 0.5**12, 13, D("2020-09-09")),
        ],
        "as_of date, customer_id string, article_id string, customer_idx int, article_idx int, t_dat date, "
        "weight double, days_before int, feature_as_of date",
    )
    assert_approx_df_equality(result, expected, 1e-12, ignore_row_order=True, ignore_nullable=True)
    with pytest.raises(ValueError, match="training_window_weeks"):
        features.training_examples(transactions, ghost_index, article_index, AS_OF, 0, 1.0)
    daily = features.training_examples(transactions, ghost_index, article_index, AS_OF, 2, 1.0, snapshot_days=1)
    assert {(r.customer_id, r.feature_as_of) for r in daily.collect()} == {
        ("c_many", D("2020-09-20")), ("c_one", D("2020-09-22")), ("ghost", D("2020-09-10"))}  # its own day


def test_history_sequence_most_recent_first_zero_padded(spark, frames):
    customers, articles, transactions, category_index, customer_index, article_index = frames
    result = features.customer_features(customers, transactions, articles, customer_index, category_index, AS_OF,
                                        history_length=3, article_index=article_index)
    got = {r.customer_id: (r.seq_article_idx, r.seq_days_before) for r in result.collect()}
    assert got == {
        "c_many": ([1, 2, 0], [3, 22, 0]),  # A last bought 09-20 (3 days before), B 09-01; one entry per article
        "c_one": ([1, 0, 0], [1, 0, 0]),
        "c_none": ([0, 0, 0], [0, 0, 0]),   # no history: all padding
    }


def test_history_sequence_cut_to_its_length_ties_by_article_index(spark, frames):
    """Longer histories keep their most recent articles; two articles last bought the same day go by index."""
    customers, articles, transactions, category_index, customer_index, article_index = frames
    same_day = transactions.unionByName(spark.createDataFrame([(D("2020-09-22"), "c_one", B, 0.02, 1)], TX_SCHEMA))

    def sequences(length: int) -> dict:
        result = features.customer_features(customers, same_day, articles, customer_index, category_index, AS_OF,
                                            history_length=length, article_index=article_index)
        return {r.customer_id: (r.seq_article_idx, r.seq_days_before) for r in result.collect()}

    assert sequences(2)["c_one"] == ([1, 2], [1, 1])  # A and B both the day before: A (index 1) first
    assert sequences(1) == {"c_many": ([1], [3]), "c_one": ([1], [1]), "c_none": ([0], [0])}
    no_history = features.customer_features(customers, same_day, articles, customer_index, category_index, AS_OF,
                                            history_length=0, article_index=article_index)
    assert not [c for c in no_history.columns if c.startswith("seq_")]


def test_training_example_never_sees_its_own_purchase(spark, frames):
    """Point-in-time: the customer state joined to an example is computed strictly before the example's period,
    so no feature of an example counts the purchase it is trained to predict (or anything after it)."""
    customers, articles, transactions, category_index, customer_index, article_index = frames
    examples = features.training_examples(transactions, customer_index, article_index, AS_OF, 4, 14.0)
    keys = examples.select("customer_id", F.col("feature_as_of").alias("as_of")).distinct()
    state = features.customer_features(customers, transactions, articles, customer_index, category_index,
                                       windows_weeks=[1, 4], history_length=4, article_index=article_index, keys=keys)
    rows = {(r.customer_id, r.t_dat): r for r in features.with_customer_state(examples, state).collect()}
    # c_one's only purchase before as_of is the example itself (09-22): its state as of 09-16 has no history.
    one = rows[("c_one", D("2020-09-22"))]
    assert (one.num_purchases_all, one.num_days_since_last, one.seq_article_idx) == (0.0, 0.0, [0, 0, 0, 0])
    assert (one.cat_age_bucket, one.cat_club_status) == (1, 1)  # the profile is still there
    # c_many's 09-20 example sees 08-30 (A) and 09-01 (B) only: not the two units of 09-20 it predicts.
    many = rows[("c_many", D("2020-09-20"))]
    assert many.num_purchases_all == 2.0 and many.num_purchases_1w == 0.0 and many.num_days_since_last == 15.0
    assert many.seq_article_idx == [2, 1, 0, 0] and many.seq_days_before == [15, 17, 0, 0]
    # the 09-01 example (feature day 08-26) sees nothing; the 08-30 one is out of the 4-week window
    assert rows[("c_many", D("2020-09-01"))].num_purchases_all == 0.0
    for row in rows.values():  # in general: the state never reaches the example's own day
        assert row.num_days_since_last == 0.0 or row.num_days_since_last >= (row.t_dat - row.feature_as_of).days + 1


def test_bad_input_names_table_and_column(spark, frames):
    customers, articles, transactions, category_index, customer_index, _ = frames
    with pytest.raises(ValueError, match="table 'articles' lacks column.*index_group_no"):
        features.article_codes(articles.drop("index_group_no"), category_index)
    with pytest.raises(ValueError, match="table 'customers' lacks column.*age"):
        features.customer_profile(customers.drop("age"))
    with pytest.raises(ValueError, match="windows_weeks"):
        features.customer_features(customers, transactions, articles, customer_index, category_index, AS_OF, [0])


def test_no_leakage_every_table_identical_with_or_without_the_future(spark, frames):
    """Features as of D from transactions before D equal those from a table that also holds D and later."""
    from recsys.popularity import popularity

    customers, articles, everything, category_index, _, _ = frames
    past = everything.where(F.col("t_dat") < F.lit(AS_OF)).cache()
    assert past.count() == len(PAST) < everything.count()

    def build(transactions):
        customer_index = features.new_ids(
            None, features.known_ids(customers, transactions, AS_OF, "customer_id"), "customer_id", "customer_idx"
        )
        article_index = features.new_ids(
            None, features.known_ids(articles, transactions, AS_OF, "article_id"), "article_id", "article_idx"
        )
        return {
            CUSTOMER_INDEX: customer_index,
            ARTICLE_INDEX: article_index,
            CUSTOMER_FEATURES: features.customer_features(
                customers, transactions, articles, customer_index, category_index, AS_OF
            ),
            ARTICLE_FEATURES: features.article_features(articles, transactions, article_index, category_index, AS_OF),
            POPULARITY: popularity(transactions, customers, articles, AS_OF, 28, 10, 14.0),
            TRAINING_EXAMPLES: features.training_examples(transactions, customer_index, article_index, AS_OF, 12, 14.0),
        }

    without, with_future = build(past), build(everything)
    for table in without:
        assert_df_equality(without[table], with_future[table], ignore_row_order=True)
    assert "stranger" not in {r.customer_id for r in with_future[CUSTOMER_INDEX].collect()}
    past.unpersist()


# --- the job: stable ids, snapshots replaced atomically, older ones readable ----------------------------------
def _load(lake, customers, articles, transactions) -> None:
    lake.write(customers, CUSTOMERS)
    # ingest would quarantine C (no graphical appearance): the lake holds it with A's
    valid = articles.fillna({"graphical_appearance_no": 1010016})
    lake.write(with_declared_columns(valid, ARTICLES), ARTICLES)
    lake.write(with_units(transactions).withColumn("t_month", F.date_format("t_dat", "yyyy-MM")), TRANSACTIONS)


def _ids(lake, table, key, idx) -> dict[str, int]:
    return {r[key]: r[idx] for r in lake.read(table).collect()}


def test_job_ids_stable_snapshots_replaced_and_older_ones_readable(spark, frames, lake):
    customers, articles, everything, _, _, _ = frames
    assert features.default_as_of(everything) == D("2020-10-01")  # the day after the last transaction
    # 1. Only the past is loaded; a first snapshot as of 2020-09-15.
    first = D("2020-09-15")
    _load(lake, customers, articles, spark.createDataFrame(PAST, TX_SCHEMA))
    summary = features.run(lake, as_of=first)
    rows = {table: info.get("rows") for table, info in summary["tables"].items()}
    assert summary["as_of"] == "2020-09-15" and rows[CUSTOMER_FEATURES] == 3 and rows[ARTICLE_FEATURES] == 3
    assert rows[TRAINING_EXAMPLES] == 3 and rows[POPULARITY] > 0  # 08-30, 09-01, 09-10: strictly before 09-15
    assert summary["tables"][CUSTOMER_INDEX]["added"] == 4  # c_many, c_none, c_one + ghost (a buyer on 09-10)
    first_version = lake.version(CUSTOMER_FEATURES)
    customer_ids = _ids(lake, CUSTOMER_INDEX, "customer_id", "customer_idx")
    article_ids = _ids(lake, ARTICLE_INDEX, "article_id", "article_idx")

    # 2. The future arrives, with a new customer (an id that sorts first) and an article in a new product group.
    newcomer = spark.createDataFrame([("a_new", None, None, None, None, 30, None)], CUSTOMERS_DDL)
    bag = spark.createDataFrame(
        [("0000000000", 5001, 66, "Accessories", 1010016, 9, 4, 5, 1676, "A", 1, "Ladieswear", 16, 1019)], ARTICLES_DDL
    )
    _load(lake, customers.unionByName(newcomer), articles.unionByName(bag), everything)
    features.run(lake, as_of=AS_OF)
    now_customers = _ids(lake, CUSTOMER_INDEX, "customer_id", "customer_idx")
    now_articles = _ids(lake, ARTICLE_INDEX, "article_id", "article_idx")
    assert {k: now_customers[k] for k in customer_ids} == customer_ids  # an existing id never moves
    assert {k: now_articles[k] for k in article_ids} == article_ids
    assert now_customers == {**customer_ids, "a_new": 5}  # appended; 'stranger' first buys after the cut-off
    assert now_articles["0000000000"] == 4

    latest = features.read_snapshot(lake, CUSTOMER_FEATURES)
    older = features.read_snapshot(lake, CUSTOMER_FEATURES, first)
    assert {r.as_of for r in latest.select("as_of").distinct().collect()} == {AS_OF} and latest.count() == 4
    # The new product group added a share column: the older snapshot reads it as 0.0, its other values unchanged.
    codes = {(r.feature, r.value): r.code for r in lake.read(CATEGORY_INDEX).collect()}
    new_share = f"num_share_product_group_{codes[('cat_product_group', 'Accessories')]}"
    before_change = lake.read(CUSTOMER_FEATURES, version=first_version)
    assert new_share in older.columns and new_share not in before_change.columns
    assert_df_equality(
        older.where(F.col(new_share) == 0.0).select(*before_change.columns), before_change, ignore_row_order=True
    )
    assert lake.sql(f"SELECT count(*) AS n FROM customer_features WHERE as_of = DATE'{AS_OF}'").first().n == 4

    # 3. Re-writing a snapshot replaces that as_of only (replaceWhere), the other stays as it was.
    replacement = latest.where(F.col("customer_id") == "c_one")
    assert features._write_snapshot(lake, replacement, CUSTOMER_FEATURES, AS_OF) == 1
    assert features.read_snapshot(lake, CUSTOMER_FEATURES).count() == 1
    assert features.read_snapshot(lake, CUSTOMER_FEATURES, first).count() == 3
    with pytest.raises(ValueError, match=r"no snapshot as of 2019-01-01 \(snapshots: 2020-09-15, 2020-09-23\)"):
        features.read_snapshot(lake, ARTICLE_FEATURES, "2019-01-01")
    with pytest.raises(ValueError, match="as_of: 'soon'"):
        features.run(lake, as_of="soon")


def test_a_partial_snapshot_holds_the_window_s_buyers_as_the_full_one_would_and_is_never_listed_from(
        spark, frames, lake):
    """The pipeline's evaluation snapshots are read only for some buyers: built for them alone, each row as the
    full snapshot has it; the drift check never compares with one, and listing everyone from one fails."""
    from recsys import monitor, score
    from recsys.tables import PARTIAL

    customers, articles, everything, _, _, _ = frames
    _load(lake, customers, articles, everything)
    week = D("2020-09-16")
    summaries = features.run_snapshots(lake, [
        features.Snapshot(AS_OF, training=False),
        features.Snapshot(week, training=False, buyers=(D("2020-09-20"), AS_OF)),  # c_many and c_one bought
    ])
    assert [(s["as_of"], s["partial"]) for s in summaries] == [("2020-09-16", True), ("2020-09-23", False)]
    partial = features.read_snapshot(lake, CUSTOMER_FEATURES, week)
    assert sorted(r.customer_id for r in partial.collect()) == ["c_many", "c_one"]
    assert {r[PARTIAL] for r in partial.collect()} == {1}
    assert {r[PARTIAL] for r in features.read_snapshot(lake, CUSTOMER_FEATURES, AS_OF).collect()} == {0}
    assert monitor.previous_snapshot(lake, CUSTOMER_FEATURES, AS_OF) is None
    with pytest.raises(ValueError, match="as of 2020-09-16 holds some customers only"):
        score.customer_rows(lake, week, None)
    assert score.customer_rows(lake, week, partial.select("customer_id"))[0].count() == 2

    features.run(lake, as_of=week, training=False)  # the same date for everyone replaces it
    full = features.read_snapshot(lake, CUSTOMER_FEATURES, week)
    assert full.count() == 3 and {r[PARTIAL] for r in full.collect()} == {0}
    assert_df_equality(partial.drop(PARTIAL), full.join(partial.select("customer_id"), "customer_id", "left_semi")
                       .drop(PARTIAL), ignore_row_order=True, ignore_nullable=True)
    assert monitor.previous_snapshot(lake, CUSTOMER_FEATURES, AS_OF).count() == 3
