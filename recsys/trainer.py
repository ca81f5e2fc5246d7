"""The two-tower training loop in torch alone: negatives, the loss, validation and checkpoints.

No Spark and no MLflow here (`recsys.train` is the I/O around it), so the loop runs wherever torch does: in a
Spark worker under TorchDistributor, in a notebook, or on a GPU box that has nothing else.

The loss and the negative sampler are separate pieces: `SampledSoftmaxLoss` takes embeddings plus the log of
each candidate's sampling rate (log-Q correction, Yi et al. 2019), a `NegativeSampler` supplies the extra
random negatives and their rates. Everything random is seeded from (seed, epoch), and a checkpoint after every
epoch holds model, optimiser and early-stopping state, so an interrupted run resumes to the same weights.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as TF

from recsys import metrics
from recsys.model import FeatureSpec, FeatureTable, SideSpec, TwoTower

if TYPE_CHECKING:
    from recsys.config import ModelConfig
    from recsys.loader import ExampleLoader

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


def equal_pairs(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) of every left[i] == right[j], found by sorting `right` and searching it for each of `left`: time and
    memory grow with the pairs (a few thousand in a full-size batch), where a broadcast comparison builds the
    whole len(left) x len(right) matrix (8,192 x 10,240) and masking by it is two more passes over the logits."""
    values, order = torch.sort(right)
    first = torch.searchsorted(values, left)
    counts = torch.searchsorted(values, left, right=True) - first
    rows = torch.repeat_interleave(torch.arange(len(left), device=left.device), counts)
    # row i's pairs sit at flat positions cum_i .. cum_i + counts_i - 1 and take values[first_i ...] in order
    shift = torch.repeat_interleave(first - (torch.cumsum(counts, 0) - counts), counts)
    return rows, order[shift + torch.arange(len(rows), device=left.device)]


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
        """[B, B + M] corrected, masked logits; the true candidate of row i is column i.

        The [B, B + M] matrix is a step's largest tensor (8,192 x 10,240 at full size), and on a CPU every pass
        over it costs about what the towers cost: one matrix product gives every logit with the temperature and
        the log-Q correction folded in (an extra column), and what is also a positive is set to -inf in place,
        pair by pair (`equal_pairs`), with no mask of the matrix's size.
        """
        b = len(article_idx)
        extra = negatives is not None and len(negatives) > 0
        items = torch.cat([positives, negatives]) if extra else positives
        candidate_idx = torch.cat([article_idx, negative_idx]) if extra else article_idx
        scaled = user / self.temperature
        if positive_log_q is not None or negative_log_q is not None:
            zeros = user.new_zeros
            log_q = torch.cat([positive_log_q if positive_log_q is not None else zeros(b),
                               *([negative_log_q if negative_log_q is not None else zeros(len(negatives))]
                                 if extra else [])])
            scaled = torch.cat([scaled, user.new_ones(b, 1)], dim=1)
            items = torch.cat([items, -log_q.to(items.dtype)[:, None]], dim=1)
        logits = scaled @ items.T
        same_article = equal_pairs(article_idx, candidate_idx)     # the same article elsewhere
        same_customer = equal_pairs(customer_idx, customer_idx)   # the customer's other purchases (positives' block)
        rows, columns = (torch.cat(pair) for pair in zip(same_article, same_customer))
        off_diagonal = rows != columns                            # row i's own candidate, column i, always stays
        return logits.index_put_((rows[off_diagonal], columns[off_diagonal]), logits.new_tensor(float("-inf")))

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


class Optimizer:
    """Adam over the model's weights; with `model.sparse_ids`, SparseAdam over the id tables instead.

    Why: at full size the customer-id table is 1.37 M rows. Dense Adam reads and writes every row and both of
    its moments on every step; with sparse gradients a step touches only the rows of the batch's ids (their
    weight decay is then off: SparseAdam has none, and decaying ids a batch never saw is not wanted anyway)."""

    def __init__(self, model: TwoTower, mc: ModelConfig, sparse: bool = False):
        tables = [t for t in (model.article_tower.id_embedding, model.customer_tower.id_embedding)
                  if t is not None] if sparse else []
        for table in tables:
            table.sparse = True  # the lookups now produce sparse gradients (the history pooling's too)
        ids = {id(t.weight) for t in tables}
        self.parts = [torch.optim.Adam([p for p in model.parameters() if id(p) not in ids], lr=mc.learning_rate,
                                       weight_decay=mc.weight_decay)]
        if tables:
            self.parts.append(torch.optim.SparseAdam([t.weight for t in tables], lr=mc.learning_rate))

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=True)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [part.state_dict() for part in self.parts]

    def load_state_dict(self, states: list[dict[str, Any]] | dict[str, Any]) -> None:
        states = [states] if isinstance(states, dict) else states
        if len(states) != len(self.parts):
            raise ValueError("the checkpoint was written with another model.sparse_ids: delete it or set it back")
        for part, state in zip(self.parts, states):
            part.load_state_dict(state)


# glibc's mallopt parameters, and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> Any:
    """The process's C library when it is glibc (mallopt, malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError elsewhere (musl, macOS)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """While training, large buffers come from the heap and stay there for the next step.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free; a step's logits and their
    gradient (8,192 x 10,240 floats at full size, 335 MB each) are such buffers, so every step faulted in and
    zeroed ~1 GB of new pages: at full size a third of the training CPU went to the kernel and the model ran at
    3,567-3,711 examples/s instead of 6,217-6,720 (BENCHMARKS, Training, "The heap"). On leaving, the defaults
    come back and the freed heap is handed back to the system. Nothing changes where the C library is not
    glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


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
    # DDP reduces sparse gradients over gloo only: several GPU processes (nccl) keep the id tables dense
    optimizer = Optimizer(model, mc, sparse=mc.sparse_ids and not (world_size > 1 and device.type == "cuda"))
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
    with reused_heap():
        for epoch in range(state["epoch"], mc.epochs):
            generator = torch.Generator().manual_seed(mc.seed * 1_000_003 + epoch * 7919 + rank)
            torch.manual_seed(mc.seed * 1_000_003 + epoch)
            model.train()
            started, total_loss, rows, batches = time.perf_counter(), 0.0, 0, 0
            join = trainer.join() if world_size > 1 else _nothing()
            with join:
                for batch in loader.epoch(epoch):
                    loss = _step(trainer, batch, data, sampler, in_batch, loss_fn, mc, generator, device)
                    optimizer.zero_grad()
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
