"""A tiny hand-made lake for the scoring, publishing and recommendation tests, and a test-double Encoder.

    as_of 2020-09-22 (the day after the last purchase)
    articles   A00..A39 (ids 0108775000..0108775039); A00..A19 sold in the last 7 days, A00 most, then A01, ...
               A20..A29 sold only in August (not "still selling" over 2 weeks), A30..A39 never sold
    customers  C00..C29; C00..C19 bought (features has_history = 1), C20..C24 have a feature row without
               history, C25..C29 are new (no feature row yet); ages spread over every bucket, C07/C27 unknown
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from declared import with_units
from recsys.config import load_config
from recsys.tables import (
    ARTICLE_FEATURES, ARTICLES, ARTICLES_SCHEMA, CUSTOMER_FEATURES, CUSTOMERS, CUSTOMERS_SCHEMA, TRANSACTIONS,
    TRANSACTIONS_SCHEMA, Lakehouse,
)

AS_OF = dt.date(2020, 9, 22)
N_ARTICLES, N_CUSTOMERS = 40, 30
ARTICLE_IDS = [f"{108775000 + i:010d}" for i in range(N_ARTICLES)]
CUSTOMER_IDS = [f"{i:064x}" for i in range(N_CUSTOMERS)]
WITH_HISTORY = CUSTOMER_IDS[:20]
NO_HISTORY = CUSTOMER_IDS[20:25]
NEW = CUSTOMER_IDS[25:]
AGES = [19, 23, 28, 31, 38, 41, 50, None, 60, 70]


class HashEncoder:
    """Deterministic, picklable stand-in for the model's Encoder: a fixed random unit vector per index."""

    def __init__(self, dim: int = 8, model_version: str = "test-1", fail: bool = False):
        self.dim, self.model_version, self.as_of, self.fail = dim, model_version, AS_OF.isoformat(), fail

    def vectors(self, idx, offset: int) -> np.ndarray:
        out = np.stack([np.random.default_rng(offset + int(i)).standard_normal(self.dim) for i in idx])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_customers(self, pdf: pd.DataFrame) -> np.ndarray:
        if self.fail:
            raise RuntimeError("injected failure while embedding customers")
        return self.vectors(pdf["customer_idx"], 0)

    def encode_articles(self, pdf: pd.DataFrame) -> np.ndarray:
        return self.vectors(pdf["article_idx"], 100_000)


def _articles(spark: SparkSession):
    rows = []
    for i, article_id in enumerate(ARTICLE_IDS):
        values = {f.name: (i if f.dataType.typeName() == "integer" else f"x{i}") for f in ARTICLES_SCHEMA.fields}
        values.update(article_id=article_id, prod_name=f"Article {i:02d}", product_type_name="Dress",
                      colour_group_name="Black", index_group_name=("Ladieswear", "Menswear")[i % 2])
        rows.append(tuple(values[f.name] for f in ARTICLES_SCHEMA.fields))
    return spark.createDataFrame(rows, ARTICLES_SCHEMA)


def _customers(spark: SparkSession):
    rows = [(c, 1, 1, "ACTIVE", "NONE", AGES[i % len(AGES)], "p" * 64) for i, c in enumerate(CUSTOMER_IDS)]
    return spark.createDataFrame(rows, CUSTOMERS_SCHEMA)


def transactions_rows() -> list[tuple]:
    rows = []
    for i, customer in enumerate(WITH_HISTORY):
        for j in range(i % 5 + 1):  # last week: article A(j + i % 7); A00 is bought by most
            rows.append((AS_OF - dt.timedelta(days=1 + j), customer, ARTICLE_IDS[(i + j) % 20 if j else j], 0.02, 2))
        rows.append((dt.date(2020, 8, 10), customer, ARTICLE_IDS[20 + i % 10], 0.03, 1))  # an August purchase
    return rows


def _transactions(spark: SparkSession):
    df = spark.createDataFrame(transactions_rows(), TRANSACTIONS_SCHEMA)
    return with_units(df).withColumn("t_month", F.date_format("t_dat", "yyyy-MM"))


def _customer_features(spark: SparkSession):
    rows = [
        (c, i + 1, AS_OF, int(c in WITH_HISTORY), AGES[i % len(AGES)], i % 6,
         float(i % 5 + 2 if c in WITH_HISTORY else 0))
        for i, c in enumerate(WITH_HISTORY + NO_HISTORY)
    ]
    return spark.createDataFrame(
        rows, "customer_id string, customer_idx int, as_of date, has_history int, age int, cat_age_bucket int, "
              "num_purchases_all double",
    )


def _article_features(spark: SparkSession):
    rows = [(a, i + 1, AS_OF, i % 3, float(i)) for i, a in enumerate(ARTICLE_IDS)]
    return spark.createDataFrame(
        rows, "article_id string, article_idx int, as_of date, cat_index_group int, num_sales_1w double"
    )


def build_seed(spark: SparkSession, root: Path) -> Path:
    """Write the source tables once into `root`; `copy_lake` hands each test its own copy."""
    lake = Lakehouse(spark, load_config("tiny", [f"paths.tables_dir={root}", f"paths.data_dir={root.parent}"]))
    lake.write(_articles(spark), ARTICLES)
    lake.write(_customers(spark), CUSTOMERS)
    lake.write(_transactions(spark), TRANSACTIONS)
    lake.write(_customer_features(spark), CUSTOMER_FEATURES)
    lake.write(_article_features(spark), ARTICLE_FEATURES)
    return root


def copy_lake(spark: SparkSession, seed: Path, tmp_path: Path, *overrides: str) -> Lakehouse:
    """A fresh Lakehouse holding the seed tables (a folder copy: Delta logs use relative paths)."""
    tables = tmp_path / "delta"
    shutil.copytree(seed, tables)
    config = load_config("tiny", [
        f"paths.tables_dir={tables}", f"paths.data_dir={tmp_path}", f"paths.artifacts_dir={tmp_path}/artifacts",
        *overrides,
    ])
    return Lakehouse(spark, config)


def lists(lake: Lakehouse, table: str = "recommendations") -> dict[str, list[tuple[int, str, str]]]:
    """customer_id -> [(rank, article_id, source)] sorted by rank."""
    out: dict[str, list] = {}
    for r in lake.read(table).select("customer_id", "rank", "article_id", "source").collect():
        out.setdefault(r.customer_id, []).append((r.rank, r.article_id, r.source))
    return {c: sorted(v) for c, v in out.items()}
