"""One Spark session for the whole test run, on the `tiny` profile, in a temporary folder."""
from __future__ import annotations

import pytest

from recsys.config import load_config


def pytest_collection_modifyitems(items):
    """Every test that needs a Spark session (directly or through a fixture) is marked `spark`: `make test-fast`
    runs the others, in seconds."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("recsys")


@pytest.fixture(scope="session")
def config(workdir):
    root = workdir / "data"
    return load_config(
        "tiny",
        [
            f"paths.data_dir={root}",
            f"paths.raw_dir={root}/raw",
            f"paths.tables_dir={root}/delta",
            f"paths.artifacts_dir={root}/artifacts",
            f"paths.checkpoint_dir={root}/checkpoints",
        ],
    )


@pytest.fixture(scope="session")
def spark(config):
    from recsys.spark import get_spark

    session = get_spark(config, "recsys-tests")
    yield session
    session.stop()


@pytest.fixture(autouse=True, scope="module")
def _release_spark_state_after_each_file():
    """One session serves hundreds of tests: cached frames and the plans behind them piled up until the driver's
    heap was full and a task hung on a Python worker. After each test file its cached frames and Delta's cached
    table states go, and both heaps collect."""
    yield
    from pyspark.sql import SparkSession

    from recsys.spark import release

    session = SparkSession.getActiveSession()
    if session is not None:
        session.catalog.clearCache()
        session._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()  # each test's tables, snapshots cached
        release(session)


@pytest.fixture()
def lake(spark, config, tmp_path):
    """A Lakehouse in a fresh folder per test, sharing the one session."""
    from recsys.tables import Lakehouse

    local = load_config("tiny", [f"paths.tables_dir={tmp_path}/delta", f"paths.data_dir={tmp_path}"])
    return Lakehouse(spark, local)


@pytest.fixture()
def registry_down(monkeypatch):
    """Every model-registry read of `MlflowClient` fails as an outage would: 503 TEMPORARILY_UNAVAILABLE."""
    from mlflow import MlflowClient
    from mlflow.exceptions import RestException

    def down(*args, **kwargs):
        raise RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected: the registry is down"})

    for method in ("get_model_version_by_alias", "get_model_version", "get_registered_model", "search_model_versions",
                   "get_model_version_download_uri", "get_latest_versions"):
        monkeypatch.setattr(MlflowClient, method, down)
