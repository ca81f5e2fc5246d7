"""The two-tower model: a customer tower and an article tower that meet in one L2-normalised space.

Features are discovered by prefix (`cat_*` int codes, `num_*` doubles, `seq_*` the customer's recent articles),
so a new feature in the feature store reaches the model without code changes. `FeatureSpec` holds everything
learned from the training data (vocabulary sizes, numeric means and standard deviations, history length),
travels inside the saved model, and turns feature rows into tensors the same way at training and at scoring
time. Anything unseen (a new customer, a new article, a new category code) maps to row 0, the reserved
"unknown" row, so scoring never crashes.

The customer tower knows what the customer bought: the last articles before the customer's snapshot are pooled
(a learned recency attention) over embeddings SHARED with the article tower (article id and product code), so
a customer whose id was never seen in training still gets a personal vector. The article tower reads the id and
the categorical attributes only: sales counts of a snapshot at the end of the training window would describe
the very purchases being trained on (popularity is the ranker's job, with point-in-time sales features).
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as TF

CAT_PREFIX = "cat_"
NUM_PREFIX = "num_"
NUM_CLIP = 5.0  # standardised numeric features are clipped: one extreme customer must not dominate a batch
SEQ_ARTICLES, SEQ_DAYS = "seq_article_idx", "seq_days_before"  # as in recsys.tables (no Spark import here)
PRODUCT_CODE = "cat_product_code"   # the article attribute the customer's history shares with the article tower


# --- feature contract ------------------------------------------------------------------------------------
@dataclass
class SideSpec:
    """What one tower knows about its entity's features, learned from the training data."""

    id_column: str                       # customer_idx | article_idx
    num_ids: int                         # embedding rows: ids 1..num_ids-1 are known, 0 is unknown
    cat_columns: list[str] = field(default_factory=list)
    cat_sizes: list[int] = field(default_factory=list)      # max code + 1 per column (0 = unknown)
    num_columns: list[str] = field(default_factory=list)
    num_mean: list[float] = field(default_factory=list)
    num_std: list[float] = field(default_factory=list)
    seq_length: int = 0                  # recent articles per row (customers); 0: no history input

    @classmethod
    def fit(cls, pdf: pd.DataFrame, id_column: str, numeric: bool = True, history: bool = True) -> "SideSpec":
        """Vocabulary sizes and numeric statistics from feature rows (`numeric=False`: ignore num_* columns)."""
        if id_column not in pdf.columns:
            raise ValueError(f"feature rows have no '{id_column}' column (columns: {', '.join(pdf.columns)})")
        cats = sorted(c for c in pdf.columns if c.startswith(CAT_PREFIX))
        nums = sorted(c for c in pdf.columns if c.startswith(NUM_PREFIX)) if numeric else []
        ids = pd.to_numeric(pdf[id_column], errors="coerce").fillna(0)
        sizes = [int(pd.to_numeric(pdf[c], errors="coerce").fillna(0).clip(lower=0).max() or 0) + 1 for c in cats]
        values = pdf[nums].apply(pd.to_numeric, errors="coerce").astype("float64") if nums else pd.DataFrame()
        mean = values.mean().fillna(0.0).tolist() if nums else []
        std = values.std(ddof=0).fillna(0.0).tolist() if nums else []
        seq = 0
        if history and SEQ_ARTICLES in pdf.columns and len(pdf):
            seq = int(max(len(v) for v in pdf[SEQ_ARTICLES] if v is not None))
        return cls.of(id_column, int(ids.max() if len(ids) else 0) + 1, dict(zip(cats, sizes)),
                      dict(zip(nums, zip(mean, std))), seq)

    @classmethod
    def of(cls, id_column: str, num_ids: int, cat_sizes: Mapping[str, int],
           num_stats: Mapping[str, tuple[float, float]], seq_length: int = 0) -> "SideSpec":
        """From statistics computed elsewhere (e.g. one Spark aggregation over the training rows)."""
        cats, nums = sorted(cat_sizes), sorted(num_stats)
        return cls(
            id_column=id_column,
            num_ids=int(num_ids),
            cat_columns=cats,
            cat_sizes=[max(int(cat_sizes[c]), 1) for c in cats],
            num_columns=nums,
            num_mean=[float(num_stats[c][0] or 0.0) for c in nums],
            num_std=[float(num_stats[c][1]) if (num_stats[c][1] or 0.0) > 1e-12 else 1.0 for c in nums],
            seq_length=int(seq_length),
        )

    @property
    def columns(self) -> list[str]:
        """Every input column this side reads, besides the id."""
        return [*self.cat_columns, *self.num_columns, *([SEQ_ARTICLES, SEQ_DAYS] if self.seq_length else [])]

    def tensors(self, rows: Mapping[str, Any] | pd.DataFrame) -> dict[str, torch.Tensor]:
        """Feature rows (a DataFrame, or a mapping column -> array, e.g. a loader batch) -> {"id", "cat", "num"
        [, "seq", "seq_days"]} tensors; unknown ids/codes -> 0, missing numbers -> the mean, a missing or short
        history -> zero padding."""
        n = _rows(rows, self.id_column)
        ids = self._codes(rows, self.id_column, self.num_ids, n)
        cat = np.zeros((n, len(self.cat_columns)), dtype=np.int64)
        for j, (column, size) in enumerate(zip(self.cat_columns, self.cat_sizes)):
            cat[:, j] = self._codes(rows, column, size, n)
        num = np.zeros((n, len(self.num_columns)), dtype=np.float32)
        for j, column in enumerate(self.num_columns):
            if column in rows:
                raw = pd.to_numeric(pd.Series(np.asarray(rows[column]).reshape(-1)), errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan)
                raw = np.where(np.isfinite(raw), raw, self.num_mean[j])
                num[:, j] = np.clip((raw - self.num_mean[j]) / self.num_std[j], -NUM_CLIP, NUM_CLIP)
        out = {"id": torch.from_numpy(ids), "cat": torch.from_numpy(cat), "num": torch.from_numpy(num)}
        if self.seq_length:
            out["seq"] = torch.from_numpy(_padded(rows, SEQ_ARTICLES, n, self.seq_length))
            out["seq_days"] = torch.from_numpy(_padded(rows, SEQ_DAYS, n, self.seq_length).astype(np.float32))
        return out

    @staticmethod
    def _codes(rows, column: str, size: int, n: int) -> np.ndarray:
        if column not in rows:
            return np.zeros(n, dtype=np.int64)
        values = pd.to_numeric(pd.Series(np.asarray(rows[column]).reshape(-1)), errors="coerce")
        codes = values.fillna(0).to_numpy(dtype=np.int64)
        return np.where((codes > 0) & (codes < size), codes, 0)


def _rows(rows, id_column: str) -> int:
    return len(rows) if isinstance(rows, pd.DataFrame) else len(np.asarray(rows[id_column]).reshape(-1))


def _padded(rows, column: str, n: int, length: int) -> np.ndarray:
    """A column of int sequences (lists, arrays, or a 2-d array) -> [n, length] int64, truncated / zero-padded."""
    out = np.zeros((n, length), dtype=np.int64)
    if column not in rows:
        return out
    values = rows[column]
    if isinstance(values, pd.Series):
        values = values.to_numpy()
    if isinstance(values, torch.Tensor):
        values = values.numpy()
    if isinstance(values, np.ndarray) and values.ndim == 2:
        width = min(length, values.shape[1])
        out[:, :width] = values[:, :width]
        return out
    for i, value in enumerate(values):
        if value is None:
            continue
        value = np.asarray(value, dtype=np.int64)[:length]
        out[i, :len(value)] = value
    return out


@dataclass
class FeatureSpec:
    customer: SideSpec
    article: SideSpec

    @classmethod
    def fit(cls, customer_features: pd.DataFrame, article_features: pd.DataFrame) -> "FeatureSpec":
        return cls(SideSpec.fit(customer_features, "customer_idx"),
                   SideSpec.fit(article_features, "article_idx", numeric=False))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        return cls(SideSpec(**data["customer"]), SideSpec(**data["article"]))


class FeatureTable:
    """A whole side's features as dense tensors indexed by idx (row 0 = unknown), kept in memory by the trainer.

    The article side lives here (its attributes do not change with time); a batch's features are a gather. The
    customer side arrives with each training example instead, as of that example's own day (point-in-time).
    """

    def __init__(self, spec: SideSpec, pdf: pd.DataFrame):
        self.spec = spec
        dense = pd.DataFrame({spec.id_column: np.arange(spec.num_ids)})
        rows = pdf.drop_duplicates(spec.id_column, keep="last")
        rows = rows[pd.to_numeric(rows[spec.id_column], errors="coerce").between(1, spec.num_ids - 1)]
        dense = dense.merge(rows, on=spec.id_column, how="left")
        self.tensors = spec.tensors(dense)
        self.tensors["num"][0] = 0.0  # the unknown row: average numbers, unknown codes, no history
        self.tensors["cat"][0] = 0
        for name in ("seq", "seq_days"):
            if name in self.tensors:
                self.tensors[name][0] = 0

    def to(self, device: torch.device) -> "FeatureTable":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def __len__(self) -> int:
        return self.spec.num_ids

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.where((idx > 0) & (idx < self.spec.num_ids), idx, torch.zeros_like(idx))
        return {name: tensor[idx] for name, tensor in self.tensors.items()}


# --- towers ----------------------------------------------------------------------------------------------
@dataclass
class TowerConfig:
    id_dim: int = 32
    attribute_dim: int = 16
    hidden_dim: int = 128
    output_dim: int = 64
    customer_id: bool = True             # False: the customer tower is inductive (features and history only)


class HistoryPooling(nn.Module):
    """The customer's last articles -> one vector: a recency attention over the article tower's OWN embeddings.

    Weights are softmax(position bias - rate * days ago) over the non-padding entries, both learned; the pooled
    vector is [article id embedding ; product code embedding] of the articles, so what the article tower learns
    about an article is what the history says about the customer. An empty history pools to zeros.
    """

    def __init__(self, length: int, article_ids: nn.Embedding, product_codes: nn.Embedding | None,
                 article_product: torch.Tensor):
        super().__init__()
        self.article_ids = article_ids
        self.product_codes = product_codes
        self.register_buffer("article_product", article_product.long().clone())
        self.position = nn.Parameter(torch.zeros(length))
        self.rate = nn.Parameter(torch.tensor(0.0))

    @property
    def dim(self) -> int:
        return self.article_ids.embedding_dim + (self.product_codes.embedding_dim if self.product_codes else 0)

    def forward(self, seq: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
        seq = torch.where((seq > 0) & (seq < self.article_ids.num_embeddings), seq, torch.zeros_like(seq))
        valid = seq > 0
        parts = [self.article_ids(seq)]
        if self.product_codes is not None:
            parts.append(self.product_codes(self.article_product[seq]))
        vectors = torch.cat(parts, dim=-1)
        logits = self.position[None, : seq.shape[1]] - TF.softplus(self.rate) * days / 7.0
        logits = logits.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a row of padding only: all weights 0
        return (weights.unsqueeze(-1) * vectors).sum(dim=1)


class Tower(nn.Module):
    """[id embedding] + one embedding per categorical feature + projected numeric features [+ pooled history]
    -> MLP -> unit vector.

    Input contract: {"id": Long[B], "cat": Long[B, n_cat], "num": Float[B, n_num]} (+ "seq": Long[B, L],
    "seq_days": Float[B, L] with a history) as made by `SideSpec.tensors`.
    """

    def __init__(self, spec: SideSpec, config: TowerConfig, use_id: bool = True,
                 history: HistoryPooling | None = None):
        super().__init__()
        self.id_embedding = nn.Embedding(spec.num_ids, config.id_dim) if use_id else None
        self.cat_embeddings = nn.ModuleList(nn.Embedding(size, config.attribute_dim) for size in spec.cat_sizes)
        n_num = len(spec.num_columns)
        self.num_projection = nn.Linear(n_num, config.attribute_dim) if n_num else None
        self.history = history
        width = ((config.id_dim if use_id else 0) + config.attribute_dim * len(spec.cat_sizes)
                 + (config.attribute_dim if n_num else 0) + (history.dim if history is not None else 0))
        self.mlp = nn.Sequential(
            nn.Linear(max(width, 1), config.hidden_dim), nn.ReLU(), nn.Linear(config.hidden_dim, config.output_dim)
        )
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.05)
        for embedding in self.cat_embeddings:
            nn.init.normal_(embedding.weight, std=0.05)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.id_embedding(batch["id"])] if self.id_embedding is not None else []
        parts += [emb(batch["cat"][:, j]) for j, emb in enumerate(self.cat_embeddings)]
        if self.num_projection is not None:
            parts.append(self.num_projection(batch["num"]))
        if self.history is not None:
            parts.append(self.history(batch["seq"], batch["seq_days"]))
        if not parts:  # no input at all: one learned vector for everyone
            parts.append(torch.ones(len(batch["id"]), 1, device=self.mlp[0].weight.device))
        return TF.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


class TwoTower(nn.Module):
    """Score = dot product of the two unit vectors; training divides it by a temperature (see train.py).

    `article_product`: the product code of every article row (the history pooling's shared product embedding);
    None builds a zero table of the right size, to be filled by `load_state_dict`.
    """

    def __init__(self, spec: FeatureSpec, config: TowerConfig, article_product: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.tower_config = config
        self.article_tower = Tower(spec.article, config)
        history = None
        if spec.customer.seq_length:
            product = None
            if PRODUCT_CODE in spec.article.cat_columns:
                product = self.article_tower.cat_embeddings[spec.article.cat_columns.index(PRODUCT_CODE)]
            if article_product is None:
                article_product = torch.zeros(spec.article.num_ids, dtype=torch.long)
            if self.article_tower.id_embedding is None:
                raise ValueError("the history pooling needs the article tower's id embedding")
            history = HistoryPooling(spec.customer.seq_length, self.article_tower.id_embedding, product,
                                     article_product)
        self.customer_tower = Tower(spec.customer, config, use_id=config.customer_id, history=history)

    def user_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.customer_tower(batch)

    def item_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.article_tower(batch)

    def forward(self, customer_batch: dict[str, torch.Tensor], article_batch: dict[str, torch.Tensor]):
        """(customer vectors, article vectors): one call, so DistributedDataParallel sees both towers."""
        return self.user_embedding(customer_batch), self.item_embedding(article_batch)

    @staticmethod
    def score(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return user @ item.T


def article_products(spec: FeatureSpec, articles: "FeatureTable") -> torch.Tensor:
    """The product code of every article row, from the in-memory article table (0 where unknown)."""
    if PRODUCT_CODE not in spec.article.cat_columns:
        return torch.zeros(spec.article.num_ids, dtype=torch.long)
    return articles.tensors["cat"][:, spec.article.cat_columns.index(PRODUCT_CODE)].detach().cpu().long()


def tower_config(model_config) -> TowerConfig:
    """`recsys.config.ModelConfig` -> the sizes the towers need."""
    return TowerConfig(
        id_dim=model_config.id_embedding_dim,
        attribute_dim=model_config.attribute_embedding_dim,
        hidden_dim=model_config.hidden_dim,
        output_dim=model_config.embedding_dim,
        customer_id=model_config.customer_id_embedding,
    )


# --- warm start: a new model from a trained one ----------------------------------------------------------
@dataclass
class WarmStart:
    """What `warm_start` took from the trained model: whole tensors, embedding rows, and what stayed fresh."""

    copied: list[str] = field(default_factory=list)          # tensors taken whole
    extended: dict[str, tuple[int, int]] = field(default_factory=dict)   # embedding -> (rows copied, rows now)
    fresh: list[str] = field(default_factory=list)           # tensors left as initialised

    def describe(self) -> str:
        grown = "; ".join(f"{name} {copied:,} of {rows:,} rows" for name, (copied, rows) in self.extended.items())
        return (f"{len(self.copied)} tensors copied, {len(self.extended)} embeddings extended"
                + (f" ({grown})" if grown else "") + f", {len(self.fresh)} fresh"
                + (f" ({', '.join(self.fresh)})" if self.fresh else ""))


def _side_of(name: str, spec: FeatureSpec) -> SideSpec:
    return spec.customer if name.startswith("customer_tower.") else spec.article


def _layout(side: SideSpec) -> tuple:
    """What a side's dense layers read, in order: the same layout means a copied weight means the same thing."""
    return tuple(side.cat_columns), tuple(side.num_columns), side.seq_length


def keep_scale(spec: FeatureSpec, trained: FeatureSpec) -> None:
    """Standardise numbers with the trained model's means and deviations (where it has the same numeric
    columns), so that its copied projection reads them on the scale it learned."""
    for side, old in ((spec.customer, trained.customer), (spec.article, trained.article)):
        if side.num_columns == old.num_columns:
            side.num_mean, side.num_std = list(old.num_mean), list(old.num_std)


def warm_start(model: TwoTower, trained: Encoder) -> WarmStart:
    """Initialise `model` from `trained` wherever a weight means the same thing in both.

    Ids and category codes are append-only (recsys.features), so row i of an id or category embedding is the same
    customer, article or value in both models: those rows are copied, and rows of ids the trained model never
    knew keep their fresh initialisation. A category embedding is matched by its column name. The dense layers
    (numeric projection, MLP, history weights) are copied only when their side reads the same columns in the same
    order; otherwise they stay fresh. Buffers (the article -> product code table) stay the new model's own.
    """
    if trained.tower != model.tower_config:
        raise ValueError(f"warm start needs the same tower sizes: trained {trained.tower}, new {model.tower_config}")
    out = WarmStart()
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = _source_name(name, model.spec, trained.spec)
            weight = trained.state.get(source) if source else None
            if weight is None:
                out.fresh.append(name)
                continue
            weight = torch.from_numpy(np.asarray(weight))
            if "embedding" in name and weight.ndim == 2 and weight.shape[1] == param.shape[1]:
                rows = min(weight.shape[0], param.shape[0])
                param[:rows] = weight[:rows]
                if rows == param.shape[0] == weight.shape[0]:
                    out.copied.append(name)
                else:
                    out.extended[name] = (rows, param.shape[0])
            elif weight.shape == param.shape and _layout(_side_of(name, model.spec)) == _layout(
                    _side_of(name, trained.spec)):
                param.copy_(weight)
                out.copied.append(name)
            else:
                out.fresh.append(name)
    return out


def _source_name(name: str, spec: FeatureSpec, trained: FeatureSpec) -> str | None:
    """The trained model's name for parameter `name`: a category embedding by its column, anything else as is."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[1] == "cat_embeddings":
        column = _side_of(name, spec).cat_columns[int(parts[2])]
        old = _side_of(name, trained).cat_columns
        return ".".join([parts[0], parts[1], str(old.index(column)), *parts[3:]]) if column in old else None
    return name


# --- the scoring-side handle -----------------------------------------------------------------------------
class Encoder:
    """A trained model packaged for scoring: feature rows in, L2-normalised float32 vectors out.

    Picklable (state as numpy arrays, the torch module rebuilt lazily), so it can be broadcast to executors.
    """

    def __init__(self, spec: FeatureSpec, tower: TowerConfig, state: dict[str, np.ndarray],
                 model_version: str = "", as_of: str = "", batch_size: int = 65536):
        self.spec = spec
        self.tower = tower
        self.state = state
        self.model_version = model_version
        self.as_of = as_of
        self.batch_size = batch_size
        self._model: TwoTower | None = None

    @classmethod
    def from_model(cls, model: TwoTower, as_of: str, model_version: str = "") -> "Encoder":
        state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        return cls(model.spec, model.tower_config, state, model_version=model_version, as_of=as_of)

    @property
    def dim(self) -> int:
        return self.tower.output_dim

    @property
    def model(self) -> TwoTower:
        if self._model is None:
            model = TwoTower(self.spec, self.tower)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in self.state.items()})
            self._model = model.eval()
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def encode_customers(self, pdf: pd.DataFrame) -> np.ndarray:
        return self._encode(pdf, self.spec.customer, self.model.user_embedding)

    def encode_articles(self, pdf: pd.DataFrame) -> np.ndarray:
        return self._encode(pdf, self.spec.article, self.model.item_embedding)

    def _encode(self, pdf: pd.DataFrame, side: SideSpec, tower) -> np.ndarray:
        out = np.zeros((len(pdf), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(pdf), self.batch_size):
                chunk = pdf.iloc[start:start + self.batch_size]
                out[start:start + len(chunk)] = tower(side.tensors(chunk)).numpy()
        return out

    # -- a single-file form, stored as an MLflow artifact
    def save(self, path) -> None:
        torch.save({"spec": self.spec.to_dict(), "tower": asdict(self.tower), "state": self.state,
                    "as_of": self.as_of, "model_version": self.model_version}, path)

    @classmethod
    def load(cls, path_or_bytes) -> "Encoder":
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        data = torch.load(source, weights_only=False)
        return cls(FeatureSpec.from_dict(data["spec"]), TowerConfig(**data["tower"]), data["state"],
                   model_version=data.get("model_version", ""), as_of=data.get("as_of", ""))


def load_encoder(model_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> Encoder:
    """`models:/name@alias`, `models:/name/3`, `runs:/<run_id>/model` or a local model folder -> Encoder.

    Reads the MLflow pyfunc model logged by `recsys.train`; `model_version` becomes the registry version when
    the URI names the registry, else `run:<run_id>`. Pass `config.tracking_uri` and `config.registry_uri` (the
    registry defaults to the tracking URI); None keeps whatever the process set (e.g. `train.configure_mlflow`).
    """
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri or tracking_uri)
    loaded = mlflow.pyfunc.load_model(model_uri)
    encoder = loaded.unwrap_python_model().encoder
    if model_uri.startswith("models:/"):
        encoder.model_version = _registry_version(model_uri)
    elif loaded.metadata.run_id:
        encoder.model_version = f"run:{loaded.metadata.run_id}"
    return encoder


def _registry_version(model_uri: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    from recsys.registry import Registry

    name_part = model_uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in name_part:
        name, alias = name_part.split("@", 1)
        version = Registry(client, mlflow.get_registry_uri()).alias_version(name, alias)
        if version is None:
            raise LookupError(f"{model_uri}: registered model {name!r} has no alias {alias!r}")
        return version
    name, _, ref = name_part.partition("/")
    if ref.isdigit():
        return ref
    versions = client.get_latest_versions(name, stages=[ref] if ref else None)
    return str(versions[0].version) if versions else ""
