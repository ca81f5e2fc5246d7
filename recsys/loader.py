"""Training-example streams behind one small interface, so the trainer never knows who reads the data.

A loader yields batches of the narrow training rows `{"customer_idx": Long[B], "article_idx": Long[B],
"weight": Float[B]}`, every row exactly once per epoch, optionally one shard of them (one per training process).
`PetastormLoader` streams a Spark DataFrame (the Delta `training_examples` table) through Petastorm's
`make_spark_converter` -> `make_torch_dataloader`; `MemoryLoader` holds the rows in numpy (tests, small runs,
and a deterministic order for exact resume). Another reader (Mosaic Streaming, plain Arrow) only has to
implement `ExampleLoader`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from pyspark.sql import DataFrame

COLUMNS = ("customer_idx", "article_idx", "weight")
Batch = dict[str, torch.Tensor]


class ExampleLoader(Protocol):
    num_rows: int
    batch_size: int

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Every row (of this shard) once, in an order that depends on the seed and the epoch."""

    def shard(self, rank: int, world_size: int) -> "ExampleLoader":
        """The same stream cut to the rows of process `rank` of `world_size` (multi-process training)."""

    def close(self) -> None:
        """Release files or workers."""


def _batch(customer_idx, article_idx, weight) -> Batch:
    return {
        "customer_idx": torch.as_tensor(customer_idx).long(),
        "article_idx": torch.as_tensor(article_idx).long(),
        "weight": torch.as_tensor(weight).float(),
    }


def _check_columns(df: DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"training examples lack column(s) {', '.join(missing)} (have: {', '.join(df.columns)})")


class MemoryLoader:
    """Rows in memory, reshuffled each epoch from (seed, epoch): the same seed gives the same batches."""

    def __init__(self, customer_idx, article_idx, weight, batch_size: int, seed: int = 0,
                 shard: int = 0, num_shards: int = 1, shuffle: bool = True):
        self.customer_idx = np.asarray(customer_idx, dtype=np.int64)
        self.article_idx = np.asarray(article_idx, dtype=np.int64)
        self.weight = np.asarray(weight, dtype=np.float32)
        if not (len(self.customer_idx) == len(self.article_idx) == len(self.weight)):
            raise ValueError("customer_idx, article_idx and weight must have the same length")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.shard_index, self.shard_count = shard, num_shards
        self.num_rows = len(range(shard, len(self.weight), num_shards))

    @classmethod
    def from_dataframe(cls, df: DataFrame, batch_size: int, seed: int = 0, **kwargs) -> "MemoryLoader":
        _check_columns(df)
        pdf = df.select(*COLUMNS).toPandas()
        return cls(pdf["customer_idx"], pdf["article_idx"], pdf["weight"], batch_size, seed, **kwargs)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        rows = np.arange(self.shard_index, len(self.weight), self.shard_count)
        if self.shuffle:
            rows = np.random.default_rng([self.seed, epoch]).permutation(rows)
        for start in range(0, len(rows), self.batch_size):
            take = rows[start:start + self.batch_size]
            yield _batch(self.customer_idx[take], self.article_idx[take], self.weight[take])

    def shard(self, rank: int, world_size: int) -> "MemoryLoader":
        return MemoryLoader(self.customer_idx, self.article_idx, self.weight, self.batch_size, self.seed,
                            shard=rank, num_shards=world_size, shuffle=self.shuffle)

    def close(self) -> None:
        pass


class PetastormLoader:
    """A Spark DataFrame materialised once as Parquet by Petastorm, then streamed to torch each epoch.

    Row groups are shuffled per epoch and a shuffling buffer mixes rows across them; the order is not
    bit-reproducible (reader threads), the set of rows per epoch is.
    """

    def __init__(self, df: DataFrame, batch_size: int, cache_dir: str | Path, seed: int = 0,
                 shard: int = 0, num_shards: int = 1, workers: int = 2, shuffle: bool = True):
        from petastorm.spark import SparkDatasetConverter, make_spark_converter

        _check_columns(df)
        cache = Path(cache_dir).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        df.sparkSession.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, cache.as_uri())
        narrow = df.select(df.customer_idx.cast("int"), df.article_idx.cast("int"), df.weight.cast("float"))
        self.converter = make_spark_converter(narrow, parquet_row_group_size_bytes=4 * 1024 * 1024)
        self.batch_size, self.seed, self.shuffle, self.workers = batch_size, seed, shuffle, workers
        self.shard_index, self.shard_count = shard, num_shards
        total = len(self.converter)
        self.num_rows = total if num_shards == 1 else -1  # Petastorm shards by row group: size known after a pass

    def epoch(self, epoch: int) -> Iterator[Batch]:
        options = dict(
            batch_size=self.batch_size,
            num_epochs=1,
            workers_count=self.workers,
            shuffle_row_groups=self.shuffle,
            seed=self.seed * 1000 + epoch,
            shuffling_queue_capacity=self.batch_size * 4 if self.shuffle else 0,
        )
        if self.shard_count > 1:
            options.update(cur_shard=self.shard_index, shard_count=self.shard_count)
        with self.converter.make_torch_dataloader(**options) as dataloader:
            for batch in dataloader:
                yield _batch(batch["customer_idx"], batch["article_idx"], batch["weight"])

    def shard(self, rank: int, world_size: int) -> "PetastormLoader":
        """Petastorm shards by row group; the converter (a Parquet cache path) is shared, not rewritten."""
        sharded = copy.copy(self)
        sharded.shard_index, sharded.shard_count, sharded.num_rows = rank, world_size, -1
        return sharded

    def close(self) -> None:
        try:
            self.converter.delete()
        except Exception:  # a cache folder already gone is not an error at close time
            pass


def make_loader(kind: str, df: DataFrame, batch_size: int, seed: int, cache_dir: str | Path,
                shard: int = 0, num_shards: int = 1) -> ExampleLoader:
    """`model.loader` config value -> a loader over `df` (customer_idx, article_idx, weight)."""
    if kind == "petastorm":
        return PetastormLoader(df, batch_size, cache_dir, seed=seed, shard=shard, num_shards=num_shards)
    if kind == "memory":
        return MemoryLoader.from_dataframe(df, batch_size, seed=seed, shard=shard, num_shards=num_shards)
    raise ValueError(f"model.loader: unknown loader {kind!r} (expected 'petastorm' or 'memory')")
