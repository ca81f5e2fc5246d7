"""FAISS retrieval index over the item tower's article embeddings, with its id map.

The index maps a customer embedding to the nearest articles by inner product (the embeddings are
L2-normalised, so this is cosine similarity, the two-tower score). Exact `IndexFlatIP` is the default: on
2 cores it scores every customer of the full catalogue in minutes, and it has no recall loss. IVF and HNSW
trade recall for speed; `recall_at_k` measures that trade against exact search on the same queries.

An `ArticleIndex` pickles (FAISS bytes + ids), so Spark can broadcast it to the executors once, and saves
to a folder (`index.faiss` + `ids.npy` + `meta.json`) that is logged as an MLflow artifact next to the
model version it belongs to.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

INDEX_TYPES = ("flat", "ivf", "hnsw")
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.npy", "meta.json"


def set_threads(n: int) -> None:
    """Cap FAISS (OpenMP) and torch threads: with one task per core, more threads only fight each other."""
    import faiss

    n = max(1, int(n))
    faiss.omp_set_num_threads(n)
    try:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency, but the index works without it
        pass


def _as_matrix(embeddings: Any, name: str) -> np.ndarray:
    matrix = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-d array [n, d], got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} has a NaN or infinite value")
    return matrix


@dataclass
class ArticleIndex:
    """A FAISS index whose row i is article `ids[i]`; `search` returns article ids, not FAISS row numbers."""

    index: Any
    ids: np.ndarray
    index_type: str = "flat"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` articles per query: (scores float32 [n, k'], article ids object [n, k']) with k' = min(k, size).

        Rows are best first. ANN indexes may find fewer than k' neighbours for a query: those slots hold
        score -inf and article id None.
        """
        queries = _as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index has {self.dim}")
        k = min(int(k), self.size)
        if k < 1 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.float32), np.empty((len(queries), 0), dtype=object)
        scores, rows = self.index.search(queries, k)
        missing = rows < 0
        ids = self.ids[np.where(missing, 0, rows)].astype(object)
        if missing.any():
            ids[missing] = None
            scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return scores, ids

    # -- pickling (Spark broadcast): FAISS objects are SWIG pointers, so ship the serialized bytes
    def __getstate__(self) -> dict[str, Any]:
        import faiss

        return {"bytes": faiss.serialize_index(self.index), "ids": self.ids, "index_type": self.index_type,
                "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import faiss

        self.index = faiss.deserialize_index(state["bytes"])
        self.ids = state["ids"]
        self.index_type = state["index_type"]
        self.meta = state["meta"]
        _apply_search_params(self.index, self.index_type, self.meta)

    # -- files
    def save(self, folder: str | Path) -> Path:
        """Write index + id map + metadata into `folder` (created); returns the folder."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        np.save(folder / IDS_FILE, self.ids.astype(str))
        meta = dict(self.meta, index_type=self.index_type, size=self.size, dim=self.dim)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return folder


def _apply_search_params(index: Any, index_type: str, meta: dict[str, Any]) -> None:
    """Search-time knobs are not part of FAISS's file format for every index type: set them after loading."""
    import faiss

    if index_type == "ivf" and "nprobe" in meta:
        faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
    elif index_type == "hnsw" and "ef_search" in meta:
        index.hnsw.efSearch = int(meta["ef_search"])


def build_index(
    embeddings: Any,
    ids: Sequence[str],
    index_type: str = "flat",
    ivf_lists: int = 1024,
    ivf_probe: int = 16,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 128,
    seed: int = 0,
    **meta: Any,
) -> ArticleIndex:
    """Inner-product index over article embeddings `[n, d]` whose row i is article `ids[i]`.

    `flat`: exact. `ivf`: k-means into `ivf_lists` cells (capped so each has >= 39 training points, FAISS's
    minimum), searching `ivf_probe` of them. `hnsw`: graph with `hnsw_m` links, `hnsw_ef_search` beam width.
    Extra keyword arguments (model_version, as_of, ...) are kept as metadata and saved with the index.
    """
    import faiss

    matrix = _as_matrix(embeddings, "article embeddings")
    ids = np.asarray(list(ids), dtype=object)
    if len(ids) != len(matrix):
        raise ValueError(f"{len(matrix)} embeddings but {len(ids)} article ids")
    if len(matrix) == 0:
        raise ValueError("cannot build an index over zero articles")
    if len(set(ids)) != len(ids):
        raise ValueError("article ids must be distinct (a duplicated article would be recommended twice)")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"scoring.index_type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    n, d = matrix.shape
    started = time.perf_counter()
    params: dict[str, Any] = {}
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "ivf":
        lists = max(1, min(int(ivf_lists), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(matrix)
        params = {"lists": lists, "nprobe": min(int(ivf_probe), lists)}
    else:
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
        params = {"m": int(hnsw_m), "ef_search": int(hnsw_ef_search)}
    index.add(matrix)
    meta = dict(meta, **params, build_seconds=round(time.perf_counter() - started, 3))
    _apply_search_params(index, index_type, meta)
    return ArticleIndex(index=index, ids=ids, index_type=index_type, meta=meta)


def load_index(folder: str | Path) -> ArticleIndex:
    """Read a folder written by `ArticleIndex.save` (or downloaded from MLflow)."""
    import faiss

    folder = Path(folder)
    for name in (INDEX_FILE, IDS_FILE, META_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"index folder {folder} has no {name}; was it written by ArticleIndex.save?")
    meta = json.loads((folder / META_FILE).read_text())
    index = faiss.read_index(str(folder / INDEX_FILE))
    ids = np.load(folder / IDS_FILE).astype(object)
    if len(ids) != index.ntotal:
        raise ValueError(f"{folder}: {IDS_FILE} has {len(ids)} ids but the index holds {index.ntotal} vectors")
    index_type = meta.pop("index_type", "flat")
    for key in ("size", "dim"):
        meta.pop(key, None)
    _apply_search_params(index, index_type, meta)
    return ArticleIndex(index=index, ids=ids, index_type=index_type, meta=meta)


def build_from_config(embeddings: Any, ids: Sequence[str], scoring: Any, **meta: Any) -> ArticleIndex:
    """`build_index` with the knobs of a `ScoringConfig`."""
    return build_index(
        embeddings, ids, index_type=scoring.index_type, ivf_lists=scoring.ivf_lists, ivf_probe=scoring.ivf_probe,
        hnsw_m=scoring.hnsw_m, hnsw_ef_search=scoring.hnsw_ef_search, **meta,
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 12) -> float:
    """Mean share of the exact top-k (`truth` ids [n, >=k]) that `found` [n, >=k] also returns."""
    found, truth = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    if len(truth) == 0 or truth.shape[1] == 0:
        return 1.0
    hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]
    return float(np.mean(hits))


def compare_to_exact(index: ArticleIndex, queries: Any, k: int = 12, exact: ArticleIndex | None = None
                     ) -> dict[str, float]:
    """Recall@k of `index` against exact search over the same vectors, with both search times.

    Exact search runs on `exact` (a flat index over the same articles) or on a flat copy rebuilt from the
    stored vectors, so any index type can be checked.
    """
    import faiss

    queries = _as_matrix(queries, "queries")
    if exact is None:
        vectors = index.index.reconstruct_n(0, index.size) if index.index_type != "ivf" else _ivf_vectors(index)
        exact = ArticleIndex(faiss.IndexFlatIP(index.dim), index.ids)
        exact.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    started = time.perf_counter()
    _, truth = exact.search(queries, k)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    _, found = index.search(queries, k)
    approx_s = time.perf_counter() - started
    return {
        "recall_at_k": recall_at_k(found, truth, k),
        "k": k,
        "queries": len(queries),
        "exact_seconds": exact_s,
        "index_seconds": approx_s,
        "speedup": exact_s / approx_s if approx_s > 0 else float("inf"),
    }


def checked(index: ArticleIndex, vectors: Any, queries: Any, k: int, min_recall: float
            ) -> tuple[ArticleIndex, dict[str, Any]]:
    """An approximate index kept only when it finds at least `min_recall` of the exact top `k` of `queries` (a
    sample of the customers it will serve); an IVF index short of it first searches twice the cells, and again,
    up to a quarter of them (`_wider`); else the exact index over the same `vectors`. Its recall depends on how a
    model's embeddings cluster, which every training run changes: measured each time, never assumed (at full size
    32 of 1,024 cells found 99.3 % of one run's exact top 50 and 98.9 % of the next run's, the same code: that
    run searched exactly, 8.8x slower, rather than more cells). Returns (the index to search, what was measured;
    empty for an exact index); `tried` lists [cells searched, recall] of each IVF measurement."""
    if isinstance(min_recall, bool) or not isinstance(min_recall, (int, float)) or not 0 <= min_recall <= 1:
        raise ValueError(f"scoring.min_recall must be a share between 0 and 1, got {min_recall!r}")
    if index.index_type == "flat" or len(queries) == 0:
        return index, {}
    meta = {key: value for key, value in index.meta.items() if key in ("model_version", "as_of")}
    exact = build_index(vectors, list(index.ids), "flat", **meta)  # the truth, and the fallback
    tried: list[list[float]] = []
    while True:
        report = compare_to_exact(index, queries, k, exact)
        facts = {"recall": round(report["recall_at_k"], 4), "recall_k": report["k"],
                 "recall_queries": report["queries"], "speedup": round(report["speedup"], 1),
                 "min_recall": min_recall}
        if index.index_type == "ivf":
            tried.append([int(index.meta["nprobe"]), facts["recall"]])
            facts.update(nprobe=int(index.meta["nprobe"]), lists=int(index.meta["lists"]), tried=tried)
        if report["recall_at_k"] >= min_recall:
            return index, facts
        if not _wider(index):
            return exact, {**facts, "fallback": "flat"}


def _wider(index: ArticleIndex) -> bool:
    """An IVF index set to search twice as many cells, while that stays within a quarter of them (beyond, an
    approximate search saves too little over the exact one to be worth its misses). False: nothing wider."""
    if index.index_type != "ivf":
        return False
    probes = 2 * int(index.meta["nprobe"])
    if probes > int(index.meta["lists"]) // 4:
        return False
    index.meta["nprobe"] = probes
    _apply_search_params(index.index, "ivf", index.meta)
    return True


def _ivf_vectors(index: ArticleIndex) -> np.ndarray:
    """Vectors of an IVF index in insertion order (IVF lists store them grouped by cell)."""
    import faiss

    ivf = faiss.extract_index_ivf(index.index)
    ivf.make_direct_map()
    return ivf.reconstruct_n(0, index.size)


def save_with_model(index: ArticleIndex, folder: str | Path, run_id: str | None = None,
                    tracking_uri: str | None = None) -> dict[str, str]:
    """Save locally and, when the model has an MLflow run, log the folder as that run's `index` artifact.

    MLflow problems do not fail scoring: the local copy is enough to reproduce it, and the return value says
    where the index went.
    """
    path = index.save(folder)
    where = {"path": str(path)}
    if run_id:
        try:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=tracking_uri)
            client.log_artifacts(run_id, str(path), artifact_path=f"index/{index.index_type}")
            where["mlflow_artifact"] = f"runs:/{run_id}/index/{index.index_type}"
        except Exception as exc:  # noqa: BLE001 - report, do not fail the scoring run
            where["mlflow_error"] = f"{type(exc).__name__}: {exc}"
    return where


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
