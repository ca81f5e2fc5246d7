"""Ingest at full H&M size: the three raw CSVs of a folder -> validated Delta tables, timed.

Records wall time, CPU seconds and peak memory (this process plus its children: the Spark JVM and Python
workers, sampled every half second), rows/s over all files, the per-file counts of the ingest report and the
machine's load (wall times mean little on a machine that other jobs share). With `--nightly`, also times a `--since` run
that replaces the last day, as the nightly job does.

Usage: python benchmarks/ingest_full.py RAW_DIR [--profile full] [--tables-dir DIR] [--nightly] [--set K=V]
Writes benchmarks/results/ingest_full.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "ingest_full.json"

from benchmarks.measure import ProcessTree, machine, parse_args, scratch_tables  # noqa: E402


def timed_ingest(lake, raw_dir: str, since: str | None) -> dict:
    from recsys import ingest

    load_before = os.getloadavg()
    with ProcessTree() as tree:
        started = time.perf_counter()
        report = ingest.run(lake, raw_dir, since=since)
        seconds = time.perf_counter() - started
    rows = sum(f.rows_read for f in report.files)
    print(report.format(), flush=True)
    return {
        "since": since,
        "seconds": round(seconds, 1),
        "rows_read": rows,
        "rows_per_s": round(rows / seconds),
        "cpu_s": round(tree.cpu_s, 1),
        "cpu_s_per_million_rows": round(tree.cpu_s / rows * 1e6, 1),
        "peak_rss_gib": round(tree.peak / 2**30, 2),
        "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "files": [
            {"file": f.source_file, "read": f.rows_read, "written": f.rows_written,
             "quarantined": f.rows_quarantined, "skipped": f.rows_skipped, "reasons": f.reasons}
            for f in report.files
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_dir")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--tables-dir", default=None, help="default: <data_dir>/bench-ingest (emptied first)")
    parser.add_argument("--nightly", action="store_true", help="also time a --since run of the last day")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=str(RESULT))
    args = parse_args(parser)

    from recsys.config import load_config
    from recsys.spark import get_spark
    from recsys.tables import TRANSACTIONS, Lakehouse

    config = load_config(args.profile, args.set)
    tables = scratch_tables(config, args.tables_dir, "bench-ingest")
    config = load_config(args.profile, [*args.set, f"paths.tables_dir={tables}"])
    raw = Path(args.raw_dir)
    input_bytes = {p.name: p.stat().st_size for p in sorted(raw.glob("*.csv"))}

    session_started = time.perf_counter()
    spark = get_spark(config, "bench-ingest")
    lake = Lakehouse(spark, config)
    result = {
        "benchmark": "ingest_full",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "profile": config.profile,
        "spark": {"master": config.spark.master, "driver_memory": config.spark.driver_memory,
                  "shuffle_partitions": config.spark.shuffle_partitions},
        "raw_dir": str(raw.resolve()),
        "input_bytes": input_bytes,
        "spark_start_s": round(time.perf_counter() - session_started, 1),
        "full": timed_ingest(lake, str(raw), None),
    }
    result["delta_bytes"] = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(tables.iterdir())
    }
    if args.nightly:
        last = lake.read(TRANSACTIONS).agg({"t_dat": "max"}).first()[0]
        result["nightly"] = timed_ingest(lake, str(raw), last.isoformat())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("full", "nightly")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
