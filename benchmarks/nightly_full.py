"""The nightly refresh from a daily drop, timed: `recsys nightly --date D`, then the same day again.

Steps, in a fresh folder <data_dir>/bench-nightly (raw/, landing/, delta/, mlflow, checkpoints):
  1. synth the profile's data plus one daily drop (the day after the two years), from the same simulation;
  2. a full ingest of the raw CSVs (the tables the nightly starts from); with --prime, the whole pipeline too,
     so that the nightly refreshes a trained, gated, published system (the steady state) rather than training
     its first model;
  3. `pipeline.nightly(D)`, timed: nightly_s;
  4. the same call again, timed: rerun_s. It must load nothing and skip every later stage (checked).
Peak memory is that of the whole process tree (driver, Spark JVM, Python workers) over steps 3 and 4, sampled
by `measure.ProcessTree`. Setup times (synth, ingest, prime) are recorded too, but are not the benchmark.

With --primed the nightly refreshes the profile's own lake instead (<data_dir>, left trained, gated and published
by benchmarks/pipeline_full.py): only the drop is synthesised (the same simulation, one day on) and the model is
warm-started from the champion (`model.refresh=warm`, the nightly job's default) unless --set says otherwise.
The lake then holds that day, unless --restore puts every table back to its version before the nightly (Delta
RESTORE; what the nightly created is dropped), so the next --primed run starts from the same lake.

Whether the night relists (the buyers since the last publish get new lists, nothing is retrained) or runs in
full is the nightly's own decision (`nightly.full_every_days`); --full forces the full run.

Usage: python benchmarks/nightly_full.py [--scale full|small|tiny] [--prime | --primed [--restore]] [--full]
       [--set K=V] [--out FILE]
Writes benchmarks/results/nightly_<scale>.json (nightly_full.json at the default scale).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks.measure import ProcessTree, machine, parse_args  # noqa: E402  (one memory sampler for every benchmark)


def timed(step, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    result = step(*args, **kwargs)
    return result, round(time.perf_counter() - started, 1)


def primed_lake(config) -> tuple[object, dt.date, float]:
    """The profile's own lake, published by the pipeline, and the next day's drop beside its raw files (the
    same simulation one day on; the two years are synthesised into a scratch folder and thrown away)."""
    import tempfile

    from recsys import synth
    from recsys.spark import get_spark
    from recsys.tables import RECOMMENDATIONS, TRANSACTIONS, Lakehouse, drop_file

    lake = Lakehouse(get_spark(config, "bench-nightly"), config)
    if not lake.exists(RECOMMENDATIONS):
        raise SystemExit(f"--primed: nothing published under {config.paths.tables_dir}: run `make bench-pipeline`")
    last = lake.read(TRANSACTIONS).agg({"t_dat": "max"}).first()[0]
    day = dt.date.fromisoformat(config.synth.end_date) + dt.timedelta(days=1)
    if last >= day:
        raise SystemExit(f"--primed: {day} is already loaded (newest purchase {last}): run `make bench-pipeline`")
    synth_s = 0.0
    if not (config.path(config.landing_dir) / drop_file(day)).exists():
        with tempfile.TemporaryDirectory(dir=config.path(config.paths.data_dir)) as scratch:
            _, synth_s = timed(synth.generate, config.synth, scratch, drop_days=1,
                               landing_dir=str(config.path(config.landing_dir)))
    return lake, day, synth_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="full", choices=["tiny", "small", "full"])
    parser.add_argument("--prime", action="store_true", help="run the whole pipeline before the nightly (untimed)")
    parser.add_argument("--primed", action="store_true",
                        help="refresh the profile's own published lake (after benchmarks/pipeline_full.py)")
    parser.add_argument("--restore", action="store_true",
                        help="with --primed: afterwards, every table back to its version before the nightly")
    parser.add_argument("--full", action="store_true", help="a full nightly even if the last full run is recent")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/nightly_<scale>.json")
    args = parse_args(parser)
    if args.prime and args.primed:
        parser.error("--prime builds a fresh lake, --primed reuses the profile's own: pick one")
    if args.restore and not args.primed:
        parser.error("--restore puts the profile's own lake back after a --primed run: give --primed")

    from recsys import ingest, pipeline, synth
    from recsys.config import load_config
    from recsys.spark import get_spark
    from recsys.tables import RECOMMENDATIONS, TRANSACTIONS, Lakehouse, drop_file

    if args.primed:
        config = load_config(args.scale, ["model.refresh=warm", *args.set])
        lake, day, synth_s = primed_lake(config)
        ingest_s = prime_s = None
    else:
        base = Path(load_config(args.scale).paths.data_dir).resolve() / "bench-nightly"
        shutil.rmtree(base, ignore_errors=True)
        config = load_config(args.scale, [
            *args.set, f"paths.data_dir={base}", f"paths.raw_dir={base}/raw", f"paths.tables_dir={base}/delta",
            f"paths.artifacts_dir={base}/artifacts", f"paths.checkpoint_dir={base}/checkpoints",
        ])
        day = dt.date.fromisoformat(config.synth.end_date) + dt.timedelta(days=1)
        _, synth_s = timed(synth.generate, config.synth, config.paths.raw_dir, drop_days=1,
                           landing_dir=config.landing_dir)
        lake = Lakehouse(get_spark(config, "bench-nightly"), config)
        _, ingest_s = timed(ingest.run, lake, config.paths.raw_dir)
        prime_s = timed(pipeline.run, config, out=print)[1] if args.prime else None

    load_before = os.getloadavg()
    messages: list[str] = []

    def say(message: str) -> None:
        messages.append(message)
        print(message, flush=True)

    tables_before = lake.versions() if args.restore else {}
    try:
        with ProcessTree() as tree:
            first, nightly_s = timed(pipeline.nightly, config, day.isoformat(), full=args.full, out=say)
            published = lake.version(RECOMMENDATIONS)
            again, rerun_s = timed(pipeline.nightly, config, day.isoformat(), full=args.full, out=say)
        relisted = first["score"].get("relisted")
        republished = lake.version(RECOMMENDATIONS) != published
        transactions = lake.read(TRANSACTIONS).count()
    finally:
        if args.restore:  # the same lake for the next --primed run
            for name in lake.existing():
                lake.restore(name, tables_before.get(name))
    redone = [s for s in pipeline.STAGES[1:] if again[s]["status"] not in ("up to date", "skipped")]
    if again["ingest"]["drop"] != "unchanged" or redone or republished:
        raise SystemExit(f"the rerun of {day} was not a no-op: {json.dumps(again, default=str)}")
    result = {
        "benchmark": "nightly_full",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "scale": args.scale,
        "primed": args.primed or args.prime,
        "overrides": args.set,
        "day": day.isoformat(),
        "drop_rows": sum(1 for _ in open(config.path(config.landing_dir) / drop_file(day))) - 1,
        "transactions": transactions,
        "nightly_s": nightly_s,
        "rerun_s": rerun_s,
        "peak_rss_gib": round(tree.peak / 2**30, 2),
        "cpu_s": round(tree.cpu_s, 1),
        "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "mode": first.get("mode"),
        "relisted_customers": relisted,
        "stages": {s: {k: first[s].get(k) for k in ("status", "seconds")} for s in pipeline.STAGES},
        "score": {k: first["score"].get(k) for k in ("seconds", "slice_seconds", "checks", "checks_s", "customers")},
        "restored": args.restore,
        "train_refresh": first["train"].get("refresh", config.model.refresh),
        "rerun_says": messages[-1],
        "setup_s": {"synth": synth_s, "ingest": ingest_s, "prime_pipeline": prime_s},
    }
    out = Path(args.out or RESULTS / f"nightly_{args.scale}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
