"""The one entry point behind every `jobs/*.py` file (spark-submit, Databricks `spark_python_task`).

A job file only names its stage's `recsys` sub-command; options are parsed by `recsys.cli` itself, so
`spark-submit jobs/train.py --profile full --set model.epochs=1` and `recsys train --profile full --set
model.epochs=1` accept exactly the same arguments and run exactly the same code.
"""
from __future__ import annotations

import sys
from typing import NoReturn

# jobs/<file>.py -> the `recsys` sub-command it runs (the stage DAG order: ingest -> features -> train ->
# evaluate -> score; nightly chains them for one new day).
JOB_COMMANDS = {
    "ingest": "ingest",
    "build_features": "features",
    "train": "train",
    "evaluate": "evaluate",
    "score": "score",
    "nightly": "nightly",
}


def main(command: str, argv: list[str] | None = None) -> int:
    """Run `recsys <command> <argv>`; `argv` defaults to the process arguments after the script name."""
    from recsys.cli import main as cli_main

    args = sys.argv[1:] if argv is None else list(argv)
    return cli_main([command, *args])


def run(command: str) -> NoReturn:
    """Exit with the stage's status: a non-zero code fails the spark-submit / Databricks task."""
    sys.exit(main(command))
