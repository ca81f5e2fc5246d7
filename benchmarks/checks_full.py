"""What the checks before a publish cost at full size (`recsys.monitor.check_before_publish`), per run.

On the tables a full pipeline run left (SOURCE_TABLES, default the `full` profile's): K articles for every
customer (drawn per customer from the week's 1,000 best sellers, so that coverage, concentration and overlap have
something to measure) are staged as `score` stages them, a second draw stands in for the previously published
lists, and the checks run once, timed: list statistics, overlap with the previous lists, and the PSI of every
numeric customer feature of the newest snapshot against the one before. Everything is written in a scratch
folder (the source's articles, customers and customer_features are linked, never written).

    .venv/bin/python benchmarks/checks_full.py [SOURCE_TABLES] [--profile full] [--set KEY=VALUE ...]

Writes benchmarks/results/checks_full.json (`checks_s`, `checks`, `rows`, `peak_rss_gib`, `date`, `load_avg`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import ProcessTree, load_avg, machine, now, parse_args, scratch_tables, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "checks_full.json"
LINKED = ("articles", "customers", "customer_features", "article_features")


def drawn_lists(customers, best_sellers: list[str], k: int, seed: int):
    """K articles per customer, each drawn from `best_sellers` by a hash of (customer, position, seed)."""
    from pyspark.sql import functions as F

    pool = F.array(*[F.lit(a) for a in best_sellers])
    ranks = F.explode(F.sequence(F.lit(1), F.lit(k))).alias("rank")
    pick = F.pmod(F.xxhash64("customer_id", "rank", F.lit(seed)), F.lit(len(best_sellers))) + 1
    return (customers.select("customer_id", ranks)
            .select("customer_id", "rank", F.element_at(pool, pick.cast("int")).alias("article_id"),
                    (F.lit(1.0) / F.col("rank")).alias("score"), F.lit("two_tower").alias("source")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_tables", nargs="?", default=None, help="default: the profile's tables_dir")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULT))
    args = parse_args(parser)

    from pyspark.sql import functions as F

    from recsys import monitor
    from recsys.config import load_config
    from recsys.spark import get_spark
    from recsys.tables import ARTICLE_FEATURES, CUSTOMER_FEATURES, CUSTOMERS, RECOMMENDATIONS, Lakehouse

    config = load_config(args.profile, args.set)
    source = Path(args.source_tables or config.path(config.paths.tables_dir)).resolve()
    missing = [n for n in LINKED if not (source / n / "_delta_log").is_dir()]
    if missing:
        raise SystemExit(f"{source}: no Delta table {missing}; run the pipeline's features stage into it first")
    tables = scratch_tables(config, None, "bench-checks")
    for name in LINKED:
        (tables / name).symlink_to(source / name, target_is_directory=True)
    config = load_config(args.profile, [*args.set, f"paths.tables_dir={tables}"])
    lake = Lakehouse(get_spark(config, "bench-checks"), config)

    as_of = lake.read(CUSTOMER_FEATURES).agg(F.max("as_of")).first()[0]
    week = lake.read(ARTICLE_FEATURES).where(F.col("as_of") == F.lit(as_of))
    best = [r.article_id for r in week.orderBy(F.desc("num_sales_1w"), "article_id").limit(1000).collect()]
    customers = lake.read(CUSTOMERS).select("customer_id").distinct()
    k = config.scoring.k
    lake.spark.sparkContext.setJobDescription("previous lists")
    drawn_lists(customers, best, k, 1).write.format("delta").save(str(tables / RECOMMENDATIONS))
    staging = tables / "recommendations_staging"
    drawn_lists(customers, best, k, 2).write.format("delta").save(str(staging))
    staged = lake.spark.read.format("delta").load(str(staging))

    with ProcessTree() as tree:
        started = time.perf_counter()
        checked = monitor.check_before_publish(lake, staged, "bench-checks", as_of)
        seconds = round(time.perf_counter() - started, 1)
    result = {
        "benchmark": "checks_full", "date": now(), "machine": machine(), "profile": config.profile,
        "as_of": str(as_of), "rows": staged.count(), "k": k, "checks_s": seconds, "cpu_s": round(tree.cpu_s, 1),
        "peak_rss_gib": tree.peak_gib, "load_avg": load_avg(),
        "checks": {c.name: {"value": c.value, "status": c.status} for c in checked},
    }
    write_result(args.out, result)
    print(monitor.summary(checked))
    print({k: v for k, v in result.items() if k != "checks"}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
