"""Approximate article indexes on a trained model's embeddings: search time and recall against exact search, for
the two-tower the registry serves (challenger, else champion) on a lake a pipeline left.

    .venv/bin/python benchmarks/index_recall.py [--profile full] [--set KEY=VALUE] [--customers 5000] [--k 100]

Queries are customers the model scores (`recsys.score.recall_queries`: a sample by a hash of the id), one thread
(what each Spark task gets). Writes benchmarks/results/index_recall.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import load_avg, machine, now, parse_args, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "index_recall.json"
VARIANTS = [
    ("flat", {}),
    ("ivf", {"ivf_lists": 1024, "ivf_probe": 16}),
    ("ivf", {"ivf_lists": 1024, "ivf_probe": 32}),
    ("ivf", {"ivf_lists": 1024, "ivf_probe": 64}),
    ("hnsw", {"hnsw_m": 32, "hnsw_ef_search": 128}),
    ("hnsw", {"hnsw_m": 32, "hnsw_ef_search": 256}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", default=str(RESULT))
    args = parse_args(parser)

    from recsys.config import load_config
    from recsys.features import read_snapshot
    from recsys.index import build_index, recall_at_k, set_threads
    from recsys.model import load_encoder
    from recsys.score import recall_queries, resolve_model, snapshot_of
    from recsys.spark import get_spark
    from recsys.tables import ARTICLE_FEATURES, Lakehouse

    config = load_config(args.profile, args.set)
    lake = Lakehouse(get_spark(config), config)
    model_uri, _ = resolve_model(config)
    encoder = load_encoder(model_uri, config.tracking_uri, config.registry_uri)
    snapshot = snapshot_of(lake, None)
    articles = read_snapshot(lake, ARTICLE_FEATURES, snapshot).toPandas()  # the catalogue: bounded
    vectors, ids = encoder.encode_articles(articles), articles["article_id"].tolist()
    queries = recall_queries(lake, encoder, snapshot, args.customers)
    set_threads(1)
    result = {"benchmark": "index_recall", "date": now(), "machine": machine(), "profile": config.profile,
              "overrides": args.set, "model": model_uri, "model_version": getattr(encoder, "model_version", ""),
              "as_of": snapshot.isoformat(), "articles": len(ids), "queries": len(queries), "k": args.k,
              "threads": 1, "load_avg_start": load_avg(), "variants": []}
    truth = None
    for kind, options in VARIANTS:
        index = build_index(vectors, ids, kind, **options)
        started = time.perf_counter()
        _, found = index.search(queries, args.k)
        seconds = time.perf_counter() - started
        truth = found if truth is None else truth  # the first variant is the exact search
        row = {"index": kind, **options, "build_s": index.meta["build_seconds"], "search_s": round(seconds, 2),
               "speedup": round(result["variants"][0]["search_s"] / seconds, 1) if result["variants"] else 1.0,
               f"recall_at_{args.k}": round(recall_at_k(found, truth, args.k), 4),
               "recall_at_12": round(recall_at_k(found, truth, 12), 4)}
        result["variants"].append(row)
        print(f"  {row}", flush=True)
    result["load_avg_end"] = load_avg()
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
