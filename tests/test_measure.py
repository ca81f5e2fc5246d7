"""The benchmarks' process-tree sampler: a child's memory counts, and the peak says which processes held it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import ProcessTree  # noqa: E402


def test_the_peak_names_the_processes_that_held_it():
    holding = "import sys, time; x = bytearray(200 * 2**20); print('ready', flush=True); sys.stdin.read()"
    with ProcessTree(every_s=0.05) as tree:
        child = subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        tree._sample()  # at least one sample while the child holds its memory
        child.communicate("")
    assert tree.peak_parts_gib["workers"] >= 0.19 and tree.peak_gib >= 0.19
    # named among the largest (this process may have bigger ones beside it: a test worker's Spark JVM)
    named = {pid: (name, size) for name, pid, size in tree.peak_processes_gib}
    assert named[child.pid][0].startswith("python") and named[child.pid][1] >= 0.19
    assert sum(size for _, _, size in tree.peak_processes_gib) <= tree.peak_gib + 0.01
