"""Training throughput: the model alone vs the Petastorm loader alone vs both, in examples/s.

The loader must deliver at least twice what the trainer consumes, or the trainer starves. Shapes follow the
feature-store contract at the chosen scale (customers, articles, `cat_*` vocabularies of the real H&M
columns, `num_*` counts); the training rows are synthetic (customer_idx, article_idx, weight) written to Delta
and streamed exactly as `recsys train` streams them. Writes benchmarks/results/train_throughput.json.

    .venv/bin/python benchmarks/train_throughput.py --scale small --rows 300000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys import train  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.loader import MemoryLoader, PetastormLoader  # noqa: E402
from recsys.model import TwoTower, tower_config  # noqa: E402
from recsys.spark import get_spark  # noqa: E402
from recsys.tables import Lakehouse  # noqa: E402

# vocabulary sizes of the real columns (DATA.md) and of the customer profile codes
ARTICLE_CATS = {"product_type": 131, "product_group": 19, "graphical_appearance": 30, "colour_group": 50,
                "perceived_colour_value": 8, "perceived_colour_master": 20, "department": 250, "index": 10,
                "index_group": 5, "section": 56, "garment_group": 21}
CUSTOMER_CATS = {"age_bucket": 6, "club_status": 3, "news_frequency": 3, "fn": 2, "active": 2}
CUSTOMER_NUMS, ARTICLE_NUMS = 24, 10


def feature_frame(n: int, id_column: str, cats: dict[str, int], n_num: int, rng) -> pd.DataFrame:
    frame = {id_column: np.arange(1, n + 1, dtype=np.int32)}
    frame.update({f"cat_{name}": rng.integers(0, size + 1, n).astype(np.int32) for name, size in cats.items()})
    frame.update({f"num_f{j}": rng.gamma(1.0, 2.0, n) for j in range(n_num)})
    return pd.DataFrame(frame)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 ceiling right now (best of `repeats`): on a shared machine it says how loaded it is."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--rows", type=int, default=300_000, help="training rows streamed per epoch")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    config = load_config(args.scale, [f"paths.data_dir={work}", f"paths.tables_dir={work}/delta",
                                      "spark.driver_memory=4g"])
    mc = config.model
    if args.batch_size:
        mc.batch_size = args.batch_size
    mc.epochs, mc.device = 2, "auto"  # the first epoch pays lazy initialisation: the second is reported
    customers, articles = config.synth.n_customers, config.synth.n_articles
    rng = np.random.default_rng(0)

    spark = get_spark(config, "bench-train")
    lake = Lakehouse(spark, config)
    rows = spark.range(args.rows).selectExpr(
        f"cast(floor(rand(1) * {customers}) + 1 as int) as customer_idx",
        f"cast(floor(pow(rand(2), 3) * {articles}) + 1 as int) as article_idx",  # skewed, like sales
        "rand(3) as weight",
    )
    lake.write(rows, "bench_training_examples")
    stream = lake.read("bench_training_examples")
    counts = stream.groupBy("article_idx").count().toPandas()
    empty = pd.DataFrame({"customer_idx": [], "article_idx": []})
    data = train.TrainingData.build(feature_frame(customers, "customer_idx", CUSTOMER_CATS, CUSTOMER_NUMS, rng),
                                    feature_frame(articles, "article_idx", ARTICLE_CATS, ARTICLE_NUMS, rng),
                                    counts, empty, "2020-09-22")
    pdf = stream.toPandas()
    results: dict = {"matmul_gflops": matmul_gflops()}

    # 1. model alone: rows already in memory, the loader's cost is a numpy permutation
    memory = MemoryLoader.of(pdf["customer_idx"], pdf["article_idx"], pdf["weight"], mc.batch_size, mc.seed)
    model = TwoTower(data.spec, tower_config(mc))
    fit = train.fit(model, memory, data, mc)
    results["model_alone_examples_per_s"] = fit.history[-1]["examples_per_s"]

    # 2. loader alone: Petastorm from the Delta table (Parquet materialisation timed separately)
    started = time.perf_counter()
    petastorm = PetastormLoader(stream, mc.batch_size, work / "petastorm", seed=mc.seed)
    results["petastorm_materialise_s"] = time.perf_counter() - started
    try:
        for epoch in range(2):  # the first pass warms the reader's file cache
            started, n = time.perf_counter(), 0
            for batch in petastorm.epoch(epoch):
                n += len(batch["weight"])
            seconds = time.perf_counter() - started
        results["loader_alone_examples_per_s"] = n / seconds

        # 3. both: the real training loop fed by Petastorm
        model = TwoTower(data.spec, tower_config(mc))
        fit = train.fit(model, petastorm, data, mc)
        results["model_and_loader_examples_per_s"] = fit.history[-1]["examples_per_s"]
    finally:
        petastorm.close()

    results["loader_headroom"] = results["loader_alone_examples_per_s"] / results["model_alone_examples_per_s"]
    report = {
        "benchmark": "train_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores / {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
        "device": str(train.resolve_device(mc.device)),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average_at_end": os.getloadavg()[0],
        "scale": args.scale, "customers": customers, "articles": articles, "rows": args.rows,
        "batch_size": mc.batch_size, "negatives": mc.negatives, "threads": args.threads,
        "embedding_dim": mc.embedding_dim, "id_embedding_dim": mc.id_embedding_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        **results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
