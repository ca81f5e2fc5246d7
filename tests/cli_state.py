"""`recsys.cli.main` sets process-wide output settings (recsys.console, recsys.progress); tests undo them."""
from __future__ import annotations

import os
import warnings

import pytest

from recsys import console, progress


@pytest.fixture(autouse=True)
def restore_cli_state():
    names = ("PYTHONWARNINGS", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    saved_env = {k: os.environ.get(k) for k in names}
    saved = (console._quiet, progress._enabled)
    with warnings.catch_warnings():
        yield
    console._quiet, progress._enabled = saved
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
