"""Where a Spark run's time went, from its event log: per call site and per Spark stage.

A benchmark's wall time says which pipeline stage is slow; the event log says which query inside it, and why
(task time, CPU, garbage collection, rows shuffled, bytes spilled). `benchmarks/pipeline_full.py --event-log DIR`
writes one; this reads it (plain JSON lines, or `.zstd` / `.lz4` through the `zstd` / `lz4` command).

    .venv/bin/python benchmarks/spark_profile.py DIR_OR_FILE [...] [--depth N] [--window FROM TO] [--top 25]
                                                  [--json OUT]

Each job is named by the pipeline's step it ran in (`recsys.spark.described`: `score / slice 2 / write
candidates`) and the Python line that started it, where Spark records one (`count at recsys/features.py:123`).
`--depth N` groups by the first N parts of the step alone (`--depth 1`: per pipeline stage). The wall time of a
group is the union of its jobs' spans, so jobs that overlap are not counted twice.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from recsys.spark import STEP, STEP_SEPARATOR

METRICS = {  # Spark's task metric accumulators -> short names (times in ms, cpu in ns)
    "internal.metrics.executorRunTime": "run_ms",
    "internal.metrics.executorCpuTime": "cpu_ns",
    "internal.metrics.jvmGCTime": "gc_ms",
    "internal.metrics.input.recordsRead": "input_rows",
    "internal.metrics.output.recordsWritten": "output_rows",
    "internal.metrics.shuffle.read.recordsRead": "shuffle_read_rows",
    "internal.metrics.shuffle.write.recordsWritten": "shuffle_write_rows",
    "internal.metrics.shuffle.write.bytesWritten": "shuffle_write_bytes",
    "internal.metrics.diskBytesSpilled": "spill_disk_bytes",
}
DECOMPRESS = {".zstd": ["zstd", "-dc"], ".zst": ["zstd", "-dc"], ".lz4": ["lz4", "-dc"]}


@dataclass
class Stage:
    stage_id: int
    app: str
    name: str = ""
    tasks: int = 0
    start_ms: int = 0
    end_ms: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return max(self.end_ms - self.start_ms, 0) / 1000


@dataclass
class Job:
    job_id: int
    app: str
    name: str
    start_ms: int
    end_ms: int = 0
    stage_ids: list[int] = field(default_factory=list)


def log_files(paths: Iterable[str]) -> list[Path]:
    """Event log files, oldest first (a folder holds one per Spark application)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise SystemExit(f"spark_profile: no such event log file or folder: {path}")
        files.extend(sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
                     if path.is_dir() else [path])
    return files


def _lines(path: Path) -> Iterator[str]:
    suffix = path.suffix if path.suffix != ".inprogress" else Path(path.stem).suffix
    command = DECOMPRESS.get(suffix)
    if command is None:
        with path.open(encoding="utf-8", errors="replace") as handle:
            yield from handle
        return
    if shutil.which(command[0]) is None:
        raise SystemExit(f"spark_profile: {path} is compressed ({suffix}) and the `{command[0]}` command is not "
                         "installed: install it, or write the log with spark.eventLog.compress=false")
    with subprocess.Popen([*command, str(path)], stdout=subprocess.PIPE, text=True, errors="replace") as proc:
        stream: IO[str] = proc.stdout  # type: ignore[assignment]
        yield from stream


def read(files: Iterable[Path], depth: int = 0, window: tuple[float, float] | None = None
         ) -> tuple[list[Job], dict[tuple[str, int], Stage]]:
    """(jobs, stages) of the logs; `window` (first, last ms since the epoch): only the jobs started inside it."""
    jobs: dict[tuple[str, int], Job] = {}
    stages: dict[tuple[str, int], Stage] = {}
    for path in files:
        app = path.name.split(".")[0]
        for line in _lines(path):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # the last line of a log still being written
                continue
            kind = event.get("Event")
            if kind == "SparkListenerJobStart":
                props = event.get("Properties") or {}
                jobs[app, event["Job ID"]] = Job(event["Job ID"], app, _name(props, depth), event["Submission Time"],
                                                 stage_ids=list(event["Stage IDs"]))
            elif kind == "SparkListenerJobEnd" and (app, event["Job ID"]) in jobs:
                jobs[app, event["Job ID"]].end_ms = event["Completion Time"]
            elif kind == "SparkListenerStageCompleted":
                info = event["Stage Info"]
                stage = stages.setdefault((app, info["Stage ID"]), Stage(info["Stage ID"], app))
                stage.name = info.get("Stage Name", "")
                stage.tasks += info.get("Number of Tasks", 0)
                stage.start_ms = stage.start_ms or info.get("Submission Time", 0)
                stage.end_ms = max(stage.end_ms, info.get("Completion Time", 0))
                for acc in info.get("Accumulables", []):
                    short = METRICS.get(acc.get("Name", ""))
                    if short:
                        stage.metrics[short] = stage.metrics.get(short, 0) + float(acc.get("Value") or 0)
    if window:
        jobs = {key: job for key, job in jobs.items() if window[0] <= job.start_ms <= window[1]}
        kept = {(job.app, sid) for job in jobs.values() for sid in job.stage_ids}
        stages = {key: stage for key, stage in stages.items() if key in kept}
    return list(jobs.values()), stages


def _name(props: dict[str, str], depth: int) -> str:
    """`step | call site` of a job (either may be missing); with `depth`, the step's first `depth` parts alone."""
    step = props.get(STEP, "")
    if depth:
        return STEP_SEPARATOR.join(step.split(STEP_SEPARATOR)[:depth]) or "(no step)"
    call = _site(props["callSite.short"]) if "callSite.short" in props else ""
    return " | ".join(part for part in (step, call) if part) or "?"


def _site(call_site: str) -> str:
    """`count at /abs/path/recsys/features.py:123` -> `count at recsys/features.py:123`."""
    head, sep, where = call_site.rpartition(" at ")
    for marker in ("/recsys/", "/benchmarks/", "/jobs/"):
        if marker in where:
            return f"{head}{sep}{marker[1:]}{where.split(marker, 1)[1]}"
    return call_site


def _union_s(spans: list[tuple[int, int]]) -> float:
    total, end = 0, None
    for start, stop in sorted(spans):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1000


def summarise(jobs: list[Job], stages: dict[tuple[str, int], Stage], top: int) -> dict[str, Any]:
    owner: dict[tuple[str, int], str] = {}
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for job in jobs:
        spans[job.name].append((job.start_ms, job.end_ms or job.start_ms))
        for sid in job.stage_ids:
            owner.setdefault((job.app, sid), job.name)
    sites: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, stage in stages.items():
        row = sites[owner.get(key, "?")]
        row["stages"] += 1
        for name, value in stage.metrics.items():
            row[name] += value
    groups = [{"job": site, "wall_s": round(_union_s(spans.get(site, [])), 1), "jobs": len(spans.get(site, [])),
                **_readable(row)} for site, row in sites.items()]
    groups.sort(key=lambda r: -r["wall_s"])
    slowest = sorted(stages.values(), key=lambda s: -s.wall_s)[:top]
    return {
        "wall_s": round(_union_s([(j.start_ms, j.end_ms or j.start_ms) for j in jobs]), 1),
        "groups": groups,
        "stages": [{"app": s.app, "stage": s.stage_id, "job": owner.get((s.app, s.stage_id), "?"),
                    "name": s.name, "tasks": s.tasks, "wall_s": round(s.wall_s, 1), **_readable(s.metrics)}
                   for s in slowest],
    }


def _readable(metrics: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if name == "cpu_ns":
            out["cpu_s"] = round(value / 1e9, 1)
        elif name.endswith("_ms"):
            out[name[:-3] + "_s"] = round(value / 1000, 1)
        elif name.endswith("_bytes"):
            out[name[:-6] + "_mib"] = round(value / 2**20, 1)
        elif name != "stages":
            out[name] = int(value)
    return out


def _epoch_ms(text: str) -> float:
    moment = dt.datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp() * 1000


def table(rows: list[dict[str, Any]], columns: list[str], limit: int) -> str:
    shown = rows[:limit]
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in shown:
        lines.append(" | ".join(_cell(row.get(c, "")) for c in columns))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 1e6:.2f} M"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="event log files, or folders of them")
    parser.add_argument("--depth", type=int, default=0, help="group by the first N parts of the step alone")
    parser.add_argument("--top", type=int, default=25, help="how many groups and stages to print")
    parser.add_argument("--json", help="also write the whole summary here")
    parser.add_argument("--window", nargs=2, metavar=("FROM", "TO"),
                        help="only jobs started between these UTC times (ISO, e.g. 2026-11-28T04:50:30)")
    args = parser.parse_args(argv)
    window = tuple(_epoch_ms(t) for t in args.window) if args.window else None
    jobs, stages = read(log_files(args.paths), args.depth, window)
    if not jobs:
        print("spark_profile: no Spark jobs in these event logs", file=sys.stderr)
        return 1
    summary = summarise(jobs, stages, args.top)
    print(f"{len(jobs)} jobs, {len(stages)} stages, {summary['wall_s']} s with a job running\n")
    print("## Steps and call sites (slowest first)\n")
    print(table(summary["groups"], ["job", "wall_s", "jobs", "run_s", "cpu_s", "gc_s", "input_rows",
                                        "shuffle_read_rows", "shuffle_write_rows", "spill_disk_mib"], args.top))
    print("\n## Spark stages (slowest first)\n")
    print(table(summary["stages"], ["app", "stage", "job", "tasks", "wall_s", "run_s", "cpu_s", "gc_s",
                                    "shuffle_read_rows", "shuffle_write_rows", "spill_disk_mib"], args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
