"""Delta Lake JARs, resolved from Maven Central once into a project-owned cache.

Spark's usual `spark.jars.packages` resolves with Ivy at every session start, which needs the network and
costs seconds; resolving once in `make setup` lets every later session start offline.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request
from importlib.metadata import version
from pathlib import Path

SCALA = "2.12"
MAVEN = os.environ.get("RECSYS_MAVEN_REPO", "https://repo1.maven.org/maven2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def jar_dir() -> Path:
    return Path(os.environ.get("RECSYS_JAR_DIR", PROJECT_ROOT / ".cache" / "jars"))


def delta_version() -> str:
    """The JARs must match the Python `delta-spark` package exactly."""
    return version("delta-spark")


def artifacts(delta: str | None = None) -> list[tuple[str, str, str]]:
    """(group, artifact, version) of the JARs Spark needs; antlr4 and scala ship with Spark itself."""
    delta = delta or delta_version()
    return [("io.delta", f"delta-spark_{SCALA}", delta), ("io.delta", "delta-storage", delta)]


def _url(group: str, artifact: str, ver: str, suffix: str = "") -> str:
    return f"{MAVEN}/{group.replace('.', '/')}/{artifact}/{ver}/{artifact}-{ver}.jar{suffix}"


def jar_paths() -> list[Path]:
    return [jar_dir() / f"{a}-{v}.jar" for _, a, v in artifacts()]


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def resolve(quiet: bool = False) -> list[Path]:
    """Download missing JARs and verify them against Maven's SHA-1; present, verified files are kept."""
    jar_dir().mkdir(parents=True, exist_ok=True)
    paths = []
    for group, artifact, ver in artifacts():
        target = jar_dir() / f"{artifact}-{ver}.jar"
        sha_file = target.with_suffix(".jar.sha1")
        if target.exists() and sha_file.exists() and _sha1(target) == sha_file.read_text().split()[0]:
            paths.append(target)
            continue
        expected = urllib.request.urlopen(_url(group, artifact, ver, ".sha1"), timeout=60).read().decode().split()[0]
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(_url(group, artifact, ver), timeout=300) as response:
            tmp.write_bytes(response.read())
        if _sha1(tmp) != expected:
            tmp.unlink()
            raise RuntimeError(f"checksum mismatch for {artifact}-{ver}.jar from {MAVEN}")
        tmp.replace(target)
        sha_file.write_text(expected + "\n")
        if not quiet:
            print(f"resolved {group}:{artifact}:{ver} -> {target}")
        paths.append(target)
    return paths


def missing() -> list[Path]:
    return [p for p in jar_paths() if not p.exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolve", action="store_true", help="download missing JARs (network)")
    args = parser.parse_args(argv)
    if args.resolve:
        resolve()
    gone = missing()
    for path in jar_paths():
        print(("MISSING " if path in gone else "ok      ") + str(path))
    return 1 if gone else 0


if __name__ == "__main__":
    sys.exit(main())
