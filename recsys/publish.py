"""Publishing the `recommendations` table: validated, atomic, traceable, reversible.

A scoring run first writes its lists to `recommendations_staging` (the expensive computation happens once),
checks them there (every customer exactly K distinct articles, ranks 1..K, 10-character ids), and only then
overwrites `recommendations` in one Delta commit. Readers therefore see the previous version or the new one,
never a mix, and a run that fails anywhere before that commit leaves the last good version in place.

Each publish commit carries Delta `userMetadata` (run_id, model_version, action) and the rows carry
`run_id` / `model_version`, so `DESCRIBE HISTORY recommendations` says which model produced which version,
and `rollback` can go back to the previously published run. Rows are range-partitioned and sorted by
`customer_id` before writing: each file holds a narrow customer_id range, so a lookup of one customer reads one
file thanks to Delta's min/max data skipping (what OPTIMIZE ZORDER BY customer_id gives for one column,
without a second commit).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
import uuid
from typing import Any, Iterable, Iterator

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys import monitor
from recsys.spark import described, release
from recsys.tables import (
    ARTICLES, CUSTOMERS, PUBLISH_CHECKS, RECOMMENDATIONS, RECOMMENDATIONS_NAMED, RECOMMENDATIONS_SCHEMA,
    RECOMMENDATIONS_STAGING, Lakehouse,
)

USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
NAME_COLUMNS = ("prod_name", "product_type_name", "colour_group_name", "index_group_name")
PUBLISH, ROLLBACK = "publish", "rollback"
EVERYONE, RELIST = "everyone", "relist"  # a publish's scope: every customer's list new, or only some of them


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def conform(df: DataFrame, model_version: str, run_id: str, generated_at: dt.datetime | None = None) -> DataFrame:
    """customer_id, rank, article_id, score, source (+ anything) -> exactly the `recommendations` schema."""
    missing = [c for c in ("customer_id", "rank", "article_id", "score", "source") if c not in df.columns]
    if missing:
        raise ValueError(f"recommendations are missing column(s) {missing}; got {df.columns}")
    stamp = generated_at or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    extra = {"model_version": F.lit(model_version), "run_id": F.lit(run_id), "generated_at": F.lit(stamp)}
    return df.select(*[
        (F.col(f.name) if f.name in df.columns and f.name not in extra else extra[f.name])
        .cast(f.dataType).alias(f.name)
        for f in RECOMMENDATIONS_SCHEMA.fields
    ])


_RANK_BITS = 62  # ranks 1..62 fit one long's bits: the distinct ranks of a list as a bit set


def _rank_parts(k: int) -> list[Column]:
    """The per-(customer, article) part of counting a list's distinct ranks: the bit set of its ranks (a rank
    outside 1..62 sets no bit; min/max rank catch it), or for K > 62 the ranks themselves (a distinct count)."""
    if k <= _RANK_BITS:
        rank = F.col("rank")
        bit = F.when(rank.between(1, _RANK_BITS), F.pow(F.lit(2.0), rank).cast("long"))  # exact: a power of 2
        return [F.bit_or(bit).alias("rank_bits")]
    return [F.collect_set("rank").alias("rank_set")]


def _distinct_ranks(k: int) -> Column:
    """A customer's distinct ranks (non-null), from `_rank_parts`."""
    if k <= _RANK_BITS:
        return F.coalesce(F.bit_count(F.bit_or("rank_bits")), F.lit(0))
    return F.size(F.array_distinct(F.flatten(F.collect_list("rank_set"))))


def check_lists(recs: DataFrame, customers: DataFrame, k: int) -> dict[str, int]:
    """Count the customers whose list breaks the contract; all zeros means the table may be published.

    Contract: every customer in `customers` has exactly `k` rows with ranks 1..k, `k` distinct articles,
    10-character article ids, and no list belongs to a customer outside `customers`.
    """
    # Two aggregations on one shuffle, no distinct count: per (customer, article) first, so a customer's distinct
    # articles are its rows there, then per customer. Two distinct counts in one aggregation made Spark copy
    # every list row three times (Expand) and shuffle twice: the costliest step after the lists themselves.
    per_pair = recs.groupBy("customer_id", "article_id").agg(
        F.count(F.lit(1)).alias("rows"),
        F.min("rank").alias("min_rank"),
        F.max("rank").alias("max_rank"),
        *_rank_parts(k),
        F.sum((F.length("article_id") != 10).cast("int")).alias("bad_ids"),
    )
    per_customer = per_pair.groupBy("customer_id").agg(
        F.sum("rows").alias("rows"),
        F.count("article_id").alias("articles"),  # a null article_id is not an article (as a distinct count)
        _distinct_ranks(k).alias("ranks"),
        F.min("min_rank").alias("min_rank"),
        F.max("max_rank").alias("max_rank"),
        F.sum("bad_ids").alias("bad_ids"),
    )
    wanted = customers.select("customer_id").distinct().withColumn("wanted", F.lit(True))
    joined = wanted.join(per_customer, "customer_id", "full_outer")
    bad_list = (
        (F.col("rows") != k) | (F.col("articles") != k) | (F.col("ranks") != k)
        | (F.col("min_rank") != 1) | (F.col("max_rank") != k) | (F.col("bad_ids") > 0)
    )
    row = joined.agg(
        F.count(F.when(F.col("wanted"), 1)).alias("customers"),
        F.count(F.when(F.col("wanted") & F.col("rows").isNull(), 1)).alias("without_list"),
        F.count(F.when(F.col("wanted").isNull(), 1)).alias("unknown_customers"),
        F.count(F.when(F.col("rows").isNotNull() & bad_list, 1)).alias("bad_lists"),
        F.min(
            F.when(F.col("rows").isNull() | F.col("wanted").isNull() | bad_list, F.col("customer_id"))
        ).alias("example"),
        F.coalesce(F.sum("rows"), F.lit(0)).alias("rows"),
    ).first()
    return row.asDict()


def validate(recs: DataFrame, customers: DataFrame, k: int) -> dict[str, int]:
    """`check_lists`, raising a ValueError that names one offending customer when anything is wrong."""
    report = check_lists(recs, customers, k)
    problems = {key: report[key] for key in ("without_list", "unknown_customers", "bad_lists") if report[key]}
    if problems:
        raise ValueError(
            f"recommendations not published: {problems} (expected exactly {k} distinct articles for each of "
            f"{report['customers']} customers; e.g. customer_id {report['example']})"
        )
    return report


def with_article_names(recs: DataFrame, articles: DataFrame) -> DataFrame:
    """Recommendations plus the article's name, type, colour and index group, for people reading them."""
    names = articles.select("article_id", *NAME_COLUMNS).dropDuplicates(["article_id"])
    return recs.join(F.broadcast(names), "article_id", "left").select(
        "customer_id", "rank", "article_id", *NAME_COLUMNS, "score", "source", "model_version", "run_id",
        "generated_at",
    )


@contextlib.contextmanager
def commit_metadata(spark: SparkSession, **fields: Any) -> Iterator[None]:
    """Every Delta commit inside the block records `fields` as JSON userMetadata (shown by DESCRIBE HISTORY)."""
    previous = spark.conf.get(USER_METADATA_CONF, None)
    spark.conf.set(USER_METADATA_CONF, json.dumps(fields, sort_keys=True, default=str))
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(USER_METADATA_CONF)
        else:
            spark.conf.set(USER_METADATA_CONF, previous)


def _layout(df: DataFrame, partitions: int) -> DataFrame:
    """Narrow customer_id ranges per file, sorted inside: point lookups skip all other files."""
    return df.repartitionByRange(max(1, partitions), "customer_id").sortWithinPartitions("customer_id", "rank")


@contextlib.contextmanager
def _session_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Session settings for the writes inside the block only (Spark copies them into the Parquet writer's
    Hadoop conf). A cluster that refuses a setting (some Databricks modes) writes with its defaults."""
    previous: dict[str, str | None] = {}
    for key, value in settings.items():
        try:
            previous[key] = spark.conf.get(key, None)
            spark.conf.set(key, value)
        except Exception:  # noqa: BLE001 - a refused setting only costs lookup speed
            previous.pop(key, None)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def write_for_lookup(lake: Lakehouse, recs: DataFrame, name: str = RECOMMENDATIONS) -> None:
    """Write `recs` in the lookup layout: `_layout`'s files, and Parquet row groups of `serving.row_group_bytes`,
    whose min/max customer_id let a Spark-free reader (recsys.lookup) decode one small row group per lookup."""
    config = lake.config
    with _session_conf(lake.spark, {"parquet.block.size": str(config.serving.row_group_bytes)}):
        lake.write(_layout(recs, config.scoring.partitions), name)


def publish(lake: Lakehouse, recs: DataFrame | Iterable[DataFrame], model_version: str, run_id: str | None = None,
            k: int | None = None, as_of: dt.date | None = None, popularity_only: bool = False,
            kept: DataFrame | None = None) -> dict[str, Any]:
    """Stage, validate, check (recsys.monitor), then replace `recommendations` in one commit, and the named
    companion table after it.

    `recs` needs customer_id, rank, article_id, score, source: one DataFrame, or slices of the customers computed
    one after the other (each is staged, and what Spark kept for it released, before the next is computed: the
    disk a computation needs follows the slice, not the customer base). A failure in the computation of `recs`, the
    validation or a blocking check writes nothing to the published tables; a failure in either write puts both
    back to their previous version (`Lakehouse.restore_on_failure`). `as_of`: the feature snapshot the lists
    were scored from (its drift against the one before is checked). `popularity_only`: lists that are all
    popularity by design (the walking skeleton), so their fallback share is recorded, not checked.

    `kept`: published rows (the `recommendations` schema) that stay as they are beside `recs` (a relist: only some
    customers got new lists). They take this run's run_id, so one publish is one run, but keep their
    model_version and generated_at: each row still says which model made it, and when. The whole table is
    validated and checked, and rewritten in the lookup layout, as for a full publish.
    """
    config = lake.config
    k = k or config.scoring.k
    run_id = run_id or new_run_id()
    slices = iter([recs] if isinstance(recs, DataFrame) else recs)
    slice_seconds: list[float] = []  # what each slice took, computation and staging (the summary says)
    started = time.perf_counter()
    while True:  # the whole computation runs here, once
        with described(lake.spark, f"slice {len(slice_seconds) + 1}"):
            part = next(slices, None)  # making a slice computes some of it (its customers' candidates)
            if part is None:
                break
            lake.write(conform(part, model_version, run_id), RECOMMENDATIONS_STAGING,
                       mode="append" if slice_seconds else "overwrite")
        del part  # the slice's plan holds its checkpoints: let go of it before releasing
        release(lake.spark)
        slice_seconds.append(round(time.perf_counter() - started, 1))
        started = time.perf_counter()
    if not slice_seconds:
        raise ValueError("publish: no recommendations given (an empty list of slices)")
    if kept is not None:
        lake.write(kept.withColumn("run_id", F.lit(run_id)), RECOMMENDATIONS_STAGING, mode="append")
    staged = lake.read(RECOMMENDATIONS_STAGING)
    report = validate(staged, lake.read(CUSTOMERS), k)
    started = time.perf_counter()
    with described(lake.spark, "checks"):
        checked = (monitor.check_before_publish(lake, staged, run_id, as_of, popularity_only)
                   if config.monitoring.enabled else [])
    checks_s = round(time.perf_counter() - started, 1)  # what watching the lists costs, per run (BENCHMARKS)
    articles = lake.read(ARTICLES)
    with lake.restore_on_failure(RECOMMENDATIONS, RECOMMENDATIONS_NAMED):
        with commit_metadata(lake.spark, action=PUBLISH, run_id=run_id, model_version=model_version,
                             as_of=as_of, scope=EVERYONE if kept is None else RELIST):
            write_for_lookup(lake, staged)
            lake.write(with_article_names(staged, articles), RECOMMENDATIONS_NAMED)
    return {
        "table": lake.location(RECOMMENDATIONS),
        "version": lake.version(RECOMMENDATIONS),
        "run_id": run_id,
        "model_version": model_version,
        "customers": report["customers"],
        "rows": report["rows"],
        "k": k,
        "sources": {r["source"]: r["n"] for r in staged.groupBy("source").agg(F.count(F.lit(1)).alias("n")).collect()},
        "checks": monitor.summary(checked) if config.monitoring.enabled else "checks: off (monitoring.enabled)",
        "checks_s": checks_s,
        "slice_seconds": slice_seconds,
    }


def history(lake: Lakehouse, name: str = RECOMMENDATIONS) -> list[dict[str, Any]]:
    """Oldest first: version, timestamp, operation and the parsed userMetadata of every commit of `name`."""
    rows = lake.history(name).select("version", "timestamp", "operation", "userMetadata").orderBy("version").collect()
    out = []
    for r in rows:
        try:
            meta = json.loads(r["userMetadata"]) if r["userMetadata"] else {}
        except (TypeError, ValueError):
            meta = {"note": r["userMetadata"]}
        out.append({"version": int(r["version"]), "timestamp": r["timestamp"], "operation": r["operation"], **meta})
    return out


def live_publishes(commits: list[dict[str, Any]], current_run_id: str | None = None) -> list[dict[str, Any]]:
    """The publish commits (oldest first) that led to what readers see: not rolled back since, and, given the
    run_id of the rows in the table now (`current_run`), none after that run's (a Delta RESTORE, e.g. a failed
    publish put back, records no rollback)."""
    withdrawn = {c.get("from_run_id") for c in commits if c.get("action") == ROLLBACK}
    live = [c for c in commits if c.get("action") == PUBLISH and c.get("run_id") not in withdrawn]
    if current_run_id is not None:
        last = max((i for i, c in enumerate(live) if c["run_id"] == current_run_id), default=None)
        live = live[:last + 1] if last is not None else []
    return live


def last_as_of(commits: list[dict[str, Any]], scope: str | None = None,
               checked: dict[str, dt.date] | None = None, current_run_id: str | None = None) -> dt.date | None:
    """The snapshot date of the newest live publish (of `scope`: EVERYONE or RELIST, when given); None when there
    is none or its date is unknown. A publish without a scope was a full one; one from before commits recorded
    their date takes it from `checked` (run_id -> as_of, what `publish_checks` recorded for the run)."""
    for commit in reversed(live_publishes(commits, current_run_id)):
        if scope is None or commit.get("scope", EVERYONE) == scope:
            if commit.get("as_of"):
                return dt.date.fromisoformat(commit["as_of"])
            return (checked or {}).get(commit["run_id"])
    return None


def checked_as_of(lake: Lakehouse) -> dict[str, dt.date]:
    """run_id -> the snapshot date its checks recorded (`publish_checks`; empty without monitoring)."""
    if not lake.exists(PUBLISH_CHECKS):
        return {}
    rows = lake.read(PUBLISH_CHECKS).where(F.col("as_of").isNotNull()).select("run_id", "as_of").distinct()
    return {r.run_id: r.as_of for r in rows.collect()}


def published_dates(lake: Lakehouse, run_id: str | None = None) -> dict[str, Any]:
    """What the table holds now (the rows of `run_id`, default `current_run`): the scope of its publish, the
    snapshot date of that publish (`as_of`) and of the last full one (`full_as_of`); None where unknown."""
    commits, checked = history(lake), checked_as_of(lake)
    run_id = run_id or current_run(lake)["run_id"]
    live = live_publishes(commits, run_id)
    return {"scope": live[-1].get("scope", EVERYONE) if live else None,
            "as_of": last_as_of(commits, checked=checked, current_run_id=run_id),
            "full_as_of": last_as_of(commits, EVERYONE, checked, run_id)}


def current_run(lake: Lakehouse) -> dict[str, str]:
    """run_id and model_version of the rows readers see now (read from the data, so restores count)."""
    row = lake.read(RECOMMENDATIONS).select("run_id", "model_version").limit(1).first()
    if row is None:
        raise ValueError(f"table '{RECOMMENDATIONS}' is empty: nothing is published")
    return {"run_id": row["run_id"], "model_version": row["model_version"]}


def rollback_target(commits: list[dict[str, Any]], current_run_id: str) -> dict[str, Any]:
    """The publish to go back to: the last one before the current run's, skipping runs already rolled back."""
    publishes = [c for c in commits if c.get("action") == PUBLISH and c.get("run_id")]
    position = max((i for i, c in enumerate(publishes) if c["run_id"] == current_run_id), default=None)
    if position is None:
        raise ValueError(f"the published run {current_run_id!r} has no publish commit in the table history")
    withdrawn = {c.get("from_run_id") for c in commits if c.get("action") == ROLLBACK} | {current_run_id}
    earlier = [c for c in publishes[:position] if c["run_id"] not in withdrawn]
    if not earlier:
        raise ValueError(f"no earlier published version of '{RECOMMENDATIONS}' to roll back to")
    return earlier[-1]


def rollback(lake: Lakehouse) -> dict[str, Any]:
    """Back to the previously published run, as one new commit of each table (history keeps everything)."""
    current = current_run(lake)
    target = rollback_target(history(lake), current["run_id"])
    named = {c["run_id"]: c["version"] for c in history(lake, RECOMMENDATIONS_NAMED)
             if c.get("action") == PUBLISH and c.get("run_id")} if lake.exists(RECOMMENDATIONS_NAMED) else {}
    with lake.restore_on_failure(RECOMMENDATIONS, RECOMMENDATIONS_NAMED):
        with commit_metadata(lake.spark, action=ROLLBACK, run_id=target["run_id"],
                             model_version=target.get("model_version"), from_run_id=current["run_id"]):
            lake.restore(RECOMMENDATIONS, target["version"])
            if target["run_id"] in named:
                lake.restore(RECOMMENDATIONS_NAMED, named[target["run_id"]])
            else:  # the companion table is derived: rebuild it from the restored rows
                lake.write(with_article_names(lake.read(RECOMMENDATIONS), lake.read(ARTICLES)),
                           RECOMMENDATIONS_NAMED)
    return {
        "table": lake.location(RECOMMENDATIONS),
        "version": lake.version(RECOMMENDATIONS),
        "restored_version": target["version"],
        "run_id": target["run_id"],
        "model_version": target.get("model_version"),
        "rolled_back_run_id": current["run_id"],
    }
