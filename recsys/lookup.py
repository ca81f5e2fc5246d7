"""Reading what is published, without Spark: delta-rs (`deltalake`) for the committed snapshot, pyarrow for the rows.

Starting a JVM to read twelve rows costs half a minute; this module answers in milliseconds. `recommendations`
is written range-partitioned and sorted by customer_id, in Parquet row groups of `serving.row_group_bytes`
(`recsys.publish.write_for_lookup`), so a lookup:

1. pins one committed version of the table with delta-rs: its data files and each file's min/max customer_id
   from the Delta log (Delta keeps a 32-character prefix of strings, so two files can both match one id:
   both are read);
2. reads those files' footers (once per version) and picks the row groups whose own, full-length min/max hold
   the id;
3. decodes only those row groups and keeps the id's rows. A batch decodes each row group it needs once.

`PublishedVersion.load()` reads a whole version into memory (sorted ids, row offsets, integer codes for the
repetitive strings): what the server does, so that a request is a binary search. Either way every answer comes from one
version: an object never changes its version, and a newer publish is read into a new object.

Article names come from the `articles` table (`Catalogue`), recent purchases from `transactions` (only the
newest `t_month` partitions). Nothing here imports pyspark or pandas: `recsys recommend` starts in well under
two seconds.
"""
from __future__ import annotations

import bisect
import datetime as dt
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.config import Config

RECOMMENDATIONS, ARTICLES, CUSTOMERS, TRANSACTIONS, POPULARITY = (
    "recommendations", "articles", "customers", "transactions", "popularity")  # names as in recsys.tables
LIST_COLUMNS = ("customer_id", "rank", "article_id", "score", "source", "model_version", "run_id", "generated_at")
NAME_COLUMNS = ("prod_name", "product_type_name", "colour_group_name", "index_group_name")  # = publish.NAME_COLUMNS
ITEM_COLUMNS = ("rank", "article_id", *NAME_COLUMNS, "score", "source")
ID_COLUMN = "customer_id of the published table"  # how errors name it
# Reader features this module handles; anything else (deletion vectors, column mapping) changes how the data
# files must be read, so such a table is refused with a message rather than read wrongly.
SUPPORTED_READER_FEATURES = {"timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"}


class UnsupportedTable(ValueError):
    """A Delta table whose protocol asks for reader features this Spark-free reader does not implement."""


class UnknownCustomer(ValueError):
    """No published list for a customer id (the message says whether the customer exists at all)."""


def table_uri(config: Config, name: str) -> str:
    """Where delta-rs finds table `name`: `serving.tables_uri`/name, else the local `paths.tables_dir`/name."""
    root = config.serving.tables_uri
    if root:
        return root.rstrip("/") + "/" + name
    if config.paths.catalog:
        raise ValueError(
            f"the tables are Unity Catalog tables ({config.paths.catalog}); set serving.tables_uri to their "
            "storage root for the Spark-free reader, or use `recsys recommend --spark`"
        )
    return str(config.path(config.paths.tables_dir) / name)


def open_table(uri: str, version: int | None = None):
    """A delta-rs `DeltaTable` pinned at `version` (default: the latest), with errors that name the table."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    name = uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        table = DeltaTable(uri, version=version)
    except TableNotFoundError:
        raise FileNotFoundError(
            f"table '{name}' does not exist at {uri}; run the stage that writes it first") from None
    except DeltaError as exc:
        raise ValueError(f"table '{name}' at {uri}: cannot read version {version}: {exc}") from None
    protocol = table.protocol()
    unsupported = sorted(set(protocol.reader_features or []) - SUPPORTED_READER_FEATURES)
    if protocol.min_reader_version == 2 or unsupported:  # reader version 2 means column mapping
        raise UnsupportedTable(
            f"table '{name}' at {uri} needs reader features {unsupported or ['columnMapping']} (protocol "
            f"{protocol.min_reader_version}/{protocol.min_writer_version}) that the Spark-free reader does "
            "not implement; read it with Spark (`recsys recommend --spark`)"
        )
    return table


def _filesystem(uri: str):
    """pyarrow filesystem + root path for a table URI (local paths, file://, s3://, gs://, abfs:// ...)."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), uri
    return fs.FileSystem.from_uri(uri)


def _files(table, root: str) -> list[dict[str, Any]]:
    """The version's data files from the Delta log: `path` (under root), `num_records`, the `min.<column>` /
    `max.<column>` statistics and `partition.<column>` values.

    Plain Python values on purpose: building Arrow arrays from Python objects makes pyarrow 14 import pandas,
    half a second of a cold `recsys recommend`.
    """
    actions = table.get_add_actions(flatten=True)  # arro3, handed over through the Arrow C stream interface
    adds = pa.RecordBatchReader._import_from_c_capsule(actions.__arrow_c_stream__()).read_all()
    prefix = root.rstrip("/") + "/"
    absolute = lambda path: "://" in path or path.startswith("/")  # noqa: E731 - e.g. a shallow clone's files
    return [{**add, "path": add["path"] if absolute(add["path"]) else prefix + add["path"]}
            for add in adds.to_pylist()]


def commit_info(entry: dict[str, Any]) -> dict[str, Any]:
    """One Delta history entry as the project reads it: version, time, operation and its userMetadata fields."""
    try:
        meta = json.loads(entry["userMetadata"]) if entry.get("userMetadata") else {}
    except (TypeError, ValueError):
        meta = {"note": entry.get("userMetadata")}
    if not isinstance(meta, dict):
        meta = {"note": meta}
    stamp = entry.get("timestamp")
    committed = dt.datetime.fromtimestamp(stamp / 1000, tz=dt.timezone.utc) if stamp else None
    return {"version": int(entry["version"]), "timestamp": committed, "operation": entry.get("operation"), **meta}


def history(uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Oldest first, like `recsys.publish.history`: every commit of the table with its parsed userMetadata."""
    return [commit_info(e) for e in reversed(open_table(uri).history(limit))]


# --- the published lists, one committed version -------------------------------------------------------------
def _string_key(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass
class _DataFile:
    """One Parquet file of a version, with its row groups' customer_id ranges (read from the footer on demand)."""

    path: str
    min_id: str | None
    max_id: str | None
    rows: int
    _parquet: pq.ParquetFile | None = field(default=None, repr=False)
    _mins: list[str | None] = field(default_factory=list, repr=False)
    _maxs: list[str | None] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the server reads from threads

    def may_hold(self, customer_id: str) -> bool:
        return ((self.min_id is None or self.min_id <= customer_id)
                and (self.max_id is None or customer_id <= self.max_id))

    def parquet(self, filesystem) -> pq.ParquetFile:
        with self._lock:
            if self._parquet is None:
                handle = pq.ParquetFile(filesystem.open_input_file(self.path), coerce_int96_timestamp_unit="us")
                column = handle.schema_arrow.get_field_index("customer_id")
                stats = [handle.metadata.row_group(i).column(column).statistics
                         for i in range(handle.metadata.num_row_groups)]
                known = [s is not None and s.has_min_max for s in stats]
                self._mins = [_string_key(s.min) if k else None for s, k in zip(stats, known)]
                self._maxs = [_string_key(s.max) if k else None for s, k in zip(stats, known)]
                self._parquet = handle
            return self._parquet

    def row_groups(self, filesystem, customer_id: str) -> list[int]:
        """The row groups whose customer_id range holds the id (sorted files: usually exactly one)."""
        self.parquet(filesystem)
        return [i for i, (lo, hi) in enumerate(zip(self._mins, self._maxs))
                if (lo is None or lo <= customer_id) and (hi is None or customer_id <= hi)]

    def read_row_group(self, filesystem, group: int, columns: list[str]) -> pa.Table:
        handle = self.parquet(filesystem)
        with self._lock:
            return handle.read_row_group(group, columns=columns)


class PublishedVersion:
    """One committed version of `recommendations`, read file by file (no JVM). Never changes its version."""

    resident = False

    def __init__(self, uri: str, version: int | None = None):
        table = open_table(uri, version)
        self.uri = uri
        self.version = table.version()
        self.schema_names = [f.name for f in table.schema().fields]
        missing = [c for c in LIST_COLUMNS if c not in self.schema_names]
        if missing:
            raise ValueError(f"table '{RECOMMENDATIONS}' at {uri} lacks column(s) {missing}; has {self.schema_names}")
        self.commit = self._commit()
        self.filesystem, root = _filesystem(uri)
        self.files = sorted(
            (_DataFile(f["path"], f.get("min.customer_id"), f.get("max.customer_id"), f.get("num_records") or 0)
             for f in _files(table, root)),
            key=lambda f: (f.min_id or "", f.max_id or ""),
        )
        max_ids = [f.max_id for f in self.files]
        # publish's files hold disjoint, ordered ranges: then a binary search finds the first candidate
        self._max_ids = max_ids if None not in max_ids and max_ids == sorted(max_ids) else None
        self.rows = sum(f.rows for f in self.files)

    def _commit(self) -> dict[str, Any]:
        """This version's commit. Read from the latest snapshot: delta-rs 1.6 numbers the history of a table
        opened at an older version wrongly (it counts the later commits from the pinned version down)."""
        latest = open_table(self.uri)
        for entry in latest.history(latest.version() - self.version + 1):
            if int(entry["version"]) == self.version:
                return commit_info(entry)
        return {"version": self.version}

    def _candidates(self, customer_id: str) -> list[_DataFile]:
        if self._max_ids is not None:
            start = bisect.bisect_left(self._max_ids, customer_id)
            out = []
            for f in self.files[start:]:
                if f.min_id is not None and f.min_id > customer_id:
                    break
                out.append(f)
            return out
        return [f for f in self.files if f.may_hold(customer_id)]

    def rows_for(self, customer_ids: Sequence[str]) -> pa.Table:
        """Every published row of these customers (LIST_COLUMNS), decoding each needed row group once."""
        wanted: dict[tuple[int, int], set[str]] = {}
        files = {id(f): f for f in self.files}
        for customer_id in dict.fromkeys(customer_ids):
            for f in self._candidates(customer_id):
                for group in f.row_groups(self.filesystem, customer_id):
                    wanted.setdefault((id(f), group), set()).add(customer_id)
        parts = []
        for (file_key, group), ids in sorted(wanted.items(), key=lambda kv: kv[0][1]):
            block = files[file_key].read_row_group(self.filesystem, group, list(LIST_COLUMNS))
            parts.extend(_rows_of(block, ids))
        if not parts:
            return _empty_rows()
        return pa.concat_tables(parts).sort_by([("customer_id", "ascending"), ("rank", "ascending")])

    def columns_for(self, customer_ids: Sequence[str]) -> dict[str, list[Any]]:
        rows = self.rows_for(customer_ids)
        return {c: rows[c].to_pylist() for c in LIST_COLUMNS}

    def sample_ids(self, n: int) -> list[str]:
        """The first customer id of up to n files spread over the version (reads one row group of each)."""
        files = [f for f in self.files if f.rows]
        picks = sorted({round(i * (len(files) - 1) / max(n - 1, 1)) for i in range(min(n, len(files)))})
        out = []
        for i in picks:
            group = files[i].read_row_group(self.filesystem, 0, ["customer_id"])
            if group.num_rows:
                out.append(group["customer_id"][0].as_py())
        return out

    def load(self) -> "ResidentVersion":
        """The whole version in memory (what the server holds): a lookup becomes a binary search."""
        return ResidentVersion.from_files(self)


def _rows_of(block: pa.Table, ids: set[str]) -> list[pa.Table]:
    """The rows of `ids` in a decoded row group: binary searches on its sorted customer_id column, or a filter
    when the group is not sorted (a table not written by publish)."""
    keys = _as_bytes(block["customer_id"], ID_COLUMN)
    if len(keys) > 1 and not (keys[1:] >= keys[:-1]).all():
        return [block.filter(pc.is_in(block["customer_id"], value_set=pa.array(sorted(ids), pa.string())))]
    out = []
    for customer_id in sorted(ids):
        key = customer_id.encode()
        if len(key) > keys.dtype.itemsize:
            continue
        wanted = np.array([key], dtype=keys.dtype)
        start, stop = np.searchsorted(keys, wanted, "left")[0], np.searchsorted(keys, wanted, "right")[0]
        if stop > start:
            out.append(block.slice(int(start), int(stop - start)))
    return out


def _empty_rows() -> pa.Table:
    types = {"rank": pa.int32(), "score": pa.float64(), "generated_at": pa.timestamp("us")}
    return pa.table({c: pa.array([], types.get(c, pa.string())) for c in LIST_COLUMNS})


def _as_bytes(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """A string column as a numpy `S<width>` array: zero-copy when all values have one length (64-hex ids)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError(f"column {name} holds nulls")
    if len(array) == 0:
        return np.array([], dtype="S1")
    if pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
    lengths = np.diff(offsets)
    width = int(lengths[0])
    if width > 0 and (lengths == width).all():
        return np.frombuffer(array.buffers()[2], dtype=f"S{width}", count=len(array), offset=int(offsets[0]))
    return np.array([v.encode() for v in array.to_pylist()])  # numpy pads to the longest; comparisons ignore it


class _Codes:
    """One column's distinct values over all files, and each row's code into them (int32 while loading)."""

    def __init__(self) -> None:
        self.values: pa.Array | None = None

    def encode(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        encoded = pc.dictionary_encode(array)
        local = encoded.dictionary
        if self.values is None:
            self.values = local
            mapping = np.arange(len(local), dtype=np.int32)
        else:
            position = pc.index_in(local, value_set=self.values)
            new = local.filter(pc.is_null(position))
            if len(new):
                self.values = pa.concat_arrays([self.values, new])
                position = pc.index_in(local, value_set=self.values)
            mapping = position.to_numpy(zero_copy_only=False).astype(np.int32)
        return mapping[encoded.indices.to_numpy(zero_copy_only=False)]

    def decoded(self) -> list[Any]:
        return [] if self.values is None else self.values.to_pylist()


def _smallest(codes: np.ndarray, distinct: int) -> np.ndarray:
    return codes.astype(np.min_scalar_type(max(distinct - 1, 0)), copy=False)


class ResidentVersion:
    """A whole version in memory, as numpy arrays: the sorted unique customer ids, where each list starts, and
    per row the rank, score and codes into the distinct article ids / sources / model versions / runs / times.

    About 20 bytes per published row plus each customer id once (~0.45 GB at full size); a lookup is a binary
    search and a slice.
    """

    resident = True
    CODED = ("article_id", "source", "model_version", "run_id", "generated_at")

    def __init__(self, source: PublishedVersion, ids: np.ndarray, starts: np.ndarray, columns: dict[str, np.ndarray],
                 values: dict[str, list[Any]]):
        self.uri, self.version, self.commit = source.uri, source.version, source.commit
        self.ids, self.starts, self.columns, self.values = ids, starts, columns, values
        self.rows = int(starts[-1])

    @classmethod
    def from_files(cls, source: PublishedVersion) -> "ResidentVersion":
        total = sum(f.rows for f in source.files) or 0
        rank = np.empty(total, np.int32)
        score = np.empty(total, np.float64)
        coded = {c: np.empty(total, np.int32) for c in cls.CODED}
        codes = {c: _Codes() for c in cls.CODED}
        id_parts, start_parts, offset = [], [], 0
        for f in source.files:
            block = pq.read_table(source.filesystem.open_input_file(f.path), columns=list(LIST_COLUMNS),
                                  coerce_int96_timestamp_unit="us")
            n = block.num_rows
            if n == 0:
                continue
            if offset + n > total:
                raise ValueError(f"{f.path} holds more rows than the Delta log says ({source.uri})")
            ids = _as_bytes(block["customer_id"], ID_COLUMN)
            ranks = block["rank"].to_numpy()
            same = ids[1:] == ids[:-1]
            if not ((ids[1:] >= ids[:-1]).all() and (~same | (ranks[1:] > ranks[:-1])).all()):
                block = block.sort_by([("customer_id", "ascending"), ("rank", "ascending")])  # not publish's layout
                ids, ranks = _as_bytes(block["customer_id"], ID_COLUMN), block["rank"].to_numpy()
                same = ids[1:] == ids[:-1]
            first = np.concatenate([[0], np.flatnonzero(~same) + 1])
            id_parts.append(ids[first].copy())
            start_parts.append(first + offset)
            rank[offset:offset + n] = ranks
            score[offset:offset + n] = block["score"].to_numpy()
            for c in cls.CODED:
                coded[c][offset:offset + n] = codes[c].encode(block[c])
            offset += n
        if offset != total:
            raise ValueError(f"the Delta log of {source.uri} counts {total} rows, the files hold {offset}")
        width = max((p.dtype.itemsize for p in id_parts), default=1)
        ids = np.concatenate([p.astype(f"S{width}") for p in id_parts]) if id_parts else np.array([], "S1")
        starts = np.concatenate([*start_parts, [offset]]).astype(np.int64)
        values = {c: codes[c].decoded() for c in cls.CODED}
        columns = {"rank": _smallest(rank, int(rank.max(initial=0)) + 1), "score": score,
                   **{c: _smallest(coded[c], len(values[c])) for c in cls.CODED}}
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # files overlap: order every row once
            return cls._sorted(source, ids, starts, columns, values)
        return cls(source, ids, starts, columns, values)

    @classmethod
    def _sorted(cls, source, ids, starts, columns, values) -> "ResidentVersion":
        per_row = np.repeat(ids, np.diff(starts))
        order = np.lexsort((columns["rank"], per_row))
        per_row = per_row[order]
        first = np.concatenate([[0], np.flatnonzero(per_row[1:] != per_row[:-1]) + 1])
        return cls(source, per_row[first].copy(), np.concatenate([first, [len(per_row)]]).astype(np.int64),
                   {c: a[order] for c, a in columns.items()}, values)

    @property
    def customers(self) -> int:
        return len(self.ids)

    def _positions(self, customer_ids: Sequence[str]) -> list[tuple[str, int]]:
        width = self.ids.dtype.itemsize
        keys = [c for c in dict.fromkeys(customer_ids) if len(c.encode()) <= width]
        if not keys or not len(self.ids):
            return []
        encoded = np.array([k.encode() for k in keys], dtype=self.ids.dtype)
        at = np.searchsorted(self.ids, encoded)
        found = at < len(self.ids)
        found[found] = self.ids[at[found]] == encoded[found]
        return [(k, int(i)) for k, i, ok in zip(keys, at, found) if ok]

    def columns_for(self, customer_ids: Sequence[str]) -> dict[str, list[Any]]:
        """LIST_COLUMNS as Python lists for these customers' rows, each list in rank order."""
        hits = self._positions(customer_ids)
        if len(hits) == 1:
            start, stop = int(self.starts[hits[0][1]]), int(self.starts[hits[0][1] + 1])
            take: slice | np.ndarray = slice(start, stop)
            owners = [hits[0][0]] * (stop - start)
        else:
            spans = [(int(self.starts[i]), int(self.starts[i + 1])) for _, i in hits]
            take = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.array([], np.int64)
            owners = [k for (k, _), (a, b) in zip(hits, spans) for _ in range(b - a)]
        out: dict[str, list[Any]] = {"customer_id": owners}
        for c in ("rank", "score"):
            out[c] = self.columns[c][take].tolist()
        for c in self.CODED:
            values = self.values[c]
            out[c] = [values[i] for i in self.columns[c][take].tolist()]
        return out

    def rows_for(self, customer_ids: Sequence[str]) -> pa.Table:
        columns = self.columns_for(customer_ids)
        return pa.table({c: columns[c] for c in LIST_COLUMNS}) if columns["customer_id"] else _empty_rows()

    def sample_ids(self, n: int) -> list[str]:
        """n customer ids spread over the id range (for the page's examples)."""
        if not len(self.ids):
            return []
        picks = np.unique(np.linspace(0, len(self.ids) - 1, num=min(n, len(self.ids))).astype(int))
        return [self.ids[i].decode() for i in picks]


# --- article names ----------------------------------------------------------------------------------------
class Catalogue:
    """article_id -> the names people read (prod_name, type, colour, index group), from `articles`.

    `Catalogue(uri)` reads the whole table once (the server keeps it per `articles` version);
    `Catalogue(uri, only=ids)` reads just the rows of those ids (a one-off lookup).
    """

    def __init__(self, uri: str, only: Iterable[str] | None = None):
        table = open_table(uri)
        self.version = table.version()
        filesystem, root = _filesystem(uri)
        columns = ["article_id", *NAME_COLUMNS]
        wanted = None if only is None else np.array([a.encode() for a in set(only)], dtype=bytes)
        parts = []
        for data_file in _files(table, root):
            part = pq.read_table(filesystem.open_input_file(data_file["path"]), columns=columns)
            if wanted is not None:  # a few rows: slices, no Arrow arrays built from Python objects
                hits = np.flatnonzero(np.isin(_as_bytes(part["article_id"], f"article_id of {uri}"), wanted))
                part = pa.concat_tables([part.slice(int(i), 1) for i in hits]) if len(hits) else part.slice(0, 0)
            parts.append(part)
        names = pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in columns})
        self.names: dict[str, dict[str, Any]] = {
            row[0]: dict(zip(NAME_COLUMNS, row[1:])) for row in zip(*(names[c].to_pylist() for c in columns))
        }
        self.unknown = dict.fromkeys(NAME_COLUMNS)

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, article_id: str) -> dict[str, Any]:
        """The article's names (shared: copy before changing); None for each name of an unknown article."""
        return self.names.get(article_id, self.unknown)


# --- lists for people ---------------------------------------------------------------------------------------
@dataclass
class CustomerList:
    """One customer's published list, best first, with the version it was read from."""

    customer_id: str
    version: int
    model_version: str | None
    run_id: str | None
    generated_at: dt.datetime | None
    items: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        generated = self.generated_at.isoformat() + ("Z" if self.generated_at.tzinfo is None else "") \
            if self.generated_at else None
        return {"customer_id": self.customer_id, "version": self.version, "model_version": self.model_version,
                "run_id": self.run_id, "generated_at": generated, "items": self.items}


def lists(published: PublishedVersion | ResidentVersion, catalogue: Catalogue | None, customer_ids: Sequence[str],
          k: int | None = None) -> dict[str, CustomerList]:
    """customer_id -> CustomerList for the ids that have a published list (in `published`'s version only)."""
    return _assemble(published.version, published.columns_for(customer_ids), catalogue, k)


def _assemble(version: int, data: dict[str, list[Any]], catalogue: Catalogue | None,
              k: int | None) -> dict[str, CustomerList]:
    out: dict[str, CustomerList] = {}
    for i, customer_id in enumerate(data["customer_id"]):
        entry = out.get(customer_id)
        if entry is None:
            entry = out[customer_id] = CustomerList(customer_id, version, data["model_version"][i],
                                                    data["run_id"][i], data["generated_at"][i], [])
        if k is not None and len(entry.items) >= k:
            continue
        article_id = data["article_id"][i]
        entry.items.append({"rank": data["rank"][i], "article_id": article_id,
                            **(catalogue.describe(article_id) if catalogue is not None else {}),
                            "score": data["score"][i], "source": data["source"][i]})
    return out


def customer_exists(config: Config, customer_id: str) -> bool:
    """Whether `customers` holds the id (a full scan of one column: only for explaining a miss)."""
    import pyarrow.dataset as ds

    table = open_table(table_uri(config, CUSTOMERS))
    filesystem, root = _filesystem(table_uri(config, CUSTOMERS))
    dataset = ds.dataset([f["path"] for f in _files(table, root)], format="parquet", filesystem=filesystem)
    return dataset.count_rows(filter=ds.field("customer_id") == customer_id) > 0


def lookup(config: Config, customer_ids: Sequence[str], k: int | None = None,
           version: int | None = None) -> list[CustomerList]:
    """The published lists of these customers, in the order asked, with article names; no Spark.

    Raises UnknownCustomer naming the first id without a list, and whether it is a customer at all.
    """
    published = PublishedVersion(table_uri(config, RECOMMENDATIONS), version)
    columns = published.columns_for(customer_ids)
    found = {}
    if columns["customer_id"]:
        catalogue = Catalogue(table_uri(config, ARTICLES), only=columns["article_id"])
        found = _assemble(published.version, columns, catalogue, k)
    for customer_id in customer_ids:
        if customer_id not in found:
            try:
                known = customer_exists(config, customer_id)
            except FileNotFoundError:  # nothing to tell an unknown id from an unscored customer
                known = None
            why = {True: "has no published list (re-run scoring)", False: "is not in the customers table",
                   None: "has no published list"}[known]
            raise UnknownCustomer(f"customer_id {customer_id!r} {why} (recommendations version {published.version})")
    return [found[c] for c in customer_ids]


def format_list(entry: CustomerList) -> str:
    """A customer's list as a small table for the terminal (the layout of recsys.recommend.format_list)."""
    head = (f"customer {entry.customer_id}  (model {entry.model_version}, run {entry.run_id}, "
            f"recommendations version {entry.version})")
    cells = [[str(item.get(c)) if c != "score" else f"{item[c]:.4f}" for c in ITEM_COLUMNS] for item in entry.items]
    widths = [min(30, max(len(c), *(len(row[i]) for row in cells))) for i, c in enumerate(ITEM_COLUMNS)]
    clip = lambda text, w: text if len(text) <= w else text[: w - 3] + "..."  # noqa: E731
    numeric = {"rank", "score"}
    line = lambda row: "  ".join(  # noqa: E731
        clip(v, w).rjust(w) if c in numeric else clip(v, w).ljust(w) for v, w, c in zip(row, widths, ITEM_COLUMNS)
    ).rstrip()
    return "\n".join([head, line(list(ITEM_COLUMNS)), *map(line, cells)])


# --- recent purchases (the page) ----------------------------------------------------------------------------
def recent_purchases(config: Config, customer_id: str, catalogue: Catalogue | None = None,
                     months: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The customer's purchases in the newest `serving.purchases_months` months of `transactions`, newest first.

    Reads only those `t_month` partitions (from the Delta log's partition values), filtered on customer_id.
    """
    import pyarrow.dataset as ds

    months = months or config.serving.purchases_months
    limit = limit or config.serving.purchases_limit
    uri = table_uri(config, TRANSACTIONS)
    table = open_table(uri)
    filesystem, root = _filesystem(uri)
    files = _files(table, root)
    newest = set(sorted({f.get("partition.t_month") for f in files} - {None}, reverse=True)[:months])
    if newest:
        files = [f for f in files if f.get("partition.t_month") in newest]
    dataset = ds.dataset([f["path"] for f in files], format="parquet", filesystem=filesystem)
    rows = dataset.to_table(columns=["t_dat", "article_id", "price", "sales_channel_id"],
                            filter=ds.field("customer_id") == customer_id)
    rows = rows.sort_by([("t_dat", "descending"), ("article_id", "ascending")]).slice(0, limit)
    out = []
    for row in rows.to_pylist():
        names = catalogue.describe(row["article_id"]) if catalogue is not None else {}
        out.append({"t_dat": row["t_dat"].isoformat(), "article_id": row["article_id"], **names,
                    "price": row["price"], "sales_channel_id": row["sales_channel_id"]})
    return out


def popular_list(config: Config, catalogue: Catalogue | None, k: int) -> list[dict[str, Any]]:
    """The newest global best sellers of `popularity`, as list items: what an unknown customer may be shown."""
    uri = table_uri(config, POPULARITY)
    table = open_table(uri)
    filesystem, root = _filesystem(uri)
    files = _files(table, root)
    newest = max((f["partition.as_of"] for f in files if f.get("partition.as_of") is not None), default=None)
    if newest is not None:
        files = [f for f in files if f.get("partition.as_of") == newest]
    import pyarrow.dataset as ds

    dataset = ds.dataset([f["path"] for f in files], format="parquet", filesystem=filesystem)
    rows = dataset.to_table(columns=["segment_type", "rank", "article_id", "score"],
                            filter=ds.field("segment_type") == "global").sort_by("rank").slice(0, k)
    if rows.num_rows == 0:
        raise ValueError(f"table '{POPULARITY}' at {uri} has no global best sellers to show unknown customers")
    return [{"rank": i + 1, "article_id": r["article_id"],
             **(catalogue.describe(r["article_id"]) if catalogue is not None else {}),
             "score": r["score"], "source": f"popularity_{r['segment_type']}"} for i, r in enumerate(rows.to_pylist())]


def customer_id_pattern(config: Config) -> re.Pattern[str]:
    """`serving.customer_id_pattern`, compiled; a bad pattern is a config error naming the key."""
    try:
        return re.compile(config.serving.customer_id_pattern)
    except re.error as exc:
        raise ValueError(f"serving.customer_id_pattern {config.serving.customer_id_pattern!r}: {exc}") from None
