"""Train the two-tower model on one feature snapshot; track it in MLflow and register it as `challenger`.

Train as you serve: every row of `training_examples` carries the customer's state (profile, purchase signals,
the last articles bought) as of the start of its own period, computed in Spark from the purchases strictly
before it, and streams through a loader (Petastorm by default) straight from Delta; only the article side (the
catalogue) is held in memory. The last `model.validation_days` before the snapshot are held out: every epoch is
scored on them with the project's Recall@12 / MAP@12 (the customers as of their period's start), the best epoch
wins, and training stops when validation stops improving. It is a model-selection signal; the honest test is
`recsys evaluate` on the week after as_of.

The loop itself (negatives, loss, validation, checkpoints) is `recsys.trainer`, torch alone.
"""
from __future__ import annotations

import os

# Before MLflow is imported anywhere: nothing of a training run leaves the machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import hashlib
import json
import tempfile
from dataclasses import asdict
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from recsys import console
from recsys.config import Config, ModelConfig
from recsys.features import read_snapshot
from recsys.trainer import (
    TrainingData, article_embeddings, fit, fit_distributed, popularity_validation, read_checkpoint,
)
from recsys.loader import make_loader
from recsys.model import (
    SEQ_ARTICLES, Encoder, SideSpec, TwoTower, article_products, keep_scale, tower_config, warm_start,
)
from recsys.registry import CHALLENGER
from recsys.spark import release
from recsys.tables import ARTICLE_FEATURES, ARTICLE_INDEX, CUSTOMER_INDEX, TRAINING_EXAMPLES, Lakehouse



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
        raise ValueError(f"table '{TRAINING_EXAMPLES}' has no rows for as_of={as_of}: "
                         f"run `recsys features --as-of {as_of}`")
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
        raise ValueError(f"table '{ARTICLE_FEATURES}' has no snapshot as_of={as_of}: "
                         f"run `recsys features --as-of {as_of}`")
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
        artifacts = config.local_mlflow[1]
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
    with console.hushed():
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
    from recsys.model import load_encoder
    from recsys.registry import CHAMPION, Registry

    version = Registry.of(config).alias_version(config.mlflow.registered_model, CHAMPION)
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
                             columns=data.spec.customer.columns, workers=mc.loader_workers)
        # Spark's part is done (the rows are Petastorm's files now): the JVM gives back the heap earlier stages grew,
        # or it stays resident beside the epochs' tensors (a whole pipeline in one process peaked at 17.2 GiB)
        release(lake.spark)
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
