"""`recsys serve`: the published lists over HTTP (FastAPI + uvicorn), and a page for people, without Spark.

The server holds one `Served` bundle: a committed version of `recommendations` (in memory when
`serving.preload`, else read row group by row group), the article catalogue and, if unknown customers get
best sellers (`serving.unknown_customer: popular`), that list. A background thread looks for a newer Delta
version every `serving.refresh_seconds`; a newer one is read completely into a new bundle and only then does
the reference change. A request reads the reference once and answers from that bundle only: every answer comes
from one committed version, never a mix, and while a new version loads the previous one keeps answering.

API (JSON):
    GET  /recommendations/{customer_id}?k=   one list: items (rank, article_id, names, score, source), version,
                                             model_version, run_id, generated_at; 404 unknown, 422 malformed id
    POST /recommendations/batch              {"customer_ids": [...], "k": 12} -> results in order + missing ids
    GET  /health                             200 once a version is loaded, else 503 with the reason
    GET  /version                            the served Delta version, its commit (run, model), the articles version
    GET  /customers/{customer_id}/purchases  recent purchases (the newest serving.purchases_months months)
    GET  /customers/examples?n=              a few customer ids of the served version (for the page)
Pages: `/` (find a customer: purchases and recommendations side by side), `/history` (publish history),
`/report` (the latest evaluation report).
"""
from __future__ import annotations

import datetime as dt
import gc
import html
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from recsys import lookup
from recsys.config import Config

log = logging.getLogger("recsys.serve")
WEB_DIR = Path(__file__).with_name("web")
UNKNOWN_CUSTOMER_MODES = ("error", "popular")


@dataclass(frozen=True)
class Served:
    """Everything one request reads: one version of the lists, and the catalogue they are named from."""

    lists: lookup.ResidentVersion | lookup.PublishedVersion
    catalogue: lookup.Catalogue
    popular: list[dict[str, Any]] | None
    loaded_at: dt.datetime
    load_seconds: float

    @property
    def version(self) -> int:
        return self.lists.version

    def describe(self) -> dict[str, Any]:
        commit = self.lists.commit
        return {
            "table": self.lists.uri, "version": self.version,
            "committed_at": _iso(commit.get("timestamp")), "operation": commit.get("operation"),
            "action": commit.get("action"), "run_id": commit.get("run_id"),
            "model_version": commit.get("model_version"), "articles_version": self.catalogue.version,
            "rows": self.lists.rows, "customers": getattr(self.lists, "customers", None),
            "in_memory": self.lists.resident, "loaded_at": _iso(self.loaded_at),
            "load_seconds": round(self.load_seconds, 3),
        }


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value.isoformat() + "Z" if isinstance(value, dt.datetime) else str(value)


class Server:
    """Holds the served bundle and replaces it, whole, when a newer version is committed."""

    def __init__(self, config: Config, preload: bool | None = None,
                 open_version: Callable[[str, int], lookup.PublishedVersion] = lookup.PublishedVersion):
        mode = config.serving.unknown_customer
        if mode not in UNKNOWN_CUSTOMER_MODES:
            raise ValueError(f"serving.unknown_customer must be one of {UNKNOWN_CUSTOMER_MODES}, got {mode!r}")
        self.config = config
        self.preload = config.serving.preload if preload is None else preload
        self.uri = lookup.table_uri(config, lookup.RECOMMENDATIONS)
        self.articles_uri = lookup.table_uri(config, lookup.ARTICLES)
        self.pattern = lookup.customer_id_pattern(config)
        self.open_version = open_version
        self.current: Served | None = None
        self.last_error: str | None = None
        self._loading = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def latest(self) -> tuple[int, int]:
        """The newest committed versions of `recommendations` and `articles` (reads only the Delta logs)."""
        return lookup.open_table(self.uri).version(), lookup.open_table(self.articles_uri).version()

    def refresh(self) -> bool:
        """Load the newest version if it is not the one served; True when the served version changed."""
        with self._loading:
            try:
                version, articles_version = self.latest()
                current = self.current
                if current and current.version == version and current.catalogue.version == articles_version:
                    return False
                started = time.perf_counter()
                if current and current.version == version:  # only the articles changed
                    lists = current.lists
                else:
                    published = self.open_version(self.uri, version)
                    lists = published.load() if self.preload else published
                catalogue = current.catalogue if current and current.catalogue.version == articles_version \
                    else lookup.Catalogue(self.articles_uri)
                popular = None
                if self.config.serving.unknown_customer == "popular":
                    popular = lookup.popular_list(self.config, catalogue, self.config.scoring.k)
                served = Served(lists, catalogue, popular, dt.datetime.now(dt.timezone.utc),
                                time.perf_counter() - started)
            except Exception as exc:  # keep answering from the version already held
                error = f"{type(exc).__name__}: {exc}"
                if error != self.last_error:  # once, not at every poll
                    log.error("could not load %s: %s", self.uri, error)
                self.last_error = error
                if self.current is None:
                    raise
                return False
            self.current = served  # the switch: one reference assignment
            self.last_error = None
            # The catalogue's ~100 K dicts would otherwise be walked by every full garbage collection, which shows
            # as latency spikes; frozen objects are skipped (reference counting still frees the old version).
            gc.freeze()
            log.warning("serving %s version %d (%d rows, loaded in %.1f s)", self.uri, served.version,
                        served.lists.rows, served.load_seconds)
            return True

    def start(self) -> None:
        """First load (errors are kept for /health), then follow new publishes in a background thread."""
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - /health reports it; the thread keeps trying
            pass
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="recsys-serve-refresh", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.config.serving.refresh_seconds):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - recorded in last_error
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --- the app ----------------------------------------------------------------------------------------------------
def create_app(config: Config, server: Server | None = None, start: bool = True):
    """The FastAPI app over `server` (a new one from `config` by default); `start` follows new publishes."""
    from contextlib import asynccontextmanager

    from fastapi import Body, FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    server = server or Server(config)
    serving = config.serving

    @asynccontextmanager
    async def lifespan(app):
        if start:
            await run_in_threadpool(server.start)
        yield
        server.stop()

    app = FastAPI(title="recsys", summary="The published top-K lists of every customer", lifespan=lifespan)
    app.state.server = server

    def reply(data: Any, status: int = 200) -> Response:
        body = json.dumps(data, default=str, separators=(",", ":")).encode()
        return Response(body, status_code=status, media_type="application/json")

    def served() -> Served:
        current = server.current
        if current is None:
            raise HTTPException(503, f"nothing served yet: {server.last_error or 'loading'}")
        return current

    def check(customer_id: str) -> str:
        if not server.pattern.fullmatch(customer_id):
            raise HTTPException(422, f"customer_id {customer_id[:100]!r} is malformed: expected "
                                     f"serving.customer_id_pattern {serving.customer_id_pattern}")
        return customer_id

    async def find(bundle: Served, ids: list[str], k: int | None) -> dict[str, lookup.CustomerList]:
        if bundle.lists.resident:
            return lookup.lists(bundle.lists, bundle.catalogue, ids, k)
        return await run_in_threadpool(lookup.lists, bundle.lists, bundle.catalogue, ids, k)

    def fallback(bundle: Served, customer_id: str, k: int | None) -> dict[str, Any]:
        items = bundle.popular[:k] if k else bundle.popular
        commit = bundle.lists.commit
        return {"customer_id": customer_id, "known": False, "version": bundle.version,
                "model_version": commit.get("model_version"), "run_id": commit.get("run_id"),
                "generated_at": None, "items": items}

    @app.get("/recommendations/{customer_id}")
    async def recommendations(customer_id: str, k: int | None = Query(None, ge=1, le=1000)) -> Response:
        bundle = served()
        found = (await find(bundle, [check(customer_id)], k)).get(customer_id)
        if found is not None:
            return reply({**found.to_dict(), "known": True})
        if bundle.popular is not None:
            return reply(fallback(bundle, customer_id, k))
        raise HTTPException(404, f"no published list for customer_id {customer_id!r} in "
                                 f"recommendations version {bundle.version}")

    @app.post("/recommendations/batch")
    async def batch(customer_ids: list[str] = Body(..., embed=True, min_length=1, max_length=serving.max_batch),
                    k: int | None = Body(None, embed=True, ge=1, le=1000)) -> Response:
        bad = [c for c in customer_ids if not server.pattern.fullmatch(c)]
        if bad:
            raise HTTPException(422, f"{len(bad)} malformed customer_id(s), e.g. {bad[:3]}: expected "
                                     f"serving.customer_id_pattern {serving.customer_id_pattern}")
        bundle = served()
        found = await find(bundle, customer_ids, k)
        missing = [c for c in dict.fromkeys(customer_ids) if c not in found]
        results = [{**found[c].to_dict(), "known": True} if c in found else fallback(bundle, c, k)
                   for c in customer_ids if c in found or bundle.popular is not None]
        return reply({"version": bundle.version, "results": results, "missing": missing})

    @app.get("/health")
    async def health() -> Response:
        bundle = server.current
        if bundle is None:
            return reply({"status": "unavailable", "reason": server.last_error or "loading"}, 503)
        return reply({"status": "ok", "version": bundle.version, "rows": bundle.lists.rows,
                      "last_refresh_error": server.last_error})

    @app.get("/version")
    async def version() -> Response:
        return reply(served().describe())

    @app.get("/customers/examples")
    async def examples(n: int = Query(6, ge=1, le=50)) -> Response:
        bundle = served()
        ids = bundle.lists.sample_ids(n) if bundle.lists.resident else \
            await run_in_threadpool(bundle.lists.sample_ids, n)
        return reply({"version": bundle.version, "customer_ids": ids})

    @app.get("/customers/{customer_id}/purchases")
    async def purchases(customer_id: str) -> Response:
        bundle = served()
        rows = await run_in_threadpool(lookup.recent_purchases, config, check(customer_id), bundle.catalogue)
        return reply({"customer_id": customer_id, "months": serving.purchases_months, "purchases": rows})

    @app.get("/history", response_class=HTMLResponse)
    async def publish_history(format: str = Query("html", pattern="^(html|json)$")) -> Response:
        commits = await run_in_threadpool(lookup.history, server.uri)
        if format == "json":
            return reply(commits)
        return HTMLResponse(history_page(commits, server.current))

    @app.get("/report", response_class=HTMLResponse)
    async def report() -> Response:
        path = report_path(config)
        if not path.exists():
            raise HTTPException(404, f"no evaluation report at {path}: run `recsys evaluate` (or the pipeline)")
        return FileResponse(path, media_type="text/html")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> Response:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def report_path(config: Config) -> Path:
    """`serving.report_path`, or where `recsys evaluate` writes its HTML report."""
    default = Path(config.paths.artifacts_dir) / "evaluation" / "report.html"
    return config.path(config.serving.report_path or str(default))


def history_page(commits: list[dict[str, Any]], current: Served | None) -> str:
    """The publish history as a plain HTML table, newest first; the served version is marked."""
    keys = ["version", "timestamp", "operation", "action", "run_id", "model_version", "from_run_id"]
    served_version = current.version if current else None
    rows = "".join(
        "<tr{}>{}</tr>".format(
            ' class="served"' if c["version"] == served_version else "",
            "".join(f"<td>{html.escape(str(_iso(c.get(k)) if k == 'timestamp' else c.get(k, '')))}</td>" for k in keys),
        )
        for c in reversed(commits)
    )
    head = "".join(f"<th>{k}</th>" for k in keys)
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>recsys: publish history</title>'
        '<link rel="stylesheet" href="/static/style.css"></head><body><main>'
        '<p><a href="/">&larr; find a customer</a></p><h1>Publish history of <code>recommendations</code></h1>'
        f"<p>Every Delta commit, newest first; the served version is highlighted. "
        f'JSON: <a href="/history?format=json">/history?format=json</a>.</p>'
        f'<table id="history"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></main></body></html>'
    )


CONFIG_ENV = "RECSYS_SERVE_CONFIG"  # the resolved config, as JSON, for worker processes


def app_from_environment():
    """The app of one uvicorn worker process (`serving.workers` > 1), from the config its parent resolved."""
    from recsys.config import from_dict

    return create_app(from_dict(json.loads(os.environ[CONFIG_ENV]), f"${CONFIG_ENV}"))


def run(config: Config, host: str | None = None, port: int | None = None, verbose: bool = False) -> int:
    """Serve until interrupted (uvicorn; access log with --verbose).

    `serving.workers` > 1 starts that many processes on one port, each holding its own copy of the version and
    following publishes on its own: each answer still comes from one committed version, but during a switch two
    consecutive requests may be answered by processes on different versions.
    """
    import uvicorn

    host = host or config.serving.host
    port = port or config.serving.port
    workers = config.serving.workers
    if workers < 1:
        raise ValueError(f"serving.workers must be at least 1, got {workers}")
    uri = lookup.table_uri(config, lookup.RECOMMENDATIONS)
    print(f"recsys serve: {uri} -> http://{host}:{port}/  ({workers} process(es); API: /recommendations/"
          "{customer_id}, /recommendations/batch, /health, /version; Ctrl+C stops)", flush=True)
    options = {"host": host, "port": port, "log_level": "info" if verbose else "warning", "access_log": verbose}
    if workers == 1:
        uvicorn.run(create_app(config), **options)
    else:
        os.environ[CONFIG_ENV] = json.dumps(config.to_dict())
        uvicorn.run("recsys.serve:app_from_environment", factory=True, workers=workers, **options)
    return 0
