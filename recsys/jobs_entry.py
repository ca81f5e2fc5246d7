"""The one entry point behind every `jobs/*.py` file (spark-submit, or a Databricks `spark_python_task`).

A job file only names its `recsys` command line prefix; options are parsed by `recsys.cli` itself, so
`spark-submit jobs/train.py --profile full --set model.epochs=1` and
`recsys pipeline --steps train --profile full --set model.epochs=1` accept the same arguments and run the same
code. The stage jobs run one step of `recsys pipeline` (not the stand-alone stage commands) so that, chained
in DAG order by any scheduler, they do exactly what the pipeline does: two feature snapshots, training before
the held-out week, evaluation with the champion/challenger gate, scoring with the champion.
"""
from __future__ import annotations

import sys
from typing import NoReturn

# jobs/<file>.py -> the `recsys` arguments it runs, in the stage DAG order.
JOB_COMMANDS = {
    "ingest": ("pipeline", "--steps", "ingest"),
    "build_features": ("pipeline", "--steps", "features"),
    "train": ("pipeline", "--steps", "train"),
    "rank": ("pipeline", "--steps", "rank"),
    "evaluate": ("pipeline", "--steps", "evaluate"),
    "score": ("pipeline", "--steps", "score"),
    "nightly": ("nightly",),
}


def main(command: tuple[str, ...] | list[str], argv: list[str] | None = None) -> int:
    """Run `recsys <command...> <argv>`; `argv` defaults to the process arguments after the script name."""
    from recsys.cli import main as cli_main

    args = sys.argv[1:] if argv is None else list(argv)
    return cli_main([*command, *args])


def run(*command: str) -> NoReturn:
    """Exit with the command's status: non-zero fails the spark-submit / Databricks task."""
    sys.exit(main(command))
