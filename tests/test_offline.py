"""After `make setup`, Spark with Delta starts with no network at all (the JARs come from the project cache)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    from recsys.config import load_config
    from recsys.spark import get_spark
    from recsys.tables import Lakehouse
    root = sys.argv[1]
    config = load_config("tiny", [f"paths.data_dir={root}", f"paths.tables_dir={root}/delta"])
    lake = Lakehouse(get_spark(config, "offline-check"), config)
    lake.write(lake.spark.range(5), "offline_probe")
    print("rows", lake.read("offline_probe").count())
""")


def _no_network_prefix() -> list[str]:
    """`unshare -n` gives the child a network namespace with nothing but a down loopback."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a network namespace here (needs root)")
    # Loopback up (Spark's driver talks to itself over it); nothing else exists in the namespace.
    return ["unshare", "-n", "sh", "-c", "ip link set lo up 2>/dev/null; exec \"$@\"", "sh"]


def test_spark_with_delta_starts_offline(tmp_path):
    cmd = _no_network_prefix() + [sys.executable, "-c", SCRIPT, str(tmp_path)]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows 5" in result.stdout
