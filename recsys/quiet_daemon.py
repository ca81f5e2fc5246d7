"""Spark's Python daemon for a quiet `recsys` run: pyspark's own, with what native libraries print in the
workers past every logger and verbosity setting dropped line by line.

XGBoost's collective prints "[hh:mm:ss] Task N got rank N" for every training task whatever its verbosity (a
console-level log routed to Python's `print` in the worker); the JVM copies the workers' output to the
terminal. Forked workers inherit the filtered stdout. Set by `recsys.spark` (`spark.python.daemon.module`) only
for a quiet local run: a verbose run, tests, notebooks and spark-submit jobs keep pyspark's daemon.
"""
from __future__ import annotations

import re
import sys
from typing import Any, TextIO

NOISE = re.compile(r"\[\d\d:\d\d:\d\d\] Task \d+ got rank \d+\n")


class FilteredLines:
    """A text stream that forwards every line except the ones NOISE matches in full (a partial line waits)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).splitlines(keepends=True)
        self._pending = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        kept = "".join(line for line in lines if not NOISE.fullmatch(line))
        if kept:
            self._stream.write(kept)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, buffer, encoding ...: the real stream's
        return getattr(self._stream, name)


if __name__ == "__main__":
    from pyspark import daemon

    sys.stdout = FilteredLines(sys.stdout)
    daemon.manager()
