"""`recsys.cli.main` sets process-wide output settings (recsys.console, recsys.progress); tests undo them."""
from __future__ import annotations

import os
import warnings

import pytest

from recsys import console, progress


@pytest.fixture(autouse=True)
def restore_cli_state():
    saved_env = {k: os.environ.get(k) for k in ("PYTHONWARNINGS", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    saved = (console._quiet, progress._enabled)
    with warnings.catch_warnings():
        yield
    console._quiet, progress._enabled = saved
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
