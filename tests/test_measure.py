"""The benchmarks' process-tree sampler: a child's memory counts, and the peak says which processes held it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# in a process of its own: a test worker's own children (a Spark JVM) would share the tree and move its peak
MEASURE = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.measure import ProcessTree
holding = "import sys; x = bytearray(200 * 2**20); print('ready', flush=True); sys.stdin.read()"
with ProcessTree(every_s=0.05) as tree:
    child = subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    tree._sample()  # at least one sample while the child holds its memory
    child.communicate("")
print(json.dumps({"child": child.pid, "peak": tree.peak_gib, "parts": tree.peak_parts_gib,
                  "processes": tree.peak_processes_gib}))
"""


def test_the_peak_names_the_processes_that_held_it():
    out = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(ROOT)], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["parts"]["workers"] >= 0.19 and out["peak"] >= 0.19
    named = {pid: (name, size) for name, pid, size in out["processes"]}
    assert named[out["child"]][0].startswith("python") and named[out["child"]][1] >= 0.19
    assert sum(size for _, _, size in out["processes"]) <= out["peak"] + 0.01
