"""A full-size published `recommendations` table (and an `articles` catalogue) for the lookup and serving benchmarks.

1,371,980 customers (64-hex ids, as in the Kaggle data) x K = 12 rows, the real schema, written the way
`recsys.publish` writes it (`conform`, then `write_for_lookup`: range-partitioned into `scoring.partitions`
files of the `full` profile, sorted by customer_id, row groups of `serving.row_group_bytes`, one Delta commit
with the publish userMetadata). The articles are 105,542 rows of the `articles` schema with names drawn from
small vocabularies. Written once with Spark into `data/bench-serve/delta` (gitignored) and reused when present.

Usage: python benchmarks/published_full.py [--root DIR] [--force]   (imported by lookup_full.py / serve_full.py)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import parse_args  # noqa: E402

N_CUSTOMERS, N_ARTICLES, K = 1_371_980, 105_542, 12
DEFAULT_ROOT = ROOT / "data" / "bench-serve"
MODEL_VERSION = "two_tower@bench"
PRODUCT_TYPES = ["Trousers", "Dress", "Sweater", "T-shirt", "Top", "Blouse", "Jacket", "Shorts", "Shirt",
                 "Vest top", "Underwear bottom", "Skirt", "Hoodie", "Bra", "Socks"]
COLOURS = ["Black", "White", "Dark Blue", "Grey", "Light Pink", "Beige", "Red", "Blue", "Light Beige", "Dark Green"]
INDEX_GROUPS = ["Ladieswear", "Baby/Children", "Divided", "Menswear", "Sport"]
WORDS = ["Luna", "Tilda", "Bella", "Skinny", "Slim", "Wide", "Ribbed", "Basic", "Soft", "Denim", "Linen", "Cosy"]


def tables_dir(root: Path = DEFAULT_ROOT) -> Path:
    return root / "delta"


def config_overrides(root: Path = DEFAULT_ROOT) -> list[str]:
    """The `full` profile pointed at the benchmark folder (what the readers load too)."""
    return [f"paths.tables_dir={tables_dir(root)}", f"paths.data_dir={root}", f"paths.artifacts_dir={root}/artifacts"]


def ready(root: Path = DEFAULT_ROOT) -> bool:
    return all((tables_dir(root) / name / "_delta_log").is_dir() for name in ("recommendations", "articles"))


def _articles(spark):
    from pyspark.sql import functions as F

    from recsys.tables import ARTICLES_SCHEMA

    def pick(values: list[str], salt: int):
        position = (F.pmod(F.xxhash64("id", F.lit(salt)), len(values)) + 1).cast("int")
        return F.element_at(F.array(*map(F.lit, values)), position)

    special = {
        "article_id": F.lpad((F.col("id") + 108775000).cast("string"), 10, "0"),
        "prod_name": F.concat_ws(" ", pick(WORDS, 1), pick(WORDS, 2), F.col("id").cast("string")),
        "product_type_name": pick(PRODUCT_TYPES, 3),
        "colour_group_name": pick(COLOURS, 4),
        "index_group_name": pick(INDEX_GROUPS, 5),
        "detail_desc": F.lit(None),
    }
    columns = []
    for field in ARTICLES_SCHEMA.fields:
        if field.name in special:
            expr = special[field.name]
        elif field.dataType.typeName() == "integer":
            expr = F.pmod(F.col("id"), 97)
        else:
            expr = F.concat(F.lit(field.name.split("_")[0] + " "), F.pmod(F.col("id"), 31).cast("string"))
        columns.append(expr.cast(field.dataType).alias(field.name))
    return spark.range(N_ARTICLES, numPartitions=2).select(*columns)


def _recommendations(spark):
    from pyspark.sql import functions as F

    customers = spark.range(N_CUSTOMERS, numPartitions=8).select(
        F.sha2(F.col("id").cast("string"), 256).alias("customer_id"), F.abs(F.xxhash64("id")).alias("h"))
    rows = customers.select("customer_id", "h", F.explode(F.sequence(F.lit(1), F.lit(K))).alias("rank"))
    # 12 distinct articles per customer (the stride times 11 stays below the catalogue size), model rows first.
    article = F.pmod(F.col("h") + F.col("rank") * 7919, N_ARTICLES) + 108775000
    source = (F.when(F.pmod("h", 5) == 0, "popularity_global")
              .when(F.col("rank") <= 8, "two_tower").otherwise("popularity_age_bucket"))
    return rows.select("customer_id", F.col("rank").cast("int").alias("rank"),
                       F.lpad(article.cast("string"), 10, "0").alias("article_id"),
                       (F.lit(1.0) / F.col("rank")).alias("score"), source.alias("source"))


def build(root: Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Write the two tables once (a few minutes on 2 cores); returns the tables folder."""
    if ready(root) and not force:
        return tables_dir(root)
    shutil.rmtree(tables_dir(root), ignore_errors=True)
    from recsys.config import load_config
    from recsys.publish import PUBLISH, commit_metadata, conform, new_run_id, write_for_lookup
    from recsys.spark import get_spark
    from recsys.tables import ARTICLES, Lakehouse

    config = load_config("full", [*config_overrides(root), "spark.driver_memory=4g", "spark.shuffle_partitions=32"])
    spark = get_spark(config, "bench-published")
    lake = Lakehouse(spark, config)
    started = time.perf_counter()
    lake.write(_articles(spark), ARTICLES)
    run_id = new_run_id()
    with commit_metadata(spark, action=PUBLISH, run_id=run_id, model_version=MODEL_VERSION):
        write_for_lookup(lake, conform(_recommendations(spark), MODEL_VERSION, run_id))
    print(f"wrote {tables_dir(root)} in {time.perf_counter() - started:.0f} s", flush=True)
    spark.stop()
    return tables_dir(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--force", action="store_true", help="rewrite the tables even if present")
    args = parse_args(parser)
    print(build(args.root, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
