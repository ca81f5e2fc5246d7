"""Train the two-tower model on one feature snapshot; track it in MLflow and register it as `challenger`.

Train as you serve: every row of `training_examples` carries the customer's state (profile, purchase signals,
the last articles bought) as of the start of its own period, computed in Spark from the purchases strictly
before it, and streams through a loader (Petastorm by default) straight from Delta; only the article side (the
catalogue) is held in memory. The last `model.validation_days` before the snapshot are held out: every epoch is
scored on them with the project's Recall@12 / MAP@12 (the customers as of their period's start), the best epoch
wins, and training stops when validation stops improving. It is a model-selection signal; the honest test is
`recsys evaluate` on the week after as_of.

The loss and the negative sampler are separate pieces: `SampledSoftmaxLoss` takes embeddings plus the log of
each candidate's sampling rate (log-Q correction, Yi et al. 2019), a `NegativeSampler` supplies the extra
random negatives and their rates. Everything random is seeded from (seed, epoch), and a checkpoint after every
epoch holds model, optimiser and early-stopping state, so an interrupted run resumes to the same weights.
"""
from __future__ import annotations

import os

# Before MLflow is imported anywhere: nothing of a training run leaves the machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import hashlib
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Callable, Protocol

import mlflow
import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from torch.nn import functional as TF

from recsys import metrics
from recsys.config import Config, ModelConfig
from recsys.features import read_snapshot
from recsys.loader import ExampleLoader, make_loader
from recsys.model import (
    SEQ_ARTICLES, Encoder, FeatureSpec, FeatureTable, SideSpec, TwoTower, article_products, keep_scale, tower_config,
    warm_start,
)
from recsys.tables import ARTICLE_FEATURES, ARTICLE_INDEX, CUSTOMER_INDEX, TRAINING_EXAMPLES, Lakehouse

CHALLENGER = "challenger"
VALIDATION_K = 12


# --- negatives and loss ----------------------------------------------------------------------------------
class NegativeSampler(Protocol):
    """Where extra negatives come from, and how often each article is drawn (for the log-Q correction)."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n article_idx values (never 0, the unknown row)."""

    def log_q(self, article_idx: torch.Tensor, draws: int) -> torch.Tensor:
        """log of the expected number of times each article appears among `draws` draws."""


class CatalogueSampler:
    """Uniform over the catalogue: every known article equally likely."""

    def __init__(self, num_ids: int):
        if num_ids < 2:
            raise ValueError("the catalogue has no articles to sample negatives from")
        self.num_ids = num_ids

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(1, self.num_ids, (n,), generator=generator)

    def log_q(self, article_idx: torch.Tensor, draws: int) -> torch.Tensor:
        return torch.full(article_idx.shape, math.log(draws / (self.num_ids - 1)), device=article_idx.device)


class FrequencySampler:
    """Proportional to sales counts: the 'recent' negative source, and the law of the in-batch positives."""

    def __init__(self, counts: np.ndarray):
        counts = np.asarray(counts, dtype=np.float64).copy()
        counts[0] = 0.0
        if counts.sum() <= 0:
            raise ValueError("no article has a sale in the training window")
        self.probs = torch.as_tensor(counts / counts.sum(), dtype=torch.float32)
        self.log_probs = torch.log(self.probs.clamp_min(1e-12))

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)

    def log_q(self, article_idx: torch.Tensor, draws: int) -> torch.Tensor:
        self.log_probs = self.log_probs.to(article_idx.device)
        return self.log_probs[article_idx] + math.log(draws)


def make_sampler(source: str, num_ids: int, counts: np.ndarray) -> NegativeSampler:
    if source == "catalogue":
        return CatalogueSampler(num_ids)
    if source == "recent":
        return FrequencySampler(counts)
    raise ValueError(f"model.negative_source: unknown source {source!r} (expected 'catalogue' or 'recent')")


class SampledSoftmaxLoss:
    """Softmax over the batch's own positives plus extra negatives, weighted per example.

    Row i's candidates are every positive in the batch and every extra negative. A candidate that is also a
    positive for row i's customer (the same article twice in the batch, or another purchase of the same
    customer) is masked out, never counted as a negative. With log-Q correction each candidate's logit is
    lowered by the log of its sampling rate, so best sellers are not over-penalised for showing up often.
    """

    def __init__(self, temperature: float):
        if temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def logits(self, user: torch.Tensor, positives: torch.Tensor, customer_idx: torch.Tensor,
               article_idx: torch.Tensor, negatives: torch.Tensor | None = None,
               negative_idx: torch.Tensor | None = None, positive_log_q: torch.Tensor | None = None,
               negative_log_q: torch.Tensor | None = None) -> torch.Tensor:
        """[B, B + M] corrected, masked logits; the true candidate of row i is column i."""
        batch = user @ positives.T / self.temperature
        if positive_log_q is not None:
            batch = batch - positive_log_q[None, :]
        also_positive = (article_idx[:, None] == article_idx[None, :]) | (customer_idx[:, None] == customer_idx[None, :])
        also_positive.fill_diagonal_(False)
        parts = [batch.masked_fill(also_positive, float("-inf"))]
        if negatives is not None and len(negatives):
            extra = user @ negatives.T / self.temperature
            if negative_log_q is not None:
                extra = extra - negative_log_q[None, :]
            parts.append(extra.masked_fill(negative_idx[None, :] == article_idx[:, None], float("-inf")))
        return torch.cat(parts, dim=1)

    def __call__(self, weight: torch.Tensor, **candidates) -> torch.Tensor:
        logits = self.logits(**candidates)
        target = torch.arange(len(logits), device=logits.device)
        per_example = TF.cross_entropy(logits, target, reduction="none")
        return (per_example * weight).sum() / weight.sum().clamp_min(1e-12)


# --- training data ---------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """What the loop needs besides the stream: the article side in memory, sales counts, validation truth.

    The customer side is NOT here: every training row carries the customer's state as of its own period
    (`training_examples`, point-in-time), so nothing the example predicts can reach its features.
    """

    as_of: str
    spec: FeatureSpec
    articles: FeatureTable
    article_counts: np.ndarray                      # training rows per article_idx (log-Q, 'recent' sampler)
    validation: dict[int, list[int]]                # customer_idx -> article_idx bought in the held-out days
    validation_customers: pd.DataFrame = field(repr=False, default=None)  # their state, one row each
    article_pdf: pd.DataFrame = field(repr=False, default=None)

    @classmethod
    def build(cls, customer_spec: SideSpec, article_pdf: pd.DataFrame, article_counts: pd.DataFrame,
              validation_rows: pd.DataFrame, validation_customers: pd.DataFrame, as_of: str) -> "TrainingData":
        """From the customer spec, the article feature rows, training rows per article (article_idx, count),
        validation purchases (customer_idx, article_idx) and the validation customers' state rows."""
        spec = FeatureSpec(customer_spec, SideSpec.fit(article_pdf, "article_idx", numeric=False))
        idx = article_counts["article_idx"].to_numpy(dtype=np.int64)
        known = (idx > 0) & (idx < spec.article.num_ids)
        counts = np.bincount(idx[known], weights=article_counts["count"].to_numpy(dtype=np.float64)[known],
                             minlength=spec.article.num_ids).astype(np.int64)
        validation: dict[int, list[int]] = {}
        for customer, article in zip(validation_rows["customer_idx"].tolist(), validation_rows["article_idx"].tolist()):
            validation.setdefault(int(customer), []).append(int(article))
        return cls(as_of, spec, FeatureTable(spec.article, article_pdf), counts, validation,
                   validation_customers, article_pdf)

    def customer_batch(self, rows) -> dict[str, torch.Tensor]:
        return self.spec.customer.tensors(rows)


def _snapshot_date(lake: Lakehouse, as_of: str | None) -> str:
    if as_of:
        return str(date.fromisoformat(str(as_of)))
    return str(read_snapshot(lake, TRAINING_EXAMPLES).select("as_of").first()[0])


def _check_examples(examples: DataFrame, as_of: str) -> None:
    """Nulls or non-positive weights would silently poison the loss: name the column instead."""
    row = examples.agg(
        F.count(F.lit(1)).alias("rows"),
        *[F.sum(F.col(c).isNull().cast("int")).alias(c) for c in ("customer_idx", "article_idx", "weight", "t_dat")],
        F.sum((F.col("weight") <= 0).cast("int")).alias("bad_weight"),
    ).first().asDict()
    if not row["rows"]:
        raise ValueError(f"table '{TRAINING_EXAMPLES}' has no rows for as_of={as_of}: run `recsys features --as-of {as_of}`")
    for column in ("customer_idx", "article_idx", "weight", "t_dat"):
        if row[column]:
            raise ValueError(f"table '{TRAINING_EXAMPLES}' as_of={as_of}: {row[column]} row(s) with null '{column}'")
    if row["bad_weight"]:
        raise ValueError(f"table '{TRAINING_EXAMPLES}' as_of={as_of}: {row['bad_weight']} row(s) with 'weight' <= 0")


def state_columns(examples: DataFrame) -> list[str]:
    """The customer-state columns a training row carries (point-in-time `cat_*`, `num_*`, `seq_*`)."""
    return [c for c in examples.columns if c.startswith(("cat_", "num_", "seq_"))]


def customer_spec(rows: DataFrame, num_ids: int, use_history: bool = True) -> SideSpec:
    """Vocabulary sizes and numeric statistics of the customer state, in one Spark aggregation over the training
    rows (nothing full-size comes to the driver)."""
    columns = state_columns(rows)
    cats = [c for c in columns if c.startswith("cat_")]
    nums = [c for c in columns if c.startswith("num_")]
    history = use_history and SEQ_ARTICLES in columns
    aggregates = [F.max(c).alias(f"max_{c}") for c in cats]
    aggregates += [a for c in nums for a in (F.avg(c).alias(f"avg_{c}"), F.stddev_pop(c).alias(f"std_{c}"))]
    aggregates += [F.max(F.size(SEQ_ARTICLES)).alias("seq")] if history else []
    aggregates += [F.max("customer_idx").alias("max_id")]
    row = rows.agg(*aggregates).first().asDict()
    return SideSpec.of(
        "customer_idx", max(int(num_ids), int(row["max_id"] or 0) + 1),
        {c: int(row[f"max_{c}"] or 0) + 1 for c in cats},
        {c: (row[f"avg_{c}"], row[f"std_{c}"]) for c in nums},
        int(row.get("seq") or 0) if history else 0,
    )


def load_training_data(lake: Lakehouse, as_of: str | None, mc: ModelConfig, recent_weeks: int = 0
                       ) -> tuple[TrainingData, DataFrame]:
    """Training rows + article snapshot -> (in-memory data, the Spark DataFrame of training rows to stream).

    `recent_weeks` > 0 keeps only the training rows of that many weeks before the held-out days (a warm refresh)."""
    as_of = _snapshot_date(lake, as_of)
    article_pdf = read_snapshot(lake, ARTICLE_FEATURES, as_of).toPandas()  # the catalogue: bounded
    if article_pdf.empty:
        raise ValueError(f"table '{ARTICLE_FEATURES}' has no snapshot as_of={as_of}: run `recsys features --as-of {as_of}`")
    examples = read_snapshot(lake, TRAINING_EXAMPLES, as_of)
    _check_examples(examples, as_of)
    columns = state_columns(examples)
    if not any(c.startswith(("num_", "seq_")) for c in columns) or "feature_as_of" not in examples.columns:
        raise ValueError(f"table '{TRAINING_EXAMPLES}' as_of={as_of} has no point-in-time customer state "
                         f"(feature_as_of, num_*, seq_*): rebuild it with `recsys features --as-of {as_of}`")
    validation_start = date.fromisoformat(as_of) - timedelta(days=mc.validation_days)
    held_out = F.col("t_dat") >= F.lit(validation_start.isoformat()).cast("date")
    train = examples.filter(~held_out) if mc.validation_days > 0 else examples
    if recent_weeks > 0:
        train = train.filter(F.col("t_dat") >= F.lit(validation_start - timedelta(weeks=recent_weeks)).cast("date"))
    if mc.max_train_rows > 0:
        train = train.orderBy(F.col("t_dat").desc(), "customer_idx", "article_idx").limit(mc.max_train_rows)
    if not mc.use_history:
        columns = [c for c in columns if not c.startswith("seq_")]
    train = train.select("customer_idx", "article_idx", "weight", *columns)
    counts = train.groupBy("article_idx").count().toPandas()
    if counts.empty:
        window = f"in the {recent_weeks} weeks " if recent_weeks > 0 else ""
        raise ValueError(f"table '{TRAINING_EXAMPLES}' as_of={as_of}: no rows {window}before the "
                         f"{mc.validation_days} held-out days (lower model.validation_days)")
    known = lake.read(CUSTOMER_INDEX).agg(F.max("customer_idx")).first()[0] if lake.exists(CUSTOMER_INDEX) else 0
    spec = customer_spec(train, (known or 0) + 1, mc.use_history)
    empty = pd.DataFrame({"customer_idx": pd.Series([], dtype="int64"), "article_idx": pd.Series([], dtype="int64")})
    validation, validation_customers = empty, pd.DataFrame({"customer_idx": pd.Series([], dtype="int64")})
    if mc.validation_days > 0:
        rows = examples.filter(held_out)
        validation = rows.select("customer_idx", "article_idx").toPandas()  # one period of buyers: bounded
        first = Window.partitionBy("customer_idx").orderBy("feature_as_of", "t_dat", "article_idx")
        validation_customers = (rows.withColumn("_n", F.row_number().over(first)).filter("_n = 1")
                                .select("customer_idx", *columns).toPandas())
    data = TrainingData.build(spec, article_pdf, counts, validation, validation_customers, as_of)
    return data, train


# --- the loop --------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    stopped_early: bool
    resumed_from: int                       # first epoch this call ran (0: fresh start)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def article_embeddings(model: TwoTower, articles: FeatureTable, batch_size: int = 65536) -> torch.Tensor:
    """Vectors for every article row (row 0 = unknown), in eval mode, no gradients."""
    device = articles.tensors["id"].device
    out = []
    with torch.no_grad():
        for start in range(0, len(articles), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(articles)), device=device)
            out.append(model.item_embedding(articles.batch(idx)))
    return torch.cat(out)


def top_k(model: TwoTower, data: TrainingData, customers: pd.DataFrame, k: int,
          block: int = 4096) -> dict[int, list[int]]:
    """Exact top-k article_idx per customer state row (customer_idx + state columns) over the whole catalogue
    (the unknown row excluded)."""
    was_training = model.training
    model.eval()
    items = article_embeddings(model, data.articles)
    device = items.device
    result: dict[int, list[int]] = {}
    with torch.no_grad():
        for start in range(0, len(customers), block):
            chunk = customers.iloc[start:start + block]
            batch = {name: t.to(device) for name, t in data.customer_batch(chunk).items()}
            scores = model.score(model.user_embedding(batch), items)
            scores[:, 0] = float("-inf")
            best = scores.topk(min(k, items.shape[0] - 1), dim=1).indices.cpu().tolist()
            result.update(zip(chunk["customer_idx"].astype(int).tolist(), best))
    model.train(was_training)
    return result


def validate(model: TwoTower, data: TrainingData, k: int = VALIDATION_K) -> dict[str, float]:
    """Recall@k and MAP@k of the model on the held-out days, with the project's metric definitions."""
    if not data.validation:
        return {}
    scores = metrics.evaluate(top_k(model, data, data.validation_customers, k), data.validation, [k])
    return {f"val_{metrics.metric_name(name, k)}": scores[metrics.metric_name(name, k)] for name in ("recall", "map")}


def popularity_validation(data: TrainingData, k: int = VALIDATION_K) -> dict[str, float]:
    """The same held-out days scored for the global top-k best sellers: the bar the model must clear."""
    if not data.validation:
        return {}
    counts = data.article_counts.copy()
    counts[0] = -1
    best = np.argsort(-counts, kind="stable")[:k].tolist()
    scores = metrics.evaluate({c: best for c in data.validation}, data.validation, [k])
    return {f"val_popularity_{metrics.metric_name(name, k)}": scores[metrics.metric_name(name, k)]
            for name in ("recall", "map")}


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename: an interruption during the save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path | None) -> dict[str, Any] | None:
    if path is None or not Path(path).exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def fit(model: TwoTower, loader: ExampleLoader, data: TrainingData, mc: ModelConfig,
        checkpoint: Path | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
        extra: dict[str, Any] | None = None, rank: int = 0, world_size: int = 1) -> FitResult:
    """Train in place; after it returns `model` holds the best validated weights (or the last, without validation).

    `checkpoint`: resumed from when it exists, rewritten after each epoch (rank 0). `extra` is stored in it
    (e.g. the MLflow run id). With world_size > 1 the caller has set up torch.distributed and the loader is sharded.
    """
    device = resolve_device(mc.device)
    seed_everything(mc.seed)
    model.to(device)
    data.articles.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=mc.learning_rate, weight_decay=mc.weight_decay)
    state = {"epoch": 0, "best_metric": float("-inf"), "best_epoch": -1, "bad_epochs": 0, "history": [],
             "best_state": None}
    saved = read_checkpoint(checkpoint)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    resumed_from = state["epoch"]
    trainer = model
    if world_size > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(model)
    sampler = make_sampler(mc.negative_source, data.spec.article.num_ids, data.article_counts)
    in_batch = FrequencySampler(data.article_counts)
    loss_fn = SampledSoftmaxLoss(mc.temperature)
    stopped_early = False
    for epoch in range(state["epoch"], mc.epochs):
        generator = torch.Generator().manual_seed(mc.seed * 1_000_003 + epoch * 7919 + rank)
        torch.manual_seed(mc.seed * 1_000_003 + epoch)
        model.train()
        started, total_loss, rows, batches = time.perf_counter(), 0.0, 0, 0
        join = trainer.join() if world_size > 1 else _nothing()
        with join:
            for batch in loader.epoch(epoch):
                loss = _step(trainer, batch, data, sampler, in_batch, loss_fn, mc, generator, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(batch["weight"])
                rows += len(batch["weight"])
                batches += 1
        seconds = time.perf_counter() - started
        row = {"epoch": epoch, "loss": total_loss / max(rows, 1), "examples": rows,
               "examples_per_s": rows / max(seconds, 1e-9), "epoch_seconds": seconds}
        row.update(validate(model, data))
        score = row.get(f"val_{metrics.metric_name('map', VALIDATION_K)}")
        if score is None or score > state["best_metric"] + 1e-12:
            state.update(best_metric=score if score is not None else float("-inf"), best_epoch=epoch, bad_epochs=0,
                         best_state=_state_copy(model))
        else:
            state["bad_epochs"] += 1
        state["history"].append(row)
        state["epoch"] = epoch + 1
        stopped_early = score is not None and state["bad_epochs"] >= mc.patience and epoch + 1 < mc.epochs
        if checkpoint is not None and rank == 0:
            _save_checkpoint(checkpoint, {"model": _state_copy(model), "optimizer": optimizer.state_dict(),
                                          "state": state, **(extra or {})})
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stopped_early:
            break
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return FitResult(state["history"], state["best_epoch"], state["best_metric"], stopped_early, resumed_from)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _step(trainer, batch, data: TrainingData, sampler: NegativeSampler, in_batch: FrequencySampler,
          loss_fn: SampledSoftmaxLoss, mc: ModelConfig, generator: torch.Generator, device) -> torch.Tensor:
    """One batch: positives and extra negatives through the article tower in one call, then the loss."""
    customers = {name: t.to(device) for name, t in data.customer_batch(batch).items()}
    customer_idx = batch["customer_idx"].to(device)
    article_idx = batch["article_idx"].to(device)
    weight = batch["weight"].to(device)
    negative_idx = sampler.sample(mc.negatives, generator).to(device) if mc.negatives > 0 else article_idx[:0]
    user, items = trainer(customers, data.articles.batch(torch.cat([article_idx, negative_idx])))
    positives, negatives = items[: len(article_idx)], items[len(article_idx):]
    corrections = {}
    if mc.log_q_correction:
        corrections["positive_log_q"] = in_batch.log_q(article_idx, len(article_idx))
        if len(negative_idx):
            corrections["negative_log_q"] = sampler.log_q(negative_idx, len(negative_idx))
    return loss_fn(weight, user=user, positives=positives, customer_idx=customer_idx, article_idx=article_idx,
                   negatives=negatives, negative_idx=negative_idx, **corrections)


# --- multi-process training ------------------------------------------------------------------------------
def fit_distributed(model: TwoTower, loader: ExampleLoader, data: TrainingData, mc: ModelConfig,
                    checkpoint: Path | None, extra: dict[str, Any] | None = None) -> FitResult:
    """The same `fit`, in `model.distributed_processes` local processes (gloo) under Spark's TorchDistributor.

    On a Databricks cluster, `local_mode=False` and `num_processes` = executors x GPUs scale it out unchanged.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=mc.distributed_processes, local_mode=True,
                                   use_gpu=resolve_device(mc.device).type == "cuda")
    state, result = distributor.run(_distributed_worker, model, loader, data, mc, checkpoint, extra)
    model.load_state_dict(state)
    return result


def _distributed_worker(model, loader, data, mc, checkpoint, extra):
    import torch.distributed as dist

    cuda = resolve_device(mc.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        result = fit(model, loader.shard(rank, world), data, mc, checkpoint, extra=extra, rank=rank,
                     world_size=world)
        return _state_copy(model), result
    finally:
        dist.destroy_process_group()


# --- MLflow ----------------------------------------------------------------------------------------------
class EncoderModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of an `Encoder`: feature rows in, embeddings out; params {'tower': customer|article}."""

    def load_context(self, context) -> None:
        self.encoder = Encoder.load(context.artifacts["encoder"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        tower = (params or {}).get("tower", "customer")
        if tower == "customer":
            return self.encoder.encode_customers(model_input)
        if tower == "article":
            return self.encoder.encode_articles(model_input)
        raise ValueError(f"params.tower must be 'customer' or 'article', got {tower!r}")


def configure_mlflow(config: Config) -> str:
    """Tracking and registry at config.tracking_uri, artifacts under data_dir; returns the experiment id."""
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.registry_uri)
    name = config.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifacts = config.path(config.paths.data_dir) / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _signature(data: TrainingData, encoder: Encoder):
    """Input: every feature column either tower reads (each optional); output: [n, dim] float32."""
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
    from mlflow.types.schema import Array, DataType

    def spec_for(column: str) -> ColSpec:
        if column.startswith("seq_"):
            return ColSpec(Array(DataType.long), column, required=False)
        return ColSpec("double" if column.startswith("num_") else "long", column, required=False)

    columns = {}
    for side in (data.spec.customer, data.spec.article):
        for column in [side.id_column, *side.columns]:
            columns.setdefault(column, spec_for(column))
    return mlflow.models.ModelSignature(
        inputs=Schema(list(columns.values())),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, encoder.dim))]),
        params=ParamSchema([ParamSpec("tower", "string", "customer")]),
    )


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _log_artifacts(lake: Lakehouse, data: TrainingData, encoder: Encoder, model: TwoTower) -> Any:
    """The pyfunc model, item embeddings, id maps, the config; returns the logged model's info."""
    config = lake.config
    mlflow.log_dict(config.to_dict(), "config.json")
    mlflow.log_dict(data.spec.to_dict(), "feature_spec.json")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.to("cpu").eval()
        data.articles.to(torch.device("cpu"))
        vectors = article_embeddings(model, data.articles).numpy()
        articles = data.article_pdf[["article_id", "article_idx"]].copy()
        articles = articles[(articles["article_idx"] > 0) & (articles["article_idx"] < len(vectors))]
        articles["embedding"] = list(vectors[articles["article_idx"].to_numpy()])
        articles.to_parquet(folder / "article_embeddings.parquet", index=False)
        mlflow.log_artifact(str(folder / "article_embeddings.parquet"), "embeddings")
        for table in (CUSTOMER_INDEX, ARTICLE_INDEX):
            if lake.exists(table):
                lake.read(table).toPandas().to_parquet(folder / f"{table}.parquet", index=False)
                mlflow.log_artifact(str(folder / f"{table}.parquet"), "id_maps")
        encoder.save(folder / "encoder.pt")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=EncoderModel(),
            artifacts={"encoder": str(folder / "encoder.pt")},
            signature=_signature(data, encoder),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}", f"mlflow=={mlflow.__version__}"],
        )


def register(model_uri: str, name: str, as_of: str, run_id: str) -> str:
    """A new registry version of `model_uri`, aliased `challenger`; returns the version number."""
    client = mlflow.MlflowClient()
    version = mlflow.register_model(model_uri, name, tags={"as_of": as_of, "run_id": run_id}).version
    client.set_registered_model_alias(name, CHALLENGER, version)
    return str(version)


REFRESHES = ("full", "warm")


def warm_source(config: Config) -> tuple[Encoder | None, str]:
    """The model a warm refresh starts from (the champion two-tower), or None and why a full refresh it is."""
    mc = config.model
    if mc.refresh not in REFRESHES:
        raise ValueError(f"model.refresh: unknown value {mc.refresh!r} (expected one of {', '.join(REFRESHES)})")
    if mc.refresh == "full":
        return None, "model.refresh=full"
    if mc.warm_weeks < 1:
        raise ValueError(f"model.warm_weeks must be at least 1 for model.refresh=warm, got {mc.warm_weeks}")
    from recsys.evaluate import CHAMPION, registry_versions
    from recsys.model import load_encoder

    version = registry_versions(config).get(CHAMPION)
    if version is None:
        return None, f"no '{config.mlflow.registered_model}@{CHAMPION}' to start from: a full refresh"
    champion = load_encoder(f"models:/{config.mlflow.registered_model}/{version}", config.tracking_uri,
                            config.registry_uri)
    if champion.tower != tower_config(mc):
        return None, f"the champion (version {version}) has other tower sizes: a full refresh"
    return champion, f"warm from the champion, version {version}, on the last {mc.warm_weeks} weeks"


def checkpoint_path(config: Config, as_of: str) -> Path:
    """One checkpoint per (snapshot, model settings): a changed setting starts afresh instead of resuming."""
    settings = {k: v for k, v in asdict(config.model).items() if k not in ("epochs", "patience", "device")}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return config.path(config.paths.checkpoint_dir) / f"two_tower_{as_of}_{key}.pt"


def run(lake: Lakehouse, as_of: str | None = None) -> dict[str, Any]:
    """Train on the `as_of` feature snapshot (latest when None), log to MLflow, register as `challenger`."""
    config = lake.config
    mc = config.model
    torch.set_num_threads(mc.torch_threads)
    champion, refresh = warm_source(config)
    data, train_rows = load_training_data(lake, as_of, mc, recent_weeks=mc.warm_weeks if champion else 0)
    experiment_id = configure_mlflow(config)
    checkpoint = checkpoint_path(config, data.as_of)
    saved = read_checkpoint(checkpoint)
    if champion is not None:
        keep_scale(data.spec, champion.spec)
    model = TwoTower(data.spec, tower_config(mc), article_products(data.spec, data.articles))
    if champion is not None:
        refresh += ": " + warm_start(model, champion).describe()
    print(f"two-tower refresh: {refresh}")
    with mlflow.start_run(run_id=saved.get("run_id") if saved else None,
                          run_name=None if saved else f"two-tower as_of {data.as_of}") as active:
        run_id = active.info.run_id
        if not saved:
            mlflow.log_params({k: v for k, v in _flat("model.", asdict(mc)).items()})
            mlflow.log_params({"feature_as_of": data.as_of, "customers": data.spec.customer.num_ids - 1,
                               "articles": data.spec.article.num_ids - 1,
                               "train_examples": int(data.article_counts.sum()),
                               "validation_customers": len(data.validation)})
            mlflow.set_tags({"feature_as_of": data.as_of, "stage": "train",
                             "refresh": "warm" if champion else "full",
                             "warm_start_from": champion.model_version if champion else "",
                             "refresh_detail": refresh[:5000]})
            mlflow.log_metrics(popularity_validation(data))
        loader = make_loader(mc.loader, train_rows, mc.batch_size, mc.seed,
                             config.path(config.paths.checkpoint_dir) / "petastorm",
                             columns=data.spec.customer.columns)
        try:
            extra = {"run_id": run_id}
            if mc.distributed_processes > 1:
                result = fit_distributed(model, loader, data, mc, checkpoint, extra)
            else:
                result = fit(model, loader, data, mc, checkpoint, extra=extra,
                             on_epoch_end=lambda epoch, row: mlflow.log_metrics(
                                 {k: v for k, v in row.items() if k != "epoch"}, step=epoch))
        finally:
            loader.close()
        if mc.distributed_processes > 1:
            for row in result.history:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        best = result.history[result.best_epoch] if result.best_epoch >= 0 else {}
        final = {k: v for k, v in best.items() if k.startswith("val_")}
        mlflow.log_metrics({**{f"best_{k}": v for k, v in final.items()}, "best_epoch": result.best_epoch,
                            "stopped_early": float(result.stopped_early)})
        encoder = Encoder.from_model(model, data.as_of)
        info = _log_artifacts(lake, data, encoder, model)
        version = register(info.model_uri, config.mlflow.registered_model, data.as_of, run_id)
    checkpoint.unlink(missing_ok=True)
    model_uri = f"models:/{config.mlflow.registered_model}@{CHALLENGER}"
    ui = f"mlflow ui --backend-store-uri {config.tracking_uri}"
    print(f"MLflow run {run_id} (experiment {config.mlflow.experiment} #{experiment_id}) at {config.tracking_uri}\n"
          f"registered {config.mlflow.registered_model} version {version} as '{CHALLENGER}': {model_uri}\n"
          f"open it with: {ui}")
    return {
        "run_id": run_id,
        "model_uri": model_uri,
        "model_version": version,
        "as_of": data.as_of,
        "refresh": refresh,
        "metrics": {**final, **popularity_validation(data), "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history), "resumed_from_epoch": result.resumed_from},
        "tracking_uri": config.tracking_uri,
        "mlflow_ui": ui,
    }
