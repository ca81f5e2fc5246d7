"""A daily drop: one day's purchases, a file shaped like `transactions_train.csv`, merged into `transactions`.

Why it is built this way:
- New purchases arrive as one file per day, `<paths.landing_dir>/transactions/YYYY-MM-DD.csv`; the nightly
  reads that file only, never the two-year CSV again.
- The rows go through ingest's own reader, parser and checks (`ingest.classify` against the `articles` table),
  so a bad row of a drop lands in `quarantine` (source file `transactions/<day>.csv`, its line number and
  reason) exactly like a bad row of the big file.
- A drop holds one day, and that day has purchases. The file is refused before anything is written when it is
  missing, empty (zero bytes or a header only), has another header, holds rows dated another day, is for a
  day in the future, or would leave a day without purchases between the table and itself.
- Rows are merged on the row key `TRANSACTION_KEY` (recsys.tables): the purchase's columns plus `unit`, the row's
  ordinal among the identical rows of its day. A purchase has no id, and identical rows are real (several units
  of one article), so the ordinal is what makes "the same row" well defined. Loading a day again finds every key
  already there and writes nothing (no new Delta version, so the pipeline's later stages see unchanged inputs);
  a day already loaded with other rows is an error that names the difference, unless the caller replaces it on
  purpose (`replace=True`, `recsys nightly --replace-day`): then one MERGE inserts the keys that are new and
  deletes the keys the file no longer has.
- The writes of a load (transactions, quarantine, ingest_runs) sit in one `Lakehouse.transaction`: a failure
  restores each table's previous version.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys import ingest
from recsys.ingest import FileReport, IngestError, IngestReport, MissingRawFile
from recsys.tables import (
    ARTICLES,
    DROP_FOLDER,
    INGEST_RUNS,
    INGEST_RUNS_SCHEMA,
    QUARANTINE,
    RAW_COLUMNS,
    TRANSACTION_KEY,
    TRANSACTIONS,
    Lakehouse,
    drop_file,
)

LATEST = "latest"                       # --date latest: the newest drop in the landing folder
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.csv$")
LOADED, UNCHANGED, REPLACED = "loaded", "unchanged", "replaced"


# --- where a day's file is ------------------------------------------------------------------------------------
def drop_path(landing_dir: str, day: date) -> str:
    return f"{str(landing_dir).rstrip('/')}/{drop_file(day)}"


def resolve_day(landing_dir: str, text: str | date) -> date:
    """`YYYY-MM-DD`, or `latest`: the newest `YYYY-MM-DD.csv` in the landing folder (what a scheduled or
    file-triggered job loads without being told the day)."""
    if isinstance(text, date):
        return text
    if text != LATEST:
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise IngestError(f"--date {text!r}: expected a day YYYY-MM-DD or '{LATEST}'") from None
    folder = f"{str(landing_dir).rstrip('/')}/{DROP_FOLDER}"
    local = ingest.local_file(folder)
    if local is None:
        raise IngestError(f"--date {LATEST} lists a local folder (or a /Volumes path), not {folder}: give the day")
    days = sorted(m.group(1) for p in (local.iterdir() if local.is_dir() else []) if (m := _DAY_FILE.match(p.name)))
    if not days:
        raise MissingRawFile(f"{folder}: no drop file named YYYY-MM-DD.csv (--date {LATEST})")
    return date.fromisoformat(days[-1])


# --- checks of the whole file ---------------------------------------------------------------------------------
def check_file(lake: Lakehouse, landing_dir: str, day: date, today: date) -> None:
    """The drop exists, is not empty, has Kaggle's header, is not for a future day, leaves no gap."""
    path = drop_path(landing_dir, day)
    if day > today:
        raise IngestError(f"{path}: the drop is for {day}, a day in the future (today is {today})")
    local = ingest.local_file(path)
    if local is not None and local.is_file() and local.stat().st_size == 0:
        raise IngestError(f"{path}: empty file (0 bytes); expected the header "
                          f"({', '.join(RAW_COLUMNS[TRANSACTIONS])}) and the purchases of {day}")
    problem = ingest.header_problem(lake.spark, path, TRANSACTIONS)
    if problem:
        message, missing = problem
        raise (MissingRawFile if missing else IngestError)(f"the drop for {day}: {message}")
    for table in (ARTICLES, TRANSACTIONS):
        if not lake.exists(table):
            raise IngestError(f"table '{table}' does not exist at {lake.location(table)}: run a full `recsys ingest` "
                              f"of the raw files once before loading daily drops")
    ingest.require_row_key(lake)
    last = lake.read(TRANSACTIONS).agg(F.max("t_dat")).first()[0]
    if last is not None and day > last + timedelta(days=1):
        first_missing = last + timedelta(days=1)
        raise IngestError(f"{path}: loading {day} would leave a gap: the last day in '{TRANSACTIONS}' is {last}; "
                          f"load {first_missing} first ({drop_path(landing_dir, first_missing)})")


def other_days(records: DataFrame, day: date) -> DataFrame:
    """Rows dated another day than the drop's: per date, its rows and first line (an unparseable date is a row
    error, quarantined like in ingest, not counted here)."""
    return (records.where(F.col("t_dat").isNotNull() & (F.col("t_dat") != F.lit(day)))
            .groupBy("t_dat").agg(F.count(F.lit(1)).alias("rows"), F.min("line_number").alias("first_line"))
            .orderBy("t_dat"))


def check_one_day(records: DataFrame, path: str, day: date, today: date) -> None:
    wrong = other_days(records, day).collect()
    if wrong:
        listed = ", ".join(
            f"{r.t_dat} ({r.rows:,} row{'s' if r.rows > 1 else ''}, first on line {r.first_line}"
            + (", in the future)" if r.t_dat > today else ")") for r in wrong[:5])
        more = f" and {len(wrong) - 5} more dates" if len(wrong) > 5 else ""
        raise IngestError(f"{path}: a drop holds the purchases of one day ({day}), but "
                          f"{sum(r.rows for r in wrong):,} row(s) are dated otherwise: {listed}{more}")


# --- the day in the table against the day in the file ---------------------------------------------------------
def day_scope(day: date) -> str:
    """The target rows of one day, on the partition column first (so Delta reads one month's files)."""
    return f"t.t_month = '{day:%Y-%m}' AND t.t_dat = DATE'{day.isoformat()}'"


@dataclass
class DayDiff:
    """How the file's day differs from the day in the tables (keys = TRANSACTION_KEY)."""

    in_table: int                       # rows of the day in `transactions`
    in_file: int                        # valid rows of the file
    new: int                            # keys in the file, not in the table
    gone: int                           # keys in the table, not in the file
    quarantined_before: int             # lines of this file in `quarantine`
    quarantined_now: int
    same_quarantine: bool

    @property
    def same(self) -> bool:
        return self.new == 0 and self.gone == 0 and self.same_quarantine

    @property
    def first_load(self) -> bool:
        return self.in_table == 0 and self.quarantined_before == 0

    def describe(self, day: date) -> str:
        return (f"'{TRANSACTIONS}' holds {self.in_table:,} rows of {day} and '{QUARANTINE}' "
                f"{self.quarantined_before:,} lines of its file; the file now gives {self.in_file:,} valid rows "
                f"({self.new:,} not in the table, {self.gone:,} of the table's not in the file) and "
                f"{self.quarantined_now:,} quarantined lines")


def day_diff(table_rows: DataFrame, file_rows: DataFrame, bad_before: list[tuple], bad_now: list[tuple]) -> DayDiff:
    """`table_rows` / `file_rows`: the day's rows (with TRANSACTION_KEY); `bad_*`: (line_number, reason) pairs.
    One full outer join on the key counts all four numbers."""
    table_keys = table_rows.select(*TRANSACTION_KEY, F.lit(1).alias("_in_table"))
    file_keys = file_rows.select(*TRANSACTION_KEY, F.lit(1).alias("_in_file"))
    in_table, in_file = F.col("_in_table").isNotNull(), F.col("_in_file").isNotNull()
    counts = table_keys.join(file_keys, TRANSACTION_KEY, "full_outer").agg(
        F.count(F.when(in_table, 1)).alias("in_table"), F.count(F.when(in_file, 1)).alias("in_file"),
        F.count(F.when(in_file & ~in_table, 1)).alias("new"), F.count(F.when(in_table & ~in_file, 1)).alias("gone"),
    ).first()
    return DayDiff(
        in_table=counts["in_table"], in_file=counts["in_file"], new=counts["new"], gone=counts["gone"],
        quarantined_before=len(bad_before), quarantined_now=len(bad_now),
        same_quarantine=sorted(bad_before) == sorted(bad_now),
    )


# --- the load -------------------------------------------------------------------------------------------------
@dataclass
class DropReport:
    day: date
    path: str
    outcome: str                        # loaded | unchanged | replaced
    file: FileReport
    diff: DayDiff
    run_id: str

    @property
    def changed(self) -> bool:
        return self.outcome != UNCHANGED

    def format(self) -> str:
        d = self.diff
        head = {
            LOADED: f"day {self.day}: {d.new:,} purchase rows loaded from {self.path}",
            UNCHANGED: f"day {self.day} was already loaded with the same {d.in_table:,} rows from {self.path}: "
                       f"nothing changed, nothing new to publish",
            REPLACED: f"day {self.day} replaced from {self.path}: {d.new:,} rows added, {d.gone:,} removed, "
                      f"{d.in_file:,} rows of that day now",
        }[self.outcome]
        return "\n".join([head, "", FileReport.HEADER, *self.file.lines()])


def load_day(lake: Lakehouse, landing_dir: str, day: str | date, today: date | None = None,
             replace: bool = False) -> DropReport:
    """Merge the drop of `day` (or `latest`) into `transactions`, its bad rows into `quarantine`.

    Loading a day again changes nothing; a day already loaded with other rows raises `IngestError` unless
    `replace`. Every refused file leaves every table at its version before the call.
    """
    day = resolve_day(landing_dir, day)
    path = drop_path(landing_dir, day)
    today = today or datetime.now(timezone.utc).date()
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    run = IngestReport(uuid.uuid4().hex[:12], str(landing_dir), day, started)
    check_file(lake, landing_dir, day, today)
    articles = lake.read(ARTICLES).select("article_id")
    records, rows_read = ingest.classify(lake, path, TRANSACTIONS, None, today, articles)
    rows = ingest.canonical(TRANSACTIONS, records).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        if rows_read == 0:
            raise IngestError(f"{path}: no purchases: the file holds only its header (a day always has purchases)")
        check_one_day(records, path, day, today)
        report = ingest.count_file(TRANSACTIONS, records, rows_read, drop_file(day))
        run.files.append(report)
        bad = ingest.quarantined(TRANSACTIONS, records, run.run_id, started, drop_file(day))
        bad_now = [(r.line_number, r.reason) for r in bad.select("line_number", "reason").collect()]
        bad_before = [] if not lake.exists(QUARANTINE) else [
            (r.line_number, r.reason) for r in lake.read(QUARANTINE)
            .where(F.col("source_file") == drop_file(day)).select("line_number", "reason").collect()]
        in_table = lake.read(TRANSACTIONS).alias("t").where(day_scope(day))
        diff = day_diff(in_table, rows, bad_before, bad_now)
        if diff.same:
            return DropReport(day, path, UNCHANGED, report, diff, run.run_id)
        if not diff.first_load and not replace:
            raise IngestError(f"day {day} is already loaded with different rows: {diff.describe(day)}. Nothing was "
                              f"written; to replace the day with this file, run again with --replace-day")
        outcome = LOADED if diff.first_load else REPLACED
        with lake.restore_on_failure(TRANSACTIONS, QUARANTINE, INGEST_RUNS):
            merged = lake.merge(rows, TRANSACTIONS, TRANSACTION_KEY, day_scope(day), delete_missing=replace)
            wrote = (int(merged.get("numTargetRowsInserted", 0)), int(merged.get("numTargetRowsDeleted", 0)))
            if wrote != (diff.new, diff.gone if replace else 0):
                raise IngestError(f"{TRANSACTIONS}: the MERGE of {day} inserted {wrote[0]} "
                                  f"and deleted {wrote[1]} rows; "
                                  f"{diff.new} and {diff.gone if replace else 0} expected")
            ingest.write_checked(lake, bad, QUARANTINE, report.rows_quarantined,
                                 replace_where=f"source_file = '{drop_file(day)}'")
            run.finished_at = datetime.now(timezone.utc).replace(tzinfo=None)
            lake.write(lake.spark.createDataFrame(ingest.runs_rows(run), INGEST_RUNS_SCHEMA), INGEST_RUNS,
                       mode="append")
        return DropReport(day, path, outcome, report, diff, run.run_id)
    finally:
        rows.unpersist()
        records.unpersist()
