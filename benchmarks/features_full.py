"""The feature build (`recsys features`) on ingested tables, timed per table, with peak memory.

Reads the canonical `articles`, `customers`, `transactions` Delta tables of SOURCE_TABLES (what `recsys ingest`
wrote) through symbolic links in a fresh benchmark folder, so the feature tables it writes never touch the
source lake. Records the wall time of each output table (from `features.run`'s summary), the total, the
peak resident memory of this process and its children (the Spark JVM, Python workers), the Spark settings
that matter (master, driver memory, shuffle partitions, AQE) and the machine's load. With `--rerun`, a second
run for the same as_of shows the cost of replacing a snapshot (no new ids).

Usage: python benchmarks/features_full.py SOURCE_TABLES [--profile full] [--as-of DATE] [--rerun] [--set K=V]
Writes benchmarks/results/features_full.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "features_full.json"

from benchmarks.measure import ProcessTree, parse_args, scratch_tables  # noqa: E402  (one memory sampler for every benchmark)


def timed_run(lake, as_of: str | None) -> dict:
    from recsys import features

    load_before = os.getloadavg()
    with ProcessTree() as memory:
        started = time.perf_counter()
        summary = features.run(lake, as_of=as_of)
        seconds = time.perf_counter() - started
    print(json.dumps(summary, indent=2), flush=True)
    return {
        "as_of": summary["as_of"],
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(memory.peak / 2**30, 2),
        "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "tables": summary["tables"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_tables", help="a tables folder holding articles, customers, transactions (Delta)")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--tables-dir", default=None, help="default: <data_dir>/bench-features (emptied first)")
    parser.add_argument("--as-of", dest="as_of", default=None, help="default: the day after the last transaction")
    parser.add_argument("--rerun", action="store_true", help="also time a second run for the same as_of")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULT))
    args = parse_args(parser)

    from recsys.config import load_config
    from recsys.spark import get_spark
    from recsys.tables import ARTICLES, CUSTOMERS, TRANSACTIONS, Lakehouse

    config = load_config(args.profile, args.set)
    tables = scratch_tables(config, args.tables_dir, "bench-features")
    source = Path(args.source_tables).resolve()
    for name in (ARTICLES, CUSTOMERS, TRANSACTIONS):
        if not (source / name / "_delta_log").is_dir():
            raise SystemExit(f"{source / name}: not a Delta table; run `recsys ingest` into {source} first")
        (tables / name).symlink_to(source / name, target_is_directory=True)
    config = load_config(args.profile, [*args.set, f"paths.tables_dir={tables}"])

    session_started = time.perf_counter()
    spark = get_spark(config, "bench-features")
    lake = Lakehouse(spark, config)
    conf = spark.conf
    result = {
        "benchmark": "features_full",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{psutil.cpu_count()} cores / {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                   f"{platform.processor() or platform.machine()}",
        "profile": config.profile,
        "spark": {
            "master": config.spark.master,
            "driver_memory": config.spark.driver_memory,
            "shuffle_partitions": conf.get("spark.sql.shuffle.partitions"),
            "adaptive": conf.get("spark.sql.adaptive.enabled"),
            "auto_broadcast_threshold": conf.get("spark.sql.autoBroadcastJoinThreshold"),
        },
        "inputs": {name: lake.read(name).count() for name in (ARTICLES, CUSTOMERS, TRANSACTIONS)},
        "features_config": config.to_dict()["features"],
        "spark_start_s": round(time.perf_counter() - session_started, 1),
    }
    result["first"] = timed_run(lake, args.as_of)
    if args.rerun:
        result["rerun"] = timed_run(lake, result["first"]["as_of"])
    result["delta_bytes"] = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in sorted(tables.iterdir()) if not p.is_symlink()
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("first", "rerun")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
