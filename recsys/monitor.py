"""Checks on a scoring run's lists before they are published, and on the customer features they came from.

A model can pass the gate on last week and still produce lists nobody should see tonight: everyone getting the
same dozen articles, most customers falling back to popularity, a feature pipeline that silently changed its
distribution. Each check measures one such thing on the staged lists (against the currently published ones
and the previous feature snapshot); `monitoring.*_warn` thresholds only warn, `monitoring.*_block` thresholds
stop the publish, so the previous lists stay. Every run's checks are kept in the `publish_checks` table.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys.config import MonitoringConfig

OK, WARN, BLOCK = "ok", "warn", "block"
# the popularity fill of recsys.recommend (not the `popularity` candidate source: that one was ranked)
FILL_SOURCES = ("popularity_age_bucket", "popularity_global")
DRIFT_PREFIX = "psi_"   # one check per numeric customer feature: psi_num_purchases_4w, ...


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    warn: float | None          # the soft threshold (None: not checked)
    block: float | None         # the hard threshold (None: not checked)
    direction: str              # "max": higher is worse; "min": lower is worse

    @property
    def status(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return OK

        def crosses(limit: float | None) -> bool:
            if limit is None:
                return False
            return self.value > limit if self.direction == "max" else self.value < limit

        return BLOCK if crosses(self.block) else WARN if crosses(self.warn) else OK

    def describe(self) -> str:
        limit = self.block if self.status == BLOCK else self.warn
        sign = ">" if self.direction == "max" else "<"
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        return f"{self.name} = {value}" + (f" ({sign} {limit:g})" if self.status != OK else "")


class PublishBlocked(RuntimeError):
    """A hard threshold was crossed: the lists are not published and the previous ones stay."""

    def __init__(self, checks: list[Check]):
        self.checks = checks
        blocked = "; ".join(c.describe() for c in checks if c.status == BLOCK)
        super().__init__(f"publish blocked by monitoring: {blocked}. The published recommendations are "
                         "unchanged; see the `publish_checks` table (thresholds: monitoring.* in the config)")


# --- measurements (pure: DataFrames in, numbers out) -----------------------------------------------------------
def list_stats(lists: DataFrame, catalogue_size: int, top: int = 12) -> dict[str, float]:
    """fallback_share: rows filled from popularity after the ranked candidates ran out; catalogue_coverage:
    distinct articles over the catalogue; concentration: the share of all rows taken by the `top` most recommended
    articles (everyone getting the same list shows here); the score distribution (null share, quartiles)."""
    fallback = F.col("source").isin(*FILL_SOURCES)
    # No distinct count beside the quantiles: with one, Spark kept a quantile sketch per article in every task.
    # The rows per article give the distinct articles and the top ones (one count per article: catalogue-sized).
    row = lists.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(fallback.cast("int")).alias("fallback"),
        F.sum(F.col("score").isNull().cast("int")).alias("null_scores"),
        F.percentile_approx("score", [0.01, 0.5, 0.99], 1000).alias("q"),
    ).first()
    rows = row.rows or 0
    per_article = lists.groupBy("article_id").agg(F.count(F.lit(1)).alias("n"))
    listed = per_article.agg(F.count("article_id").alias("articles"),
                             F.sort_array(F.collect_list("n"), asc=False).alias("n")).first()
    top_rows = sum((listed.n or [])[:top])
    q = row.q or [None, None, None]
    return {
        "rows": float(rows),
        "fallback_share": (row.fallback or 0) / rows if rows else None,
        "catalogue_coverage": (listed.articles or 0) / catalogue_size if catalogue_size else None,
        "concentration": top_rows / rows if rows else None,
        "score_null_share": (row.null_scores or 0) / rows if rows else None,
        "score_p01": q[0], "score_p50": q[1], "score_p99": q[2],
    }


def overlap(new: DataFrame, previous: DataFrame | None) -> float | None:
    """Of the articles each customer had in the previous published lists, the share still in the new ones
    (customers in both): a sudden churn of every list is a symptom, not a model improvement."""
    if previous is None:
        return None
    keys = ["customer_id", "article_id"]
    old = previous.select(*keys)
    both = old.select("customer_id").distinct().join(new.select("customer_id").distinct(), "customer_id")
    old_rows = old.join(both, "customer_id")
    row = old_rows.agg(F.count(F.lit(1)).alias("n")).crossJoin(
        old_rows.join(new.select(*keys), keys).agg(F.count(F.lit(1)).alias("kept"))).first()
    return row.kept / row.n if row.n else None


def _bucket(column: str, edges: list[float]):
    """0..len(edges): the quantile bin of `column` (edges from the reference snapshot)."""
    value = F.col(column).cast("double")
    bucket = F.lit(len(edges))
    for i, edge in reversed(list(enumerate(edges))):
        bucket = F.when(value <= F.lit(edge), F.lit(i)).otherwise(bucket)
    return F.when(value.isNotNull(), bucket)


def _shares(df: DataFrame, edges: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    """Per column, the share of non-null rows in each bin: one Spark job for every column at once."""
    pairs = F.explode(F.array(*[F.struct(F.lit(c).alias("c"), _bucket(c, e).alias("b")) for c, e in edges.items()]))
    counts = df.select(pairs.alias("p")).where(F.col("p.b").isNotNull()).groupBy("p.c", "p.b").agg(
        F.count(F.lit(1)).alias("n")).collect()
    out: dict[str, dict[int, float]] = {c: {} for c in edges}
    for row in counts:
        out[row.c][row.b] = row.n
    return {c: {b: bins.get(b, 0) / sum(bins.values()) for b in range(len(edges[c]) + 1)} if bins else {}
            for c, bins in out.items()}


def psi(now: dict[int, float], before: dict[int, float], eps: float = 1e-4) -> float | None:
    """Population stability index between two binned distributions. Below 0.1 stable, 0.1-0.25 a shift worth
    a look, above 0.25 a different population."""
    if not now or not before:
        return None
    return float(sum((max(now.get(b, 0), eps) - max(p, eps)) * math.log(max(now.get(b, 0), eps) / max(p, eps))
                     for b, p in before.items()))


def feature_drift(current: DataFrame, previous: DataFrame | None, columns: list[str],
                  bins: int = 10) -> dict[str, float | None]:
    """PSI of each column between two snapshots, over the previous snapshot's quantile bins (two passes each)."""
    if previous is None or not columns:
        return {}
    quantiles = previous.approxQuantile(columns, [i / bins for i in range(1, bins)], 0.001)
    edges = {c: sorted(set(q)) for c, q in zip(columns, quantiles) if q}
    if not edges:
        return {c: None for c in columns}
    now, before = _shares(current, edges), _shares(previous, edges)
    return {c: psi(now.get(c, {}), before.get(c, {})) if c in edges else None for c in columns}


# --- thresholds ------------------------------------------------------------------------------------------------
def checks(mc: MonitoringConfig, stats: dict[str, Any], kept: float | None,
           drift: dict[str, float | None], popularity_only: bool = False) -> list[Check]:
    """Every measurement against its thresholds. `popularity_only` lists are all fill by design: their fallback
    share is recorded without thresholds."""
    fallback = (None, None) if popularity_only else (mc.fallback_share_warn, mc.fallback_share_block)
    out = [
        Check("fallback_share", stats.get("fallback_share"), *fallback, "max" if not popularity_only else "none"),
        Check("catalogue_coverage", stats.get("catalogue_coverage"), mc.coverage_warn, mc.coverage_block, "min"),
        Check("concentration", stats.get("concentration"), mc.concentration_warn, mc.concentration_block, "max"),
        Check("score_null_share", stats.get("score_null_share"), mc.score_null_warn, mc.score_null_block, "max"),
        Check("overlap_with_previous", kept, mc.overlap_warn, mc.overlap_block, "min"),
    ]
    out += [Check(f"{DRIFT_PREFIX}{name}", value, mc.psi_warn, mc.psi_block, "max") for name, value in drift.items()]
    return out


def rows(run_id: str, as_of: dt.date | None, checked: list[Check], stats: dict[str, Any],
         at: dt.datetime) -> list[tuple]:
    """`publish_checks` rows: every check with its thresholds and outcome, plus the score quantiles (no
    threshold: the record to compare runs by)."""
    measured = [(c.name, c.value, c.warn, c.block, c.direction, c.status) for c in checked]
    measured += [(name, stats.get(name), None, None, "none", OK) for name in ("score_p01", "score_p50", "score_p99")]
    return [(run_id, as_of, at, name, None if v is None else float(v), w, b, d, s)
            for name, v, w, b, d, s in measured]


# --- the I/O edge: what the publish step calls -------------------------------------------------------------------
def previous_snapshot(lake, table: str, as_of: dt.date) -> DataFrame | None:
    """The snapshot of `table` just before `as_of`, if any; never a partial one (some customers only: another
    population, not an earlier state of the same one)."""
    from recsys.tables import PARTIAL

    df = lake.read(table)
    if PARTIAL in df.columns:
        df = df.where(F.col(PARTIAL) == 0)
    before = df.where(F.col("as_of") < F.lit(as_of)).agg(F.max("as_of")).first()[0]
    return None if before is None else df.where(F.col("as_of") == F.lit(before))


def check_before_publish(lake, staged: DataFrame, run_id: str, as_of: dt.date | None,
                         popularity_only: bool = False) -> list[Check]:
    """Measure the staged lists (and the customer features of `as_of` against the snapshot before), record
    every check in `publish_checks`, and raise `PublishBlocked` when a hard threshold is crossed."""
    from recsys.tables import ARTICLES, CUSTOMER_FEATURES, PUBLISH_CHECKS, PUBLISH_CHECKS_SCHEMA, RECOMMENDATIONS

    mc = lake.config.monitoring
    stats = list_stats(staged, lake.read(ARTICLES).count())
    kept = overlap(staged, lake.read(RECOMMENDATIONS) if lake.exists(RECOMMENDATIONS) else None)
    drift: dict[str, float | None] = {}
    if as_of is not None and lake.exists(CUSTOMER_FEATURES):
        features = lake.read(CUSTOMER_FEATURES)
        current = features.where(F.col("as_of") == F.lit(as_of))
        numeric = [c for c in features.columns if c.startswith("num_")]
        drift = feature_drift(current, previous_snapshot(lake, CUSTOMER_FEATURES, as_of), numeric, mc.psi_bins)
    checked = checks(mc, stats, kept, drift, popularity_only)
    at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    lake.write(lake.spark.createDataFrame(rows(run_id, as_of, checked, stats, at), PUBLISH_CHECKS_SCHEMA),
               PUBLISH_CHECKS, mode="append")
    if any(c.status == BLOCK for c in checked):
        raise PublishBlocked(checked)
    return checked


def summary(checked: list[Check]) -> str:
    """One line for the stage summary: the warnings, or that every check passed."""
    warned = [c.describe() for c in checked if c.status != OK]
    return ("checks: " + "; ".join(warned)) if warned else f"checks: all {len(checked)} ok"
