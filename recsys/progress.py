"""Progress on the terminal for long stages: a one-line bar on stderr, shown only when stderr is a terminal.

A stage that runs for minutes should show that it is alive. This module is the one place that draws
progress (tqdm), so the stages only say what they are doing:

    from recsys import progress

    with progress.stage("features") as bar:     # "features: 0:42" ticking every second; when the work is
        ...                                      # countable: bar.total = N, then bar.update(n) as it advances
    for batch in progress.track(batches, "epoch 1", total=len(batches)):
        ...                                      # a bar over an iterable (passes the items through unchanged)
    with progress.spark_jobs("score"):           # the running Spark stage(s): tasks done / total, elapsed
        lake.write(...)

`recsys` (the command line) wraps every command in `spark_jobs`, so Spark work shows progress without any stage
calling this module; `stage` and `track` are for the Python-side loops (training epochs, scoring batches).
All three draw nothing, and cost nothing, when stderr is not a terminal (CI logs, tests, spark-submit jobs) or
after `enable(False)`; the environment variable RECSYS_PROGRESS=1 / 0 forces them on / off. The bars are
transient (cleared when done), so the stage summaries the stages print stay as they are.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
_enabled = True


def enable(on: bool = True) -> None:
    """Turn progress display on or off for this process (the CLI turns it off with --verbose)."""
    global _enabled
    _enabled = on


def active() -> bool:
    forced = os.environ.get("RECSYS_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return _enabled and sys.stderr.isatty()


class _Silent:
    """Stands in for a bar when nothing is drawn: the same calls, no output."""

    total: int | None = None
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, text: str, refresh: bool = True) -> None:
        pass


def _bar(description: str, total: int | None = None, unit: str = "it", **options: Any):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                mininterval=0.5, **options)


@contextlib.contextmanager
def stage(description: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
    """A bar (or, without a total, an elapsed-time line) for the duration of the block; yields it."""
    if not active():
        yield _Silent()
        return
    bar = _bar(description, total, unit)
    stop = threading.Event()

    def tick() -> None:  # tqdm redraws only on update: keep the elapsed time moving
        while not stop.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="recsys-progress", daemon=True)
    ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        ticker.join(timeout=2)
        bar.close()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """`items`, with a bar advancing as they are consumed."""
    if not active():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.5)


class _SparkWatcher(threading.Thread):
    """Polls the active SparkContext's status tracker and draws its running stages as one bar."""

    def __init__(self, description: str, every: float):
        super().__init__(name="recsys-spark-progress", daemon=True)
        self.description, self.every = description, every
        self.halt = threading.Event()

    def run(self) -> None:
        bar, started = None, 0.0
        while not self.halt.wait(self.every):
            try:
                pyspark = sys.modules.get("pyspark")  # never import Spark just to watch it
                context = pyspark.SparkContext._active_spark_context if pyspark else None
                tracker = context.statusTracker() if context is not None else None
                stages = [s for s in map(tracker.getStageInfo, tracker.getActiveStageIds()) if s] if tracker else []
            except Exception:  # noqa: BLE001 - the session is starting or stopping
                stages = []
            if not stages:
                if bar is not None:
                    bar.close()
                    bar = None
                continue
            total = sum(s.numTasks for s in stages)
            if bar is None:
                bar, started = _bar(self.description, total, unit="task",
                                    bar_format="{desc} |{bar}| {n}/{total} tasks{postfix}"), time.monotonic()
            bar.total = total
            bar.n = sum(s.numCompletedTasks for s in stages)
            ids = ",".join(str(s.stageId) for s in stages)
            bar.set_description(f"{self.description}: Spark stage {ids}", refresh=False)
            bar.set_postfix_str(f"{time.monotonic() - started:.0f}s", refresh=False)
            bar.refresh()
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def spark_jobs(description: str = "spark", every: float = 0.5) -> Iterator[None]:
    """While the block runs, show the progress of whatever Spark is executing (in this process)."""
    if not active():
        yield
        return
    watcher = _SparkWatcher(description, every)
    watcher.start()
    try:
        yield
    finally:
        watcher.halt.set()
        watcher.join(timeout=2)
