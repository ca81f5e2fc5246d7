"""What the notebooks in notebooks/ share: widgets, the session and display, on Databricks and as plain Python.

A notebook reads its parameters with `widgets(...)`: on Databricks they are text widgets (a job can set them);
anywhere else each one is read from the environment variable RECSYS_WIDGET_<NAME>, or takes its default, so a
test can run the same notebook file with `python notebooks/02_train.py`.
"""
from __future__ import annotations

import os
from typing import Any

from recsys.config import Config, load_config
from recsys.spark import on_databricks
from recsys.tables import Lakehouse

ENV_PREFIX = "RECSYS_WIDGET_"


def _notebook_global(name: str) -> Any:
    """`dbutils` / `display` as the Databricks notebook defines them; None elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell.user_ns.get(name) if shell is not None else None


def dbutils() -> Any:
    found = _notebook_global("dbutils")
    if found is None and on_databricks():
        from pyspark.dbutils import DBUtils  # only on Databricks
        from pyspark.sql import SparkSession

        found = DBUtils(SparkSession.builder.getOrCreate())
    return found


def widgets(**defaults: Any) -> dict[str, str]:
    """Declare one text widget per keyword (its default) and return the current values."""
    db = dbutils()
    values = {}
    for name, default in defaults.items():
        if db is not None:
            db.widgets.text(name, str(default))
            values[name] = db.widgets.get(name)
        else:
            values[name] = os.environ.get(ENV_PREFIX + name.upper(), str(default))
    return values


def default_profile() -> str:
    """`databricks` on a cluster; elsewhere empty, which means RECSYS_PROFILE or the config's default."""
    return "databricks" if on_databricks() else ""


def overrides(text: str) -> list[str]:
    """The `overrides` widget: `key=value` pairs separated by ';' (values may hold commas: `evaluation.ks=[6, 12]`)."""
    return [part.strip() for part in text.split(";") if part.strip()]


def open_lakehouse(params: dict[str, str], app_name: str = "recsys-notebook") -> tuple[Config, Lakehouse]:
    """Config from the `profile` / `overrides` widgets, then the session (the cluster's on Databricks)."""
    from recsys.spark import get_spark

    config = load_config(params.get("profile") or None, overrides(params.get("overrides", "")))
    return config, Lakehouse(get_spark(config, app_name), config)


def show(df: Any, n: int = 20) -> None:
    """Databricks' `display` where there is one, a printed table elsewhere (Spark or pandas DataFrames)."""
    display = _notebook_global("display")
    if display is not None:
        display(df.limit(n) if hasattr(df, "limit") else df.head(n))
        return
    frame = df.limit(n).toPandas() if hasattr(df, "limit") else df.head(n)
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(frame.to_string(index=False))
