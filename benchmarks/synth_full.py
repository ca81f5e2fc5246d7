"""Benchmark: the `full` synthetic data set (105,542 articles, 1,371,980 customers, ~31.8 M rows).

Target (issue 3): written in <= 20 minutes with peak memory <= 12 GiB on a 2-core / 24 GiB machine.
Writes the CSVs to --out (default data/full/raw), then `_SUCCESS` there, then the realism report.
Results: benchmarks/results/synth_full.json (+ synth_full_compare.txt).

    .venv/bin/python benchmarks/synth_full.py [--out DIR] [--seed N] [--articles PATH] [--no-compare]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

from recsys import realism, synth
from recsys.config import PROJECT_ROOT, load_config

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "full" / "raw"))
    parser.add_argument("--profile", default="full")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--articles", default="")
    parser.add_argument("--no-compare", action="store_true")
    args = parser.parse_args()

    config = load_config(args.profile)
    if args.seed is not None:
        config.synth.seed = args.seed
    config.synth.articles_path = args.articles
    out = Path(args.out)
    (out / "_SUCCESS").unlink(missing_ok=True)

    t0 = time.perf_counter()
    stats = synth.generate(config.synth, str(out))
    seconds = time.perf_counter() - t0
    rss = peak_rss_gib()
    (out / "_SUCCESS").write_text(json.dumps(stats["rows"]) + "\n")
    sizes = {name: Path(p).stat().st_size for name, p in stats["paths"].items()}
    result = {
        "benchmark": "synth_full",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores / "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.platform()}",
        "profile": args.profile,
        "seed": config.synth.seed,
        "articles_path": args.articles,
        "rows": stats["rows"],
        "bytes": sizes,
        "seconds": round(seconds, 1),
        "rows_per_second": round(stats["rows"]["transactions"] / seconds),
        "peak_rss_gib": round(rss, 2),
        "targets": {"seconds": 1200, "peak_rss_gib": 12},
        "passed": seconds <= 1200 and rss <= 12,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "synth_full.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

    if not args.no_compare:
        t1 = time.perf_counter()
        report = realism.compare(str(out))
        text = realism.format_report(report)
        (RESULTS / "synth_full_compare.txt").write_text(text + "\n")
        result["compare_seconds"] = round(time.perf_counter() - t1, 1)
        result["compare_outside"] = report["outside"]
        result["peak_rss_gib_with_compare"] = round(peak_rss_gib(), 2)
        (RESULTS / "synth_full.json").write_text(json.dumps(result, indent=2) + "\n")
        print(text)


if __name__ == "__main__":
    main()
