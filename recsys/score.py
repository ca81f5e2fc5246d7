"""Batch scoring: every customer's top-K articles from the two-tower model, published as `recommendations`.

Steps: the item tower embeds the candidate articles on the driver (about 100 k rows) and FAISS indexes them;
the encoder and the index go to the executors once, as one broadcast, and each Python worker deserialises them
once and keeps them for all its batches; `mapInPandas` embeds customers batch by batch (user tower) and
searches the index. Customers without history, or short of K candidates after filtering, are completed from
popularity (age bucket, then global) by `recommend.complete_lists`, and `publish.publish` validates and swaps
the table atomically.

Threads: Spark runs one task per core, so each task gets `scoring.threads_per_task` FAISS/torch threads
(1 on a 2-core machine with local[2]); more would oversubscribe the cores.
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from recsys.index import ArticleIndex, build_from_config, checked, save_with_model, set_threads
from recsys.popularity import UNKNOWN, customer_age_buckets
from recsys.publish import conform, new_run_id, publish
from recsys.recommend import CANDIDATE_COLUMNS, complete_lists, popularity_lists
from recsys.features import read_snapshot
from recsys.registry import CHALLENGER, CHAMPION, Registry, system_label
from recsys.spark import Shipped
from recsys.split import as_date, before
from recsys.tables import (
    ARTICLE_FEATURES, CANDIDATES, CUSTOMER_FEATURES, CUSTOMERS, PARTIAL, RECOMMENDATIONS, TRANSACTIONS, Lakehouse,
)

PREFERENCE = (CHAMPION, CHALLENGER)  # the default model: the gate's pick, else the latest trained one


def resolve_model(config, model_uri: str | None = None) -> tuple[str, str | None]:
    """(model URI, MLflow run id of that model or None). Default: registry alias `champion`, else `challenger`;
    a registry that cannot answer raises `RegistryUnavailable` rather than falling back to the challenger."""
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    registry = Registry.of(config)
    name = config.mlflow.registered_model
    if model_uri:
        run_id = None
        if model_uri.startswith("runs:/"):
            run_id = model_uri[len("runs:/"):].split("/", 1)[0]
        elif model_uri.startswith(f"models:/{name}@"):
            alias = model_uri.split("@", 1)[1]
            version = registry.alias(name, alias)
            if version is None:
                raise ValueError(f"--model-uri {model_uri}: registered model {name!r} has no alias {alias!r}")
            run_id = version.run_id
        return model_uri, run_id
    for alias in PREFERENCE:
        version = registry.alias(name, alias)
        if version is not None:
            return f"models:/{name}@{alias}", version.run_id
    raise ValueError(
        f"no model to score with: registered model {name!r} has neither alias {' nor '.join(PREFERENCE)} at "
        f"{config.registry_uri}; run `recsys train` first or pass --model-uri"
    )


def candidate_articles(article_features: DataFrame, transactions: DataFrame, as_of: dt.date, weeks: int) -> DataFrame:
    """Articles to index: all of them (weeks = 0), or only those sold in the last `weeks` weeks (still selling)."""
    if weeks <= 0:
        return article_features
    recent = before(transactions, as_of, weeks * 7).select("article_id").distinct()
    return article_features.join(recent, "article_id", "left_semi")


def scored_customers(customer_features: DataFrame, min_history: int) -> DataFrame:
    """The customers the model scores: those with at least `min_history` purchases (others get popularity)."""
    rows = customer_features.filter(F.col("has_history") == 1)
    if "num_purchases_all" in customer_features.columns and min_history > 1:
        rows = rows.filter(F.col("num_purchases_all") >= min_history)
    return rows


def _top_rows(customer_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
    """[n, k] search results -> long rows customer_id, article_id, score, pos (empty slots dropped)."""
    n, k = ids.shape
    out = pd.DataFrame({
        "customer_id": np.repeat(customer_ids.astype(object), k),
        "article_id": ids.reshape(-1),
        "score": scores.reshape(-1).astype(np.float64),
        "pos": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
    })
    return out[out["article_id"].notna()]


def _extra_rows(customer_ids: np.ndarray, extras: pd.Series, vectors: np.ndarray, articles: "ArticleVectors"
                ) -> pd.DataFrame:
    """The similarity of each customer to articles other sources proposed (pos null: not a model pick)."""
    counts = extras.map(lambda v: 0 if v is None else len(v)).to_numpy()
    if counts.sum() == 0:
        return pd.DataFrame(columns=["customer_id", "article_id", "score", "pos"])
    owner = np.repeat(np.arange(len(customer_ids)), counts)
    ids = np.concatenate([np.asarray(v, dtype=object) for v in extras if v is not None and len(v)])
    rows = articles.rows(ids)
    known = rows >= 0
    scores = np.full(len(ids), np.nan)
    scores[known] = np.einsum("ij,ij->i", vectors[owner[known]], articles.matrix[rows[known]])
    return pd.DataFrame({"customer_id": customer_ids[owner].astype(object), "article_id": ids, "score": scores,
                         "pos": pd.array([None] * len(ids), dtype="Int32")})


class ArticleVectors:
    """Article id -> row of the item-tower matrix: the similarity of any (customer, article) pair, not only the
    index's nearest neighbours (the ranker's `two_tower_similarity` for the other sources' candidates)."""

    def __init__(self, ids: Sequence[str], matrix: np.ndarray):
        self.ids = pd.Index(list(ids))
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.ids.get_indexer(ids)


def _search_fn(shipped: Shipped, n: int, threads: int) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas body: embed a batch of customers, search the index, emit the top `n` rows (and, when the
    rows carry `extra_articles`, the similarity to each of those, with pos null)."""

    def search(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        encoder, index, articles = shipped.value()
        set_threads(threads)
        for pdf in batches:
            if len(pdf) == 0:
                continue
            vectors = encoder.encode_customers(pdf)
            customer_ids = pdf["customer_id"].to_numpy()
            if n > 0:
                scores, ids = index.search(vectors, n)
                yield _top_rows(customer_ids, scores, ids)
            if articles is not None and "extra_articles" in pdf.columns:
                extra = _extra_rows(customer_ids, pdf["extra_articles"], vectors, articles)
                if len(extra):
                    yield extra

    return search


def model_candidates(customer_features: DataFrame, encoder: Any, index: ArticleIndex, n: int,
                     threads: int = 1, partitions: int | None = None, extra: DataFrame | None = None,
                     articles: ArticleVectors | None = None) -> DataFrame:
    """customer_id, article_id, score, pos: the `n` nearest articles of each customer (lazy; Spark job).

    With `extra` (customer_id, article_id pairs) and the article vectors, also each of those pairs' similarity
    (pos null). The encoder, the index and the vectors are shipped to the workers as one object
    (`recsys.spark.Shipped`), so any picklable encoder works (including test doubles defined outside the package).
    """
    spark = customer_features.sparkSession
    rows = customer_features
    if extra is not None:
        if articles is None:
            raise ValueError("model_candidates: `extra` pairs need the article vectors to score them")
        lists = extra.groupBy("customer_id").agg(F.collect_set("article_id").alias("extra_articles"))
        rows = rows.join(lists, "customer_id", "left")
    shipped = Shipped(spark, (encoder, index, articles))
    rows = rows.repartition(partitions) if partitions else rows
    return rows.mapInPandas(_search_fn(shipped, n, threads), CANDIDATE_COLUMNS)


def purchased(transactions: DataFrame, as_of: dt.date) -> DataFrame:
    """customer_id, article_id pairs bought before `as_of` (to exclude when asked)."""
    return before(transactions, as_of).select("customer_id", "article_id").distinct()


def model_version_of(encoder: Any) -> str:
    return str(getattr(encoder, "model_version", "") or "unversioned")


def check_model_date(encoder: Any, as_of: dt.date, what: str = "scored") -> None:
    """A model trained on features as of D must never be scored (or evaluated) on a day before D: its training
    rows would include the purchases it is asked to predict."""
    trained = getattr(encoder, "as_of", "") or ""
    if trained and as_of < as_date(trained, "model as_of"):
        raise ValueError(f"model {model_version_of(encoder)} was trained on features as of {trained}; it cannot be "
                         f"{what} as of {as_of.isoformat()} (before its training data ends): that would leak the "
                         "purchases it learned from into the evaluation")


def retrieval(lake: Lakehouse, encoder: Any, snapshot: dt.date, mlflow_run_id: str | None = None
              ) -> tuple[ArticleIndex, ArticleVectors, dict[str, Any]]:
    """The item tower over the candidate articles of `snapshot`: a FAISS index (saved beside the model) and the
    vectors themselves (for similarities of pairs the index did not return). Built once per encoder, date and
    state of the tables it reads, and handed out again (every slice of a publish searches the same index)."""
    return lake.kept("retrieval", lambda: _retrieval(lake, encoder, snapshot, mlflow_run_id),
                     ARTICLE_FEATURES, TRANSACTIONS, key=(_Same(encoder), snapshot, mlflow_run_id))


class _Same:
    """Equal only to the very same object (an encoder class may define a value equality, or none)."""

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _retrieval(lake: Lakehouse, encoder: Any, snapshot: dt.date, mlflow_run_id: str | None
               ) -> tuple[ArticleIndex, ArticleVectors, dict[str, Any]]:
    config = lake.config
    scoring = config.scoring
    model_version = model_version_of(encoder)
    article_features = read_snapshot(lake, ARTICLE_FEATURES, snapshot)
    transactions = lake.read(TRANSACTIONS)
    articles_pdf = candidate_articles(article_features, transactions, snapshot, scoring.candidate_weeks).toPandas()
    if articles_pdf.empty:
        raise ValueError(f"no candidate articles to index as of {snapshot} (scoring.candidate_weeks="
                         f"{scoring.candidate_weeks})")
    vectors = encoder.encode_articles(articles_pdf)
    ids = articles_pdf["article_id"].tolist()
    index = build_from_config(vectors, ids, scoring, model_version=model_version, as_of=snapshot.isoformat())
    recall: dict[str, Any] = {}
    if index.index_type != "flat":  # approximate: checked against exact search on customers it will serve
        searched = max(neighbours(config), config.candidates.two_tower_n)  # the most any caller asks for
        queries = recall_queries(lake, encoder, snapshot, scoring.recall_sample)
        index, recall = checked(index, vectors, queries, searched, scoring.min_recall)
        if recall:
            fallback = f", below scoring.min_recall {scoring.min_recall}: exact search instead" \
                if "fallback" in recall else ""
            cells = (f" searching {recall['nprobe']:,} of {recall['lists']:,} cells" if "nprobe" in recall else "") + (
                f" ({' -> '.join(f'{r:.2%} at {p:,}' for p, r in recall['tried'][:-1])} cells before)"
                if len(recall.get("tried", [])) > 1 else "")
            print(f"article index: {scoring.index_type} found {recall['recall']:.2%} of the exact top {searched} "
                  f"for {recall['recall_queries']:,} customers{cells} ({recall['speedup']}x faster){fallback}",
                  flush=True)
    index_dir = Path(config.path(config.paths.artifacts_dir)) / "index" / model_version.replace("/", "_")
    index_location = save_with_model(index, index_dir, run_id=mlflow_run_id, tracking_uri=config.tracking_uri)
    facts = {"index": {"type": index.index_type, "articles": index.size, "dim": index.dim, **recall,
                       **index_location}}
    return index, ArticleVectors(ids, vectors), facts


def recall_queries(lake: Lakehouse, encoder: Any, snapshot: dt.date, n: int) -> np.ndarray:
    """The vectors of up to `n` of the customers the model scores as of `snapshot` (a sample by a hash of the id,
    the same every run): the queries an approximate index is checked on."""
    if n <= 0:
        return np.zeros((0, 0), dtype=np.float32)
    rows = scored_customers(read_snapshot(lake, CUSTOMER_FEATURES, snapshot), lake.config.scoring.min_history)
    sample = rows.orderBy(F.xxhash64("customer_id"), "customer_id").limit(n).toPandas()  # bounded: n rows
    return encoder.encode_customers(sample) if len(sample) else np.zeros((0, 0), dtype=np.float32)


def customer_rows(lake: Lakehouse, snapshot: dt.date, customers: DataFrame | None) -> tuple[DataFrame, DataFrame]:
    """(the customer_features rows to encode, customer_id + age_bucket of everyone who needs a list)."""
    customer_features = read_snapshot(lake, CUSTOMER_FEATURES, snapshot)
    if customers is None and PARTIAL in customer_features.columns and \
            customer_features.where(F.col(PARTIAL) == 1).limit(1).count():
        raise ValueError(f"the customer_features snapshot as of {snapshot} holds some customers only (a pipeline's "
                         f"evaluation snapshot): run `recsys features --as-of {snapshot}` to list everyone from it")
    segments = customer_age_buckets(lake.read(CUSTOMERS))
    if customers is not None:  # a subset (e.g. an evaluation week's buyers); unknown ids get the 'unknown' bucket
        segments = (
            customers.select("customer_id").distinct().join(segments, "customer_id", "left")
            .select("customer_id", F.coalesce("age_bucket", F.lit(UNKNOWN)).alias("age_bucket"))
        )
        customer_features = customer_features.join(segments.select("customer_id"), "customer_id", "left_semi")
    return customer_features, segments


def snapshot_of(lake: Lakehouse, as_of: dt.date | str | None) -> dt.date:
    from recsys.features import read_snapshot

    return as_date(read_snapshot(lake, CUSTOMER_FEATURES, as_of).select("as_of").first()[0], "as_of")


def _lists(lake: Lakehouse, encoder: Any, as_of: dt.date | str | None, customers: DataFrame | None,
           mlflow_run_id: str | None = None) -> tuple[DataFrame, dict[str, Any], Callable[[], None]]:
    """(lazy lists customer_id, rank, article_id, score, source; facts about the run; cleanup)."""
    config = lake.config
    scoring = config.scoring
    snapshot = snapshot_of(lake, as_of)
    check_model_date(encoder, snapshot)
    index, _, facts = retrieval(lake, encoder, snapshot, mlflow_run_id)
    customer_features, _ = customer_rows(lake, snapshot, customers)
    candidates = model_candidates(
        scored_customers(customer_features, scoring.min_history), encoder, index, neighbours(config),
        threads=scoring.threads_per_task, partitions=scoring.partitions,
    )
    recs, cleanup = model_lists(lake, candidates, snapshot, customers)
    return recs, {"as_of": snapshot.isoformat(), **facts, "exclude_purchased": scoring.exclude_purchased}, cleanup


def neighbours(config) -> int:
    """How many nearest articles the model's own lists are cut from: k, or with `scoring.exclude_purchased`
    `scoring.candidates` (bought articles are dropped from them)."""
    scoring = config.scoring
    return scoring.k if not scoring.exclude_purchased else max(scoring.k, scoring.candidates)


def model_lists(lake: Lakehouse, candidates: DataFrame, snapshot: dt.date, customers: DataFrame | None
                ) -> tuple[DataFrame, Callable[[], None]]:
    """The model's neighbours (customer_id, article_id, score, pos) -> its lists: exactly k a customer, bought
    articles left out when configured, completed from popularity. Returns (lazy lists, cleanup)."""
    scoring = lake.config.scoring
    _, segments = customer_rows(lake, snapshot, customers)
    exclude = purchased(lake.read(TRANSACTIONS), snapshot) if scoring.exclude_purchased else None
    popular = popularity_lists(lake, snapshot, scoring.k).cache()
    return complete_lists(candidates, segments, popular, scoring.k, exclude), popular.unpersist


def recommend(lake: Lakehouse, encoder: Any, as_of: dt.date | str | None = None,
              customers: DataFrame | None = None) -> DataFrame:
    """The model's lists in the `recommendations` schema, not published (evaluation, notebooks).

    Features and popularity as of `as_of` (default: the latest snapshot), for `customers` (a DataFrame with
    customer_id; default: everyone in `customers`). Lazy: the caller decides when it is computed.
    """
    recs, _, _ = _lists(lake, encoder, as_of, customers)
    return conform(recs, model_version_of(encoder), run_id="")


def customer_slices(lake: Lakehouse, size: int) -> list[DataFrame]:
    """Every customer once, in about ceil(customers / size) slices of neighbouring ids (size 0: one slice).

    Ranges of the id, not a hash of it: the rows a slice appends to `candidates` then lie in files whose id
    statistics span that slice alone, so the slice reading back its own rows skips the files of the slices before
    it (with a hash every file spans every id, and the n-th slice re-read the n-1 before it)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"scoring.slice_customers must be a whole number >= 0, got {size!r}")
    everyone = lake.read(CUSTOMERS).select("customer_id").distinct()
    n = -(-everyone.count() // size) if size else 1
    if n <= 1:
        return [everyone]
    # the first id of each of n ranges of about equal size (Spark samples the boundaries); bounded: n ids
    firsts = everyone.repartitionByRange(n, "customer_id").groupBy(F.spark_partition_id()).agg(
        F.min("customer_id").alias("first"))
    cuts = sorted(r.first for r in firsts.collect())[1:]
    customer = F.col("customer_id")
    return [everyone.filter((customer >= low if low is not None else F.lit(True))
                            & (customer < high if high is not None else F.lit(True)))
            for low, high in zip([None, *cuts], [*cuts, None])]


def _decided_lists(lake: Lakehouse, snapshot: dt.date, customers: DataFrame | None
                   ) -> tuple[Iterable[DataFrame], str, dict[str, Any]]:
    """What the latest gate decided (`gate_decisions`), as lists for `customers` (None: everyone, in slices):
    the champion system's, or, when no model beat the best baseline on the evaluated week, that baseline's
    (source = its name). Returns (lazy lists, model_version, the decision)."""
    from recsys import baselines, evaluate
    from recsys.gate import latest_decision
    from recsys.two_stage import APPEND, REPLACE

    config = lake.config
    decision = latest_decision(lake)
    if decision is None or not decision.get("publish"):
        raise ValueError("nothing decided to publish: run the evaluation with the gate first (`recsys evaluate "
                         "--gate`, the pipeline's evaluate stage)")
    choice = decision["publish"]
    if choice == "model":
        system = decision["champion"]
        if not system:
            raise ValueError("the latest gate decision publishes the model, but names no champion system")
        if customers is None:  # one slice computed at a time, as publish stages it; the candidates are kept
            models = evaluate.system_models(config, system)  # loaded once for every slice
            recs = (evaluate.system_recommender(lake, system, snapshot, part, write_candidates=APPEND if i else REPLACE,
                                                models=models)
                    for i, part in enumerate(customer_slices(lake, config.scoring.slice_customers)))
        else:  # some customers: the `candidates` table keeps the last full run's
            recs = [evaluate.system_recommender(lake, system, snapshot, customers)]
        return recs, system_label(config, system), decision
    if choice.startswith("baseline:"):
        name = choice.split(":", 1)[1]
        target = lake.read(CUSTOMERS).select("customer_id").distinct() if customers is None else customers
        (recs,) = baselines.recommend(config, lake.read(TRANSACTIONS), lake.read(CUSTOMERS), lake.read("articles"),
                                      target, snapshot, [name]).values()
        return [recs], f"{name}@{snapshot.isoformat()}", decision
    raise ValueError(f"gate_decisions: unknown publish choice {choice!r}")


def _decided_summary(summary: dict[str, Any], snapshot: dt.date, decision: dict[str, Any], started: float
                     ) -> dict[str, Any]:
    return {**summary, "as_of": snapshot.isoformat(), "published": decision["publish"],
            "gate_test_week": str(decision["test_week"]), "reason": decision["reason"],
            "seconds": round(time.perf_counter() - started, 1)}


def publish_decided(lake: Lakehouse, as_of: dt.date | str | None = None) -> dict[str, Any]:
    """Publish what the latest gate decided for every customer, as of `as_of` (default: the latest feature
    snapshot)."""
    started = time.perf_counter()
    snapshot = snapshot_of(lake, as_of)
    recs, version, decision = _decided_lists(lake, snapshot, None)
    # the candidates are written slice by slice as the lists are computed: a failure puts them back with the lists
    with lake.restore_on_failure(CANDIDATES):
        summary = publish(lake, recs, model_version=version, run_id=new_run_id(), k=lake.config.scoring.k,
                          as_of=snapshot)
    return _decided_summary(summary, snapshot, decision, started)


def customers_to_relist(lake: Lakehouse, since: dt.date, as_of: dt.date) -> DataFrame:
    """Whose list a relist recomputes: everyone who bought from `since` up to `as_of` (their history, so their
    candidates and features, changed), and every customer who has no published list yet."""
    transactions = lake.read(TRANSACTIONS)
    buyers = before(transactions.where(F.col("t_dat") >= F.lit(since)), as_of).select("customer_id")
    everyone = lake.read(CUSTOMERS).select("customer_id")
    listed = lake.read(RECOMMENDATIONS).select("customer_id")
    return buyers.union(everyone.join(listed, "customer_id", "left_anti")).distinct().join(
        everyone, "customer_id", "left_semi")


def relist_decided(lake: Lakehouse, since: dt.date, as_of: dt.date | str | None = None) -> dict[str, Any]:
    """Publish new lists, by what the latest gate decided, for the customers who bought since `since` (and those
    without a list); everyone else keeps the list published now. What a nightly does between full runs: the
    day's buyers are the customers whose candidates changed, and a fraction of the customer base."""
    started = time.perf_counter()
    snapshot = snapshot_of(lake, as_of)
    if not lake.exists(RECOMMENDATIONS):
        raise ValueError("nothing is published yet, so there is nothing to keep: publish every customer first "
                         "(`recsys pipeline`)")
    target = customers_to_relist(lake, since, snapshot).persist()
    try:
        relisted = target.count()
        recs, version, decision = _decided_lists(lake, snapshot, target)
        kept = lake.read(RECOMMENDATIONS).join(target, "customer_id", "left_anti").join(
            lake.read(CUSTOMERS).select("customer_id"), "customer_id", "left_semi")
        summary = publish(lake, recs, model_version=version, run_id=new_run_id(), k=lake.config.scoring.k,
                          as_of=snapshot, kept=kept)
    finally:
        target.unpersist()
    return {**_decided_summary(summary, snapshot, decision, started), "relisted": relisted,
            "relisted_since": since.isoformat()}


def run(lake: Lakehouse, model_uri: str | None = None, encoder: Any = None,
        as_of: dt.date | str | None = None) -> dict[str, Any]:
    """Score every customer with the model (default: `champion`, else `challenger`) and publish the lists.

    `encoder` may be given directly (tests, notebooks); otherwise it is loaded from `model_uri`.
    """
    config = lake.config
    started = time.perf_counter()
    mlflow_run_id = None
    if encoder is None:
        from recsys.model import load_encoder

        model_uri, mlflow_run_id = resolve_model(config, model_uri)
        encoder = load_encoder(model_uri, config.tracking_uri, config.registry_uri)
    recs, facts, cleanup = _lists(lake, encoder, as_of, None, mlflow_run_id)
    try:
        summary = publish(lake, recs, model_version=model_version_of(encoder), run_id=new_run_id(), k=config.scoring.k,
                          as_of=dt.date.fromisoformat(facts["as_of"]))
    finally:
        cleanup()
    return {**summary, "model_uri": model_uri, **facts, "seconds": round(time.perf_counter() - started, 1)}
