"""A small published lake for the lookup, serving and page tests, written with Spark once per test session.

    the scoring seed (tests/scoring_data.py): 40 articles, 30 customers, purchases in August and September 2020
    popularity         one snapshot, as of 2020-09-22 (for `serving.unknown_customer: popular`)
    recommendations    version 0: popularity lists as of 2020-09-19; version 1: as of 2020-09-22
                       row groups of about 100 rows (`serving.row_group_bytes=1`), so a lookup has to pick
                       row groups by their statistics

The readers under test then open it without Spark. Tests that change it work on a copy (`copy_of`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import scoring_data as data
from recsys.config import Config, load_config

_built: dict[str, Path] = {}
CUTOFFS = ("2020-09-19", "2020-09-22")  # versions 0 and 1


def overrides(lake_dir: Path) -> list[str]:
    return [f"paths.tables_dir={lake_dir}/delta", f"paths.data_dir={lake_dir}",
            f"paths.artifacts_dir={lake_dir}/artifacts", "serving.row_group_bytes=1"]


def config_for(lake_dir: Path, *extra: str) -> Config:
    return load_config("tiny", [*overrides(lake_dir), *extra])


def build(spark, tmp_path_factory) -> Path:
    """The lake folder (tables under `delta/`), built on first use in this session."""
    key = str(tmp_path_factory.getbasetemp())
    if key in _built:
        return _built[key]
    from recsys import recommend
    from recsys.popularity import popularity
    from recsys.tables import ARTICLES, CUSTOMERS, POPULARITY, TRANSACTIONS, Lakehouse

    root = tmp_path_factory.mktemp("published")
    seed = data.build_seed(spark, root / "seed")
    lake_dir = root / "lake"
    shutil.copytree(seed, lake_dir / "delta")
    lake = Lakehouse(spark, config_for(lake_dir))
    features = lake.config.features
    lake.write(popularity(lake.read(TRANSACTIONS), lake.read(CUSTOMERS), lake.read(ARTICLES), CUTOFFS[1],
                          features.popularity_window_days, features.popularity_top_n,
                          features.decay_half_life_days), POPULARITY)
    for cutoff in CUTOFFS:
        recommend.run_popularity(lake, cutoff=cutoff)
    _built[key] = lake_dir
    return lake_dir


def copy_of(lake_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the lake (Delta logs hold relative paths, so a folder copy is a full copy)."""
    target = tmp_path / "lake"
    shutil.copytree(lake_dir, target)
    return target
