"""What the `recsys` command prints: the project's own lines, not its dependencies' noise.

A normal run sets Spark's log level to ERROR, from the JVM's first line on (a log4j2 file passed to the local
driver with `spark.driver.extraJavaOptions`); ignores the FutureWarning / DeprecationWarning / UserWarning that
petastorm, pyarrow and mlflow raise (in Spark's Python workers too, which inherit PYTHONWARNINGS); and keeps the
mlflow (MLFLOW_LOGGING_LEVEL), py4j, alembic, petastorm and XGBoost-PySpark loggers at ERROR. What libraries print
past their loggers is dropped too: MLflow's registry lines (`hushed`), XGBoost's per-task rank lines in Spark's
workers (`recsys.quiet_daemon`). `recsys --verbose` leaves all of it as the libraries set it.

Only the command line calls `configure`: tests, notebooks and spark-submit jobs keep their own settings, and
on Databricks the cluster's logging is left alone.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

LOG4J_QUIET = Path(__file__).with_name("log4j2-quiet.properties")
NOISY_MODULES = r"(petastorm|pyarrow|mlflow)(\.|$)"
NOISY_CATEGORIES = (FutureWarning, DeprecationWarning, UserWarning)
NOISY_LOGGERS = ("mlflow", "py4j", "alembic", "petastorm", "XGBoost-PySpark")
WORKER_WARNINGS = "ignore::FutureWarning,ignore::DeprecationWarning"  # worker processes: by category only

_quiet = False


def configure(verbose: bool) -> None:
    """Quiet (the default) or verbose output for this process and the Spark session it will start."""
    global _quiet
    _quiet = not verbose
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    for category in NOISY_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", WORKER_WARNINGS)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # mlflow sets its loggers from this when imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def hushed():
    """In a quiet run, drop what a library prints itself around one call (MLflow's registry prints its
    "Successfully registered model" lines with print, past the loggers); a verbose run shows it."""
    if not _quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def spark_log_level(configured: str) -> str:
    """ERROR in a quiet run, else the configured `spark.log_level`."""
    return "ERROR" if _quiet else configured


def python_daemon() -> str | None:
    """The Spark Python daemon that drops native libraries' console lines in the workers (None when verbose or
    not run from the command line: pyspark's own)."""
    return "recsys.quiet_daemon" if _quiet else None


def driver_java_options() -> str:
    """The JVM option that makes Spark's start-up quiet too (empty when verbose or not run from the CLI)."""
    return f"-Dlog4j2.configurationFile={LOG4J_QUIET.as_uri()}" if _quiet else ""
