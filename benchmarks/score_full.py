"""Scoring at full H&M size: 1,371,980 customers x 105,542 articles, d = 64 (random unit vectors).

Measures, in one run on one machine:
- the machine's fp32 matrix-multiply peak (torch, 4096 x 4096), the ceiling for exact search;
- exact FAISS IndexFlatIP search of every customer (customers/s, effective GFLOP/s, % of the peak), after a
  short tuning of FAISS's BLAS block sizes;
- IVF and HNSW: build time, speed-up over exact and recall@12 against exact on a sample of customers;
- end-to-end Spark scoring (`recsys.score.model_candidates`: encoder + index broadcast once, mapInPandas,
  one thread per task) on a subset of customers;
- peak memory (this process, and its children: the Spark JVM and Python workers).

Writes benchmarks/results/score_full.json. Usage: python benchmarks/score_full.py [--customers N] [--spark-customers N]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import ProcessTree, machine, parse_args, write_result  # noqa: E402

N_CUSTOMERS, N_ARTICLES, DIM, K = 1_371_980, 105_542, 64, 12
RESULT = ROOT / "benchmarks" / "results" / "score_full.json"


def unit_vectors(n: int, d: int, seed: int, chunk: int = 262_144) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def matmul_peak(threads: int, size: int = 4096, repeats: int = 5) -> float:
    """Best-of-N fp32 GFLOP/s of a size x size matrix multiply."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def timed_search(index, queries: np.ndarray, k: int, block: int = 65_536) -> tuple[float, np.ndarray]:
    ids = np.empty((len(queries), k), dtype=object)
    started = time.perf_counter()
    for start in range(0, len(queries), block):
        ids[start:start + block] = index.search(queries[start:start + block], k)[1]
    return time.perf_counter() - started, ids


class RandomEncoder:
    """Cheap deterministic user tower stand-in: customer_idx -> a pseudo-random unit vector (vectorised)."""

    def __init__(self, dim: int):
        self.dim, self.model_version, self.as_of = dim, "bench", ""
        self.freq = np.random.default_rng(3).uniform(0.5, 50.0, size=dim).astype(np.float64)
        self.phase = np.random.default_rng(4).uniform(0, 6.28, size=dim)

    def encode_customers(self, pdf):
        x = np.sin(np.outer(pdf["customer_idx"].to_numpy(np.float64), self.freq) + self.phase).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def encode_articles(self, pdf):  # pragma: no cover - the index is built from random vectors here
        raise NotImplementedError


def spark_scoring(index, customers: int) -> dict:
    from pyspark import cloudpickle
    from pyspark.sql import functions as F

    from recsys.config import load_config
    from recsys.score import model_candidates
    from recsys.spark import get_spark

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = load_config("full", ["spark.driver_memory=6g", "spark.shuffle_partitions=8"])
    spark = get_spark(config, "bench-score")
    frame = spark.range(1, customers + 1, numPartitions=8).select(
        F.sha2(F.col("id").cast("string"), 256).alias("customer_id"), F.col("id").cast("int").alias("customer_idx")
    )
    started = time.perf_counter()
    rows = model_candidates(frame, RandomEncoder(DIM), index, K, threads=1)
    rows.write.format("noop").mode("overwrite").save()
    seconds = time.perf_counter() - started
    return {"customers": customers, "seconds": seconds, "customers_per_s": customers / seconds,
            "partitions": 8, "tasks_in_parallel": 2, "threads_per_task": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=N_CUSTOMERS, help="customers searched exactly")
    parser.add_argument("--sample", type=int, default=20_000, help="customers for the ANN recall / speed sample")
    parser.add_argument("--spark-customers", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parse_args(parser)

    import faiss

    from recsys.index import build_index, recall_at_k, set_threads

    set_threads(args.threads)
    memory = ProcessTree().__enter__()  # sampled until the end of the run
    result: dict = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(), "faiss": faiss.__version__,
        "sizes": {"customers": args.customers, "articles": N_ARTICLES, "dim": DIM, "k": K},
        "threads": args.threads,
    }
    peak = matmul_peak(args.threads)
    result["matmul_peak_gflops"] = peak
    print(f"matmul peak: {peak:.1f} GFLOP/s", flush=True)

    articles = unit_vectors(N_ARTICLES, DIM, 1)
    customers = unit_vectors(args.customers, DIM, 2)
    ids = [f"{i:010d}" for i in range(N_ARTICLES)]
    exact = build_index(articles, ids)

    # FAISS splits a batch into query x database blocks for BLAS; larger blocks use the GEMM better.
    tuning = {}
    sample = customers[: args.sample]
    for qbs, dbs in [(4096, 1024), (4096, 4096), (8192, 8192), (16384, 16384)]:
        faiss.cvar.distance_compute_blas_query_bs = qbs
        faiss.cvar.distance_compute_blas_database_bs = dbs
        seconds, _ = timed_search(exact, sample, K)
        tuning[f"{qbs}x{dbs}"] = len(sample) / seconds
        print(f"blas blocks {qbs}x{dbs}: {len(sample) / seconds:,.0f} customers/s", flush=True)
    best = max(tuning, key=tuning.get)
    qbs, dbs = map(int, best.split("x"))
    faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = qbs, dbs
    result["flat_block_tuning_customers_per_s"] = tuning

    seconds, exact_ids = timed_search(exact, customers, K)
    flops = 2.0 * args.customers * N_ARTICLES * DIM
    result["exact"] = {
        "blas_blocks": best, "seconds": seconds, "customers_per_s": args.customers / seconds,
        "gflops": flops / seconds / 1e9, "percent_of_matmul_peak": 100 * flops / seconds / 1e9 / peak,
        "seconds_for_all_1371980_customers": N_CUSTOMERS / (args.customers / seconds),
    }
    print(json.dumps(result["exact"]), flush=True)
    truth = exact_ids[: args.sample]
    exact_sample_qps = tuning[best]

    result["ann"] = {}
    for kind, options in [("ivf", {"ivf_lists": 1024, "ivf_probe": 16}), ("ivf", {"ivf_lists": 1024, "ivf_probe": 64}),
                          ("hnsw", {"hnsw_m": 32, "hnsw_ef_search": 128})]:
        started = time.perf_counter()
        index = build_index(articles, ids, kind, **options)
        build = time.perf_counter() - started
        seconds, found = timed_search(index, sample, K)
        name = f"{kind}:" + ",".join(f"{k}={v}" for k, v in options.items())
        result["ann"][name] = {
            "build_seconds": build, "customers_per_s": len(sample) / seconds,
            "speedup_vs_exact": (len(sample) / seconds) / exact_sample_qps,
            "recall_at_12_vs_exact": recall_at_k(found, truth, K),
        }
        print(name, json.dumps(result["ann"][name]), flush=True)

    del customers, exact_ids
    set_threads(args.threads)
    result["spark_end_to_end"] = spark_scoring(exact, args.spark_customers)
    print(json.dumps(result["spark_end_to_end"]), flush=True)

    result["peak_rss_gib"] = {
        "driver_python": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "process_tree_sampled": memory.peak / 2**30,
    }
    result["load_average_at_end"] = os.getloadavg()
    write_result(RESULT, result)
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
