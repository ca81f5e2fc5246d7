"""The whole pipeline at full H&M size on this machine: synth (if absent), then every stage of
`recsys --profile full pipeline` in order, each timed with its CPU seconds and the peak memory of the whole
process tree (driver, Spark JVM, Python workers).

Checks what a nightly run must deliver: every customer published with exactly K articles. Writes
benchmarks/results/pipeline_full.json (`total_s`, `peak_rss_gib`, `customers_published`, `stages`, `date`,
`load_avg`, and per stage its summary).

    .venv/bin/python benchmarks/pipeline_full.py [--profile full] [--set KEY=VALUE ...] [--fresh [--fresh-registry] |
                                                 --resume] [--event-log DIR]

When the gate published a baseline (no model beat it on the week), the score stage did not pay for the two
stages; `--system-lists [N]` then times the challenger system's lists for every customer (or N of them) on the
lake the run left, without publishing them (`system_lists` in the result).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import ProcessTree, load_avg, machine, now, parse_args, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "pipeline_full.json"


def published(lake, k: int) -> dict:
    """Customers in the published table, and how many of them do not have exactly K distinct articles."""
    from pyspark.sql import functions as F

    if not lake.exists("recommendations"):  # a run stopped (or re-measured stages) before any publish
        print("no published recommendations: run the score stage (--resume, or --redo score)", flush=True)
        return {"customers_published": 0, "customers_without_exactly_k": None}
    per = lake.read("recommendations").groupBy("customer_id").agg(
        F.count(F.lit(1)).alias("n"), F.countDistinct("article_id").alias("distinct"))
    row = per.agg(F.count(F.lit(1)).alias("customers"),
                  F.sum(((F.col("n") != k) | (F.col("distinct") != k)).cast("int")).alias("wrong")).first()
    return {"customers_published": int(row.customers), "customers_without_exactly_k": int(row.wrong or 0)}


def system_lists(config, customers: int | None) -> dict:
    """What `score` costs when a model wins the gate: the challenger system's lists (candidates + ranker) for every
    customer (or one slice of about `customers` of them), computed in full into Spark's `noop` sink, published
    nowhere."""
    from recsys.evaluate import system_recommender
    from recsys.registry import CHALLENGER, system_versions
    from recsys.score import customer_slices, snapshot_of
    from recsys.spark import get_spark
    from recsys.tables import CUSTOMERS, Lakehouse

    lake = Lakehouse(get_spark(config), config)
    system = system_versions(config).get(CHALLENGER)
    if not system:
        raise SystemExit("--system-lists: no challenger in the registry: run the pipeline first")
    target = None
    if customers:  # one slice as a publish makes them (a range of ids), of about `customers` customers
        target = customer_slices(lake, customers)[0]
    with ProcessTree() as tree:
        started = time.perf_counter()
        recs = system_recommender(lake, system, snapshot_of(lake, None), target)
        recs.write.format("noop").mode("overwrite").save()
        seconds = round(time.perf_counter() - started, 1)
    n = (target if customers else lake.read(CUSTOMERS)).count()
    return {"system": system, "customers": n, "seconds": seconds, "cpu_s": round(tree.cpu_s, 1),
            "peak_rss_gib": tree.peak_gib, "date": now(), "load_avg": load_avg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the profile's tables and artifacts first (the MLflow registry stays: an "
                             "earlier run's champion is evaluated and gated against, as on a night)")
    parser.add_argument("--fresh-registry", action="store_true",
                        help="with --fresh: also delete the local MLflow database and artifacts, so no champion "
                             "is evaluated beside the new system (two such runs compare stage for stage)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the stages the result file already has (a run that stopped), run the others")
    parser.add_argument("--redo", default="", metavar="STAGE[,STAGE]",
                        help="re-measure these stages on the tables as they are (the others' figures are kept; the "
                             "replaced ones move to `redone`): a stage changed since the whole run")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--event-log", metavar="DIR",
                        help="write Spark's event log here (uncompressed), for benchmarks/spark_profile.py: which "
                             "query inside a stage took the time")
    parser.add_argument("--system-lists", type=int, nargs="?", const=0, default=None, metavar="CUSTOMERS",
                        help="only time the challenger system's lists for everyone (or CUSTOMERS of them) on the "
                             "lake the pipeline left, into a noop sink; adds `system_lists` to the result")
    args = parse_args(parser)

    from recsys import pipeline, synth
    from recsys.config import load_config
    from recsys.spark import get_spark
    from recsys.tables import CUSTOMERS, RAW_FILES, Lakehouse

    config = load_config(args.profile, args.set)
    if args.event_log:
        Path(args.event_log).mkdir(parents=True, exist_ok=True)
        config.spark.conf.update({"spark.eventLog.enabled": "true", "spark.eventLog.compress": "false",
                                  "spark.eventLog.dir": Path(args.event_log).resolve().as_uri()})
    if args.system_lists is not None:
        import json

        result = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        measured = system_lists(config, args.system_lists or None)
        result.setdefault("system_lists", {})[str(measured["customers"])] = measured
        write_result(args.out, result)
        print(measured, flush=True)
        return 0
    redo = [s for s in args.redo.split(",") if s]
    unknown = [s for s in redo if s not in pipeline.STAGES]
    if unknown:
        parser.error(f"--redo: unknown stage(s) {unknown}; stages: {', '.join(pipeline.STAGES)}")
    if redo and args.fresh:
        parser.error("--redo re-measures stages on the tables a run left; --fresh deletes them: pick one")
    if args.fresh_registry and not args.fresh:
        parser.error("--fresh-registry goes with --fresh (a registry without the tables it was trained on)")
    if args.fresh_registry and config.paths.mlflow_tracking_uri:
        parser.error(f"--fresh-registry deletes only a local registry; this profile tracks to "
                     f"{config.paths.mlflow_tracking_uri}")
    if args.resume and args.fresh:
        parser.error("--resume continues on the tables a stopped run left; --fresh deletes them: pick one")
    raw = config.path(config.paths.raw_dir)
    result: dict = {"benchmark": "pipeline_full", "date": now(), "machine": machine(), "profile": config.profile,
                    "load_avg_start": load_avg(), "stages": {}, "stage_details": {}}
    if (args.resume or redo) and Path(args.out).exists():
        import json

        result = json.loads(Path(args.out).read_text())
        result.setdefault("resumed_at", []).append({"date": now(), "after": list(result["stages"]), "redo": redo})
        for stage in redo:
            if stage in result["stages"]:
                result.setdefault("redone", []).append({stage: result["stage_details"].pop(stage)})
                del result["stages"][stage]
    if not all((raw / name).exists() for name in RAW_FILES.values()):
        with ProcessTree() as tree:
            started = time.perf_counter()
            stats = synth.generate(config.synth, str(raw))
        result["synth"] = {"seconds": round(time.perf_counter() - started, 1), "rows": stats["rows"],
                           "peak_rss_gib": tree.peak_gib}
        print(f"[   synth] {result['synth']}", flush=True)
    if args.fresh:
        for folder in (config.paths.tables_dir, config.paths.artifacts_dir, config.paths.checkpoint_dir):
            shutil.rmtree(config.path(folder), ignore_errors=True)
        if args.fresh_registry:
            database, artifacts = config.local_mlflow
            database.unlink(missing_ok=True)
            shutil.rmtree(artifacts, ignore_errors=True)
        result["registry"] = "from scratch" if args.fresh_registry else "kept"

    done = result["stages"]
    peak = max([d["peak_rss_gib"] * 2**30 for d in result["stage_details"].values()], default=0)
    peak_pss = max([d.get("peak_pss_gib", 0) * 2**30 for d in result["stage_details"].values()], default=0)
    total_cpu = sum(d["cpu_s"] for d in result["stage_details"].values())
    for stage in (s for s in pipeline.STAGES if s not in done):
        with ProcessTree() as tree:
            started = time.perf_counter()
            summary = pipeline.run(config, steps=[stage], force=True)
            seconds = round(time.perf_counter() - started, 1)
        peak, peak_pss, total_cpu = max(peak, tree.peak), max(peak_pss, tree.peak_pss), total_cpu + tree.cpu_s
        result["stages"][stage] = seconds
        result["stage_details"][stage] = {"seconds": seconds, "cpu_s": round(tree.cpu_s, 1),
                                          "peak_rss_gib": tree.peak_gib, "peak_parts_gib": tree.peak_parts_gib,
                                          "peak_processes_gib": tree.peak_processes_gib,
                                          "peak_pss_gib": tree.peak_pss_gib,
                                          "peak_pss_parts_gib": tree.peak_pss_parts_gib,
                                          "load_avg_end": load_avg(), "summary": summary.get(stage)}
        write_result(args.out, result)  # what ran so far survives a later failure
    result["total_s"] = round(sum(done.values()), 1)  # the stages' own times (a resumed run's gap is not work)
    result["cpu_s"] = round(total_cpu, 1)
    result["peak_rss_gib"] = round(peak / 2**30, 2)
    result["peak_pss_gib"] = round(peak_pss / 2**30, 2)  # what the tree occupies (ProcessTree)
    lake = Lakehouse(get_spark(config), config)
    result.update(published(lake, config.scoring.k))
    result["customers"] = lake.read(CUSTOMERS).count()
    result["load_avg"] = load_avg()
    write_result(args.out, result)
    print({k: v for k, v in result.items() if k != "stage_details"}, flush=True)
    return 0 if result["customers_without_exactly_k"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
