"""A quiet, readable command line: dependency warnings and Spark's logs silenced unless --verbose, progress on
terminals only, and the demo ending with where to look next."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import published_lake
from cli_state import restore_cli_state  # noqa: F401 - fixture: undo process-wide output settings
from recsys import cli, console, lookup, progress, quiet_daemon

ROOT = Path(__file__).resolve().parents[1]


def test_quiet_runs_ignore_dependency_warnings_not_ours():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.configure(verbose=False)
        warnings.warn_explicit("pyarrow API", FutureWarning, "reader.py", 1, module="petastorm.reader")
        warnings.warn_explicit("old option", DeprecationWarning, "client.py", 1, module="mlflow.tracking.client")
        warnings.warn_explicit("schema hint", UserWarning, "core.py", 1, module="pyarrow.parquet.core")
        warnings.warn_explicit("ours", UserWarning, "score.py", 1, module="recsys.score")
    assert [str(w.message) for w in caught] == ["ours"]
    assert console.spark_log_level("WARN") == "ERROR"
    assert os.environ["PYTHONWARNINGS"] == console.WORKER_WARNINGS  # Spark's Python workers inherit it
    option = console.driver_java_options()
    assert option.startswith("-Dlog4j2.configurationFile=file:") and console.LOG4J_QUIET.exists()
    assert "rootLogger.level = error" in console.LOG4J_QUIET.read_text()


def test_verbose_runs_keep_everything():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.configure(verbose=True)
        warnings.warn_explicit("pyarrow API", FutureWarning, "reader.py", 1, module="petastorm.reader")
    assert len(caught) == 1
    assert console.spark_log_level("WARN") == "WARN" and console.driver_java_options() == ""
    assert cli.build_parser().parse_args(["recommend", "c1", "--verbose"]).verbose is True
    assert cli.build_parser().parse_args(["-v", "recommend", "c1"]).verbose is True
    assert cli.build_parser().parse_args(["recommend", "c1"]).verbose is False


def test_a_quiet_spark_run_prints_only_its_answer(tmp_path):
    """The JVM's start-up and Spark's WARN lines stay out of a normal run (a fresh process, a real session)."""
    settings = [f"paths.data_dir={tmp_path}", f"paths.tables_dir={tmp_path}/delta", "spark.driver_memory=1g"]
    done = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "--profile", "tiny", *[a for s in settings for a in ("--set", s)],
         "sql", "SELECT 6 * 7 AS answer"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["answer", "42"]
    assert done.stderr == ""


def test_progress_draws_only_where_someone_watches(spark, monkeypatch, capsys):
    monkeypatch.delenv("RECSYS_PROGRESS", raising=False)
    assert list(progress.track([1, 2, 3], "items")) == [1, 2, 3]
    with progress.stage("features") as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal

    monkeypatch.setenv("RECSYS_PROGRESS", "1")
    assert list(progress.track([1, 2, 3], "items", total=3)) == [1, 2, 3]
    with progress.spark_jobs("score", every=0.05):
        spark.range(4, numPartitions=2).rdd.map(lambda x: time.sleep(0.5) or x).collect()
    drawn = capsys.readouterr().err
    assert "items" in drawn and "score: Spark stage" in drawn and "tasks" in drawn
    progress.enable(False)
    monkeypatch.delenv("RECSYS_PROGRESS")
    assert progress.active() is False


def test_the_demo_ends_with_where_to_look_next(spark, tmp_path_factory):
    config = published_lake.config_for(published_lake.build(spark, tmp_path_factory))
    text = cli.next_steps(config)
    example = lookup.PublishedVersion(lookup.table_uri(config, "recommendations")).sample_ids(1)[0]
    assert f"serve    then open http://127.0.0.1:8000/?customer={example}" in text
    assert f"recommend {example}" in text and "sql \"SELECT source" in text and "the report" in text
    assert len(text.splitlines()) <= 8


@pytest.mark.parametrize("argv", [["recommend"], ["serve", "--port", "x"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2


XGBOOST_RANKS = """
import sys
from xgboost import collective
from xgboost.tracker import RabitTracker
from recsys.quiet_daemon import FilteredLines
if sys.argv[1] == "filtered":
    sys.stdout = FilteredLines(sys.stdout)
tracker = RabitTracker(host_ip="127.0.0.1", n_workers=1)
tracker.start()
with collective.CommunicatorContext(**tracker.worker_args(), dmlc_task_id="0"):
    print("ours", end="")
    print(" too")
sys.stdout.flush()
"""


@pytest.mark.parametrize("mode", ["filtered", "plain"])
def test_the_quiet_daemon_drops_xgboost_s_rank_lines_and_keeps_the_rest(mode):
    run = subprocess.run([sys.executable, "-c", XGBOOST_RANKS, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "ours too" in lines
    assert any(quiet_daemon.NOISE.fullmatch(line + "\n") for line in lines) == (mode == "plain")


def test_only_a_quiet_run_swaps_spark_s_python_daemon():
    console.configure(verbose=False)
    assert console.python_daemon() == "recsys.quiet_daemon"
    assert callable(getattr(importlib.import_module("pyspark.daemon"), "manager"))  # what the module hands over to
    console.configure(verbose=True)
    assert console.python_daemon() is None


def test_hushed_drops_what_a_library_prints_only_in_a_quiet_run(capsys):
    console.configure(verbose=False)
    with console.hushed():
        print("Successfully registered model 'm'.", file=sys.stderr)
    console.configure(verbose=True)
    with console.hushed():
        print("shown")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "shown\n"
