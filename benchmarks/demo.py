"""`make demo` timed as a new user runs it: the `small` profile from nothing (synth, then every stage), in a
folder of its own (the profile's data/small is left as it is), with the peak memory and CPU seconds of the whole
process tree and each stage's seconds from the pipeline's own summary lines. Target (issue 12): <= 15 min.

    .venv/bin/python benchmarks/demo.py [--profile small] [--out benchmarks/results/demo.json]

Writes `total_s`, `stages` (name -> seconds), `peak_rss_gib`, `cpu_s`, `date`, `machine`, `load_avg`.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import ProcessTree, load_avg, machine, now, write_result  # noqa: E402

TARGET_S = 15 * 60
STAGE_DONE = re.compile(r"^\[\s*(\w+)\] done in ([0-9.]+)s")


def stage_seconds(lines: list[str]) -> dict[str, float]:
    """Each stage's own seconds from the pipeline's `[stage] done in Ns` lines."""
    return {m.group(1): float(m.group(2)) for m in map(STAGE_DONE.match, lines) if m}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="small")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    args = parser.parse_args()
    folder = ROOT / "data" / f"bench_demo_{args.profile}"
    shutil.rmtree(folder, ignore_errors=True)
    paths = [f"paths.data_dir={folder}", f"paths.raw_dir={folder}/raw", f"paths.tables_dir={folder}/delta",
             f"paths.artifacts_dir={folder}/artifacts", f"paths.checkpoint_dir={folder}/checkpoints"]
    command = [sys.executable, "-m", "recsys.cli", "--profile", args.profile,
               *[arg for path in paths for arg in ("--set", path)], "demo"]
    started_load, lines = load_avg(), []
    with ProcessTree() as tree:
        started = time.perf_counter()
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
            for line in run.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        total = round(time.perf_counter() - started, 1)
    if run.returncode:
        print(f"demo failed (exit {run.returncode}); nothing written", file=sys.stderr)
        return run.returncode
    result = {"benchmark": "demo", "date": now(), "machine": machine(), "profile": args.profile,
              "total_s": total, "target_s": TARGET_S, "met": total <= TARGET_S, "stages": stage_seconds(lines),
              "cpu_s": round(tree.cpu_s, 1), "peak_rss_gib": tree.peak_gib, "load_avg_start": started_load,
              "load_avg": load_avg()}
    write_result(args.out, result)
    shutil.rmtree(folder, ignore_errors=True)
    print({k: v for k, v in result.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
