"""One typed configuration object, loaded from `conf/base.yaml` plus a scale profile plus `--set` overrides.

Typos in YAML are silent bugs in most pipelines; here an unknown key or a value of the wrong type is an
error that names the key and the file it came from.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("tiny", "small", "full")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the typed schema."""


@dataclass
class PathsConfig:
    data_dir: str = "data"
    raw_dir: str = "data/raw"            # the three Kaggle CSVs (real or synthetic)
    landing_dir: str = ""                # daily drops: <landing_dir>/transactions/YYYY-MM-DD.csv;
                                         # empty: next to raw_dir
    tables_dir: str = "data/delta"       # one Delta table per folder when `catalog` is empty
    catalog: str = ""                    # e.g. "main.recsys" on Databricks: tables by name, not by path
    artifacts_dir: str = "data/artifacts"
    mlflow_tracking_uri: str = ""        # empty: sqlite database under data_dir
    checkpoint_dir: str = "data/checkpoints"


@dataclass
class SparkConfig:
    master: str = "local[2]"
    driver_memory: str = "8g"
    shuffle_partitions: int = 8
    ui: bool = False
    log_level: str = "WARN"
    arrow_batch_size: int = 10000
    conf: dict[str, str] = field(default_factory=dict)  # any other Spark setting, e.g. {"spark.local.dir": "/ssd"}


@dataclass
class SynthConfig:
    seed: int = 42
    n_articles: int = 3000
    n_customers: int = 20000
    start_date: str = "2018-09-20"
    end_date: str = "2020-09-22"
    rows_per_customer: float = 23.2      # two-year mean in the real data
    articles_path: str = ""              # a real articles.csv / parquet to use as the catalogue


@dataclass
class IngestConfig:
    max_price: float = 1.0               # real max is 0.59; a price above this is quarantined
    min_date: str = "2018-01-01"
    since: str = ""                      # replace only transactions on or after this date


@dataclass
class FeaturesConfig:
    as_of: str = ""                      # empty: the day after the last transaction
    windows_weeks: list[int] = field(default_factory=lambda: [1, 4, 12])
    decay_half_life_days: float = 14.0
    training_window_weeks: int = 12
    training_snapshot_days: int = 7      # a training example sees the customer as of its period's first day
    history_length: int = 20             # last articles bought, kept per customer for the customer tower
    popularity_window_days: int = 7
    popularity_top_n: int = 100


@dataclass
class SplitConfig:
    test_start: str = ""                 # empty: the last `test_days` of the data
    test_days: int = 7
    backtest_weeks: int = 1


@dataclass
class ModelConfig:
    embedding_dim: int = 64
    id_embedding_dim: int = 32
    attribute_embedding_dim: int = 16
    hidden_dim: int = 128
    customer_id_embedding: bool = True   # False: the customer tower reads features and history only
    use_history: bool = True             # pool the customer's last articles (features.history_length) in the tower
    epochs: int = 3
    batch_size: int = 2048
    learning_rate: float = 0.003
    weight_decay: float = 1e-6
    sparse_ids: bool = False             # id tables updated sparsely (SparseAdam): a step touches the batch's rows
    temperature: float = 0.05
    negatives: int = 512                 # sampled negatives per batch (popularity-corrected)
    seed: int = 7
    max_train_rows: int = 0              # 0: all training examples
    device: str = "auto"
    validation_days: int = 7             # last days before as_of held out for per-epoch Recall/MAP@12
    patience: int = 2                    # epochs without validation gain before early stopping
    loader: str = "petastorm"            # petastorm | memory
    loader_workers: int = 2              # Petastorm reader threads; 1: the same seed gives the same batches
    negative_source: str = "catalogue"   # catalogue | recent (articles sold in the training window)
    log_q_correction: bool = True
    torch_threads: int = 2
    distributed_processes: int = 0       # >1: TorchDistributor with that many local processes
    refresh: str = "full"                # full: fresh weights, the whole training window | warm: see warm_weeks
    warm_weeks: int = 2                  # warm: start from the champion's weights, train on the last N weeks only


@dataclass
class ScoringConfig:
    k: int = 12
    candidates: int = 100                # FAISS neighbours fetched before filtering to k
    index_type: str = "flat"             # flat | ivf | hnsw
    ivf_lists: int = 1024
    ivf_probe: int = 16
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    min_recall: float = 0.99             # ivf / hnsw kept only when they find this share of the exact neighbours
    recall_sample: int = 2000            # ...for this many of the customers they serve (else exact search)
    partitions: int = 8
    min_history: int = 1                 # fewer purchases than this: popularity fallback
    candidate_weeks: int = 0             # >0: index only articles sold in the last N weeks (still selling)
    exclude_purchased: bool = False      # H&M customers buy again: keep bought articles by default
    threads_per_task: int = 1            # faiss/torch threads per Spark task (tasks x threads <= cores)
    slice_customers: int = 690000        # the two stages publish in slices of about this many customers (0: one)


@dataclass
class CandidatesConfig:
    """The first stage: which sources propose articles, and how many each (recsys.candidates)."""

    sources: list[str] = field(default_factory=lambda: [
        "repurchase", "same_product", "bought_together", "two_tower", "popularity",
    ])
    repurchase_days: int = 28
    repurchase_n: int = 24
    same_product_days: int = 28
    same_product_n: int = 12
    sales_days: int = 7                  # recent sales that rank same-product candidates
    pair_days: int = 28                  # bought together: the co-purchase window
    pair_history_days: int = 14          # ... neighbours of what the customer bought in these days
    pair_neighbours: int = 12
    bought_together_n: int = 24
    popularity_days: int = 7
    popularity_n: int = 12
    two_tower_n: int = 50


@dataclass
class RankerConfig:
    """The second stage: XGBoost learning-to-rank over the candidates (recsys.ranker)."""

    label_days: int = 7                  # the ranker learns from candidates as of T - label_days,
                                         # labels T - label_days .. T - 1
    negatives_per_customer: int = 20     # random non-bought candidates kept per customer in training
    objective: str = "rank:ndcg"
    n_estimators: int = 100
    max_depth: int = 4
    learning_rate: float = 0.15
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    workers: int = 2                     # SparkXGBRanker num_workers: barrier tasks of one core each (<= cores)
    seed: int = 11


@dataclass
class EvaluationConfig:
    k: int = 12
    ks: list[int] = field(default_factory=lambda: [12, 100])
    gate_metric: str = "map_at_12"
    gate_min_improvement: float = 0.0
    gate_tolerance: float = 0.0          # how much gate_metric the challenger may lose and still be promoted
    curve_max_k: int = 100               # Recall@K curve for K = 1..curve_max_k in the report
    short_history_max: int = 5           # purchases before the test week: 0 none, 1..this short, more long
    baselines: list[str] = field(default_factory=lambda: [
        "popularity_last_week", "popularity_decayed", "popularity_age_bucket", "repurchase", "als",
    ])
    repurchase_window_days: int = 28
    als_rank: int = 32
    als_max_iter: int = 10
    als_reg: float = 0.1
    als_alpha: float = 10.0


@dataclass
class MlflowConfig:
    experiment: str = "recsys"
    registered_model: str = "recsys-two-tower"
    ranker_model: str = "recsys-ranker"
    registry_uri: str = ""               # empty: the tracking URI; "databricks-uc" on Databricks (Unity Catalog)


@dataclass
class ServingConfig:
    """Reading the published lists without Spark (`recsys recommend`, `recsys serve` and its page)."""

    tables_uri: str = ""                 # where delta-rs finds the tables; empty: paths.tables_dir
    row_group_bytes: int = 2 * 1024 * 1024   # parquet row groups of the published table: a lookup decodes one
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1                     # uvicorn processes; each holds its own copy of the served version
    refresh_seconds: float = 5.0         # how often the server looks for a newer published version
    preload: bool = True                 # the server holds its version in memory; false: reads row groups per request
    unknown_customer: str = "error"      # error (404) | popular (the global best sellers, marked as such)
    customer_id_pattern: str = "^[0-9a-f]{64}$"   # anything else is a malformed id (422)
    max_batch: int = 1000                # ids per POST /recommendations/batch
    purchases_months: int = 3            # the page shows purchases from this many most recent months
    purchases_limit: int = 24
    report_path: str = ""                # empty: artifacts_dir/evaluation/report.html (where `evaluate` writes it)


@dataclass
class MonitoringConfig:
    """Checks on the lists before they are published (recsys.monitor): crossing a `_warn` threshold warns,
    crossing a `_block` one stops the publish and the previous lists stay."""

    enabled: bool = True
    fallback_share_warn: float = 0.8     # rows filled from popularity because the ranker had too few candidates
    fallback_share_block: float = 0.99
    coverage_warn: float = 0.001         # distinct recommended articles / catalogue (lower is worse)
    coverage_block: float = 0.0          # 0: never blocks (a popularity baseline may rightly be published)
    concentration_warn: float = 0.5      # share of all rows on the 12 most recommended articles
    concentration_block: float = 1.0     # 1: never blocks (the same reason)
    score_null_warn: float = 0.01
    score_null_block: float = 0.5
    overlap_warn: float = 0.02           # of each customer's previous articles, the share still recommended
    overlap_block: float = 0.0           # 0: never blocks
    psi_warn: float = 0.25               # population stability index of each numeric customer feature
    psi_block: float = 1.0
    psi_bins: int = 10


@dataclass
class NightlyConfig:
    """`recsys nightly`: between full runs, only the customers whose purchases changed get new lists."""
    full_every_days: int = 7             # a full run (train, rank, evaluate + gate, every customer) when the last
                                         # full publish is this many days old; between them the nightly relists
                                         # the buyers since the last publish with the champion. 0: always full


@dataclass
class Config:
    profile: str = "small"
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)

    def path(self, relative: str) -> Path:
        """Relative paths in config are relative to the working directory."""
        return Path(relative).expanduser().resolve()

    @property
    def landing_dir(self) -> str:
        """Where daily drops arrive: `paths.landing_dir`, or `landing` beside `raw_dir`."""
        return self.paths.landing_dir or landing_beside(self.paths.raw_dir)

    @property
    def tracking_uri(self) -> str:
        if self.paths.mlflow_tracking_uri:
            return self.paths.mlflow_tracking_uri
        return "sqlite:///" + str(self.local_mlflow[0])

    @property
    def local_mlflow(self) -> tuple[Path, Path]:
        """(tracking database, artifact folder) of the local registry, used when no tracking URI is set."""
        data = self.path(self.paths.data_dir)
        return data / "mlflow.db", data / "mlartifacts"

    @property
    def registry_uri(self) -> str:
        """Where models are registered: locally the tracking database, on Databricks Unity Catalog."""
        return self.mlflow.registry_uri or self.tracking_uri

    def mlflow_client(self):
        """The one way to reach this project's tracking server and model registry."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def landing_beside(raw_dir: str) -> str:
    """The default landing folder: `landing` next to the raw folder (a path or a URI), e.g. data/tiny/landing."""
    return f"{posixpath.dirname(str(raw_dir).rstrip('/')) or '.'}/landing"


def from_dict(values: dict[str, Any], source: str = "a mapping") -> Config:
    """A Config from `Config.to_dict()` output (e.g. handed to worker processes), checked like a YAML file."""
    return _merge(Config(), values, source)


def conf_dir() -> Path:
    env = os.environ.get("RECSYS_CONF_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "conf"
    return local if (local / "base.yaml").exists() else PROJECT_ROOT / "conf"


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _merge(hint(), value, source, key + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_hint, key, source): _coerce(v, value_hint, f"{key}.{k}", source)
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' has type {type(value).__name__}, expected {hint}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is str and hasattr(value, "isoformat"):  # YAML turns 2020-09-22 into a date
        return value.isoformat()
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(target: Any, values: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known: {known})")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{prefix}{key}' must be a mapping, got {value!r}")
            _merge(current, value, source, f"{prefix}{key}.")
        else:
            setattr(target, key, _coerce(value, hints[key], prefix + key, source))
    return target


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """`model.epochs=5` -> {"model": {"epochs": 5}}; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(profile: str | None = None, overrides: list[str] | None = None, path: str | None = None) -> Config:
    """base.yaml, then the profile (a name in conf/ or a YAML path), then each `--set` in order."""
    config = Config()
    base = conf_dir() / "base.yaml"
    if base.exists():
        _merge(config, _read_yaml(base), str(base))
    profile = profile or os.environ.get("RECSYS_PROFILE") or config.profile
    profile_path = Path(profile) if profile.endswith((".yaml", ".yml")) else conf_dir() / f"{profile}.yaml"
    if not profile_path.exists():
        raise ConfigError(f"unknown profile {profile!r}: no file {profile_path} (profiles: {', '.join(PROFILES)})")
    _merge(config, _read_yaml(profile_path), str(profile_path))
    config.profile = profile_path.stem
    if path:
        _merge(config, _read_yaml(Path(path)), path)
    for text in overrides or []:
        _merge(config, parse_override(text), f"--set {text}")
    return config
