"""jobs/: thin spark-submit entry points, checked in-process and through the real `spark-submit` of the venv.

The spark-submit run on tiny data starts its own JVM next to the suite's session (about 20 s on a quiet
2-core machine) and is part of the default run.
"""
from __future__ import annotations

import ast
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest

from recsys import jars
from recsys.cli import COMMANDS, build_parser
from recsys.jobs_entry import JOB_COMMANDS, main
from recsys.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def job_command(path: Path) -> tuple[str, ...]:
    """The `recsys` arguments a job file hands to `recsys.jobs_entry.run(...)`, read from its source."""
    calls = [
        node for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run"
    ]
    assert len(calls) == 1 and all(isinstance(a, ast.Constant) for a in calls[0].args), f"{path.name}: run('...')"
    return tuple(a.value for a in calls[0].args)


def spark_submit(job: str, args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """The command line of docs/DEPLOY.md: local master, the Delta JARs from the project cache via --jars."""
    command = [
        str(Path(pyspark.__file__).parent / "bin" / "spark-submit"),
        "--master", "local[2]",
        "--driver-memory", "1g",
        "--jars", ",".join(str(p) for p in jars.jar_paths()),
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.log.level=WARN",
        str(JOBS / f"{job}.py"), *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_job_file_runs_a_registered_cli_command():
    files = {path.stem: job_command(path) for path in sorted(JOBS.glob("*.py"))}
    assert files == JOB_COMMANDS
    parser = build_parser()
    stages = []
    for job, command in JOB_COMMANDS.items():
        args = parser.parse_args([*command, "--date", "2020-09-23"] if job == "nightly" else list(command))
        assert args.command in COMMANDS
        stages += [args.steps] if args.command == "pipeline" else []
    assert stages == list(STAGES)  # one job per pipeline stage, in DAG order (dict order of JOB_COMMANDS)


def test_job_entry_passes_arguments_to_the_cli(capsys):
    assert main(JOB_COMMANDS["train"], ["--profile", "no-such-profile"]) == 2
    assert "unknown profile 'no-such-profile'" in capsys.readouterr().err


@pytest.mark.parametrize("job", sorted(JOB_COMMANDS))
def test_job_file_exits_with_the_cli_status(job, monkeypatch, capsys):
    required = ["--date", "2020-09-23"] if job == "nightly" else []
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--set", "model.epochz=1", *required])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(JOBS / f"{job}.py"), run_name="__main__")
    assert exit_info.value.code == 2 and "model.epochz" in capsys.readouterr().err


@pytest.mark.spark
def test_spark_submit_reports_a_config_error_without_a_session(tmp_path):
    result = spark_submit("train", ["--profile", "tiny", "--set", "model.epochs=many"], tmp_path, timeout=180)
    # spark-submit's PythonRunner merges the job's stderr into its stdout
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "config error: --set model.epochs=many: 'model.epochs' must be an integer" in result.stdout


def test_ingest_job_through_spark_submit_on_tiny_data(tmp_path, spark):
    from recsys import synth
    from recsys.config import SynthConfig, load_config
    from recsys.tables import ARTICLES, TRANSACTIONS, Lakehouse

    raw = tmp_path / "raw"
    stats = synth.generate(SynthConfig(n_articles=30, n_customers=40, start_date="2020-09-01",
                                       end_date="2020-09-22", seed=3), str(raw))
    result = spark_submit("ingest", [
        "--profile", "tiny", "--set", f"paths.raw_dir={raw}",
        "--set", f"paths.data_dir={tmp_path}", "--set", f"paths.tables_dir={tmp_path}/delta",
        "--set", "spark.shuffle_partitions=1",
    ], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "transactions_train.csv" in result.stdout and "[  ingest] done" in result.stdout

    lake = Lakehouse(spark, load_config("tiny", [f"paths.tables_dir={tmp_path}/delta"]))
    assert lake.read(TRANSACTIONS).count() == stats["rows"]["transactions"]
    ids = lake.read(ARTICLES).selectExpr("min(length(article_id)) AS lo", "max(length(article_id)) AS hi").first()
    assert (ids.lo, ids.hi) == (10, 10)
