"""benchmarks/spark_profile.py: a Spark event log -> time per call site and per stage (no Spark needed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import spark_profile as P  # noqa: E402


def _job(job_id: int, site: str, start: int, end: int, stages: list[int], step: str = "") -> list[dict]:
    props = {"spark.sql.execution.id": str(job_id), **({"callSite.short": site} if site else {}),
             **({"recsys.step": step} if step else {})}
    return [{"Event": "SparkListenerJobStart", "Job ID": job_id, "Submission Time": start, "Stage IDs": stages,
             "Properties": props},
            {"Event": "SparkListenerJobEnd", "Job ID": job_id, "Completion Time": end}]


def _stage(stage_id: int, start: int, end: int, run_ms: int, shuffle_rows: int) -> dict:
    return {"Event": "SparkListenerStageCompleted", "Stage Info": {
        "Stage ID": stage_id, "Stage Name": f"stage {stage_id}", "Number of Tasks": 4, "Submission Time": start,
        "Completion Time": end, "Accumulables": [
            {"Name": "internal.metrics.executorRunTime", "Value": run_ms},
            {"Name": "internal.metrics.executorCpuTime", "Value": run_ms * 500_000},
            {"Name": "internal.metrics.shuffle.write.recordsWritten", "Value": shuffle_rows},
            {"Name": "internal.metrics.resultSize", "Value": 7}]}}


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    events = [{"Event": "SparkListenerApplicationStart"},
              *_job(0, "count at /repo/recsys/features.py:10", 0, 4000, [0, 1]),
              _stage(0, 0, 3000, 5000, 100), _stage(1, 3000, 4000, 1000, 0),
              *_job(1, "count at /repo/recsys/features.py:10", 3000, 6000, [2]),  # overlaps the first job
              _stage(2, 3000, 6000, 2000, 0),
              *_job(2, "save at /repo/recsys/score.py:99", 10000, 11000, [3]),
              _stage(3, 10000, 11000, 1500, 40),
              *_job(3, "", 12000, 12500, [4], step="score / slice 1 / write candidates"),  # a Delta write
              _stage(4, 12000, 12500, 400, 0)]
    path = tmp_path / "events" / "local-1.inprogress"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n{\"Event\": \"SparkListenerTaskEnd\", \"trunc")
    return path.parent


def test_time_is_summed_per_python_call_site_with_overlapping_jobs_counted_once(log: Path):
    summary = P.summarise(*P.read(P.log_files([str(log)])), top=2)
    sites = {row["job"]: row for row in summary["groups"]}
    assert list(sites) == ["count at recsys/features.py:10", "save at recsys/score.py:99",
                           "score / slice 1 / write candidates"]  # slowest first
    features = sites["count at recsys/features.py:10"]
    assert (features["wall_s"], features["jobs"], features["run_s"], features["cpu_s"]) == (6.0, 2, 8.0, 4.0)
    assert features["shuffle_write_rows"] == 100
    assert summary["wall_s"] == 7.5  # 0-6 s, 10-11 s and 12-12.5 s
    assert [(s["stage"], s["wall_s"]) for s in summary["stages"]] == [(0, 3.0), (2, 3.0)]  # top 2 only
    assert "resultSize" not in json.dumps(summary)


def test_depth_groups_by_the_pipeline_step_alone(log: Path):
    summary = P.summarise(*P.read(P.log_files([str(log)]), depth=2), top=5)
    assert {row["job"]: row["wall_s"] for row in summary["groups"]} == {"(no step)": 7.0, "score / slice 1": 0.5}


def test_a_window_keeps_the_jobs_started_inside_it_and_their_stages(log: Path):
    jobs, stages = P.read(P.log_files([str(log)]), window=(2500, 10000))
    assert sorted(j.job_id for j in jobs) == [1, 2] and sorted(s.stage_id for s in stages.values()) == [2, 3]
    assert P._epoch_ms("1970-01-01T00:00:10") == 10000


def test_the_command_prints_both_tables_and_writes_the_summary(log: Path, tmp_path: Path, capsys):
    out = tmp_path / "profile.json"
    assert P.main([str(log), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Steps and call sites" in printed and "## Spark stages" in printed and "recsys/score.py:99" in printed
    assert json.loads(out.read_text())["groups"][0]["jobs"] == 2


def test_a_missing_log_is_named(tmp_path: Path):
    with pytest.raises(SystemExit, match="no-such-folder"):
        P.log_files([str(tmp_path / "no-such-folder")])
