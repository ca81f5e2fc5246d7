"""notebooks/: each Databricks source-format notebook runs as plain Python on tiny data, outside Databricks.

Widgets fall back to RECSYS_WIDGET_<NAME> environment variables (recsys.notebook), which is how these tests
point a notebook at a temporary lake. The notebooks share the suite's Spark session (`get_spark` returns it).
"""
from __future__ import annotations

import datetime as dt
import re
import runpy
from pathlib import Path

import pytest

import scoring_data as data
from recsys import monitor, notebook
from recsys.recommend import SOURCE_GLOBAL, SOURCE_MODEL
from recsys.tables import RECOMMENDATIONS, RECOMMENDATIONS_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
CELL = "# COMMAND ----------"


def run_notebook(name: str, monkeypatch, lake, **widgets: str) -> dict:
    """Execute notebooks/<name> as a script, its `profile`/`overrides` widgets aimed at `lake`'s folders;
    returns the notebook's variables."""
    config = lake.config
    overrides = [
        f"paths.tables_dir={config.paths.tables_dir}", f"paths.data_dir={config.paths.data_dir}",
        f"paths.artifacts_dir={config.paths.artifacts_dir}", f"paths.checkpoint_dir={config.paths.checkpoint_dir}",
    ]
    values = {"profile": "tiny", "overrides": ";".join(overrides), **widgets}
    for key, value in values.items():
        monkeypatch.setenv(notebook.ENV_PREFIX + key.upper(), value)
    return runpy.run_path(str(ROOT / "notebooks" / name), run_name="__main__")


@pytest.fixture(scope="module")
def scored_lake(spark, tmp_path_factory):
    """The hand-made scoring lake plus a small published `recommendations` table: 3 model picks for 10 buyers,
    the global best sellers for the new customers."""
    root = tmp_path_factory.mktemp("notebooks")
    lake = data.copy_lake(spark, data.build_seed(spark, root / "seed"), root / "lake",
                          f"paths.checkpoint_dir={root}/checkpoints")
    generated = dt.datetime(2020, 9, 22, 3, 0)
    rows = [(c, r, data.ARTICLE_IDS[(i + r) % 20], 1.0 - r / 10, SOURCE_MODEL, "test-1", "run-1", generated)
            for i, c in enumerate(data.WITH_HISTORY[:10]) for r in (1, 2, 3)]
    rows += [(c, r, data.ARTICLE_IDS[r - 1], 0.5, SOURCE_GLOBAL, "test-1", "run-1", generated)
             for c in data.NEW for r in (1, 2, 3)]
    lake.write(spark.createDataFrame(rows, RECOMMENDATIONS_SCHEMA), RECOMMENDATIONS)
    monitor.check_before_publish(lake, lake.read(RECOMMENDATIONS), "run-1", None)  # its `publish_checks` rows
    return lake


def test_notebooks_are_databricks_source_format():
    assert [p.name for p in NOTEBOOKS] == ["01_explore_data.py", "02_train.py", "03_lookup_recommendations.py"]
    for path in NOTEBOOKS:
        text = path.read_text()
        assert text.startswith("# Databricks notebook source\n"), path.name
        assert text.count(CELL) >= 3, f"{path.name}: expected several cells"
        compile(text, str(path), "exec")  # magic cells are comments: the file is plain Python


def test_widgets_fall_back_to_environment_then_default(monkeypatch):
    monkeypatch.setenv("RECSYS_WIDGET_CUSTOMER_ID", "abc")
    assert notebook.widgets(customer_id="", k=12) == {"customer_id": "abc", "k": "12"}
    assert notebook.overrides(" a.b=1 ; evaluation.ks=[6, 12];") == ["a.b=1", "evaluation.ks=[6, 12]"]
    assert notebook.default_profile() == ""


def test_explore_notebook_on_tiny_data(scored_lake, monkeypatch, capsys):
    run_notebook("01_explore_data.py", monkeypatch, scored_lake, top_n="3")
    out = capsys.readouterr().out
    assert "transactions" in out and "channel2_share" in out
    assert "55+" in out and "unknown" in out          # age buckets of the hand-made customers
    assert "Article 00" in out                         # A00 is last week's best seller


def test_lookup_notebook_shows_names_history_and_sources(scored_lake, monkeypatch, capsys):
    customer = data.WITH_HISTORY[3]
    run_notebook("03_lookup_recommendations.py", monkeypatch, scored_lake, customer_id=customer)
    out = capsys.readouterr().out
    assert f"customer {customer}" in out
    for rank in (1, 2, 3):                              # the list with the articles' names
        assert f"Article {(3 + rank) % 20:02d}" in out
    assert "2020-08-10" in out                         # the customer's August purchase
    assert SOURCE_GLOBAL in out and "test-1" in out  # lists per source


def test_lookup_notebook_names_an_unknown_customer(scored_lake, monkeypatch):
    with pytest.raises(ValueError, match="'nobody' is not in the customers table"):
        run_notebook("03_lookup_recommendations.py", monkeypatch, scored_lake, customer_id="nobody")


def test_train_notebook_end_to_end_on_synthetic_data(spark, tmp_path, monkeypatch, capsys):
    from recsys import ingest, synth
    from recsys.registry import CHALLENGER
    from recsys.config import SynthConfig, load_config
    from recsys.split import default_test_start
    from recsys.tables import TRANSACTIONS, Lakehouse

    synth.generate(SynthConfig(n_articles=120, n_customers=300, start_date="2020-06-01", end_date="2020-09-22",
                               seed=5), str(tmp_path / "raw"))
    config = load_config("tiny", [
        f"paths.tables_dir={tmp_path}/delta", f"paths.data_dir={tmp_path}", f"paths.artifacts_dir={tmp_path}/art",
        f"paths.checkpoint_dir={tmp_path}/ckpt",
    ])
    lake = Lakehouse(spark, config)
    ingest.run(lake, str(tmp_path / "raw"))
    values = run_notebook("02_train.py", monkeypatch, lake, overrides=";".join([
        f"paths.tables_dir={tmp_path}/delta", f"paths.data_dir={tmp_path}", f"paths.artifacts_dir={tmp_path}/art",
        f"paths.checkpoint_dir={tmp_path}/ckpt", "model.epochs=1", "model.loader=memory",
    ]))
    out = capsys.readouterr().out
    test_start = default_test_start(lake.read(TRANSACTIONS), config.split.test_days).isoformat()
    train_as_of = (dt.date.fromisoformat(test_start) - dt.timedelta(days=config.ranker.label_days)).isoformat()
    assert values["test_start"] == test_start and f"trained on purchases before {train_as_of}" in out
    assert values["trained"]["as_of"] == train_as_of and values["trained"]["model_version"]
    assert values["ranker_version"]["version"] == "1" and "ranker:" in out
    models = set(values["report"]["table"]["model"])
    assert {CHALLENGER, "two_tower"} <= models  # the new system and its two-tower alone, next to the baselines
    assert f"Evaluation on {test_start}" in out
    assert not lake.exists(RECOMMENDATIONS)  # the notebook publishes nothing


def local_sql_statements(path: Path) -> list[str]:
    """Statements of the ```sql blocks (not ```sql databricks) of a document, split at `;` line ends."""
    blocks = re.findall(r"^```sql\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    return [stmt.strip() for block in blocks for stmt in re.split(r";\s*$", block, flags=re.M) if stmt.strip()]


@pytest.mark.parametrize("doc", ["README.md", "docs/DEPLOY.md"])
def test_documented_sql_runs_as_written(scored_lake, doc):
    statements = local_sql_statements(ROOT / doc)
    assert len(statements) >= 3, f"{doc}: expected the SQL users' examples"
    for statement in statements:
        rows = scored_lake.sql(statement).collect()
        assert rows, f"{doc}: no rows from\n{statement}"
