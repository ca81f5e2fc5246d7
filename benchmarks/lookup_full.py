"""Lookups without Spark at full size: 1,371,980 customers x 12 = 16.5 M published rows (recsys.lookup).

Measures, on the table `published_full.py` writes (the publish layout: 32 range-partitioned files, sorted by
customer_id, row groups of serving.row_group_bytes):
- row-group reads (what `recsys recommend` does; `recsys serve --no-preload`): the first lookup of a process
  (footers not read yet), then single lookups and batches of 1,000 ids with the footers cached;
- the version held in memory (what `recsys serve` does): load time and memory, single lookups and batches;
- process start to first answer: `recsys recommend ID` in a new process, with a bytecode cache (what an
  installed package has) and without one (every module compiled at start: PYTHONDONTWRITEBYTECODE=1 on a
  venv that holds no .pyc). The OS file cache is warm: nothing here drops it on a shared machine.
Every lookup returns the full answer: the rows of one version, with article names from the catalogue.

Writes benchmarks/results/lookup_full.json. Usage: python benchmarks/lookup_full.py [--singles N] [--starts N]
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmarks.measure import parse_args, write_result  # noqa: E402

import published_full  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "lookup_full.json"


def customer_ids(n: int, seed: int) -> list[str]:
    """Published ids (published_full hashes 0..N-1), drawn at random."""
    picks = random.Random(seed).sample(range(published_full.N_CUSTOMERS), n)
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in picks]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "n": len(ms)}


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def in_process(config, singles: int, batches: int) -> dict:
    from recsys import lookup

    uri = lookup.table_uri(config, lookup.RECOMMENDATIONS)
    catalogue_s, catalogue = timed(lookup.Catalogue, lookup.table_uri(config, lookup.ARTICLES))
    out: dict = {"catalogue_load_s": catalogue_s, "catalogue_articles": len(catalogue)}

    open_s, files = timed(lookup.PublishedVersion, uri)
    first_id, *ids = customer_ids(singles + 1, 1)
    first_s, first = timed(lookup.lists, files, catalogue, [first_id])
    assert len(first[first_id].items) == 12
    times = []
    for customer_id in ids:
        seconds, found = timed(lookup.lists, files, catalogue, [customer_id])
        assert len(found[customer_id].items) == 12
        times.append(seconds)
    batch_times = []
    for b in range(batches):
        seconds, found = timed(lookup.lists, files, catalogue, customer_ids(1000, 100 + b))
        assert len(found) == 1000
        batch_times.append(seconds)
    out["row_groups"] = {
        "open_version_s": open_s, "first_lookup_ms": first_s * 1000, "files": len(files.files),
        "single": percentiles(times), "batch1000_ms": float(np.median(batch_times) * 1000),
        "batch1000_ms_all": [t * 1000 for t in batch_times],
    }
    print("row groups:", json.dumps(out["row_groups"]["single"]), f"batch {out['row_groups']['batch1000_ms']:.0f} ms",
          flush=True)

    load_s, memory = timed(files.load)
    out["in_memory_version"] = {"load_s": load_s,  # RSS deltas mean little after pyarrow's pool has grown
                                "array_mib": (memory.ids.nbytes + memory.starts.nbytes
                                              + sum(a.nbytes for a in memory.columns.values())) / 2**20,
                                "customers": memory.customers, "rows": memory.rows}
    ids = customer_ids(singles * 5, 2)
    times = []
    for customer_id in ids:
        seconds, found = timed(lookup.lists, memory, catalogue, [customer_id])
        assert len(found[customer_id].items) == 12
        times.append(seconds)
    batch_times = []
    for b in range(batches * 4):
        seconds, found = timed(lookup.lists, memory, catalogue, customer_ids(1000, 200 + b))
        assert len(found) == 1000
        batch_times.append(seconds)
    out["in_memory_version"].update(single=percentiles(times), batch1000_ms=float(np.median(batch_times) * 1000))
    print("in memory:", json.dumps(out["in_memory_version"]), flush=True)
    return out


def process_starts(overrides: list[str], starts: int, bytecode: bool) -> dict:
    """Wall time of `python -m recsys.cli ... recommend ID` from exec to exit (one list printed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache = ROOT / "data" / "bench-serve" / "pycache"
    if bytecode:  # a private bytecode cache: the shared venv stays as it is
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    command = [sys.executable, "-m", "recsys.cli", "--profile", "full",
               *[a for o in overrides for a in ("--set", o)], "recommend"]
    if bytecode:
        subprocess.run(command + customer_ids(1, 999), env=env, cwd=ROOT, check=True, capture_output=True)
    times = []
    for customer_id in customer_ids(starts, 3):
        started = time.perf_counter()
        done = subprocess.run(command + [customer_id], env=env, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        assert done.returncode == 0 and customer_id in done.stdout, done.stderr
    return {"median_s": float(np.median(times)), "max_s": max(times), "runs_s": times,
            "bytecode_cache": bytecode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=2000, help="single lookups per mode (x5 in memory)")
    parser.add_argument("--batches", type=int, default=5, help="batches of 1,000 ids (x4 in memory)")
    parser.add_argument("--starts", type=int, default=7, help="process starts per variant")
    args = parse_args(parser)

    from recsys.config import load_config

    published_full.build()
    overrides = published_full.config_overrides()
    config = load_config("full", overrides)
    result: dict = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores / {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}"
                   " GiB",
        "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
        "table": {"customers": published_full.N_CUSTOMERS, "rows": published_full.N_CUSTOMERS * published_full.K,
                  "files": config.scoring.partitions, "row_group_bytes": config.serving.row_group_bytes},
    }
    result.update(in_process(config, args.singles, args.batches))
    result["process_start_to_answer"] = {
        "with_bytecode_cache": process_starts(overrides, args.starts, bytecode=True),
        "without_bytecode_cache": process_starts(overrides, args.starts, bytecode=False),
    }
    print(json.dumps(result["process_start_to_answer"]), flush=True)
    memory, files = result["in_memory_version"], result["row_groups"]
    result.update({
        # The keys: the reader on the file statistics (what `recsys recommend` runs), warm: the version's
        # footers read, the OS file cache warm; a batch of 1,000 ids; process start to first answer (installed).
        "p50_ms": files["single"]["p50_ms"], "p99_ms": files["single"]["p99_ms"],
        "batch1000_ms": files["batch1000_ms"], "first_lookup_ms": files["first_lookup_ms"],
        "cold_start_s": result["process_start_to_answer"]["with_bytecode_cache"]["median_s"],
        # The same with the version held in memory (what `recsys serve` does).
        "in_memory_p50_ms": memory["single"]["p50_ms"], "in_memory_p99_ms": memory["single"]["p99_ms"],
        "in_memory_batch1000_ms": memory["batch1000_ms"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_at_end": os.getloadavg(),
    })
    write_result(RESULT, result)
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
