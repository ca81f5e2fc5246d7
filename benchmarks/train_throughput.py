"""Training throughput: the model alone vs the Petastorm loader alone vs both, in examples/s.

The loader must deliver at least twice what the trainer consumes, or the trainer starves. Shapes follow the
feature-store contract at the chosen scale: customers, articles, the `cat_*` vocabularies of the real H&M
columns, `num_*` purchase signals and the last 20 articles bought (`seq_*`), carried by every training row as
the trainer streams them (point-in-time customer state). The rows are synthetic, with sales skewed like real
ones; the loop, the model and the loss are the project's own (`recsys.trainer`).

`--model-only` needs torch alone (no Spark, no Java): it is what runs on a GPU machine (`--device cuda`).
Writes benchmarks/results/train_throughput.json (or --out).

    .venv/bin/python benchmarks/train_throughput.py --scale small --rows 300000
    python3 benchmarks/train_throughput.py --scale full --model-only --device cuda --out gpu.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import load_avg, machine, now, parse_args, write_result  # noqa: E402
from recsys import trainer  # noqa: E402
from recsys.config import load_config  # noqa: E402
from recsys.loader import MemoryLoader  # noqa: E402
from recsys.model import SEQ_ARTICLES, SEQ_DAYS, SideSpec, TwoTower, article_products, tower_config  # noqa: E402

# vocabulary sizes of the real columns (DATA.md) and of the customer profile codes
ARTICLE_CATS = {"product_code": 47224, "product_type": 131, "product_group": 19, "graphical_appearance": 30,
                "colour_group": 50, "perceived_colour_value": 8, "perceived_colour_master": 20,
                "department": 250, "index": 10, "index_group": 5, "section": 56, "garment_group": 21}
CUSTOMER_CATS = {"age_bucket": 6, "club_status": 3, "news_frequency": 3, "fn": 2, "active": 2}
CUSTOMER_NUMS, HISTORY = 24, 20


def skewed(rng, n: int, size: int) -> np.ndarray:
    """1..size, a few best sellers and a long tail, like sales."""
    return (np.floor(rng.random(n) ** 3 * size) + 1).astype(np.int64)


def training_rows(n: int, customers: int, articles: int, rng) -> dict[str, np.ndarray]:
    """The columns of `training_examples` as the loader yields them."""
    rows = {"customer_idx": rng.integers(1, customers + 1, n), "article_idx": skewed(rng, n, articles),
            "weight": rng.random(n).astype(np.float32) + 0.1}
    rows.update({f"cat_{c}": rng.integers(0, size + 1, n) for c, size in CUSTOMER_CATS.items()})
    rows.update({f"num_f{j}": rng.gamma(1.0, 2.0, n).astype(np.float32) for j in range(CUSTOMER_NUMS)})
    lengths = rng.integers(0, HISTORY + 1, n)
    filled = np.arange(HISTORY)[None, :] < lengths[:, None]
    rows[SEQ_ARTICLES] = np.where(filled, skewed(rng, n * HISTORY, articles).reshape(n, HISTORY), 0)
    rows[SEQ_DAYS] = np.where(filled, rng.integers(0, 365, (n, HISTORY)), 0)
    return rows


def article_rows(articles: int, rng) -> pd.DataFrame:
    frame = {"article_idx": np.arange(1, articles + 1)}
    frame.update({f"cat_{c}": rng.integers(0, min(size, articles) + 1, articles) for c, size in ARTICLE_CATS.items()})
    return pd.DataFrame(frame)


def training_data(rows: dict[str, np.ndarray], customers: int, articles: int, rng) -> trainer.TrainingData:
    spec = SideSpec.of("customer_idx", customers + 1, {f"cat_{c}": s + 1 for c, s in CUSTOMER_CATS.items()},
                       {f"num_f{j}": (2.0, 2.0) for j in range(CUSTOMER_NUMS)}, HISTORY)
    counts = pd.Series(rows["article_idx"]).value_counts().rename_axis("article_idx").reset_index(name="count")
    empty = pd.DataFrame({"customer_idx": pd.Series([], dtype="int64"), "article_idx": pd.Series([], dtype="int64")})
    return trainer.TrainingData.build(spec, article_rows(articles, rng), counts, empty, empty[["customer_idx"]],
                                      "2020-09-22")


def epoch_speed(data: trainer.TrainingData, loader, mc) -> tuple[float, int]:
    """examples/s of the second epoch (the first pays lazy initialisation), and the model's parameters."""
    model = TwoTower(data.spec, tower_config(mc), article_products(data.spec, data.articles))
    fit = trainer.fit(model, loader, data, mc)
    return fit.history[-1]["examples_per_s"], sum(p.numel() for p in model.parameters())


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 ceiling right now (best of `repeats`): on a shared machine it says how loaded it is."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def through_petastorm(rows: dict[str, np.ndarray], data, mc, config, results: dict) -> None:
    """Loader alone, then loop + loader: the rows written to Delta and streamed exactly as `recsys train` does."""
    from recsys.loader import PetastormLoader
    from recsys.spark import get_spark
    from recsys.tables import Lakehouse

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    spark = get_spark(config, "bench-train")
    lake = Lakehouse(spark, config)
    frame = pd.DataFrame({k: (list(v) if v.ndim > 1 else v) for k, v in rows.items()})
    lake.write(spark.createDataFrame(frame), "bench_training_examples")
    stream = lake.read("bench_training_examples")
    started = time.perf_counter()
    petastorm = PetastormLoader(stream, mc.batch_size, work / "petastorm", seed=mc.seed,
                                columns=data.spec.customer.columns)
    results["petastorm_materialise_s"] = round(time.perf_counter() - started, 1)
    try:
        for epoch in range(2):  # the first pass warms the reader's file cache
            started, n = time.perf_counter(), 0
            for batch in petastorm.epoch(epoch):
                n += len(batch["weight"])
            seconds = time.perf_counter() - started
        results["loader_alone_examples_per_s"] = round(n / seconds)
        results["model_and_loader_examples_per_s"] = round(epoch_speed(data, petastorm, mc)[0])
    finally:
        petastorm.close()
    results["loader_headroom"] = round(
        results["loader_alone_examples_per_s"] / results["model_alone_examples_per_s"], 2
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--rows", type=int, default=300_000, help="training rows per epoch")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--model-only", action="store_true", help="torch alone: no Spark, no Petastorm")
    parser.add_argument("--id-updates", choices=["dense", "sparse", "both"], default="dense",
                        help="model.sparse_ids off / on; both: the model alone measured each way")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parse_args(parser)

    torch.set_num_threads(args.threads)
    config = load_config(args.scale, [f"paths.data_dir={tempfile.mkdtemp(prefix='bench-train-')}",
                                      "spark.driver_memory=4g"])
    mc = config.model
    if args.batch_size:
        mc.batch_size = args.batch_size
    mc.epochs, mc.device, mc.validation_days = 2, args.device, 0
    device = trainer.resolve_device(mc.device)
    customers, articles = config.synth.n_customers, config.synth.n_articles
    rng = np.random.default_rng(0)
    rows = training_rows(args.rows, customers, articles, rng)
    data = training_data(rows, customers, articles, rng)

    results: dict = {"matmul_gflops": round(matmul_gflops(device), 1)}
    for updates in (["dense", "sparse"] if args.id_updates == "both" else [args.id_updates]):
        mc.sparse_ids = updates == "sparse"
        speed, parameters = epoch_speed(data, MemoryLoader(rows, mc.batch_size, mc.seed), mc)
        results[f"model_alone_examples_per_s_{updates}_ids"] = round(speed)
        print(f"model alone, {updates} id updates: {speed:,.0f} examples/s", flush=True)
    results["model_alone_examples_per_s"] = max(v for k, v in results.items() if k.startswith("model_alone_"))
    if not args.model_only:
        through_petastorm(rows, data, mc, config, results)
    report = {
        "benchmark": "train_throughput", "date": now(), "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "load_avg_end": load_avg(),
        "scale": args.scale, "customers": customers, "articles": articles, "rows": args.rows,
        "batch_size": mc.batch_size, "negatives": mc.negatives, "threads": args.threads,
        "embedding_dim": mc.embedding_dim, "id_embedding_dim": mc.id_embedding_dim, "history": HISTORY,
        "parameters": parameters, **results,
    }
    write_result(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
