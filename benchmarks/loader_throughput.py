"""How fast the training rows reach torch through Petastorm, without the model: one epoch of `training_examples`
(the latest snapshot, the columns the trainer reads) through `recsys.loader.PetastormLoader`, with Petastorm's
default row-wise `DataLoader` and its tensor-wise `BatchedDataLoader` (`tensor_batches`, what the trainer uses).

    .venv/bin/python benchmarks/loader_throughput.py [--profile full] [--set KEY=VALUE] [--rows N]

Writes benchmarks/results/loader_throughput.json (rows/s per loader, the batch size and the columns).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import ProcessTree, load_avg, machine, now, parse_args, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "loader_throughput.json"
LOADERS = ("batched", "row-wise")


def epoch_rate(loader, name: str) -> dict:
    """One epoch through `loader` with Petastorm's `name` data loader: rows, seconds, rows/s."""
    loader.tensor_batches = name == "batched"
    with ProcessTree() as tree:
        started, rows, batches = time.perf_counter(), 0, 0
        for batch in loader.epoch(0):
            rows += len(batch["weight"])
            batches += 1
        seconds = time.perf_counter() - started
    return {"rows": rows, "batches": batches, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds),
            "cpu_s": round(tree.cpu_s, 1), "peak_rss_gib": tree.peak_gib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--rows", type=int, default=0, help="only the first N training rows (0: all)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"which of {', '.join(LOADERS)}, in order")
    parser.add_argument("--out", default=str(RESULT))
    args = parse_args(parser)
    loaders = [x for x in args.loaders.split(",") if x]
    if any(x not in LOADERS for x in loaders):
        parser.error(f"--loaders: pick from {', '.join(LOADERS)}")

    from recsys.config import load_config
    from recsys.loader import PetastormLoader
    from recsys.spark import get_spark
    from recsys.tables import Lakehouse
    from recsys.train import load_training_data

    config = load_config(args.profile, args.set)
    mc = config.model
    lake = Lakehouse(get_spark(config), config)
    data, rows = load_training_data(lake, None, mc)
    if args.rows:
        rows = rows.limit(args.rows)
    result = {"benchmark": "loader_throughput", "date": now(), "machine": machine(), "profile": config.profile,
              "overrides": args.set, "as_of": data.as_of, "batch_size": mc.batch_size, "workers": mc.loader_workers,
              "columns": len(data.spec.customer.columns) + 3, "load_avg_start": load_avg(), "loaders": {}}
    loader = PetastormLoader(rows, mc.batch_size, config.path(config.paths.checkpoint_dir) / "petastorm-bench",
                             seed=mc.seed, columns=data.spec.customer.columns, workers=mc.loader_workers)
    try:
        result["rows"] = loader.num_rows
        for name in loaders:
            result["loaders"][name] = epoch_rate(loader, name)
            print(f"  {name}: {result['loaders'][name]}", flush=True)
    finally:
        loader.close()
    if len(result["loaders"]) == 2:
        result["speedup"] = round(result["loaders"]["batched"]["rows_per_s"]
                                  / result["loaders"]["row-wise"]["rows_per_s"], 2)
    result["load_avg_end"] = load_avg()
    write_result(args.out, result)
    print({k: v for k, v in result.items() if k != "loaders"}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
