"""The evaluation report: the table for the terminal and one self-contained HTML page with its plots."""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from recsys import metrics as M
from recsys.config import Config
from recsys.spark_metrics import ALL

HEADLINE = ("map", "recall", "ndcg", "precision", "hit_rate", "coverage", "popularity_bias")


def build_report(config: Config, test_start: dt.date, metrics: pd.DataFrame, curves: pd.DataFrame,
                 backtest: pd.DataFrame | None = None) -> dict[str, Any]:
    k = config.evaluation.k
    overall = metrics[metrics["segment"] == ALL]
    table = overall.pivot_table(index="model", columns="metric", values="value").reset_index()
    ks = sorted(set(config.evaluation.ks) | {k})
    wanted = ["model", "customers"] + [M.metric_name(m, kk) for kk in ks for m in HEADLINE]
    table = table[[c for c in wanted if c in table.columns]].sort_values(M.metric_name("map", k), ascending=False)
    return {
        "test_start": test_start.isoformat(),
        "test_end": (test_start + dt.timedelta(days=config.split.test_days - 1)).isoformat(),
        "k": k,
        "models": dict(zip(overall["model"], overall["version"])),
        "table": table.reset_index(drop=True),
        "metrics": metrics,
        "curves": curves,
        "backtest": backtest,
        # model -> seconds its lists took to compute, where the metrics carry it
        "seconds": ({m: float(v) for m, v in overall.groupby("model")["seconds"].first().items()}
                    if "seconds" in overall.columns else {}),
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The evaluation table as text, best MAP@12 first, for the terminal."""
    table = report["table"].copy()
    header = f"Evaluation on {report['test_start']} .. {report['test_end']} (customers who bought that week)"
    lines = [header, "=" * len(header)]
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.4f}".format):
        lines.append(table.to_string(index=False))
        spread = report.get("backtest")
        if spread is not None and len(spread):
            metric = M.metric_name("map", report["k"])
            rows = spread[(spread["segment"] == ALL) & (spread["metric"] == metric)]
            lines += ["", f"Back-test {metric} over {int(rows['weeks'].max())} weeks (mean, std, min, max):",
                      rows[["model", "mean", "std", "min", "max"]].to_string(index=False)]
    if report.get("seconds"):
        lines += ["", "time (s): " + ", ".join(f"{what} {s:,.1f}" for what, s in report["seconds"].items())]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("report_path"):
        lines += ["", f"HTML report: {report['report_path']}"]
    return "\n".join(lines)


def default_report_path(config: Config) -> Path:
    return config.path(config.paths.artifacts_dir) / "evaluation" / "report.html"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _bars(ax, frame: pd.DataFrame, title: str) -> None:
    """Grouped bars: one group per index entry, one bar per column."""
    n = max(len(frame.columns), 1)
    width = 0.8 / n
    for i, column in enumerate(frame.columns):
        ax.bar([x + i * width for x in range(len(frame.index))], frame[column].values, width, label=str(column))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(frame.index))])
    ax.set_xticklabels([str(i) for i in frame.index], rotation=20, ha="right")
    ax.set_title(title)
    ax.legend(fontsize=7)


def report_figures(report: Mapping[str, Any]) -> dict[str, str]:
    """title -> base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, metrics, curves = report["k"], report["metrics"], report["curves"]
    overall = metrics[metrics["segment"] == ALL]
    figures = {}

    fig, ax = plt.subplots(figsize=(9, 4))
    wanted = [M.metric_name(m, k) for m in ("map", "recall", "ndcg", "precision", "hit_rate")]
    by_metric = overall[overall["metric"].isin(wanted)].pivot(index="metric", columns="model", values="value")
    _bars(ax, by_metric.reindex(wanted), f"Metrics by model (K={k})")
    figures["Metrics by model"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, curve in curves.groupby("model"):
        ax.plot(curve["k"], curve["recall"], label=name)
    ax.set_xlabel("K"), ax.set_ylabel("Recall@K"), ax.set_title("Recall@K, K = 1..%d" % curves["k"].max())
    ax.axvline(k, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=7)
    figures["Recall@K"] = _png(fig)

    map_k = M.metric_name("map", k)
    segs = metrics[(metrics["metric"] == map_k) & (metrics["segment"] != ALL)]
    if len(segs):
        kinds = sorted({s.split(":", 1)[0] for s in segs["segment"]})
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            part = segs[segs["segment"].str.startswith(kind + ":")]
            _bars(ax, part.pivot(index="segment", columns="model", values="value"), f"{map_k} by {kind}")
        figures["By customer segment"] = _png(fig)

    wide = overall.pivot(index="model", columns="metric", values="value")
    bias, coverage = M.metric_name("popularity_bias", k), M.metric_name("coverage", k)
    if bias in wide and coverage in wide:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].scatter(wide[bias], wide[map_k])
        for name, row in wide.iterrows():
            axes[0].annotate(name, (row[bias], row[map_k]), fontsize=7)
        axes[0].set_xlabel(f"{bias} (1 = only best sellers)"), axes[0].set_ylabel(map_k)
        axes[0].set_title("Accuracy against popularity bias")
        axes[1].barh(wide.index, wide[coverage])
        axes[1].set_title(f"Catalogue coverage@{k}")
        figures["Popularity bias and coverage"] = _png(fig)

    spread = report.get("backtest")
    if spread is not None and len(spread):
        rows = spread[(spread["segment"] == ALL) & (spread["metric"] == map_k)]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.errorbar(rows["model"], rows["mean"], yerr=rows["std"], fmt="o", capsize=4)
        ax.set_title(f"Back-test: {map_k} mean ± std over {int(rows['weeks'].max())} weeks")
        ax.tick_params(axis="x", rotation=20)
        figures["Back-test spread"] = _png(fig)
    return figures


def write_html_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """One self-contained HTML page: the table and the plots as embedded PNGs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = report_figures(report)
    versions = "".join(f"<li>{html.escape(m)}: {html.escape(str(v))}</li>" for m, v in report["models"].items())
    body = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'/>"
        for title, png in figures.items()
    )
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
             "td,th{padding:3px 8px;border:1px solid #ccc}")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>recsys evaluation {report['test_start']}</title>
<style>{style}</style>
</head><body><h1>Evaluation: test week {report['test_start']} .. {report['test_end']}</h1>
<p>Customers who bought in the test week; MAP@{report['k']} as Kaggle's H&amp;M competition defines it.
Customers without a list count as 0.</p><ul>{versions}</ul>
{report['table'].to_html(index=False, float_format=lambda v: f'{v:.4f}')}
{body}</body></html>"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
