"""The feature store: point-in-time feature tables that both towers read, stable integer ids, training pairs.

Every feature is computed "as of" a date D from transactions strictly before D (a purchase ON D is the
future), so a model trained on the snapshot for D never saw its own test week. Training rows go further: each
carries the customer's state as of its own period's first day, the way the scorer sees a customer. Feature
functions are pure `(DataFrames, as_of) -> DataFrame`; `run` reads the canonical tables, calls them and writes
one snapshot per table (partition `as_of`, replaced atomically with replaceWhere; older snapshots stay readable).

Tables, types and null handling
-------------------------------
=====================  ===============================  =======================================================
table / column         type                             nulls and meaning
=====================  ===============================  =======================================================
customer_index         customer_id string,              append-only: an id keeps its number forever; new ids
                       customer_idx int                 get max+1.. in id order; 0 is reserved for "unknown"
article_index          article_id string,               same rules as customer_index
                       article_idx int
category_index         feature string, value string,    stable codes of the article categoricals (append-only,
                       code int                         1..n per feature); a null value is never indexed (code 0)
customer_features      one row per customer of `customers` per snapshot (customers with no history included),
                       or, in a partial snapshot, per customer who bought in a given window (`Snapshot.buyers`)
  customer_id          string                           never null
  partial              int                              1: a partial snapshot (read only for those buyers: the
                                                        ranker's label window, an evaluation week); 0: everyone
  customer_idx         int                              never null (0 only if the id map lacks the customer)
  as_of                date                             the snapshot (partition column)
  has_history          int                              1 if any purchase before as_of, else 0 (cold start)
  age                  int                              NULLABLE: the raw age, null when missing
  age_bucket           string                           '16-24' '25-34' '35-44' '45-54' '55+' or 'unknown'
  cat_age_bucket       int                              1..5 in that order, 0 = unknown
  cat_club_status      int                              ACTIVE 1, PRE-CREATE 2, LEFT CLUB 3, else/missing 0
  cat_news_frequency   int                              NONE/None 1, Regularly 2, Monthly 3, else/missing 0
  cat_fn, cat_active   int                              flag 1 -> 1, flag 0 -> 2, missing -> 0
  num_*                double                           NEVER null; 0.0 when the customer has no history
  num_purchases_<w>w   double                           rows in the last w weeks (w from features.windows_weeks)
  num_purchases_all    double                           rows before as_of (a duplicate row is one more unit)
  num_days_since_last  double                           as_of - last purchase date (1 = the day before)
  num_price_mean/_std  double                           over purchased rows; std is the population std (0 for
                                                        one purchase)
  num_channel2_share   double                           share of rows bought online (sales_channel_id 2)
  num_distinct_articles double                          distinct articles bought
  num_repeat_ratio     double                           share of those articles bought on two or more days
  num_share_index_group_<k>, num_share_product_group_<k>, num_share_garment_group_<k>
                       double                           share of rows in the group whose category_index code
                                                        is k (the same k as cat_* in article_features); rows of
                                                        articles missing from `articles` count in no group
  seq_article_idx      array<int>                       the last features.history_length distinct articles
                                                        bought (most recent first; ties by article_idx),
                                                        zero-padded to that length; never null
  seq_days_before      array<int>                       as_of - the day each of them was last bought
article_features       one row per article of `articles` per snapshot (never-sold articles included)
  article_id, article_idx, as_of                        as for customers
  cat_product_type ... cat_garment_group  int           category_index code of the article's value, 0 = missing
  num_sales_<w>w, num_sales_all  double                 units sold in the last w weeks / before as_of
  num_trend            double                           (sales_<w1>w/w1 + 1) / (sales_<w2>w/w2 + 1) for the two
                                                        shortest windows: >1 rising, 1.0 flat or never sold
  num_decayed_popularity double                         sum of 0.5 ** ((days_before - 1) / half_life) over sales
  num_price_mean       double                           0.0 when never sold
  num_days_since_first_sale, num_days_since_last_sale   0.0 when never sold (then num_sales_all is 0)
  num_channel2_share, num_distinct_buyers  double       0.0 when never sold
popularity             see recsys.popularity.popularity (window: features.popularity_window_days)
training_examples      as_of date, customer_id, article_id, customer_idx int, article_idx int, t_dat date,
                       weight double, days_before int, feature_as_of date, + the customer's cat_* / num_* /
                       seq_* columns AS OF feature_as_of: one row per distinct (customer, article, day) in the
                       training window (features.training_window_weeks) before as_of; days_before = as_of -
                       t_dat (1 = the day before), weight = the decay above (1.0 on the day before);
                       feature_as_of = the first day of the example's features.training_snapshot_days-long
                       period counted back from as_of (point-in-time: the example never sees its own
                       purchase, nor anything after it). No nulls.
=====================  ===============================  =======================================================
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Iterable

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from recsys.popularity import AGE_BUCKETS, UNKNOWN, age_bucket, decay_weight, popularity
from recsys.spark import described
from recsys.split import as_date, before, days_before, day_after_last_purchase
from recsys.tables import (
    ARTICLE_FEATURES,
    ARTICLE_INDEX,
    ARTICLES,
    CATEGORY_INDEX,
    CUSTOMER_FEATURES,
    CUSTOMER_INDEX,
    CUSTOMERS,
    PARTIAL,
    POPULARITY,
    SEQ_ARTICLES,
    SEQ_DAYS,
    TRAINING_EXAMPLES,
    TRANSACTIONS,
    Lakehouse,
)

__all__ = [
    "age_bucket", "article_codes", "article_features", "category_values", "customer_features", "customer_profile",
    "default_as_of", "known_ids", "new_category_codes", "new_ids", "read_snapshot", "run", "taste_columns",
    "training_examples",
]

log = logging.getLogger(__name__)

# cat_ column in article_features -> the `articles` column whose value it encodes
ARTICLE_CATEGORIES = {
    "cat_product_code": "product_code",  # colours and sizes of one product share it (the history pooling uses it)
    "cat_product_type": "product_type_no",
    "cat_product_group": "product_group_name",
    "cat_graphical_appearance": "graphical_appearance_no",
    "cat_colour_group": "colour_group_code",
    "cat_perceived_colour_value": "perceived_colour_value_id",
    "cat_perceived_colour_master": "perceived_colour_master_id",
    "cat_department": "department_no",
    "cat_index": "index_code",
    "cat_index_group": "index_group_no",
    "cat_section": "section_no",
    "cat_garment_group": "garment_group_no",
}
LITERAL_MAP_MAX = 2000  # category vocabularies up to this size are applied as literal maps, larger ones joined
# the customer's taste: share of purchases per group of these article categoricals
TASTE_GROUPS = {
    "index_group": "cat_index_group", "product_group": "cat_product_group", "garment_group": "cat_garment_group",
}
CLUB_STATUSES = ("ACTIVE", "PRE-CREATE", "LEFT CLUB")
NEWS_FREQUENCIES = ("NONE", "REGULARLY", "MONTHLY")  # matched upper-cased: Kaggle has both 'NONE' and 'None'
FLAGS = ("1", "0")
SNAPSHOT_TABLES = (CUSTOMER_FEATURES, ARTICLE_FEATURES, POPULARITY, TRAINING_EXAMPLES)


# --- small column helpers -------------------------------------------------------------------------------
def _code(value: Column, vocabulary: Iterable[str]) -> Column:
    """value -> 1..n by its position in `vocabulary`; anything else (or null) -> 0."""
    out = F.lit(0)
    for code, item in reversed(list(enumerate(vocabulary, start=1))):
        out = F.when(value == F.lit(item), F.lit(code)).otherwise(out)
    return out.cast("int")


def _finish(df: DataFrame) -> DataFrame:
    """The typing contract: cat_* int never null (0 = unknown), num_* double never null (0.0)."""
    return df.select(*[
        F.coalesce(F.col(c).cast("int"), F.lit(0)).alias(c) if c.startswith("cat_")
        else F.coalesce(F.col(c).cast("double"), F.lit(0.0)).alias(c) if c.startswith("num_")
        else F.col(c)
        for c in df.columns
    ])


def _require(df: DataFrame, columns: Iterable[str], table: str) -> DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table '{table}' lacks column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    return df


def _windows(windows_weeks: Iterable[int]) -> list[int]:
    weeks = sorted(set(int(w) for w in windows_weeks))
    if not weeks or weeks[0] < 1:
        raise ValueError(f"features.windows_weeks must be positive week counts, got {list(windows_weeks)}")
    return weeks


# --- stable ids and codes -------------------------------------------------------------------------------
def new_ids(
    existing: DataFrame | None, candidates: DataFrame, key: str, idx: str, group: str | None = None
) -> DataFrame:
    """Rows to APPEND to an id map: candidates not yet in `existing`, numbered max+1.. in key order.

    Existing numbers are never touched, so a model trained on yesterday's map reads the right rows today.
    With `group`, numbering is per group (the category index: codes 1..n per feature).
    """
    groups = [group] if group else []
    fresh = candidates.select(*groups, key).where(F.col(key).isNotNull()).distinct()
    # Without groups the numbering is one ordered pass on one partition, on purpose: ids must be dense and
    # stable, and the rows are only the NEW ids (all customers once, at most 1.37 M short strings; a few per
    # night after that), which a single task numbers in seconds.
    order = Window.partitionBy(*groups).orderBy(key) if groups else Window.orderBy(key)
    if existing is None:
        numbered = fresh.withColumn("_start", F.lit(0))
    else:
        fresh = fresh.join(existing.select(*groups, key), [*groups, key], "left_anti")
        start = existing.groupBy(*groups).agg(F.max(idx).alias("_start"))  # one row per group (or one row)
        numbered = fresh.join(start, groups, "left") if groups else fresh.crossJoin(start)
    return numbered.select(
        *groups, key, (F.coalesce("_start", F.lit(0)) + F.row_number().over(order)).cast("int").alias(idx)
    )


def known_ids(entities: DataFrame, transactions: DataFrame, as_of: dt.date | str, key: str) -> DataFrame:
    """The ids to index as of `as_of`: every row of `customers`/`articles` plus any buyer/article of a purchase
    before `as_of` that the table lacks (never one that first appears on or after the cut-off)."""
    return entities.select(key).unionByName(before(transactions, as_of).select(key)).distinct()


def category_values(articles: DataFrame) -> DataFrame:
    """(feature, value) of every article categorical, the value as a string: the candidates for category_index."""
    _require(articles, ["article_id", *ARTICLE_CATEGORIES.values()], ARTICLES)
    values = None
    for feature, column in ARTICLE_CATEGORIES.items():
        part = articles.select(F.lit(feature).alias("feature"), F.col(column).cast("string").alias("value"))
        values = part if values is None else values.unionByName(part)
    return values


def new_category_codes(existing: DataFrame | None, articles: DataFrame) -> DataFrame:
    """category_index rows to append: each article categorical value not yet coded gets the next code."""
    return new_ids(existing, category_values(articles), key="value", idx="code", group="feature")


def article_codes(articles: DataFrame, category_index: DataFrame) -> DataFrame:
    """article_id + one cat_* int per article categorical (the category_index code; 0 for a missing value), one
    row per article (an article listed twice would count its sales or purchases twice wherever it is joined).

    Small vocabularies (a few hundred codes) become literal maps, which beat joins; large ones (product_code,
    ~47,000 values) a broadcast join.
    """
    _require(articles, ["article_id", *ARTICLE_CATEGORIES.values()], ARTICLES)
    sizes = {r["feature"]: int(r["n"]) for r in category_index.groupBy("feature").count().withColumnRenamed(
        "count", "n").collect()}
    small = [f for f in ARTICLE_CATEGORIES if sizes.get(f, 0) <= LITERAL_MAP_MAX]
    codes: dict[str, dict[str, int]] = {}
    for row in category_index.where(F.col("feature").isin(small)).collect():
        codes.setdefault(row["feature"], {})[row["value"]] = int(row["code"])

    def lookup(feature: str) -> Column:
        mapping = codes.get(feature)
        if not mapping:
            return F.lit(0)
        pairs = [x for value, code in sorted(mapping.items()) for x in (F.lit(value), F.lit(code))]
        return F.create_map(*pairs)[F.col(ARTICLE_CATEGORIES[feature]).cast("string")]

    out = articles.dropDuplicates(["article_id"]).select(
        "article_id", *[F.col(ARTICLE_CATEGORIES[f]).cast("string").alias(f"_{f}") for f in ARTICLE_CATEGORIES
                        if f not in small],
        *[lookup(f).alias(f) for f in small])
    for feature in (f for f in ARTICLE_CATEGORIES if f not in small):
        mapping = category_index.where(F.col("feature") == feature).select(
            F.col("value").alias(f"_{feature}"), F.col("code").alias(feature))
        out = out.join(F.broadcast(mapping), f"_{feature}", "left").drop(f"_{feature}")
    return _finish(out.select("article_id", *ARTICLE_CATEGORIES))


def taste_columns(category_index: DataFrame) -> dict[str, list[int]]:
    """The share columns the customer features will have: group name -> the codes of that group."""
    features = {cat: group for group, cat in TASTE_GROUPS.items()}
    out: dict[str, list[int]] = {group: [] for group in TASTE_GROUPS}
    for row in category_index.where(F.col("feature").isin(list(features))).select("feature", "code").collect():
        out[features[row["feature"]]].append(int(row["code"]))
    return {group: sorted(codes) for group, codes in out.items()}


# --- feature sets (pure) --------------------------------------------------------------------------------
def _history(transactions: DataFrame, as_of: dt.date) -> DataFrame:
    """The purchases the snapshot may see: strictly before as_of, with days_before."""
    return before(transactions, as_of).withColumn("days_before", days_before(as_of))


def customer_profile(customers: DataFrame) -> DataFrame:
    """One row per customer with the profile codes; a duplicated customer row keeps the larger value per field."""
    profile = ["customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age"]
    _require(customers, profile, CUSTOMERS)
    one = customers.groupBy("customer_id").agg(*[F.max(c).alias(c) for c in profile[1:]])
    bucket = age_bucket("age")
    return one.select(
        "customer_id",
        F.col("age").cast("int").alias("age"),
        bucket.alias("age_bucket"),
        _code(bucket, AGE_BUCKETS).alias("cat_age_bucket"),
        _code(F.upper(F.trim("club_member_status")), CLUB_STATUSES).alias("cat_club_status"),
        _code(F.upper(F.trim("fashion_news_frequency")), NEWS_FREQUENCIES).alias("cat_news_frequency"),
        _code(F.col("FN").cast("int").cast("string"), FLAGS).alias("cat_fn"),
        _code(F.col("Active").cast("int").cast("string"), FLAGS).alias("cat_active"),
    )


def customer_features(
    customers: DataFrame,
    transactions: DataFrame,
    articles: DataFrame,
    customer_index: DataFrame,
    category_index: DataFrame,
    as_of: dt.date | str | None = None,
    windows_weeks: Iterable[int] = (1, 4, 12),
    history_length: int = 20,
    article_index: DataFrame | None = None,
    keys: DataFrame | None = None,
) -> DataFrame:
    """Profile plus purchase signals and recent history, every customer of `customers` as of `as_of`.

    With `keys` (customer_id, as_of) the same features are computed for exactly those pairs instead, each from the
    purchases strictly before its own `as_of`: the point-in-time state a training example sees (the customer as
    the scorer will see them, never including the purchase being predicted).
    """
    weeks = _windows(windows_weeks)
    if history_length < 0:
        raise ValueError(f"features.history_length must be >= 0, got {history_length}")
    taste = taste_columns(category_index)
    codes = article_codes(articles, category_index).select("article_id", *TASTE_GROUPS.values())
    if keys is None:
        cutoff = as_date(as_of, "as_of")
        history = before(transactions, cutoff).withColumn("as_of", F.lit(cutoff))
        base = customer_profile(customers).withColumn("as_of", F.lit(cutoff))
    else:
        keys = _require(keys, ["customer_id", "as_of"], "keys").select(
            "customer_id", F.col("as_of").cast("date").alias("as_of")).distinct()
        history = transactions.join(keys, "customer_id").filter(F.col("t_dat") < F.col("as_of"))
        base = keys.join(customer_profile(customers), "customer_id", "left").withColumn(
            "age_bucket", F.coalesce("age_bucket", F.lit(UNKNOWN)))
    history = history.withColumn("days_before", F.datediff("as_of", "t_dat"))
    key = ["customer_id", "as_of"]
    # One pass over the purchases: per (customer, as_of, article) first, then per customer from those rows (the
    # purchases aggregated twice, per customer and per article, read and joined every purchase twice).
    per_article = history.groupBy(*key, "article_id").agg(
        F.count(F.lit(1)).alias("rows"),
        *[F.sum(F.when(F.col("days_before") <= 7 * w, 1).otherwise(0)).alias(f"rows_{w}w") for w in weeks],
        (F.max("t_dat") > F.min("t_dat")).alias("repeat"),  # bought on two or more days (no distinct count)
        F.min("days_before").alias("last"),
        F.count("price").alias("priced"), F.sum("price").alias("price_sum"),
        F.sum(F.col("price") * F.col("price")).alias("price_squares"),
        F.count("sales_channel_id").alias("channelled"),
        F.sum((F.col("sales_channel_id") == 2).cast("double")).alias("channel2"),
    ).join(F.broadcast(codes), "article_id", "left")
    if article_index is not None:
        per_article = per_article.join(F.broadcast(article_index.select("article_id", "article_idx")), "article_id",
                                       "left")
    else:
        per_article = per_article.withColumn("article_idx", F.lit(0))
    rows, articles_bought = F.sum("rows"), F.count(F.lit(1))

    def mean(total: str, count: str) -> Column:  # an average over the purchases (null where none counted)
        return F.when(F.sum(count) > 0, F.sum(total) / F.sum(count))

    price_mean = mean("price_sum", "priced")
    price_var = mean("price_squares", "priced") - price_mean * price_mean
    # The last `history_length` articles bought (most recent first; ties by article_idx), for the history
    # sequence: each (customer, article) row numbered in that order, the first ones pivoted into columns by the
    # aggregation below. A collect_list there instead made all its aggregates one object aggregation
    # (interpreted, not code-generated, and sorted once a task holds 128 keys): ~70 % of the features' time.
    if history_length:
        per_article = per_article.withColumn("_idx", F.coalesce("article_idx", F.lit(0))).withColumn(
            "_pos", F.row_number().over(Window.partitionBy(*key).orderBy("last", "_idx")))
    recent = [F.max(F.when(F.col("_pos") == i, F.col(field))).alias(_pivoted(field, i))
              for field in ("_idx", "last") for i in range(1, history_length + 1)]
    stats = per_article.groupBy(*key).agg(
        *[F.sum(f"rows_{w}w").alias(f"num_purchases_{w}w") for w in weeks],
        rows.alias("num_purchases_all"),
        F.min("last").alias("num_days_since_last"),
        price_mean.alias("num_price_mean"),
        F.sqrt(F.greatest(price_var, F.lit(0.0))).alias("num_price_std"),  # population std; rounding below 0: 0
        mean("channel2", "channelled").alias("num_channel2_share"),
        *[
            (F.sum(F.when(F.col(cat) == code, F.col("rows")).otherwise(0)) / rows).alias(f"num_share_{group}_{code}")
            for group, cat in TASTE_GROUPS.items()
            for code in taste[group]
        ],
        articles_bought.alias("num_distinct_articles"),
        (F.sum(F.col("repeat").cast("double")) / articles_bought).alias("num_repeat_ratio"),
        *recent,
    )
    return _finish(
        base
        .join(stats, key, "left")
        .join(customer_index, "customer_id", "left")
        .select(
            "customer_id",
            F.coalesce("customer_idx", F.lit(0)).cast("int").alias("customer_idx"),
            "as_of",
            F.col("num_purchases_all").isNotNull().cast("int").alias("has_history"),
            "age", "age_bucket", "cat_age_bucket", "cat_club_status", "cat_news_frequency", "cat_fn", "cat_active",
            *sorted(c for c in stats.columns if c.startswith("num_")),
            *_sequence(history_length),
        )
    )


def _pivoted(field: str, position: int) -> str:
    """The aggregation's column for `field` of the customer's `position`-th most recent article."""
    return f"_seq_{field.lstrip('_')}_{position}"


def _sequence(length: int) -> list[Column]:
    """The last `length` articles bought (most recent first; ties by article_idx) as two fixed-length int arrays,
    zero-padded: `seq_article_idx` (0 = padding or an article without an id) and `seq_days_before`, from the
    aggregation's pivoted columns (`_pivoted`; null where the customer bought fewer)."""
    def padded(field: str, name: str) -> Column:
        values = [F.coalesce(F.col(_pivoted(field, i)).cast("int"), F.lit(0)) for i in range(1, length + 1)]
        return F.array(*values).cast("array<int>").alias(name)

    return [padded("_idx", SEQ_ARTICLES), padded("last", SEQ_DAYS)] if length else []


def article_features(
    articles: DataFrame,
    transactions: DataFrame,
    article_index: DataFrame,
    category_index: DataFrame,
    as_of: dt.date | str,
    windows_weeks: Iterable[int] = (1, 4, 12),
    half_life_days: float = 14.0,
) -> DataFrame:
    """Categorical codes plus sales signals as of `as_of`; every article of `articles` gets a row."""
    cutoff = as_date(as_of, "as_of")
    weeks = _windows(windows_weeks)
    short, long = (weeks[0], weeks[1]) if len(weeks) > 1 else (weeks[0], weeks[0])
    sales = _history(transactions, cutoff).groupBy("article_id").agg(
        *[F.sum(F.when(F.col("days_before") <= 7 * w, 1).otherwise(0)).alias(f"num_sales_{w}w") for w in weeks],
        F.count(F.lit(1)).alias("num_sales_all"),
        F.sum(decay_weight(F.col("days_before"), half_life_days)).alias("num_decayed_popularity"),
        F.avg("price").alias("num_price_mean"),
        F.max("days_before").alias("num_days_since_first_sale"),
        F.min("days_before").alias("num_days_since_last_sale"),
        F.avg((F.col("sales_channel_id") == 2).cast("double")).alias("num_channel2_share"),
        F.countDistinct("customer_id").alias("num_distinct_buyers"),
    )
    trend = (F.coalesce(F.col(f"num_sales_{short}w"), F.lit(0)) / short + 1.0) / (
        F.coalesce(F.col(f"num_sales_{long}w"), F.lit(0)) / long + 1.0
    )
    return _finish(
        article_codes(articles, category_index)
        .join(sales, "article_id", "left")
        .join(article_index, "article_id", "left")
        .withColumn("num_trend", trend)
        .select(
            "article_id",
            F.coalesce("article_idx", F.lit(0)).cast("int").alias("article_idx"),
            F.lit(cutoff).alias("as_of"),
            *ARTICLE_CATEGORIES,
            *sorted(c for c in sales.columns + ["num_trend"] if c.startswith("num_")),
        )
    )


def training_examples(
    transactions: DataFrame,
    customer_index: DataFrame,
    article_index: DataFrame,
    as_of: dt.date | str,
    window_weeks: int,
    half_life_days: float,
    snapshot_days: int = 7,
) -> DataFrame:
    """Positive (customer, article, day) pairs of the `window_weeks` weeks before `as_of`, with ids, decay weight and
    `feature_as_of`: the day whose customer state the example may see.

    `feature_as_of` is the first day of the example's `snapshot_days`-long period counted back from `as_of` (7: the
    week's first day, as the scorer sees a customer at the start of the week it predicts; 1: the example's own
    day). Several units of one article on one day are one interaction. Pairs whose ids are not mapped are dropped
    (they cannot happen after `run` has extended the id maps).
    """
    if window_weeks < 1:
        raise ValueError(f"features.training_window_weeks must be at least 1, got {window_weeks}")
    if snapshot_days < 1:
        raise ValueError(f"features.training_snapshot_days must be at least 1, got {snapshot_days}")
    cutoff = as_date(as_of, "as_of")
    pairs = before(transactions, cutoff, 7 * window_weeks).select("customer_id", "article_id", "t_dat").distinct()
    days = days_before(cutoff)
    periods = F.ceil(days / F.lit(snapshot_days)).cast("int")
    return (
        pairs.join(customer_index, "customer_id").join(F.broadcast(article_index), "article_id")
        .select(
            F.lit(cutoff).alias("as_of"),
            "customer_id",
            "article_id",
            F.col("customer_idx").cast("int").alias("customer_idx"),
            F.col("article_idx").cast("int").alias("article_idx"),
            "t_dat",
            decay_weight(days, half_life_days).alias("weight"),
            days.cast("int").alias("days_before"),
            F.date_sub(F.lit(cutoff), periods * snapshot_days).alias("feature_as_of"),
        )
    )


def with_customer_state(examples: DataFrame, state: DataFrame) -> DataFrame:
    """Each example joined to the customer's features as of its own `feature_as_of` (never a later state).

    `state`: `customer_features` computed with keys = the examples' (customer_id, feature_as_of).
    """
    columns = [c for c in state.columns if c.startswith(("cat_", "num_", "seq_"))]
    state = state.select("customer_id", F.col("as_of").alias("feature_as_of"), *columns)
    return examples.join(state, ["customer_id", "feature_as_of"], "left").select(examples.columns + columns)


# --- the job around them --------------------------------------------------------------------------------
def default_as_of(transactions: DataFrame) -> dt.date:
    return day_after_last_purchase(transactions)


def read_snapshot(lake: Lakehouse, table: str, as_of: dt.date | str | None = None) -> DataFrame:
    """One snapshot of a feature-store table: the one for `as_of`, or the latest when None."""
    df = lake.read(table)
    if "as_of" not in df.columns:
        raise ValueError(f"table '{table}' has no as_of column: it is not a feature-store snapshot table")
    if as_of is None:
        latest = df.agg(F.max("as_of")).first()[0]
        if latest is None:
            raise ValueError(f"table '{table}' holds no snapshot yet; run `recsys features` first")
        return df.where(F.col("as_of") == F.lit(latest))
    wanted = as_date(as_of, "as_of")
    out = df.where(F.col("as_of") == F.lit(wanted))
    if out.limit(1).count() == 0:
        have = sorted(r[0].isoformat() for r in df.select("as_of").distinct().collect())
        raise ValueError(f"table '{table}' has no snapshot as of {wanted} (snapshots: {', '.join(have) or 'none'})")
    return out


def _write_snapshot(lake: Lakehouse, df: DataFrame, table: str, as_of: dt.date) -> int:
    """Replace the `as_of` partition atomically; if the columns changed (a new product group appeared), rewrite
    all snapshots on the union of columns, the missing ones 0 / 0.0, so every older snapshot stays readable.
    Returns the snapshot's row count."""
    where = f"as_of = DATE'{as_of.isoformat()}'"
    if not lake.exists(table):
        lake.write(df, table)
        return _rows_written(lake, table)
    old = lake.read(table)
    if set(old.columns) == set(df.columns):
        lake.write(df.select(*old.columns), table, replace_where=where)
        return _rows_written(lake, table)
    columns = old.columns + [c for c in df.columns if c not in old.columns]

    def filler(column: str) -> Column:
        if column.startswith("num_"):
            return F.lit(0.0)
        if column.startswith("seq_"):
            return F.array().cast("array<int>")
        return F.lit(0).cast("int")

    def align(frame: DataFrame) -> DataFrame:
        return frame.select(*[F.col(c) if c in frame.columns else filler(c).alias(c) for c in columns])

    log.warning("%s: columns changed, rewriting every snapshot on %d columns", table, len(columns))
    lake.write(align(old.where(F.col("as_of") != F.lit(as_of))).unionByName(align(df)), table, evolve_schema=True)
    return read_snapshot(lake, table, as_of).count()


def _rows_written(lake: Lakehouse, table: str) -> int:
    """Rows the table's last commit wrote, from the Delta log (no scan of the data)."""
    metrics = lake.history(table).select("operationMetrics").first()[0] or {}
    return int(metrics.get("numOutputRows", 0))


def _extend_index(
    lake: Lakehouse, table: str, candidates: DataFrame, key: str, idx: str, group: str | None = None
) -> int:
    """Append the candidates that have no id yet; returns how many were added (no empty commits)."""
    existing = lake.read(table) if lake.exists(table) else None
    fresh = new_ids(existing, candidates, key, idx, group).persist()
    try:
        added = fresh.count()
        if added or existing is None:
            lake.write(fresh, table, mode="append")
    finally:
        fresh.unpersist()
    return added


@dataclass(frozen=True)
class Snapshot:
    """One snapshot to build. `training`: with `training_examples` (a snapshot trained on). `buyers`: (first day,
    end day): customer_features only for the customers who bought in first .. end-1, a snapshot that is read for
    them alone (the ranker's label window, an evaluation week); at full size each of those is a quarter of the
    features stage when built for all 1.37 M customers. None: every customer."""

    as_of: dt.date | None = None
    training: bool = True
    buyers: tuple[dt.date, dt.date] | None = None


def run(lake: Lakehouse, as_of: str | dt.date | None = None, training: bool = True) -> dict:
    """`recsys features`: extend the id maps, then write every snapshot table for `as_of` (default: the day
    after the last transaction); a failure puts every one of them back. Returns rows and seconds per table.

    `training=False` leaves out `training_examples` (a snapshot only scored from, never trained on)."""
    return run_snapshots(lake, [Snapshot(as_of and as_date(as_of, "as_of"), training)])[0]


def run_snapshots(lake: Lakehouse, snapshots: list[Snapshot]) -> list[dict]:
    """`run` for several snapshots in date order, the purchases read from Delta and cached once for all of them
    (at full size reading and caching them took ~115 s per snapshot)."""
    transactions = _require(
        lake.read(TRANSACTIONS), ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"], TRANSACTIONS
    )
    planned = [s if s.as_of else Snapshot(default_as_of(transactions), s.training, s.buyers) for s in snapshots]
    last = max([s.as_of for s in planned] + [s.buyers[1] for s in planned if s.buyers])
    if "t_month" in transactions.columns:  # partition pruning: months after the last day needed are never read
        transactions = transactions.where(F.col("t_month") <= F.lit(last.strftime("%Y-%m")))
    # Every feature set scans these: read the Delta tables once (only the rows and columns used) and keep them.
    transactions = before(
        transactions.select("t_dat", "customer_id", "article_id", "price", "sales_channel_id"), last
    ).persist(StorageLevel.MEMORY_AND_DISK)
    articles = lake.read(ARTICLES)
    articles = _require(articles, ["article_id", "index_group_name", *ARTICLE_CATEGORIES.values()], ARTICLES).select(
        "article_id", "index_group_name", *ARTICLE_CATEGORIES.values()
    ).persist(StorageLevel.MEMORY_AND_DISK)
    customers = lake.read(CUSTOMERS).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        out = []
        for snapshot in sorted(planned, key=lambda s: s.as_of):
            scope = None
            if snapshot.buyers:
                first, end = snapshot.buyers
                scope = before(transactions, end, (end - first).days).select("customer_id").distinct().persist(
                    StorageLevel.MEMORY_AND_DISK)
            try:
                out.append(_build(lake, snapshot.as_of, before(transactions, snapshot.as_of), customers, articles,
                                  snapshot.training, scope))
            finally:
                if scope is not None:
                    scope.unpersist()
        return out
    finally:
        for frame in (transactions, customers, articles):
            frame.unpersist()


def _build(
    lake: Lakehouse, cutoff: dt.date, transactions: DataFrame, customers: DataFrame, articles: DataFrame,
    training: bool = True, scope: DataFrame | None = None,
) -> dict:
    cfg = lake.config.features
    summary: dict = {"as_of": cutoff.isoformat(), "tables": {}, "partial": scope is not None}

    def timed(table: str, write) -> None:
        start = time.perf_counter()
        with described(lake.spark, f"{cutoff} {table}"):
            info = write()
        summary["tables"][table] = {**info, "seconds": round(time.perf_counter() - start, 2)}

    snapshot_tables = SNAPSHOT_TABLES if training else tuple(t for t in SNAPSHOT_TABLES if t != TRAINING_EXAMPLES)
    tables = (CUSTOMER_INDEX, ARTICLE_INDEX, CATEGORY_INDEX, *snapshot_tables)
    with lake.restore_on_failure(*tables):
        timed(CUSTOMER_INDEX, lambda: {"added": _extend_index(
            lake, CUSTOMER_INDEX, known_ids(customers, transactions, cutoff, "customer_id"), "customer_id",
            "customer_idx")})
        timed(ARTICLE_INDEX, lambda: {"added": _extend_index(
            lake, ARTICLE_INDEX, known_ids(articles, transactions, cutoff, "article_id"), "article_id", "article_idx")})
        timed(CATEGORY_INDEX, lambda: {"added": _extend_index(
            lake, CATEGORY_INDEX, category_values(articles), "value", "code", group="feature")})
        customer_index = lake.read(CUSTOMER_INDEX).persist(StorageLevel.MEMORY_AND_DISK)
        article_index = lake.read(ARTICLE_INDEX).persist(StorageLevel.MEMORY_AND_DISK)
        codes = lake.read(CATEGORY_INDEX)  # a few hundred rows: held on the driver, read by every feature set
        category_index = lake.spark.createDataFrame(codes.collect(), codes.schema)
        def state(as_of=None, keys=None, who: DataFrame | None = None) -> DataFrame:
            """`who` (customer_id): only these customers, their purchases alone read."""
            people, bought = customers, transactions
            if who is not None:
                people, bought = (df.join(F.broadcast(who), "customer_id", "left_semi") for df in (people, bought))
            return customer_features(people, bought, articles, customer_index, category_index, as_of,
                                     cfg.windows_weeks, cfg.history_length, article_index, keys)

        def examples() -> DataFrame:
            pairs = training_examples(transactions, customer_index, article_index, cutoff, cfg.training_window_weeks,
                                      cfg.decay_half_life_days, cfg.training_snapshot_days)
            keys = pairs.select("customer_id", F.col("feature_as_of").alias("as_of")).distinct()
            return with_customer_state(pairs, state(keys=keys))

        snapshots = {
            CUSTOMER_FEATURES: lambda: state(cutoff, who=scope).withColumn(PARTIAL, F.lit(int(scope is not None))),
            ARTICLE_FEATURES: lambda: article_features(
                articles, transactions, article_index, category_index, cutoff, cfg.windows_weeks,
                cfg.decay_half_life_days),
            POPULARITY: lambda: popularity(
                transactions, customers, articles, cutoff, cfg.popularity_window_days, cfg.popularity_top_n,
                cfg.decay_half_life_days),
            TRAINING_EXAMPLES: examples,
        }
        for table, build in ((t, snapshots[t]) for t in snapshot_tables):
            def write(table=table, build=build) -> dict:
                return {"rows": _write_snapshot(lake, build(), table, cutoff)}

            timed(table, write)
    customer_index.unpersist()
    article_index.unpersist()
    return summary
