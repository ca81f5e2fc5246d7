"""Where the two stages' time goes when they score many customers: each candidate source, the two-tower's
neighbours and similarities, the ranker's features and its prediction, timed one by one for a sample of
customers on the lake a full pipeline left (the challenger system in the registry).

Run it for two sample sizes to split each step into a fixed part (global aggregates: co-purchase pairs, article
sales) and a per-customer part; the extrapolation to every customer is in the result.

    .venv/bin/python benchmarks/system_cost.py --customers 20000 100000 [--profile full] [--set KEY=VALUE]

Writes benchmarks/results/system_cost.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import ProcessTree, load_avg, machine, now, parse_args, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "system_cost.json"


def steps(lake, system: dict, as_of, target) -> dict:
    """seconds and rows of each step for `target`, every step materialised on its own."""

    from recsys import candidates as C
    from recsys import ranker as R
    from recsys import two_stage as S
    from recsys.model import load_encoder
    from recsys.tables import ARTICLES, CUSTOMERS, TRANSACTIONS

    config = lake.config
    target = target.localCheckpoint()
    encoder = load_encoder(f"models:/{config.mlflow.registered_model}/{system[config.mlflow.registered_model]}",
                           config.tracking_uri, config.registry_uri)
    ranker = S.load_ranker(config, system[config.mlflow.ranker_model])
    transactions = lake.read(TRANSACTIONS).select("t_dat", "customer_id", "article_id", "price", "sales_channel_id")
    articles, customers = lake.read(ARTICLES), lake.read(CUSTOMERS)
    out: dict[str, dict] = {}

    def timed(name, frame, keep=True):
        """Compute `frame`, timed: checkpointed (a later step reads it), or into the noop sink (`keep=False`)."""
        started = time.perf_counter()
        if keep:
            frame = frame.localCheckpoint()
            rows = frame.count()
        else:
            rows = None
            frame.write.format("noop").mode("overwrite").save()
        out[name] = {"seconds": round(time.perf_counter() - started, 1), "rows": rows}
        if not keep:
            out[name]["part_of_next"] = True  # measured again inside the next step: not added to the total
        print(f"  {name}: {out[name]}", flush=True)
        return frame

    saved = list(config.candidates.sources)
    parts = []
    for source in saved:
        if source == S.TWO_TOWER:
            continue
        config.candidates.sources = [source]
        parts.append(timed(f"source {source}", S.source_candidates(config, transactions, articles, customers,
                                                                   target, as_of)))
    config.candidates.sources = saved
    rules = parts[0]
    for part in parts[1:]:
        rules = rules.unionByName(part)
    others = rules.select("customer_id", "article_id").distinct()
    model = timed("two_tower neighbours + similarities",
                  S.two_tower_rows(lake, encoder, as_of, target, others, config.candidates.two_tower_n))
    long = rules.unionByName(S.two_tower_long(model)).select(*C.CANDIDATE_COLUMNS)
    # as a publish runs them (customers keyed by a number): the wide rows, their features, the prediction and the
    # top K in one lazy chain that shuffles the rows once (a checkpoint between would forget their partitioning);
    # its first part alone into the noop sink, so the prediction's share is the difference
    long = timed("long rows", long)
    keys = S.customer_keys(target)
    features = S.featured(lake, S.wide_rows(S.keyed(long, keys), config.candidates.sources), target, as_of, keys)
    timed("wide rows + ranker features", features, keep=False)
    timed("wide rows + ranker features + predict + top K",
          S.unkeyed(R.predict_top_k(ranker, features, config.scoring.k), keys))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--customers", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--out", default=str(RESULT))
    args = parse_args(parser)

    from pyspark.sql import functions as F

    from recsys.config import load_config
    from recsys.registry import CHALLENGER, system_versions
    from recsys.score import snapshot_of
    from recsys.spark import get_spark
    from recsys.tables import CUSTOMERS, Lakehouse

    config = load_config(args.profile, args.set)
    lake = Lakehouse(get_spark(config), config)
    system = system_versions(config).get(CHALLENGER)
    if not system or config.mlflow.ranker_model not in system:
        raise SystemExit("no challenger two-stage system in the registry: run the pipeline first")
    as_of = snapshot_of(lake, None)
    everyone = lake.read(CUSTOMERS).select("customer_id").distinct().count()
    result = {"benchmark": "system_cost", "date": now(), "machine": machine(), "profile": args.profile,
              "overrides": args.set, "system": system, "as_of": as_of.isoformat(), "customers_all": everyone,
              "load_avg_start": load_avg(), "runs": {}}
    for n in args.customers:
        print(f"{n:,} customers", flush=True)
        target = lake.read(CUSTOMERS).select("customer_id").orderBy(F.xxhash64("customer_id")).limit(n)
        with ProcessTree() as tree:
            started = time.perf_counter()
            # a fresh Lakehouse: what it derives once per date (the ranker's article table) is paid by each run
            measured = steps(Lakehouse(lake.spark, config), system, as_of, target)
            seconds = round(time.perf_counter() - started, 1)
        result["runs"][str(n)] = {"seconds": seconds, "cpu_s": round(tree.cpu_s, 1), "peak_rss_gib": tree.peak_gib,
                                  "load_avg_end": load_avg(), "steps": measured}
        write_result(args.out, result)
    sizes = sorted(int(n) for n in result["runs"])
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        a, b = result["runs"][str(small)]["steps"], result["runs"][str(large)]["steps"]
        fit = {}
        for name in a:
            # a step that got faster with more customers (caches warming) is all fixed cost
            per = max(0.0, (b[name]["seconds"] - a[name]["seconds"]) / (large - small))
            fixed = min(a[name]["seconds"], b[name]["seconds"] - per * large)
            fit[name] = {"fixed_s": round(fixed, 1), "per_100k_s": round(per * 100_000, 1),
                         "all_customers_s": round(fixed + per * everyone, 1)}
        result["extrapolation"] = fit
        result["extrapolated_all_s"] = round(sum(v["all_customers_s"] for name, v in fit.items()
                                                 if not a[name].get("part_of_next")), 1)
    result["load_avg_end"] = load_avg()
    write_result(args.out, result)
    print(result.get("extrapolation", result["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
