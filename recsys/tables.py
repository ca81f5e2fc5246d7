"""Table names, schemas and Delta I/O in one place.

Every stage reads and writes through `Lakehouse`, so a table lives at one path (local) or one name (Unity
Catalog on Databricks), each write is one Delta commit, a table declared in `SCHEMAS` is written with exactly
its declared columns, and a multi-table step puts its tables back when it fails (`restore_on_failure`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.config import Config
from recsys.spark import described

# --- table names -------------------------------------------------------------------------------------------
ARTICLES = "articles"
CUSTOMERS = "customers"
TRANSACTIONS = "transactions"
QUARANTINE = "quarantine"
INGEST_RUNS = "ingest_runs"
CUSTOMER_FEATURES = "customer_features"
PARTIAL = "partial"  # customer_features column: 1 in a snapshot built for some customers only (features.Snapshot)
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
PUBLISH_CHECKS = "publish_checks"    # one row per check per scoring run: value, thresholds, ok | warn | block
PIPELINE_STATE = "pipeline_state"    # one row per pipeline stage: the fingerprint of its last success
PIPELINE_RUNS = "pipeline_runs"      # one row per stage run: when, outcome, rows, table versions read/written

# customer_features / training_examples: the customer's last purchases, most recent first, zero-padded
SEQ_ARTICLES = "seq_article_idx"   # array<int> of article_idx (0 = padding)
SEQ_DAYS = "seq_days_before"       # array<int>: days from that purchase to the snapshot's as_of

ALL_TABLES = (
    ARTICLES, CUSTOMERS, TRANSACTIONS, QUARANTINE, INGEST_RUNS, CUSTOMER_FEATURES, ARTICLE_FEATURES,
    POPULARITY, CUSTOMER_INDEX, ARTICLE_INDEX, TRAINING_EXAMPLES, CUSTOMER_EMBEDDINGS, ARTICLE_EMBEDDINGS,
    RECOMMENDATIONS, EVALUATION, CATEGORY_INDEX, RECOMMENDATIONS_STAGING, RECOMMENDATIONS_NAMED, EVALUATION_RUNS,
    CANDIDATES, GATE_DECISIONS, PUBLISH_CHECKS, PIPELINE_STATE, PIPELINE_RUNS,
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
TRANSACTIONS_TABLE_SCHEMA = T.StructType(  # what the table stores: the file's columns + the key's `unit`
    list(TRANSACTIONS_SCHEMA.fields) + [T.StructField("unit", T.IntegerType(), False)])
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
PUBLISH_CHECKS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType(), False),            # the publish run (recommendations' run_id)
    T.StructField("as_of", T.DateType(), True),
    T.StructField("checked_at", T.TimestampType(), False),
    T.StructField("check", T.StringType(), False),
    T.StructField("value", T.DoubleType(), True),
    T.StructField("warn", T.DoubleType(), True),
    T.StructField("block", T.DoubleType(), True),
    T.StructField("direction", T.StringType(), False),         # max: higher is worse | min | none
    T.StructField("status", T.StringType(), False),            # ok | warn | block
])
PIPELINE_STATE_SCHEMA = T.StructType([
    T.StructField("stage", T.StringType(), False),
    T.StructField("fingerprint", T.StringType(), False),  # what the stage's output depended on (recsys.pipeline)
    T.StructField("recorded_at", T.TimestampType(), False),
])
PIPELINE_RUNS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType(), False),            # one `recsys pipeline` / `nightly` invocation
    T.StructField("stage", T.StringType(), False),
    T.StructField("started_at", T.TimestampType(), False),
    T.StructField("ended_at", T.TimestampType(), False),
    T.StructField("status", T.StringType(), False),            # done | up to date | failed
    T.StructField("seconds", T.DoubleType(), False),
    T.StructField("rows", T.LongType(), True),                 # the stage's main output rows, when it has one
    T.StructField("tables_read", T.StringType(), False),       # JSON: table -> version when the stage started
    T.StructField("tables_written", T.StringType(), False),    # JSON: table -> new version, for those it changed
    T.StructField("message", T.StringType(), True),            # the stage's summary line, or the error
])
SCHEMAS = {  # the declared tables: `Lakehouse.write` refuses any other columns or types
    ARTICLES: ARTICLES_SCHEMA,
    CUSTOMERS: CUSTOMERS_SCHEMA,
    TRANSACTIONS: TRANSACTIONS_TABLE_SCHEMA,
    QUARANTINE: QUARANTINE_SCHEMA,
    INGEST_RUNS: INGEST_RUNS_SCHEMA,
    RECOMMENDATIONS: RECOMMENDATIONS_SCHEMA,
    RECOMMENDATIONS_STAGING: RECOMMENDATIONS_SCHEMA,
    EVALUATION_RUNS: EVALUATION_RUNS_SCHEMA,
    GATE_DECISIONS: GATE_DECISIONS_SCHEMA,
    PUBLISH_CHECKS: PUBLISH_CHECKS_SCHEMA,
    PIPELINE_STATE: PIPELINE_STATE_SCHEMA,
    PIPELINE_RUNS: PIPELINE_RUNS_SCHEMA,
}
PARTITIONS = {TRANSACTIONS: ["t_month"]}  # month folders: date-range reads skip the rest
# Feature-store snapshots: one `as_of` folder each, replaced with replaceWhere, older ones stay readable.
PARTITIONS.update({name: ["as_of"] for name in (CUSTOMER_FEATURES, ARTICLE_FEATURES, POPULARITY, TRAINING_EXAMPLES,
                                                 CANDIDATES)})
PARTITION_FIELDS = {  # partition columns a declared table stores beside its declared ones
    "t_month": T.StructField("t_month", T.StringType(), False),  # yyyy-MM of t_dat
}


class SchemaMismatch(ValueError):
    """A DataFrame written to a declared table does not have the declared columns and types."""


def declared_schema(name: str) -> T.StructType | None:
    """What a declared table stores: its `SCHEMAS` columns, then its partition columns; None if undeclared."""
    if name not in SCHEMAS:
        return None
    extra = [PARTITION_FIELDS[c] for c in PARTITIONS.get(name, []) if c not in SCHEMAS[name].names]
    return T.StructType(list(SCHEMAS[name].fields) + extra)


def schema_problems(schema: T.StructType, declared: T.StructType) -> list[str]:
    """Each column of `schema` that is not as `declared` (missing, extra or another type); empty when it fits."""
    have = {f.name: f.dataType for f in schema.fields}
    want = {f.name: f.dataType for f in declared.fields}
    problems = [f"column '{c}' is missing ({want[c].simpleString()} declared)" for c in want if c not in have]
    problems += [f"column '{c}' is not declared ({have[c].simpleString()})" for c in have if c not in want]
    problems += [f"column '{c}' is {have[c].simpleString()}, declared {want[c].simpleString()}"
                 for c in want if c in have and have[c] != want[c]]
    return problems


def not_null_checked(df: DataFrame, name: str, declared: T.StructType) -> DataFrame:
    """`df` with each column declared NOT NULL (that Spark cannot prove non-null) checked row by row as the
    write runs: a null fails the write, naming the table and the column. No extra pass over the data."""
    required = {f.name for f in declared.fields if not f.nullable}

    def checked(column: str) -> Column:
        error = F.raise_error(F.lit(f"table '{name}': null in column '{column}', which is declared NOT NULL"))
        return F.when(F.col(column).isNull(), error).otherwise(F.col(column)).alias(column)

    return df.select(*[checked(f.name) if f.name in required and f.nullable else F.col(f.name)
                       for f in df.schema.fields])


class Lakehouse:
    """Where the project's Delta tables live, and the only code that reads or writes them."""

    def __init__(self, spark: SparkSession, config: Config):
        self.spark = spark
        self.config = config
        self.catalog = config.paths.catalog
        self.root = config.path(config.paths.tables_dir)
        self._kept: dict[str, tuple[tuple, Any]] = {}

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

    def derived(self, name: str, build: Callable[[], DataFrame], *tables: str, key: tuple = ()) -> DataFrame:
        """A small table computed from `tables` once, then shared: the catalogue's features as of a date, which
        every slice of a publish needs (`kept`, materialised)."""
        return self.kept(name, lambda: build().localCheckpoint(), *tables, key=key)

    def kept(self, name: str, build: Callable[[], Any], *tables: str, key: tuple = ()) -> Any:
        """What `build` returns, computed once from `tables`, then handed out again. Recomputed when `key` or a
        version of one of `tables` changes (a table written since cannot leave a stale copy); one copy per `name`
        is kept."""
        stamp = (*key, *[self._commit(t) for t in tables])
        held = self._kept.get(name)
        if held is None or held[0] != stamp:
            self._kept[name] = held = (stamp, build())
        return held[1]

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        if not self.catalog:  # the newest commit file of the log: no Spark job for a local table
            commits = [int(p.name[:20]) for p in (Path(self.location(name)) / "_delta_log").glob("*.json")
                       if p.name[:20].isdigit()]
            if commits:
                return max(commits)
        return int(self._delta_table(name).history(1).select("version").first()[0])

    def _commit(self, name: str) -> tuple:
        """What identifies a table's current state: its version, and for a local table the time of that commit
        too (a table deleted and written again starts again at version 0)."""
        version = self.version(name)
        if self.catalog or version is None:
            return (version,)
        return (version, (Path(self.location(name)) / "_delta_log" / f"{version:020d}.json").stat().st_mtime_ns)

    def versions(self) -> dict[str, int]:
        """Every existing table's current version (what a stage read, or wrote when it changed)."""
        return {name: self.version(name) for name in self.existing()}

    def _delta_table(self, name: str):
        from delta.tables import DeltaTable

        if self.catalog:
            return DeltaTable.forName(self.spark, self.location(name))
        return DeltaTable.forPath(self.spark, self.location(name))

    def history(self, name: str) -> DataFrame:
        return self._delta_table(name).history()

    # -- writes (each one a Delta commit)
    def write(
        self,
        df: DataFrame,
        name: str,
        mode: str = "overwrite",
        replace_where: str | None = None,
        partition_by: list[str] | None = None,
        evolve_schema: bool = False,
    ) -> None:
        """Overwrite (whole table or `replace_where` slice) or append, as one Delta commit.

        A declared table (`SCHEMAS`) takes exactly its declared columns and types: anything else raises
        `SchemaMismatch` naming the table and the columns, before anything is written, and a null in a column
        declared NOT NULL fails the write. No write changes a table's schema by the way (Delta refuses new or
        retyped columns; on a table that is not declared, a column left out is written as null).
        `evolve_schema=True` is the deliberate step that replaces the schema with `df`'s (whole-table overwrite
        only): a feature table that gained columns, a declaration that changed.
        """
        df = self._as_declared(df, name)
        if evolve_schema and (mode != "overwrite" or replace_where):
            raise ValueError(f"table '{name}': evolve_schema replaces the whole table (mode='overwrite', "
                             "no replace_where)")
        writer = df.write.format("delta").mode(mode)
        partition_by = partition_by if partition_by is not None else PARTITIONS.get(name)
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        if replace_where:
            writer = writer.option("replaceWhere", replace_where)
        if evolve_schema:
            writer = writer.option("overwriteSchema", "true")
        with described(self.spark, f"write {name}"):
            if self.catalog:
                writer.saveAsTable(self.location(name))
            else:
                writer.save(self.location(name))

    def upsert(self, df: DataFrame, name: str, keys: list[str]) -> None:
        """Insert `df`'s rows, replacing the rows that have the same `keys`, in one MERGE commit (the table is
        created by the first call). Declared tables are checked as in `write`."""
        if not self.exists(name):
            self.write(df, name)
            return
        matched = " AND ".join(f"old.`{key}` = new.`{key}`" for key in keys)
        (self._delta_table(name).alias("old").merge(self._as_declared(df, name).alias("new"), matched)
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())

    def _as_declared(self, df: DataFrame, name: str) -> DataFrame:
        """`df` itself for a table that is not declared; else `df` checked against the declaration (columns
        and types now, NOT NULL as it is written), or SchemaMismatch naming the table and the columns."""
        declared = declared_schema(name)
        if declared is None:
            return df
        problems = schema_problems(df.schema, declared)
        if problems:
            raise SchemaMismatch(f"table '{name}' ({self.location(name)}): " + "; ".join(problems)
                                 + ". Its schema is declared in recsys.tables.SCHEMAS")
        return not_null_checked(df, name, declared)

    def merge(self, df: DataFrame, name: str, keys: list[str], scope: str, delete_missing: bool = False) -> dict:
        """One Delta MERGE of `df` (alias `s`) into the rows of `name` (alias `t`) that satisfy `scope` (SQL over
        `t.` columns, e.g. a partition and a date), matched on `keys`: rows with a new key are inserted, rows
        already there are left alone, and with `delete_missing` the rows in `scope` whose key is not in `df` are
        deleted. Returns Delta's operation metrics of the commit (numTargetRowsInserted, numTargetRowsDeleted)."""
        on = " AND ".join([f"({scope})"] + [f"t.`{k}` = s.`{k}`" for k in keys])
        source = self._as_declared(df, name).alias("s")
        merge = self._delta_table(name).alias("t").merge(source, on).whenNotMatchedInsertAll()
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
    def restore_on_failure(self, *names: str) -> Iterator[None]:
        """If the block raises, put every table in `names` back to its version before the block, then re-raise.

        Not a transaction: each write inside is its own commit, so readers can see the tables in between,
        and a driver killed inside the block leaves them there (run the step again, or `restore` from
        `history`). Every table is restored even when another's restore fails; the block's own error is what
        is raised, with a note saying which tables went back and which did not."""
        before = {name: self.version(name) for name in names}
        try:
            yield
        except BaseException as error:
            outcome = []
            for name, version in before.items():
                target = "dropped (it did not exist)" if version is None else f"restored to version {version}"
                try:
                    self.restore(name, version)
                    outcome.append(f"{name}: {target}")
                except Exception as exc:  # noqa: BLE001 - reported in the note; the other tables still go back
                    outcome.append(f"{name}: NOT {target}: {type(exc).__name__}: {exc}")
            error.add_note("after the failure: " + "; ".join(outcome))
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
