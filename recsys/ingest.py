"""Raw Kaggle CSVs -> validated Delta tables `articles`, `customers`, `transactions` (+ `quarantine`, `ingest_runs`).

Why it is built this way:
- Every data row of a raw file ends in exactly one place: its table, the `quarantine` table (source file,
  line number, raw line, reason) or, with `--since`, "skipped" because it is older than the replaced dates.
  The run checks that these add up to the rows read, and that Delta wrote exactly the rows it was given.
- Line numbers are the file's own physical line numbers (header = line 1). Customers and transactions are
  read by Spark as text, one row per line; the line number comes from each file split's byte offset, its row
  count and the row's position inside the split, so it is exact at any size without a pass through Python.
  The catalogue (`articles.csv`, ~100 k rows) is parsed on the driver instead, because its free-text
  `detail_desc` may hold quoted commas, quotes and even line breaks: a record that spans several lines keeps
  the number of its first line.
- One CSV grammar (RFC 4180: fields separated by commas, a field optionally in double quotes with `""` for a
  quote) is used on both paths, so a stray quote is "malformed" whichever path reads it.
- Types come from the schemas in `recsys.tables` (one source of truth): a column's Delta type decides how
  its text is parsed, its nullability decides whether an empty field is "missing".
- Nothing is written before every file has been found and its header checked; all writes run inside
  `Lakehouse.restore_on_failure`, so a failure half-way puts every table back to its previous version.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.utils import AnalysisException

from recsys.config import IngestConfig
from recsys.tables import (
    ARTICLES,
    ARTICLES_SCHEMA,
    CUSTOMERS,
    CUSTOMERS_SCHEMA,
    INGEST_RUNS,
    INGEST_RUNS_SCHEMA,
    QUARANTINE,
    QUARANTINE_SCHEMA,
    RAW_COLUMNS,
    RAW_FILES,
    TRANSACTION_KEY,
    TRANSACTIONS,
    TRANSACTIONS_SCHEMA,
    Lakehouse,
)

SCHEMAS = {ARTICLES: ARTICLES_SCHEMA, CUSTOMERS: CUSTOMERS_SCHEMA, TRANSACTIONS: TRANSACTIONS_SCHEMA}
INGEST_ORDER = (ARTICLES, CUSTOMERS, TRANSACTIONS)  # the catalogue first: transactions are checked against it

# --- the CSV grammar (possessive quantifiers: no backtracking, no stack overflow on long lines) -----------
FIELD_PATTERN = r'"(?:[^"]++|"")*+"|[^,"]*+'
LINE_PATTERN = rf"^(?:{FIELD_PATTERN})(?:,(?:{FIELD_PATTERN}))*+$"
EXTRACT_PATTERN = rf"(?:^|,)({FIELD_PATTERN})"
_LINE_RE = re.compile(LINE_PATTERN)
_EXTRACT_RE = re.compile(EXTRACT_PATTERN)
_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")  # what Spark's text reader (Hadoop LineReader) splits on
MAX_RECORD_LINES = 50  # a quoted field longer than this many lines is taken for an unbalanced quote

# --- quarantine reasons (fixed strings, so that they can be counted) --------------------------------------
EMPTY_LINE = "malformed line: empty"
BAD_QUOTES = "malformed line: unbalanced or stray quotes"
WRONG_FIELD_COUNT = "malformed line: wrong number of fields"
BAD_CUSTOMER_ID = "bad customer_id: not 64 lowercase hex characters"
UNKNOWN_ARTICLE = "unknown article_id: not in the articles catalogue"
NEGATIVE_PRICE = "negative price"
FUTURE_DATE = "date in the future"
UNKNOWN_CHANNEL = "unknown sales_channel_id: not 1 or 2"
SALES_CHANNELS = (1, 2)
CUSTOMER_ID_PATTERN = r"^[0-9a-f]{64}$"
NUMBER_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def missing(column: str) -> str:
    return f"missing value: {column}"


def wrong_type(column: str, kind: str) -> str:
    return f"wrong type: {column} is not {KINDS[kind][1]}"


def duplicate(key: str) -> str:
    return f"duplicate {key}: already on an earlier line"


def absurd_price(max_price: float) -> str:
    return f"absurd price: above ingest.max_price={max_price:g}"


def date_too_early(min_date: str) -> str:
    return f"date out of range: before ingest.min_date={min_date}"


class IngestError(ValueError):
    """Raw input that cannot be ingested at all (missing file, wrong header), or rows that would be lost."""


class MissingRawFile(IngestError, FileNotFoundError):
    pass


# --- reading: one row per record with its line number -------------------------------------------------
RECORDS_SCHEMA = T.StructType([
    T.StructField("line_number", T.LongType(), False),
    T.StructField("raw_line", T.StringType(), True),
    T.StructField("fields", T.ArrayType(T.StringType()), True),
    T.StructField("reason", T.StringType(), True),
])


def split_fields(line: str) -> list[str]:
    """One well-formed CSV record -> its field texts, unquoted."""
    out = []
    for match in _EXTRACT_RE.finditer(line):
        text = match.group(1)
        out.append(text[1:-1].replace('""', '"') if text.startswith('"') else text)
    return out


def parse_records(text: str, n_fields: int) -> list[tuple[int, str, list[str] | None, str | None]]:
    """A whole CSV text -> (first line number, raw record, fields or None, malformed reason or None).

    A record may span several physical lines when a quoted field holds a line break; a stray quote must not
    swallow the rest of the file, so a multi-line record is accepted only if it is well formed with the
    expected number of fields, and otherwise its first line is reported alone and reading goes on below it.
    """
    parts = _LINE_BREAK.split(text)
    lines, breaks = parts[0::2], parts[1::2] + [""]
    if lines and lines[-1] == "" and len(lines) > 1:  # the file ends with a line break
        lines, breaks = lines[:-1], breaks[:-1]
    records, i = [], 0
    while i < len(lines):
        end, record = i + 1, lines[i]
        while record.count('"') % 2 and end < len(lines) and end - i < MAX_RECORD_LINES:
            record += breaks[end - 1] + lines[end]
            end += 1
        if record == "":
            records.append((i + 1, record, None, EMPTY_LINE))
        elif '"' in record and not (record.count('"') % 2 == 0 and _LINE_RE.fullmatch(record)):
            records.append((i + 1, lines[i], None, BAD_QUOTES))
            end = i + 1
        else:
            fields = split_fields(record)
            if end - i > 1 and len(fields) != n_fields:  # two stray quotes, not one multi-line field
                records.append((i + 1, lines[i], None, BAD_QUOTES))
                end = i + 1
            else:
                records.append((i + 1, record, fields, None))
        i = end
    return records


def local_file(path: str) -> Path | None:
    """A plain local path (no URI scheme): read with Python, no Spark job needed."""
    return None if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", path) else Path(path)


def read_text(spark: SparkSession, path: str) -> str:
    local = local_file(path)
    if local is not None:
        with local.open(encoding="utf-8", newline="") as file:  # line breaks as they are, like Spark
            return file.read()
    rows = spark.read.text(path, wholetext=True).collect()
    return rows[0][0] if rows else ""


def read_records_local(spark: SparkSession, path: str, n_fields: int) -> tuple[DataFrame, int]:
    """Small files that may hold multi-line quoted fields (the catalogue): parsed on the driver.

    Returns the data records (header excluded) and their count.
    """
    records = parse_records(read_text(spark, path), n_fields)[1:]
    if not records:
        return spark.createDataFrame([], RECORDS_SCHEMA), 0
    pdf = pd.DataFrame(records, columns=RECORDS_SCHEMA.fieldNames())
    return spark.createDataFrame(pdf, RECORDS_SCHEMA), len(records)


def read_lines(spark: SparkSession, path: str) -> tuple[DataFrame, int]:
    """Big line-oriented files: Spark text rows with their exact file line numbers (header excluded).

    Within a partition `monotonically_increasing_id` counts rows in file order; one small aggregation gives
    each file split (keyed by its byte offset) its row count and first id, hence the line number of its first
    row. The scan is deterministic, so the second evaluation sees the same splits and ids.
    """
    scan = spark.read.text(path).select(
        F.col("value").alias("raw_line"),
        F.input_file_block_start().alias("_block"),
        F.monotonically_increasing_id().alias("_row"),
    )
    splits = scan.groupBy("_block").agg(F.count(F.lit(1)).alias("n"), F.min("_row").alias("first")).collect()
    shift, seen = {}, 0
    for split in sorted(splits, key=lambda s: s["_block"]):
        shift[split["_block"]] = seen + 1 - split["first"]
        seen += split["n"]
    if not shift:
        return spark.createDataFrame([], RECORDS_SCHEMA), 0
    offsets = F.create_map(*[F.lit(v).cast("long") for kv in shift.items() for v in kv])
    lines = scan.select(
        (F.col("_row") + F.element_at(offsets, F.col("_block"))).alias("line_number"), "raw_line"
    ).where(F.col("line_number") > 1)
    return lines.transform(parse_lines), seen - 1


def parse_lines(lines: DataFrame) -> DataFrame:
    """[line_number, raw_line] -> + fields (array of field texts) + reason (malformed quoting or empty line).

    Lines without a quote (all of the Kaggle customers and transactions) take the fast `split`.
    """
    raw = F.col("raw_line")
    quoted = F.instr(raw, '"') > 0
    unquote = lambda f: F.when(  # noqa: E731
        f.startswith('"'), F.regexp_replace(f.substr(F.lit(2), F.length(f) - 2), '""', '"')
    ).otherwise(f)
    fields = F.when(~quoted, F.split(raw, ",", -1)).otherwise(
        F.transform(F.regexp_extract_all(raw, F.lit(EXTRACT_PATTERN), F.lit(1)), unquote)
    )
    reason = F.when(raw == "", F.lit(EMPTY_LINE)).when(quoted & ~raw.rlike(LINE_PATTERN), F.lit(BAD_QUOTES))
    return lines.select(
        "line_number", "raw_line", F.when(reason.isNull(), fields).alias("fields"), reason.alias("reason")
    )


# --- typing: schema-driven parsers ---------------------------------------------------------------------
def _parse_date(raw: Column) -> Column:
    return F.when(raw.rlike(r"^\d{4}-\d{2}-\d{2}$"), raw.cast("date"))  # cast: null for 2020-02-30


def _parse_article_id(raw: Column) -> Column:
    return F.when(raw.rlike(r"^\d{1,10}$"), F.lpad(raw, 10, "0"))  # the CSV drops the leading zero


def _parse_double(raw: Column) -> Column:
    return F.when(raw.rlike(NUMBER_PATTERN), raw.cast("double"))


def _parse_whole(raw: Column, cast: str) -> Column:
    """Integers, also written as integer-valued floats (`1.0`, `49.0` in customers.csv); null on overflow."""
    number = _parse_double(raw)
    limit = {"int": 2**31, "short": 2**15}[cast]
    return F.when((number == F.floor(number)) & (F.abs(number) < limit), number.cast(cast))


# kind -> (parser, what the text should have been, for the quarantine reason)
KINDS = {
    "string": (lambda raw: raw, "a string"),
    "date": (_parse_date, "a YYYY-MM-DD date"),
    "article_id": (_parse_article_id, "an article id (up to 10 digits)"),
    "double": (_parse_double, "a number"),
    "int": (lambda raw: _parse_whole(raw, "int"), "a whole number"),
    "short": (lambda raw: _parse_whole(raw, "short"), "a small whole number"),
}
_KIND_OF_TYPE = {
    T.StringType(): "string", T.DateType(): "date", T.DoubleType(): "double",
    T.IntegerType(): "int", T.ShortType(): "short",
}


def kind_of(column: T.StructField) -> str:
    return "article_id" if column.name == "article_id" else _KIND_OF_TYPE[column.dataType]


def flag(df: DataFrame, checks: list[tuple[Column, str]]) -> DataFrame:
    """Keep the first reason a row fails: an earlier reason wins, then the checks in order."""
    return df.withColumn("reason", F.coalesce(F.col("reason"), *[F.when(c, F.lit(r)) for c, r in checks]))


def typed(table: str):
    """records -> one typed column per canonical column (+ `_raw_<col>` texts); field count, missing, type."""
    schema = SCHEMAS[table]
    columns = RAW_COLUMNS[table]

    def transform(records: DataFrame) -> DataFrame:
        field_at = lambda i: F.col("fields")[i]  # noqa: E731  (an empty field is a missing value)
        texts = [F.when(field_at(i) != "", field_at(i)).alias(f"_raw_{c}") for i, c in enumerate(columns)]
        df = flag(records, [(F.size("fields") != len(columns), WRONG_FIELD_COUNT)]).select(
            "line_number", "raw_line", "reason", *texts
        )
        df = df.select(
            "*", *[KINDS[kind_of(schema[c])][0](F.col(f"_raw_{c}")).alias(c) for c in columns]
        )
        required = [(F.col(f"_raw_{c}").isNull(), missing(c)) for c in columns if not schema[c].nullable]
        types = [
            (F.col(f"_raw_{c}").isNotNull() & F.col(c).isNull(), wrong_type(c, kind_of(schema[c])))
            for c in columns
        ]
        return flag(df, required + types)

    return transform


def flag_duplicates(key: str):
    """A key seen on an earlier valid line: later valid lines are quarantined (the first one wins)."""

    def transform(df: DataFrame) -> DataFrame:
        first = Window.partitionBy(key, F.col("reason").isNull()).orderBy("line_number")
        rank = F.when(F.col("reason").isNull(), F.row_number().over(first))
        return flag(df.withColumn("_rank", rank), [(F.col("_rank") > 1, duplicate(key))]).drop("_rank")

    return transform


def check_customers(df: DataFrame) -> DataFrame:
    return flag(df, [(~F.col("customer_id").rlike(CUSTOMER_ID_PATTERN), BAD_CUSTOMER_ID)]).transform(
        flag_duplicates("customer_id")
    )


def check_transactions(article_ids: DataFrame, settings: IngestConfig, today: date):
    """Domain rules of a purchase; `article_ids` is the valid catalogue of this run."""

    def transform(df: DataFrame) -> DataFrame:
        known = F.broadcast(article_ids.select("article_id", F.lit(True).alias("_known")))
        joined = df.join(known, "article_id", "left")
        price, day = F.col("price"), F.col("t_dat")
        return flag(joined, [
            (~F.col("customer_id").rlike(CUSTOMER_ID_PATTERN), BAD_CUSTOMER_ID),
            (F.col("_known").isNull(), UNKNOWN_ARTICLE),
            (price < 0, NEGATIVE_PRICE),
            (price > settings.max_price, absurd_price(settings.max_price)),
            (day < F.lit(settings.min_date).cast("date"), date_too_early(settings.min_date)),
            (day > F.lit(today), FUTURE_DATE),
            (~F.col("sales_channel_id").isin(*SALES_CHANNELS), UNKNOWN_CHANNEL),
        ]).drop("_known")

    return transform


def with_status(since: date | None):
    """written / quarantined / skipped (a `--since` run leaves rows of earlier dates as they are)."""

    def transform(df: DataFrame) -> DataFrame:
        in_scope = F.lit(True)
        if since is not None and "t_dat" in df.columns:
            in_scope = F.col("t_dat").isNull() | (F.col("t_dat") >= F.lit(since))
        status = F.when(~in_scope, "skipped").when(F.col("reason").isNull(), "written").otherwise("quarantined")
        return df.withColumn("_status", status)

    return transform


def with_units(rows: DataFrame) -> DataFrame:
    """+ `unit`: the row's ordinal (1, 2, ...) among the identical rows of its day, so that every purchase row
    has a unique key (`TRANSACTION_KEY`) although the data has no purchase id: identical rows are real (several
    units of one article bought at one price through one channel on one day). Lines are numbered in file order."""
    same = Window.partitionBy(*TRANSACTION_KEY[:-1]).orderBy("line_number")
    return rows.withColumn("unit", F.row_number().over(same).cast("int"))


def canonical(table: str, df: DataFrame) -> DataFrame:
    """Written rows in the table's canonical schema (transactions: + the `unit` of the row key and the `t_month`
    partition column)."""
    rows = df.where(F.col("_status") == "written")
    extra = []
    if table == TRANSACTIONS:
        rows = rows.transform(with_units)
        extra = [F.col("unit"), F.date_format("t_dat", "yyyy-MM").alias("t_month")]
    return rows.select(*[F.col(c.name).cast(c.dataType) for c in SCHEMAS[table]], *extra)


def quarantined(table: str, df: DataFrame, run_id: str, ingested_at: datetime, source_file: str | None = None
                ) -> DataFrame:
    day = F.col("t_dat") if table == TRANSACTIONS else F.lit(None).cast("date")
    values = {
        "source_file": F.lit(source_file or RAW_FILES[table]), "line_number": F.col("line_number"),
        "raw_line": F.col("raw_line"), "reason": F.col("reason"), "run_id": F.lit(run_id),
        "ingested_at": F.lit(ingested_at), "t_dat": day,
    }
    return df.where(F.col("_status") == "quarantined").select(
        *[values[c.name].cast(c.dataType).alias(c.name) for c in QUARANTINE_SCHEMA]
    )


# --- the report -------------------------------------------------------------------------------------------
@dataclass
class FileReport:
    source_file: str
    table: str
    rows_read: int
    rows_written: int = 0
    rows_quarantined: int = 0
    rows_skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.rows_read == self.rows_written + self.rows_quarantined + self.rows_skipped

    HEADER = f"{'file':<28} {'table':<13} {'read':>12} {'written':>12} {'quarantined':>12} {'skipped':>10}"

    def lines(self) -> list[str]:
        """The file's row of the report, then its quarantine reasons, most frequent first."""
        out = [
            f"{self.source_file:<28} {self.table:<13} {self.rows_read:>12,} {self.rows_written:>12,} "
            f"{self.rows_quarantined:>12,} {self.rows_skipped:>10,}"
            + ("" if self.balanced else "   <- does not add up")
        ]
        for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(f"    {count:>10,}  {reason}")
        return out


@dataclass
class IngestReport:
    run_id: str
    raw_dir: str
    since: date | None
    started_at: datetime
    finished_at: datetime | None = None
    files: list[FileReport] = field(default_factory=list)

    def file(self, table: str) -> FileReport:
        return next(f for f in self.files if f.table == table)

    def format(self) -> str:
        head = f"ingest {self.run_id} from {self.raw_dir}" + (f" (since {self.since})" if self.since else "")
        seconds = (self.finished_at - self.started_at).total_seconds() if self.finished_at else 0.0
        lines = [head + f", {seconds:.1f} s", "", FileReport.HEADER]
        for f in self.files:
            lines.extend(f.lines())
        lines.append("")
        lines.append("rows read = written + quarantined + skipped for every file; bad rows: table `quarantine`")
        return "\n".join(lines)


# --- checks before anything is written ---------------------------------------------------------------------
def raw_path(raw_dir: str, table: str) -> str:
    return f"{str(raw_dir).rstrip('/')}/{RAW_FILES[table]}"


def read_header(spark: SparkSession, path: str) -> list[str] | None:
    """The header's column names, or None when the file does not exist."""
    local = local_file(path)
    if local is not None:
        if not local.is_file():
            return None
        with local.open(encoding="utf-8", newline="") as lines:
            first = [(lines.readline().rstrip("\r\n"),)]
    else:
        try:
            first = spark.read.text(path).limit(1).collect()
        except AnalysisException as exc:
            if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
                return None
            raise
    line = first[0][0].lstrip("\ufeff") if first and first[0][0] else ""
    return split_fields(line) if _LINE_RE.fullmatch(line) else [line]


def header_problem(spark: SparkSession, path: str, table: str) -> tuple[str, bool] | None:
    """What is wrong with `path` as the raw file of `table` (message, file missing), or None when it exists with
    exactly the Kaggle header."""
    expected = ", ".join(RAW_COLUMNS[table])
    found = read_header(spark, path)
    if found is None:
        return f"{path}: file not found (expected columns: {expected})", True
    if found != RAW_COLUMNS[table]:
        return f"{path}: header does not match. expected columns: {expected}; found: {', '.join(found)}", False
    return None


def check_sources(spark: SparkSession, raw_dir: str) -> None:
    """Every raw file present with exactly the Kaggle header; otherwise one error listing every problem."""
    problems = [p for p in (header_problem(spark, raw_path(raw_dir, t), t) for t in INGEST_ORDER) if p]
    if problems:
        error = MissingRawFile if any(missing for _, missing in problems) else IngestError
        raise error("nothing was ingested:\n  " + "\n  ".join(message for message, _ in problems))


def parse_since(since: str | date | None) -> date | None:
    if since in (None, ""):
        return None
    if isinstance(since, date):
        return since
    try:
        return date.fromisoformat(str(since))
    except ValueError:
        raise IngestError(f"--since {since!r}: expected a date YYYY-MM-DD") from None


# --- the run -------------------------------------------------------------------------------------------------
def classify(
    lake: Lakehouse, path: str, table: str, since: date | None, today: date, article_ids: DataFrame | None
) -> tuple[DataFrame, int]:
    """One raw file of `table` -> every record with its typed columns, `reason` and `_status` (persisted), rows
    read. Transactions are checked against `article_ids`, the valid catalogue."""
    spark, n_fields = lake.spark, len(RAW_COLUMNS[table])
    records, rows_read = (
        read_records_local(spark, path, n_fields) if table == ARTICLES else read_lines(spark, path)
    )
    df = records.transform(typed(table))
    if table == ARTICLES:
        df = df.transform(flag_duplicates("article_id"))
    elif table == CUSTOMERS:
        df = df.transform(check_customers)
    else:
        df = df.transform(check_transactions(article_ids, lake.config.ingest, today))
    df = df.transform(with_status(since)).drop(*[c for c in df.columns if c.startswith("_raw_")])
    # raw lines are kept only where the quarantine needs them
    df = df.withColumn("raw_line", F.when(F.col("_status") == "quarantined", F.col("raw_line")))
    return df.persist(StorageLevel.MEMORY_AND_DISK), rows_read


def count_file(table: str, df: DataFrame, rows_read: int, source_file: str | None = None) -> FileReport:
    report = FileReport(source_file or RAW_FILES[table], table, rows_read)
    for row in df.groupBy("_status", "reason").count().collect():
        if row["_status"] == "written":
            report.rows_written += row["count"]
        elif row["_status"] == "skipped":
            report.rows_skipped += row["count"]
        else:
            report.rows_quarantined += row["count"]
            report.reasons[row["reason"]] = report.reasons.get(row["reason"], 0) + row["count"]
    if not report.balanced:
        raise IngestError(
            f"{table}: {rows_read} rows read but {report.rows_written} written + {report.rows_quarantined} "
            f"quarantined + {report.rows_skipped} skipped; nothing was written"
        )
    return report


def rows_added(lake: Lakehouse, table: str, version_before: int | None) -> int:
    """New rows in the table's last commit, as Delta counted them (a replaceWhere also rewrites, "copies",
    the rows of touched files that stay); no new commit means nothing was written."""
    last = lake.history(table).orderBy(F.desc("version")).select("version", "operationMetrics").first()
    if last is None or last["version"] == version_before:
        return 0
    metrics = last["operationMetrics"] or {}
    return int(metrics.get("numOutputRows", -1)) - int(metrics.get("numCopiedRows", 0))


def write_checked(lake: Lakehouse, df: DataFrame, table: str, expected: int, replace_where: str | None = None) -> None:
    """A Delta write whose own row count must be the one the report promises."""
    before = lake.version(table)
    lake.write(df, table, replace_where=replace_where)
    written = rows_added(lake, table, before)
    if written != expected:
        raise IngestError(f"{table}: Delta wrote {written} rows, {expected} expected")


def require_row_key(lake: Lakehouse) -> None:
    """A `transactions` table from before the row key cannot take a partial write; say how to fix it."""
    if lake.exists(TRANSACTIONS) and "unit" not in lake.read(TRANSACTIONS).columns:
        raise IngestError(
            f"table '{TRANSACTIONS}' at {lake.location(TRANSACTIONS)} has no 'unit' column (part of its row key; the "
            f"table was written by an older version): run a full `recsys ingest` once, then load days again"
        )


def runs_rows(report: IngestReport) -> list[tuple]:
    return [
        (report.run_id, report.started_at, report.finished_at, report.raw_dir, report.since, f.source_file,
         f.table, f.rows_read, f.rows_written, f.rows_quarantined, f.rows_skipped)
        for f in report.files
    ]


def quarantine_scope(since: date | None) -> str | None:
    """What a run replaces in `quarantine`: all of it, or with `--since` the catalogue files' rows and the
    transactions rows of the replaced dates (or without a readable date)."""
    if since is None:
        return None
    files = ", ".join(f"'{RAW_FILES[t]}'" for t in (ARTICLES, CUSTOMERS))
    return (
        f"source_file IN ({files}) OR (source_file = '{RAW_FILES[TRANSACTIONS]}' "
        f"AND (t_dat IS NULL OR t_dat >= '{since.isoformat()}'))"
    )


def run(
    lake: Lakehouse, raw_dir: str, since: str | date | None = None, today: date | None = None
) -> IngestReport:
    """Ingest the three raw CSVs of `raw_dir`; with `since`, replace only transactions on or after that date.

    Articles and customers are replaced whole each run (they are the current catalogue and customer base);
    re-running the same input gives the same tables.
    """
    spark = lake.spark
    since_day = parse_since(since)
    today = today or datetime.now(timezone.utc).date()
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    report = IngestReport(uuid.uuid4().hex[:12], str(raw_dir), since_day, started)
    check_sources(spark, raw_dir)
    if since_day is not None:
        require_row_key(lake)

    classified: dict[str, DataFrame] = {}
    try:
        article_ids = None
        for table in INGEST_ORDER:
            df, rows_read = classify(lake, raw_path(raw_dir, table), table, since_day, today, article_ids)
            classified[table] = df
            report.files.append(count_file(table, df, rows_read))
            if table == ARTICLES:
                article_ids = canonical(ARTICLES, df).select("article_id")

        with lake.restore_on_failure(ARTICLES, CUSTOMERS, TRANSACTIONS, QUARANTINE, INGEST_RUNS):
            for table in INGEST_ORDER:
                rows = canonical(table, classified[table])
                expected = report.file(table).rows_written
                if table == TRANSACTIONS and since_day is not None:
                    write_checked(lake, rows, table, expected, replace_where=f"t_dat >= '{since_day.isoformat()}'")
                else:
                    write_checked(lake, rows, table, expected)
            bad = [quarantined(t, classified[t], report.run_id, started) for t in INGEST_ORDER]
            scope = quarantine_scope(since_day)
            write_checked(
                lake, bad[0].unionByName(bad[1]).unionByName(bad[2]), QUARANTINE,
                sum(f.rows_quarantined for f in report.files), replace_where=scope,
            )
            report.finished_at = datetime.now(timezone.utc).replace(tzinfo=None)
            lake.write(spark.createDataFrame(runs_rows(report), INGEST_RUNS_SCHEMA), INGEST_RUNS, mode="append")
    finally:
        for df in classified.values():
            df.unpersist()
    return report
