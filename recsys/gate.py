"""The champion gate: a challenger is promoted, and a model's lists published, only when it beats every
baseline on the same week; `gate_decisions` records what `score` must publish."""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from pyspark.sql import functions as F

from recsys.config import Config
from recsys.registry import CHALLENGER, CHAMPION, Registry, system_label, system_versions
from recsys.spark_metrics import ALL
from recsys.tables import GATE_DECISIONS, GATE_DECISIONS_SCHEMA, Lakehouse

log = logging.getLogger(__name__)


@dataclass
class GateDecision:
    promote: bool
    metric: str
    challenger: float
    champion: float | None
    required: float | None
    reason: str
    version: str = ""
    best_baseline: str = ""
    baseline: float | None = None
    publish: str = ""                    # "model" or "baseline:<name>": what `score` publishes after this gate
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_baseline(config: Config, baselines: Mapping[str, Mapping[str, float]]) -> tuple[str, float | None]:
    """(name, value) of the baseline with the best `gate_metric` on the evaluated week ('' and None: none)."""
    metric = config.evaluation.gate_metric
    scored = {name: float(m[metric]) for name, m in baselines.items()
              if m.get(metric) is not None and not math.isnan(float(m[metric]))}
    if not scored:
        return "", None
    name = max(sorted(scored), key=lambda n: scored[n])
    return name, scored[name]


def gate(config: Config, challenger_metrics: Mapping[str, float], champion_metrics: Mapping[str, float] | None,
         baselines: Mapping[str, Mapping[str, float]] | None = None) -> GateDecision:
    """Promote only a challenger that beats the best baseline of the same week (by more than
    gate_min_improvement) AND is not worse than the champion beyond gate_tolerance (on `gate_metric`).

    A first model is not promoted just because there is no champion: it still has to beat every heuristic.
    Then `publish` says what the lists should be: the model (the promoted challenger, or the champion kept)
    when it beats the best baseline on this week, else that baseline.
    """
    ev = config.evaluation
    metric = ev.gate_metric
    name, bar = best_baseline(config, baselines or {})
    value = challenger_metrics.get(metric)
    champion = None if champion_metrics is None else champion_metrics.get(metric)
    champion = None if champion is None or math.isnan(float(champion)) else float(champion)

    def decide(promote: bool, required: float | None, reason: str, value: float) -> GateDecision:
        kept = value if promote else champion
        publish = "model" if kept is not None and (bar is None or kept > bar) else f"baseline:{name}"
        if kept is None and bar is None:
            publish = ""  # nothing evaluated that could be published
        return GateDecision(promote, metric, value, champion, required, reason, best_baseline=name, baseline=bar,
                            publish=publish)

    if value is None or math.isnan(float(value)):
        return decide(False, None, f"challenger has no {metric}", math.nan)
    value = float(value)
    if bar is not None and not value > bar + ev.gate_min_improvement + 1e-12:
        return decide(False, bar + ev.gate_min_improvement,
                      f"{metric} {value:.5f} does not beat the best baseline {name} ({bar:.5f})", value)
    if champion is None:
        return decide(True, bar, f"{metric} {value:.5f} beats the best baseline "
                      f"{name or '(none)'} ({bar if bar is not None else float('nan'):.5f}); no champion yet", value)
    required = champion + ev.gate_min_improvement - ev.gate_tolerance
    promote = value >= required - 1e-12
    verdict = "not worse beyond tolerance" if promote else "worse than the champion beyond tolerance"
    return decide(promote, required, f"{metric} {value:.5f} vs champion {champion:.5f} (needs >= {required:.5f}) "
                  f"and best baseline {name} {bar if bar is not None else float('nan'):.5f}: {verdict}", value)


def promote_if_better(config: Config, challenger_version: str | int, challenger_metrics: Mapping[str, float],
                      champion_metrics: Mapping[str, float] | None,
                      baselines: Mapping[str, Mapping[str, float]] | None = None,
                      models: Mapping[str, str] | None = None) -> GateDecision:
    """Apply `gate`; on promote set the registry alias `champion` on the challenger version of every registered
    model of the system (`models`: registered name -> version; default the two-tower alone). The decision and
    the numbers go to the versions' tags and to their MLflow runs."""
    registry = Registry.of(config)
    client = registry.client
    models = dict(models or {config.mlflow.registered_model: str(challenger_version)})
    decision = gate(config, challenger_metrics, champion_metrics, baselines)
    decision.version = str(challenger_version)
    decision.extra["previous_champion"] = {name: registry.alias_version(name, CHAMPION) for name in models}
    decision.extra["models"] = models
    verdict = "promoted" if decision.promote else "rejected"
    tags = {"gate.decision": verdict, "gate.metric": decision.metric, "gate.reason": decision.reason,
            "gate.challenger": str(decision.challenger), "gate.champion": str(decision.champion),
            "gate.best_baseline": f"{decision.best_baseline} {decision.baseline}", "gate.publish": decision.publish}
    for name, version in models.items():
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, str(version))
        for key, value in {**tags, "gate.previous_champion": str(decision.extra["previous_champion"][name])}.items():
            client.set_model_version_tag(name, str(version), key, value)
        run_id = registry.version(name, version).run_id
        if run_id:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.log_metric(run_id, f"gate_challenger_{decision.metric}", decision.challenger)
            if decision.champion is not None:
                client.log_metric(run_id, f"gate_champion_{decision.metric}", decision.champion)
            if decision.baseline is not None:
                client.log_metric(run_id, f"gate_best_baseline_{decision.metric}", decision.baseline)
            client.log_dict(run_id, decision.as_dict(), "evaluation/gate_decision.json")
    log.info("champion/challenger: version %s %s (%s); publish %s", challenger_version, verdict, decision.reason,
             decision.publish)
    return decision


def apply_gate(lake: Lakehouse, report: Mapping[str, Any], start: dt.date) -> GateDecision:
    """The gate on an evaluated week: promote or not, record what `score` publishes (`gate_decisions`)."""
    from recsys.baselines import BASELINES

    config = lake.config
    systems = system_versions(config)
    if CHALLENGER not in systems:
        raise ValueError("--gate: no challenger in the registry: run `recsys train` and the ranker first")
    overall = report["metrics"][report["metrics"]["segment"] == ALL]
    scores = {m: dict(zip(g["metric"], g["value"].astype(float))) for m, g in overall.groupby("model")}
    if CHALLENGER not in scores:
        raise ValueError("--gate: the challenger was not evaluated: " + "; ".join(report.get("notes", [])))
    same = systems.get(CHAMPION) == systems[CHALLENGER]
    if CHAMPION in systems and not same and CHAMPION not in scores:
        raise ValueError("--gate: the champion must be evaluated on the same week")
    champion_scores = scores[CHALLENGER] if same else scores.get(CHAMPION)
    baseline_scores = {m: v for m, v in scores.items() if m in BASELINES}
    decision = promote_if_better(config, system_label(config, systems[CHALLENGER]), scores[CHALLENGER],
                                 champion_scores, baseline_scores, models=systems[CHALLENGER])
    published = systems[CHALLENGER] if decision.promote else systems.get(CHAMPION, {})
    write_decision(lake, start, decision, published)
    return decision


def describe_gate(gate: Mapping[str, Any]) -> str:
    """One plain sentence: promoted or not, and what gets published."""
    verdict = "promoted to champion" if gate["promote"] else "stays challenger"
    publish = gate["publish"]
    what = ("the champion's lists" if publish == "model" else
            f"the best baseline's lists ({publish.split(':', 1)[1]}): no model beats it on this week"
            if publish.startswith("baseline:") else "nothing")
    return f"gate: {gate['version']} {verdict} ({gate['reason']}); publishing {what}"


def write_decision(lake: Lakehouse, test_start: dt.date, decision: GateDecision, published: Mapping[str, str]
                   ) -> None:
    """Append the gate's decision to `gate_decisions` (one row per evaluation): the numbers compared and what
    `score` must publish. `published`: registered model -> version of the champion system after the gate."""
    row = (test_start, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), decision.metric,
           json.dumps(decision.extra.get("models", {}), sort_keys=True),
           None if math.isnan(decision.challenger) else decision.challenger,
           json.dumps(decision.extra.get("previous_champion", {}), sort_keys=True), decision.champion,
           decision.best_baseline, decision.baseline, decision.promote, decision.publish,
           json.dumps(dict(published), sort_keys=True), decision.reason)
    df = lake.spark.createDataFrame([row], GATE_DECISIONS_SCHEMA)
    lake.write(df, GATE_DECISIONS, mode="append")


def latest_decision(lake: Lakehouse) -> dict[str, Any] | None:
    """The newest row of `gate_decisions` as a dict (model versions parsed), or None before any evaluation."""
    if not lake.exists(GATE_DECISIONS):
        return None
    row = lake.read(GATE_DECISIONS).orderBy(F.desc("decided_at")).limit(1).first()
    if row is None:
        return None
    out = row.asDict()
    for key in ("challenger", "champion_before", "champion"):
        out[key] = json.loads(out[key]) if out.get(key) else {}
    return out
