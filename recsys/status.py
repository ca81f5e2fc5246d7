"""What state the system is in, for a person: the last pipeline run stage by stage, what is published and how
its checks came out, what the gate decided and why, and every warning. `recsys status` prints it; the same
goes to `<artifacts_dir>/status.html` after every publish.

Read from the lake's own tables (`pipeline_runs`, `recommendations`, `publish_checks`, `gate_decisions`), so it
says the same on a laptop and on a Databricks job cluster.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pyspark.sql import functions as F

from recsys.monitor import DRIFT_PREFIX
from recsys.publish import RELIST, published_dates
from recsys.tables import PIPELINE_RUNS, PUBLISH_CHECKS, RECOMMENDATIONS, Lakehouse


def last_run(lake: Lakehouse) -> list[dict[str, Any]]:
    """The stages of the newest pipeline run, in the order they ran."""
    if not lake.exists(PIPELINE_RUNS):
        return []
    runs = lake.read(PIPELINE_RUNS)
    latest = runs.orderBy(F.desc("started_at")).select("run_id").limit(1).first()
    if latest is None:
        return []
    return [r.asDict() for r in runs.filter(F.col("run_id") == latest.run_id).orderBy("started_at").collect()]


def published(lake: Lakehouse) -> dict[str, Any] | None:
    """The published lists: Delta version, run, model, when, and the checks of that run."""
    if not lake.exists(RECOMMENDATIONS):
        return None
    row = lake.read(RECOMMENDATIONS).agg(
        F.first("run_id").alias("run_id"), F.first("model_version").alias("model_version"),
        F.max("generated_at").alias("generated_at"), F.countDistinct("customer_id").alias("customers")).first()
    if row is None or row.run_id is None:
        return None
    checks = []
    if lake.exists(PUBLISH_CHECKS):
        checks = [r.asDict() for r in lake.read(PUBLISH_CHECKS).filter(F.col("run_id") == row.run_id)
                  .orderBy("check").collect()]
    return {"version": lake.version(RECOMMENDATIONS), **row.asDict(), "checks": checks,
            **published_dates(lake, row.run_id)}


def collect(lake: Lakehouse) -> dict[str, Any]:
    from recsys.gate import latest_decision

    runs, lists, gate = last_run(lake), published(lake), latest_decision(lake)
    warnings = [f"stage {r['stage']} failed: {r['message']}" for r in runs if r["status"] == "failed"]
    warnings += [f"check {c['check']} = {c['value']:.4g} ({c['status']})" for c in (lists or {}).get("checks", [])
                 if c["status"] != "ok" and c["value"] is not None]
    if gate and gate["publish"] != "model":
        warnings.append(f"no model beats the best baseline: publishing {gate['publish']}")
    return {"runs": runs, "published": lists, "gate": gate, "warnings": warnings}


def _value(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def published_line(lists: dict[str, Any] | None) -> str:
    if not lists:
        return "published: nothing yet"
    line = (f"published: version {lists['version']}, {lists['customers']:,} customers, model "
            f"{lists['model_version']}, run {lists['run_id']}, generated {lists['generated_at']}")
    if lists.get("scope") == RELIST:  # a nightly between full runs: some lists are older than the rest
        line += (f"; a relist as of {lists.get('as_of')} (the buyers since the last publish), everyone else's "
                 f"from the full publish as of {lists.get('full_as_of')}")
    return line


def format_text(status: dict[str, Any]) -> str:
    lines = []
    runs = status["runs"]
    if runs:
        lines.append(f"last pipeline run {runs[0]['run_id']} (started {runs[0]['started_at']:%Y-%m-%d %H:%M} UTC):")
        lines += [f"  {r['stage']:<9} {r['status']:<10} {r['seconds']:>7.1f}s  {r['message'] or ''}"[:160]
                  for r in runs]
    else:
        lines.append("no pipeline run recorded yet")
    lists = status["published"]
    lines.append(published_line(lists))
    if lists:
        checked = [c for c in lists["checks"] if c["direction"] != "none"]
        drift = [c for c in checked if c["check"].startswith(DRIFT_PREFIX) and c["value"] is not None]
        shown = [c for c in checked if not c["check"].startswith(DRIFT_PREFIX) or c["status"] != "ok"]
        if checked:  # every drift check that is not ok is shown; the ok ones as their largest value
            worst = max(drift, key=lambda c: c["value"], default=None)
            lines.append("  checks: " + ", ".join(f"{c['check']} {_value(c['value'])} {c['status']}" for c in shown)
                         + (f"; feature drift (PSI) of {len(drift)} features, largest {worst['check']} "
                            f"{_value(worst['value'])}" if worst else ""))
    gate = status["gate"]
    if gate:
        champion = gate["champion"]  # parsed by latest_decision
        lines.append(f"gate ({gate['decided_at']:%Y-%m-%d %H:%M}, test week {gate['test_week']}): publish "
                     f"{gate['publish']}; champion {champion or 'none'}; {gate['metric']} challenger "
                     f"{_value(gate['challenger_value'])}, champion {_value(gate['champion_value'])}, best baseline "
                     f"{gate['best_baseline']} {_value(gate['best_baseline_value'])}")
    lines.append("warnings: " + ("; ".join(status["warnings"]) if status["warnings"] else "none"))
    return "\n".join(lines)


def format_html(status: dict[str, Any]) -> str:
    """The same as a small self-contained page."""
    def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_value(r.get(c)))}</td>" for c in columns) + "</tr>"
                       for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    lists = status["published"] or {}
    parts = [
        "<!doctype html><meta charset='utf-8'><title>recsys status</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        ".warn{color:#a40}</style>",
        "<h1>recsys status</h1>",
        "<h2>Warnings</h2>",
        "<ul>" + ("".join(f"<li class='warn'>{html.escape(w)}</li>" for w in status["warnings"]) or "<li>none</li>")
        + "</ul>",
        "<h2>Last pipeline run</h2>",
        table(status["runs"], ["stage", "status", "seconds", "rows", "started_at", "message"]),
        "<h2>Published</h2>",
        f"<p>{html.escape(published_line(status['published']))}</p>",
        table(lists.get("checks", []), ["check", "value", "warn", "block", "status"]),
    ]
    return "\n".join(parts) + "\n"


def write_html(lake: Lakehouse, status: dict[str, Any] | None = None) -> Path:
    path = lake.config.path(lake.config.paths.artifacts_dir) / "status.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_html(status or collect(lake)))
    return path
