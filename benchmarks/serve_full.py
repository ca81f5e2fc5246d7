"""`recsys serve` under load at full size (16.5 M published rows), against localhost only, bounded.

Starts `recsys serve` (one uvicorn process, the version held in memory) on the table `published_full.py`
writes, waits for /health, then for 1, 8 and 32 concurrent clients sends GET /recommendations/{id} for random
published ids over keep-alive HTTP/1.1 connections, for at most --requests requests or --seconds seconds per
level (after a short warm-up), and records requests/s, p50/p99/max latency and any non-200 answer. The load
generator is a small asyncio client in this process, on the same 2 cores as the server: the figures are for
the pair; the server's and the client's CPU seconds are recorded separately.

Writes benchmarks/results/serve_full.json. Usage: python benchmarks/serve_full.py [--requests N] [--seconds S]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import parse_args  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))

import published_full  # noqa: E402
from lookup_full import customer_ids  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "serve_full.json"
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                return json.load(response)
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"recsys serve did not become healthy within {timeout:.0f} s")


async def client(host: str, port: int, paths: list[str], start: int, step: int, stop_at: float,
                 budget: list[int], latencies: list[float], failures: list[str]) -> None:
    """One keep-alive connection sending requests back to back until the budget or the time runs out."""
    reader, writer = await asyncio.open_connection(host, port)
    i = start
    try:
        while budget[0] > 0 and time.perf_counter() < stop_at:
            budget[0] -= 1
            path = paths[i % len(paths)]
            i += step
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.split(b"\r\n")[0].decode() + " " + body[:200].decode(errors="replace"))
    finally:
        writer.close()


async def level(host: str, port: int, paths: list[str], clients: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    budget = [requests]
    started = time.perf_counter()
    await asyncio.gather(*[client(host, port, paths, c, clients, started + seconds, budget, latencies, failures)
                           for c in range(clients)])
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "non_200": len(failures), "failure_examples": failures[:3]}


class ServerProcesses:
    """The server and its worker processes (uvicorn --workers): CPU seconds and resident memory together."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)

    def all(self):
        return [self.root, *self.root.children(recursive=True)]

    def cpu_s(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.all())

    def rss_mib(self) -> float:
        return sum(p.memory_info().rss for p in self.all()) / 2**20


def run(coroutine):
    """uvloop when installed (the server uses it too): the client's own CPU cost per request is lower."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30_000, help="at most this many requests per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per level")
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=1, help="server processes (serving.workers)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parse_args(parser)

    published_full.build()
    port, host = free_port(), "127.0.0.1"
    base = f"http://{host}:{port}"
    overrides = [*published_full.config_overrides(), f"serving.port={port}", f"serving.host={host}",
                 f"serving.workers={args.workers}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "--profile", "full", *[a for o in overrides for a in ("--set", o)],
         "serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result: dict = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores / {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}"
                   " GiB",
        "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
        "server": f"recsys serve: uvicorn, {args.workers} process(es), version held in memory",
        "bounds": {k: v for k, v in vars(args).items() if k != "out"},
    }
    try:
        health = wait_healthy(base, timeout=300)
        result["server_ready_s"] = time.perf_counter() - started
        result["served_version"] = health["version"]
        processes = ServerProcesses(server.pid)
        result["server_rss_mib_ready"] = processes.rss_mib()
        paths = [f"/recommendations/{c}" for c in customer_ids(20_000, 7)]
        run(level(host, port, paths, 8, args.warmup, args.seconds))
        result["levels"] = []
        for clients in LEVELS:
            cpu_before, client_before = processes.cpu_s(), time.process_time()
            measured = run(level(host, port, paths, clients, args.requests, args.seconds))
            measured["server_cpu_s"] = processes.cpu_s() - cpu_before
            measured["client_cpu_s"] = time.process_time() - client_before
            measured["server_cpu_ms_per_request"] = 1000 * measured["server_cpu_s"] / measured["requests"]
            result["levels"].append(measured)
            print(json.dumps(measured), flush=True)
        result["server_rss_mib_end"] = processes.rss_mib()
    finally:
        server.terminate()
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    result["server_stderr_tail"] = err.decode(errors="replace")[-2000:]
    by_clients = {m["clients"]: m for m in result["levels"]}
    result.update({"rps_32": by_clients[32]["rps"], "p99_ms_32": by_clients[32]["p99_ms"],
                   "p50_ms_32": by_clients[32]["p50_ms"], "load_average_at_end": os.getloadavg()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
