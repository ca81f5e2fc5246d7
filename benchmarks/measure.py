"""What every benchmark records besides its own numbers: the process tree's peak memory and CPU seconds, the
machine and its load (wall times mean little on a machine that other jobs share), and the JSON result file."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil


class ProcessTree:
    """Peak memory and CPU seconds of this process and all its descendants (the Spark JVM, Python workers),
    sampled in a thread. CPU seconds say what the work costs even when other jobs share the machine.

    Memory two ways: the sum of the processes' RSS (`peak`), and the sum of their PSS (`peak_pss`: a page shared
    by n processes counts 1/n in each), which is what the tree occupies. They differ by the pages the processes
    share: Spark's Python workers are forked from one daemon and map the same libraries (torch, FAISS, XGBoost),
    so with several workers alive the RSS sum counts those pages once per worker. PSS is read at most every
    `pss_every_s`, and only while the RSS sum is above the PSS peak so far (the only moments it can rise)."""

    def __init__(self, every_s: float = 0.5, pss_every_s: float = 2.0):
        self.every_s, self.pss_every_s, self._stop = every_s, pss_every_s, threading.Event()
        self.peak, self.peak_pss, self._pss_at = 0, 0, 0.0
        self.peak_parts: dict[str, int] = {}  # at the peak: bytes by role (driver, jvm, workers)
        self.peak_processes: list[tuple[str, int, int]] = []  # at the peak: (name, pid, RSS) of the largest
        self.peak_pss_parts: dict[str, int] = {}
        self._cpu: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sample()
        self._cpu_start = dict(self._cpu)

    def _sample(self) -> None:
        me = psutil.Process()
        parts = {"driver": 0, "jvm": 0, "workers": 0}
        roles: dict[psutil.Process, str] = {}
        sizes: list[tuple[str, int, int]] = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
                name = proc.name()
                roles[proc] = "driver" if proc.pid == me.pid else "jvm" if name == "java" else "workers"
            except psutil.Error:
                continue
            parts[roles[proc]] += rss
            sizes.append((name, proc.pid, rss))
        total = sum(parts.values())
        if total > self.peak:  # which processes, by name: a child the JVM is forking shares (and shows) its pages
            self.peak, self.peak_parts = total, parts
            self.peak_processes = sorted(sizes, key=lambda s: -s[2])[:6]
        # PSS reads every mapping of every process (tens of ms each under load): only when it could be a new peak
        # (PSS <= RSS) and at most every pss_every_s
        now = time.monotonic()
        if total > self.peak_pss and now - self._pss_at >= self.pss_every_s:
            self._pss_at = now
            shares = dict.fromkeys(parts, 0)
            for proc, role in roles.items():
                try:
                    shares[role] += getattr(proc.memory_full_info(), "pss", 0)
                except psutil.Error:
                    continue
            if sum(shares.values()) > self.peak_pss:
                self.peak_pss, self.peak_pss_parts = sum(shares.values()), shares

    @property
    def cpu_s(self) -> float:
        return sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu.items())

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 2)

    @property
    def peak_pss_gib(self) -> float:
        return round(self.peak_pss / 2**30, 2)

    @property
    def peak_parts_gib(self) -> dict[str, float]:
        """Where the peak was: the driver process, the Spark JVM, everything else (Python workers, daemons)."""
        return _gib(self.peak_parts)

    @property
    def peak_processes_gib(self) -> list[list]:
        """The largest processes at the RSS peak: [name, pid, GiB], largest first."""
        return [[name, pid, round(size / 2**30, 2)] for name, pid, size in self.peak_processes]

    @property
    def peak_pss_parts_gib(self) -> dict[str, float]:
        return _gib(self.peak_pss_parts)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "ProcessTree":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _gib(parts: dict[str, int]) -> dict[str, float]:
    return {role: round(size / 2**30, 2) for role, size in parts.items()}


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The benchmark's arguments plus `--verbose`; without it the run prints what `recsys` prints (its own lines
    and progress, Spark's and the dependencies' logs and warnings kept quiet: recsys.console)."""
    from recsys import console, progress

    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Spark's and the dependencies' logs and warnings (quiet by default)")
    args = parser.parse_args()
    console.configure(args.verbose)
    progress.enable(not args.verbose)
    return args


def machine() -> str:
    return (f"{psutil.cpu_count()} cores / {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{platform.processor() or platform.machine()}")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_avg() -> float:
    return round(os.getloadavg()[0], 1)


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def scratch_tables(config: Any, given: str | None, name: str) -> Path:
    """A benchmark's own tables folder (`given`, else <data_dir>/<name>), emptied first, so that it never writes
    over the profile's tables."""
    folder = Path(given or Path(config.paths.data_dir) / name).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
