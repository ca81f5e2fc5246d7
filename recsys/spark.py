"""The one Spark session factory.

Locally: a `local[2]` session with Delta from the JARs that `make setup` resolved (no network at start).
On Databricks: the cluster's session as it is; the runtime already ships Delta, so nothing is added.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import uuid
from typing import Any, Iterator

from pyspark.sql import SparkSession

from recsys import console, jars
from recsys.config import Config

# Spark keeps finished jobs, stages, tasks and SQL executions (1,000 executions, 100,000 tasks by default) for
# its UI even when the UI is off; a full pipeline runs thousands of queries with large plans.
RETAINED_WITHOUT_UI = {"spark.sql.ui.retainedExecutions": "50", "spark.ui.retainedJobs": "100",
                       "spark.ui.retainedStages": "100", "spark.ui.retainedTasks": "10000"}


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def under_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands its gateway to Python: its --master/--jars must win."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_spark(config: Config, app_name: str = "recsys") -> SparkSession:
    if on_databricks():
        return SparkSession.builder.getOrCreate()
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    submitted = under_spark_submit()
    missing = [] if submitted else jars.missing()
    if missing:
        raise RuntimeError(
            f"Delta JARs not found: {', '.join(map(str, missing))}. Run `make setup` (resolves them once)."
        )
    # Workers must run the same interpreter as the driver (torch, faiss in mapInPandas).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    sc = config.spark
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.driver.memory", sc.driver_memory)
        .config("spark.sql.shuffle.partitions", str(sc.shuffle_partitions))
        .config("spark.default.parallelism", str(sc.shuffle_partitions))
        .config("spark.ui.enabled", str(sc.ui).lower())
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(sc.arrow_batch_size))
        .config("spark.sql.adaptive.enabled", "true")
        # The runtime Bloom-filter join re-runs the whole (costly) candidate plan just to build a filter.
        .config("spark.sql.optimizer.runtime.bloomFilter.enabled", "false")
        .config("spark.sql.warehouse.dir", str(config.path(config.paths.data_dir) / "spark-warehouse"))
        .config("spark.driver.extraJavaOptions", " ".join(filter(None, [
            f"-Dderby.system.home={config.path(config.paths.data_dir)}",
            "" if submitted else console.driver_java_options(),  # quiet JVM start-up (recsys without --verbose)
        ])))
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        .config("spark.python.worker.reuse", "true")
    )
    settings = dict(RETAINED_WITHOUT_UI) if not sc.ui else {}  # nobody browses finished jobs: keep few
    daemon = None if submitted else console.python_daemon()
    if daemon:  # a quiet local run: the workers' native console lines dropped too
        settings["spark.python.daemon.module"] = daemon
    settings.update(sc.conf)  # the profile's own settings last: they win
    for key, value in settings.items():
        builder = builder.config(key, value)
    if not submitted:  # a plain `python`/`recsys` run: the profile's master, Delta from the JAR cache
        builder = builder.master(sc.master).config("spark.jars", ",".join(str(p) for p in jars.jar_paths()))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(console.spark_log_level(sc.log_level))
    return spark


STEP = "recsys.step"  # a job property of our own: Delta sets spark.job.description for the jobs it starts
STEP_SEPARATOR = " / "


@contextlib.contextmanager
def described(spark: SparkSession, text: str) -> Iterator[None]:
    """The Spark jobs started inside carry `text` (after the step around it: `score / slice 2 / write
    candidates`) as a job property and as their description in Spark's UI, so a profile of the event log
    (`benchmarks/spark_profile.py`) says which step of which stage a query belongs to: Python's call site alone
    names a `count`, or nothing for a Delta write. Each property gets back the value it had."""
    sc = spark.sparkContext
    keys = (STEP, "spark.job.description")
    before = {key: sc.getLocalProperty(key) for key in keys}
    step = f"{before[STEP]}{STEP_SEPARATOR}{text}" if before[STEP] else text
    for key in keys:
        sc.setLocalProperty(key, step)
    try:
        yield
    finally:
        for key, value in before.items():
            sc.setLocalProperty(key, value)  # type: ignore[arg-type]  # None removes it


def release(spark: SparkSession) -> None:
    """Let Spark drop what nothing refers to any more (shuffle files, checkpointed blocks) now, not at its next
    periodic clean-up: between slices of a large computation, so the disk holds one slice at a time. The full
    collection also lets the JVM hand back heap it no longer uses (before work that needs no Spark), and this
    process the memory Python freed (glibc keeps freed pages inside its heap for later allocations: in a whole
    pipeline in one process, the driver held 2.2 GiB from the rank stage on)."""
    import gc

    gc.collect()  # Python's references to the JVM objects go first
    spark.sparkContext._jvm.System.gc()  # then the JVM's, which the ContextCleaner acts on
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_WORKER_STATE: dict[str, Any] = {}


class Shipped:
    """An object (a model, an index) broadcast to the Python workers as cloudpickled bytes and unpickled once
    per worker and run, not per batch: any picklable object works, test doubles defined outside the package
    included. Pass the instance into a mapInPandas body and call `value()` there."""

    def __init__(self, spark: SparkSession, value: Any):
        from pyspark import cloudpickle

        self.payload = spark.sparkContext.broadcast(cloudpickle.dumps(value))
        self.token = uuid.uuid4().hex

    def value(self) -> Any:
        from pyspark import cloudpickle

        if self.token not in _WORKER_STATE:
            _WORKER_STATE.clear()  # the previous run's object: let it go
            _WORKER_STATE[self.token] = cloudpickle.loads(self.payload.value)
            if getattr(self.payload, "_path", None) is not None:
                # a worker's copy, read from the broadcast's file (and read again should it be needed): PySpark
                # would keep the pickled bytes beside the object for the worker's life (an encoder with 1.37 M
                # customer rows: ~0.2 GiB a worker)
                self.payload.__dict__.pop("_value", None)
        return _WORKER_STATE[self.token]
