"""Table names, schemas and Delta I/O in one place.

Every stage reads and writes through `Lakehouse`, so a table lives at one path (local) or one name (Unity
Catalog on Databricks), writes are Delta transactions, and a multi-table step can be rolled back as a whole.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from recsys.config import Config

# --- table names -------------------------------------------------------------------------------------------
ARTICLES = "articles"
CUSTOMERS = "customers"
TRANSACTIONS = "transactions"
QUARANTINE = "quarantine"
INGEST_RUNS = "ingest_runs"
CUSTOMER_FEATURES = "customer_features"
ARTICLE_FEATURES = "article_features"
POPULARITY = "popularity"
CUSTOMER_INDEX = "customer_index"
ARTICLE_INDEX = "article_index"
TRAINING_EXAMPLES = "training_examples"
CATEGORY_INDEX = "category_index"  # stable int codes of the article categoricals (append-only, like the id maps)
CUSTOMER_EMBEDDINGS = "customer_embeddings"
ARTICLE_EMBEDDINGS = "article_embeddings"
RECOMMENDATIONS = "recommendations"
RECOMMENDATIONS_STAGING = "recommendations_staging"  # a scoring run's output, validated before publishing
RECOMMENDATIONS_NAMED = "recommendations_named"      # recommendations joined with article names, for people
EVALUATION = "evaluation"
EVALUATION_RUNS = "evaluation_runs"  # one row per (model, version, test week, segment, metric)
CANDIDATES = "candidates"            # first-stage lists: customer x article x source, partition as_of
GATE_DECISIONS = "gate_decisions"    # one row per evaluation: what was compared, what gets published

# customer_features / training_examples: the customer's last purchases, most recent first, zero-padded
SEQ_ARTICLES = "seq_article_idx"   # array<int> of article_idx (0 = padding)
SEQ_DAYS = "seq_days_before"       # array<int>: days from that purchase to the snapshot's as_of

ALL_TABLES = (
    ARTICLES, CUSTOMERS, TRANSACTIONS, QUARANTINE, INGEST_RUNS, CUSTOMER_FEATURES, ARTICLE_FEATURES,
    POPULARITY, CUSTOMER_INDEX, ARTICLE_INDEX, TRAINING_EXAMPLES, CUSTOMER_EMBEDDINGS, ARTICLE_EMBEDDINGS,
    RECOMMENDATIONS, EVALUATION, CATEGORY_INDEX, RECOMMENDATIONS_STAGING, RECOMMENDATIONS_NAMED, EVALUATION_RUNS,
    CANDIDATES, GATE_DECISIONS,
)

# --- raw file contract (the Kaggle CSVs, exactly) ---------------------------------------------------------
RAW_FILES = {
    ARTICLES: "articles.csv",
    CUSTOMERS: "customers.csv",
    TRANSACTIONS: "transactions_train.csv",
}
RAW_COLUMNS = {
    ARTICLES: [
        "article_id", "product_code", "prod_name", "product_type_no", "product_type_name",
        "product_group_name", "graphical_appearance_no", "graphical_appearance_name", "colour_group_code",
        "colour_group_name", "perceived_colour_value_id", "perceived_colour_value_name",
        "perceived_colour_master_id", "perceived_colour_master_name", "department_no", "department_name",
        "index_code", "index_name", "index_group_no", "index_group_name", "section_no", "section_name",
        "garment_group_no", "garment_group_name", "detail_desc",
    ],
    CUSTOMERS: ["customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age", "postal_code"],
    TRANSACTIONS: ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"],
}


DROP_FOLDER = TRANSACTIONS  # daily drops of new purchases, under paths.landing_dir


def drop_file(day) -> str:
    """A daily drop (the columns of transactions_train.csv, one day's rows) relative to `paths.landing_dir`:
    `transactions/YYYY-MM-DD.csv`; also its `source_file` in `quarantine` and `ingest_runs`."""
    return f"{DROP_FOLDER}/{day.isoformat()}.csv"


ARTICLE_INT_COLUMNS = {
    "product_code", "product_type_no", "graphical_appearance_no", "colour_group_code", "perceived_colour_value_id",
    "perceived_colour_master_id", "department_no", "index_group_no", "section_no", "garment_group_no",
}

# --- canonical Delta schemas ------------------------------------------------------------------------------
ARTICLES_SCHEMA = T.StructType(
    [T.StructField("article_id", T.StringType(), False)]
    + [
        T.StructField(c, T.IntegerType() if c in ARTICLE_INT_COLUMNS else T.StringType(), c == "detail_desc")
        for c in RAW_COLUMNS[ARTICLES][1:]
    ]
)
CUSTOMERS_SCHEMA = T.StructType([
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("FN", T.IntegerType(), True),
    T.StructField("Active", T.IntegerType(), True),
    T.StructField("club_member_status", T.StringType(), True),
    T.StructField("fashion_news_frequency", T.StringType(), True),
    T.StructField("age", T.IntegerType(), True),
    T.StructField("postal_code", T.StringType(), True),
])
TRANSACTIONS_SCHEMA = T.StructType([
    T.StructField("t_dat", T.DateType(), False),
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("article_id", T.StringType(), False),
    T.StructField("price", T.DoubleType(), False),
    T.StructField("sales_channel_id", T.ShortType(), False),
])
# The row key of `transactions`: the purchase's columns + `unit`, its ordinal among the identical rows of that
# day (the data has no purchase id, and identical rows are real: several units bought). The daily drop MERGEs
# on it (recsys.drop); ingest writes `unit` with every row (recsys.ingest.with_units).
TRANSACTION_KEY = ["t_dat", "customer_id", "article_id", "price", "sales_channel_id", "unit"]
QUARANTINE_SCHEMA = T.StructType([
    T.StructField("source_file", T.StringType(), False),
    T.StructField("line_number", T.LongType(), False),
    T.StructField("raw_line", T.StringType(), True),
    T.StructField("reason", T.StringType(), False),
    T.StructField("run_id", T.StringType(), False),
    T.StructField("ingested_at", T.TimestampType(), False),
    T.StructField("t_dat", T.DateType(), True),  # transactions only: lets `--since` replace exactly its dates
])
INGEST_RUNS_SCHEMA = T.StructType([  # one row per source file per ingest run
    T.StructField("run_id", T.StringType(), False),
    T.StructField("started_at", T.TimestampType(), False),
    T.StructField("finished_at", T.TimestampType(), False),
    T.StructField("raw_dir", T.StringType(), False),
    T.StructField("since", T.DateType(), True),
    T.StructField("source_file", T.StringType(), False),
    T.StructField("table_name", T.StringType(), False),
    T.StructField("rows_read", T.LongType(), False),
    T.StructField("rows_written", T.LongType(), False),
    T.StructField("rows_quarantined", T.LongType(), False),
    T.StructField("rows_skipped", T.LongType(), False),
])
RECOMMENDATIONS_SCHEMA = T.StructType([
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("rank", T.IntegerType(), False),
    T.StructField("article_id", T.StringType(), False),
    T.StructField("score", T.DoubleType(), False),
    T.StructField("source", T.StringType(), False),
    T.StructField("model_version", T.StringType(), False),
    T.StructField("run_id", T.StringType(), False),
    T.StructField("generated_at", T.TimestampType(), False),
])
EVALUATION_RUNS_SCHEMA = T.StructType([
    T.StructField("model", T.StringType(), False),
    T.StructField("version", T.StringType(), False),
    T.StructField("test_week", T.DateType(), False),
    T.StructField("metric", T.StringType(), False),
    T.StructField("value", T.DoubleType(), True),
    T.StructField("segment", T.StringType(), False),
])
GATE_DECISIONS_SCHEMA = T.StructType([
    T.StructField("test_week", T.DateType(), False),
    T.StructField("decided_at", T.TimestampType(), False),
    T.StructField("metric", T.StringType(), False),
    T.StructField("challenger", T.StringType(), False),        # JSON: registered model -> version
    T.StructField("challenger_value", T.DoubleType(), True),
    T.StructField("champion_before", T.StringType(), False),   # JSON: registered model -> version (or null)
    T.StructField("champion_value", T.DoubleType(), True),
    T.StructField("best_baseline", T.StringType(), False),
    T.StructField("best_baseline_value", T.DoubleType(), True),
    T.StructField("promoted", T.BooleanType(), False),
    T.StructField("publish", T.StringType(), False),           # 'model' | 'baseline:<name>'
    T.StructField("champion", T.StringType(), False),          # JSON: the champion system after the gate
    T.StructField("reason", T.StringType(), False),
])
SCHEMAS = {
    ARTICLES: ARTICLES_SCHEMA,
    CUSTOMERS: CUSTOMERS_SCHEMA,
    TRANSACTIONS: TRANSACTIONS_SCHEMA,
    QUARANTINE: QUARANTINE_SCHEMA,
    INGEST_RUNS: INGEST_RUNS_SCHEMA,
    RECOMMENDATIONS: RECOMMENDATIONS_SCHEMA,
    EVALUATION_RUNS: EVALUATION_RUNS_SCHEMA,
    GATE_DECISIONS: GATE_DECISIONS_SCHEMA,
}
PARTITIONS = {TRANSACTIONS: ["t_month"]}  # month folders: date-range reads skip the rest
# Feature-store snapshots: one `as_of` folder each, replaced with replaceWhere, older ones stay readable.
PARTITIONS.update({name: ["as_of"] for name in (CUSTOMER_FEATURES, ARTICLE_FEATURES, POPULARITY, TRAINING_EXAMPLES,
                                                 CANDIDATES)})


class Lakehouse:
    """Where the project's Delta tables live, and the only code that reads or writes them."""

    def __init__(self, spark: SparkSession, config: Config):
        self.spark = spark
        self.config = config
        self.catalog = config.paths.catalog
        self.root = config.path(config.paths.tables_dir)

    # -- addressing
    def location(self, name: str) -> str:
        return f"{self.catalog}.{name}" if self.catalog else str(self.root / name)

    def exists(self, name: str) -> bool:
        if self.catalog:
            return self.spark.catalog.tableExists(self.location(name))
        return (Path(self.location(name)) / "_delta_log").is_dir()

    def existing(self) -> list[str]:
        names = list(ALL_TABLES)
        if not self.catalog and self.root.is_dir():
            names += sorted(p.name for p in self.root.iterdir() if p.name not in names)
        return [n for n in names if self.exists(n)]

    # -- reads
    def read(self, name: str, version: int | None = None) -> DataFrame:
        if not self.exists(name):
            raise FileNotFoundError(
                f"table '{name}' does not exist at {self.location(name)}; run the stage that writes it first"
            )
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.table(self.location(name)) if self.catalog else reader.load(self.location(name))

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        return int(self._delta_table(name).history(1).select("version").first()[0])

    def _delta_table(self, name: str):
        from delta.tables import DeltaTable

        if self.catalog:
            return DeltaTable.forName(self.spark, self.location(name))
        return DeltaTable.forPath(self.spark, self.location(name))

    def history(self, name: str) -> DataFrame:
        return self._delta_table(name).history()

    # -- writes (each one a Delta transaction)
    def write(
        self,
        df: DataFrame,
        name: str,
        mode: str = "overwrite",
        replace_where: str | None = None,
        partition_by: list[str] | None = None,
    ) -> None:
        """Overwrite (whole table or `replace_where` slice) or append, atomically."""
        writer = df.write.format("delta").mode(mode)
        partition_by = partition_by if partition_by is not None else PARTITIONS.get(name)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        if replace_where:
            writer = writer.option("replaceWhere", replace_where)
        elif mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if self.catalog:
            writer.saveAsTable(self.location(name))
        else:
            writer.save(self.location(name))

    def merge(self, df: DataFrame, name: str, keys: list[str], scope: str, delete_missing: bool = False) -> dict:
        """One Delta MERGE of `df` (alias `s`) into the rows of `name` (alias `t`) that satisfy `scope` (SQL over
        `t.` columns, e.g. a partition and a date), matched on `keys`: rows with a new key are inserted, rows
        already there are left alone, and with `delete_missing` the rows in `scope` whose key is not in `df` are
        deleted. Returns Delta's operation metrics of the commit (numTargetRowsInserted, numTargetRowsDeleted)."""
        on = " AND ".join([f"({scope})"] + [f"t.`{k}` = s.`{k}`" for k in keys])
        merge = self._delta_table(name).alias("t").merge(df.alias("s"), on).whenNotMatchedInsertAll()
        if delete_missing:
            merge = merge.whenNotMatchedBySourceDelete(condition=scope)
        merge.execute()
        last = self.history(name).orderBy("version", ascending=False).select("operationMetrics").first()
        return dict(last["operationMetrics"] or {})

    def restore(self, name: str, version: int | None) -> None:
        """Back to `version`; a table that did not exist before is dropped."""
        if version is None:
            if self.catalog:
                self.spark.sql(f"DROP TABLE IF EXISTS {self.location(name)}")
            else:
                import shutil

                shutil.rmtree(self.location(name), ignore_errors=True)
            return
        if self.version(name) != version:
            self._delta_table(name).restoreToVersion(version)

    @contextlib.contextmanager
    def transaction(self, *names: str) -> Iterator[None]:
        """All-or-nothing over several tables: on any error each table goes back to its version before."""
        before = {name: self.version(name) for name in names}
        try:
            yield
        except BaseException:
            for name, version in before.items():
                self.restore(name, version)
            raise

    # -- SQL by name
    def register_views(self) -> list[str]:
        """Make every existing table queryable by its bare name in Spark SQL."""
        names = self.existing()
        for name in names:
            self.read(name).createOrReplaceTempView(name)
        return names

    def sql(self, query: str) -> DataFrame:
        self.register_views()
        return self.spark.sql(query)
