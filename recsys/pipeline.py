"""The stages in order: ingest -> features -> train -> rank -> evaluate (+ gate) -> score (+ publish).

Dates follow one rule, so nothing leaks. With P the publish date (the day after the newest purchase), E = P -
split.test_days the first day of the evaluation week and A = E - ranker.label_days:

    train      the two-tower model on point-in-time rows before A
    rank       the ranker on candidates as of A, labels = the purchases of A .. E-1
    evaluate   the full system (candidates + ranker), the two-tower alone, the champion and every baseline on
               the week from E; the gate promotes only a challenger that beats every baseline and the champion,
               and records what gets published: the champion's lists, or the best baseline's when no model wins
    score      that choice as of P, with features that include every purchase up to the newest day

Publishing is the last step and one Delta transaction: a failure anywhere before it leaves the published
`recommendations` as they were.

A stage whose inputs did not change since its last success (fingerprints in the `pipeline_state` table, in
the lake with the others, so a job cluster that starts bare resumes where the last run stopped) is skipped
unless `force`.

A run with `drop_day` differs in one way: ingest merges the day's drop file from `paths.landing_dir` into
`transactions` (recsys.drop) instead of reading the raw CSVs again. A day loaded again writes nothing, so every
later stage finds its inputs unchanged and is skipped.

The nightly (`nightly`) is such a run, full once the last full publish is `nightly.full_every_days` old. On the
days between it relists: features for P only, no training, ranking or evaluation, and new lists by the
champion the last gate chose for the customers who bought since the last publish (their candidates changed);
everyone else keeps the list they have. That is what makes a night a fraction of a full run at full size.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recsys.config import Config
from recsys.registry import CHALLENGER, Registry
from recsys.tables import (
    ARTICLES, CUSTOMER_FEATURES, CUSTOMERS, PIPELINE_RUNS, PIPELINE_RUNS_SCHEMA, PIPELINE_STATE, PIPELINE_STATE_SCHEMA,
    RECOMMENDATIONS, TRAINING_EXAMPLES, TRANSACTIONS, Lakehouse,
)

STAGES = ("ingest", "features", "train", "rank", "evaluate", "score")
FULL_RUN_ONLY = ("train", "rank", "evaluate")  # what a relist night leaves to the next full run


class StageFailed(RuntimeError):
    """A stage raised; the message names it, and what stays published."""


@dataclass
class Context:
    config: Config
    lake: Lakehouse
    force: bool = False
    as_of: dt.date | None = None          # publish snapshot (default: the day after the last purchase)
    since: str | None = None              # ingest only the days from here (the big CSV again)
    drop_day: str | None = None           # ingest only this day's drop (YYYY-MM-DD or 'latest'): the nightly
    replace_day: bool = False             # a drop for a day already loaded with other rows replaces it
    nightly: bool = False                 # relist between full runs (`nightly.full_every_days`)
    loaded_day: dt.date | None = None     # the drop's day, once ingested
    results: dict[str, Any] = field(default_factory=dict)
    out: Callable[[str], None] = print

    # -- the dates, derived from the data once it is ingested
    def last_day(self) -> dt.date:
        from recsys.split import last_date

        return last_date(self.lake.read(TRANSACTIONS))

    def publish_as_of(self) -> dt.date:
        from recsys.split import day_after_last_purchase

        return self.as_of or day_after_last_purchase(self.lake.read(TRANSACTIONS))

    def test_start(self) -> dt.date:
        """The evaluation week: the last `test_days` before the publish snapshot."""
        return self.publish_as_of() - dt.timedelta(days=self.config.split.test_days)

    def train_as_of(self) -> dt.date:
        """Where the two-tower's training rows end and the ranker's label window starts."""
        return self.test_start() - dt.timedelta(days=self.config.ranker.label_days)

    def relist_since(self) -> dt.date | None:
        """On a nightly between full runs, the first purchase day whose buyers get new lists; None: a full run.
        Decided once, after ingest (it depends on the publish date the drop moves)."""
        if "relist_since" not in self.results:
            self.results["relist_since"] = _relist_since(self)
        return self.results["relist_since"]


# --- fingerprints: skip work whose inputs did not change ----------------------------------------------------
def load_state(lake: Lakehouse) -> dict[str, str]:
    """stage -> the fingerprint of its last success (empty before the first run)."""
    if not lake.exists(PIPELINE_STATE):
        return {}
    return {row.stage: row.fingerprint for row in lake.read(PIPELINE_STATE).collect()}


def record_success(lake: Lakehouse, stage: str, key: str) -> None:
    """Set `stage`'s row of `pipeline_state` to fingerprint `key` (one MERGE; the other stages' rows stay)."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    lake.upsert(lake.spark.createDataFrame([(stage, key, now)], PIPELINE_STATE_SCHEMA), PIPELINE_STATE, ["stage"])


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _raw_fingerprint(raw_dir: Path) -> str:
    from recsys.tables import RAW_FILES

    files = [raw_dir / name for name in RAW_FILES.values()]
    return _digest([(f.name, f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else (f.name, None) for f in files])


def _versions(lake: Lakehouse, *names: str) -> list[int | None]:
    return [lake.version(name) for name in names]


def _relist_since(ctx: Context) -> dt.date | None:
    """A nightly relists while the last full publish is younger than `nightly.full_every_days` and a gate has
    decided what to publish; from the earlier of the last publish's date and the drop's day (a replaced older
    day relists its buyers too)."""
    from recsys.gate import latest_decision
    from recsys.publish import published_dates

    every = ctx.config.nightly.full_every_days
    if every < 0:
        raise ValueError(f"nightly.full_every_days must be >= 0 (0: every nightly is a full run), got {every}")
    lake = ctx.lake
    if not ctx.nightly or every == 0 or not lake.exists(RECOMMENDATIONS) or latest_decision(lake) is None:
        return None
    dates = published_dates(lake)
    full = dates["full_as_of"]
    if full is None or (ctx.publish_as_of() - full).days >= every:
        return None
    ctx.results["next_full_run"] = full + dt.timedelta(days=every)  # the first publish date that runs in full
    since = dates["as_of"] or full
    day = ctx.loaded_day or _drop_day(ctx)  # a bundle task runs its step alone: the day from the landing folder
    return min(since, day) if day else since


def _drop_day(ctx: Context) -> dt.date | None:
    from recsys import drop

    return drop.resolve_day(ctx.config.landing_dir, ctx.drop_day) if ctx.drop_day else None


def _relist_reason(ctx: Context) -> str:
    return (f"a relist night: the customers who bought since {ctx.relist_since()} get new lists from the champion, "
            f"the others keep theirs; train, rank and evaluate wait for the next full run (publish date "
            f"{ctx.results['next_full_run']} or later, nightly.full_every_days; --full runs one now)")


def _challenger_tower(config: Config) -> str | None:
    """The two-tower version under `challenger`; None before the first training (an outage raises)."""
    return Registry.of(config).alias_version(config.mlflow.registered_model, CHALLENGER)


# --- the stages ---------------------------------------------------------------------------------------------
def stage_ingest(ctx: Context) -> dict[str, Any]:
    """The raw CSVs (all of them, or with `since` the transactions from that day on), or one day's drop."""
    from recsys import drop, ingest

    summary: dict[str, Any] = {}
    if ctx.drop_day:
        loaded = drop.load_day(ctx.lake, ctx.config.landing_dir, ctx.drop_day, replace=ctx.replace_day)
        ctx.loaded_day = loaded.day
        ctx.out(loaded.format())
        summary = {"day": loaded.day.isoformat(), "drop": loaded.outcome}
    else:
        ctx.out(ingest.run(ctx.lake, ctx.config.paths.raw_dir, since=ctx.since).format())
    return {**summary, "rows": ctx.lake.read(TRANSACTIONS).count(), "last_day": ctx.last_day().isoformat()}


def stage_features(ctx: Context) -> dict[str, Any]:
    """Three snapshots: training rows as of A, the evaluation week's start E, the publish date P (a relist: P).

    A's customers are read only for the ranker's label window A .. E-1 and E's only for the evaluation week
    E .. P-1: their customer features are built for those buyers alone (partial snapshots); P's for everyone."""
    from recsys import features

    publish, test_start, train_as_of = ctx.publish_as_of(), ctx.test_start(), ctx.train_as_of()
    if ctx.relist_since():
        snapshots = [features.Snapshot(publish, training=False)]
    else:
        snapshots = [features.Snapshot(train_as_of, training=True, buyers=(train_as_of, test_start)),
                     features.Snapshot(test_start, training=False, buyers=(test_start, publish)),
                     features.Snapshot(publish, training=False)]
    out = {}
    for summary in features.run_snapshots(ctx.lake, snapshots):
        out[summary["as_of"]] = {t: {"rows": v.get("rows"), "seconds": v.get("seconds")}
                                 for t, v in summary["tables"].items()}
        out[summary["as_of"]]["partial"] = summary["partial"]
    return out


def stage_train(ctx: Context) -> dict[str, Any]:
    from recsys import train

    result = train.run(ctx.lake, as_of=ctx.train_as_of().isoformat())
    return {k: result[k] for k in ("run_id", "model_version", "as_of", "refresh", "metrics")}


def stage_rank(ctx: Context) -> dict[str, Any]:
    """The ranker on the challenger two-tower's candidates, label window A .. E-1; registered as challenger."""
    from recsys import two_stage
    from recsys.model import load_encoder

    config = ctx.config
    tower = _challenger_tower(config)
    if tower is None:
        raise ValueError(f"no '{config.mlflow.registered_model}@challenger' in the registry: run the train stage")
    encoder = load_encoder(f"models:/{config.mlflow.registered_model}/{tower}", config.tracking_uri,
                           config.registry_uri)
    fit = two_stage.fit_ranker(ctx.lake, encoder, ctx.test_start())
    ctx.out(two_stage.describe(fit))
    logged = two_stage.log_ranker(config, fit, tower, ctx.test_start())
    return {"ranker_version": logged["version"], "two_tower_version": tower, **fit.facts}


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    """The challenger system, the champion, the two-tower alone and the baselines on the held-out week, through
    one path; then the gate, which also decides what `score` publishes."""
    from recsys import evaluate
    from recsys.metrics import metric_name
    from recsys.report import format_report

    report = evaluate.run(ctx.lake, test_start=ctx.test_start(), gate_challenger=True)
    ctx.out(format_report(report))
    k = ctx.config.evaluation.k
    table = report["table"]
    return {
        "test_start": report["test_start"],
        "report": report.get("report_path"),
        "gate": report["gate"],
        "map_at_k": dict(zip(table["model"], table[metric_name("map", k)].astype(float))),
        "seconds": report.get("seconds", {}),  # where the stage's time went: building the lists, each model
    }


def stage_score(ctx: Context) -> dict[str, Any]:
    from recsys import score

    since = ctx.relist_since()
    if since:
        return score.relist_decided(ctx.lake, since, as_of=ctx.publish_as_of())
    return score.publish_decided(ctx.lake, as_of=ctx.publish_as_of())


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "ingest": stage_ingest,
    "features": stage_features,
    "train": stage_train,
    "rank": stage_rank,
    "evaluate": stage_evaluate,
    "score": stage_score,
}


def fingerprint(stage: str, ctx: Context) -> str:
    """What a stage's output depends on; the same fingerprint means the same output."""
    config, lake = ctx.config, ctx.lake
    if stage == "ingest":
        return _digest(_raw_fingerprint(config.path(config.paths.raw_dir)), ctx.since, config.ingest)
    if stage == "features":  # a relist's snapshots are not a full run's: the mode is part of the key
        return _digest(_versions(lake, ARTICLES, CUSTOMERS, TRANSACTIONS), ctx.publish_as_of(), config.features,
                       ctx.train_as_of(), ctx.relist_since() is not None)
    if stage == "train":  # not the champion a warm refresh starts from: the gate moves it after this stage
        return _digest(_versions(lake, TRAINING_EXAMPLES), ctx.train_as_of(), config.model)
    if stage == "rank":
        return _digest(_challenger_tower(config), ctx.test_start(), config.ranker, config.candidates)
    if stage == "evaluate":
        return _digest(_system(config), ctx.test_start(), config.evaluation, config.scoring, config.candidates)
    return _digest(_decision(lake), _versions(lake, CUSTOMER_FEATURES), config.scoring, config.candidates,
                   ctx.publish_as_of(), ctx.relist_since())


def _system(config: Config) -> Any:
    from recsys.registry import system_versions

    return system_versions(config)


def _decision(lake: Lakehouse) -> Any:
    from recsys.gate import latest_decision

    decision = latest_decision(lake)
    return None if decision is None else {k: decision[k] for k in ("decided_at", "publish", "champion")}


def _outputs_exist(stage: str, lake: Lakehouse) -> bool:
    needed = {"ingest": [TRANSACTIONS], "features": [CUSTOMER_FEATURES], "score": [RECOMMENDATIONS]}
    return all(lake.exists(name) for name in needed.get(stage, []))


def run(config: Config, steps: list[str] | None = None, as_of: str | None = None, force: bool = False,
        from_stage: str | None = None, since: str | None = None, out: Callable[[str], None] = print,
        drop_day: str | None = None, replace_day: bool = False, nightly: bool = False) -> dict:
    """Run the stages in order; returns per stage its status, seconds and summary.

    `drop_day` (YYYY-MM-DD or 'latest'): ingest merges that day's drop instead of reading the raw CSVs.
    `nightly`: relist between full runs (module docstring)."""
    from recsys.spark import described, get_spark, release

    selected = _select(steps, from_stage)
    if since and drop_day:
        raise ValueError("--since re-reads the raw CSVs from a day on, --date loads one day's drop: give one of them")
    if replace_day and not drop_day:
        raise ValueError("--replace-day replaces the day of a drop: give the day with --date")
    lake = Lakehouse(get_spark(config, "recsys-pipeline"), config)
    ctx = Context(config, lake, force=force, as_of=dt.date.fromisoformat(as_of) if as_of else None, since=since,
                  drop_day=drop_day, replace_day=replace_day, nightly=nightly, out=out)
    state = load_state(lake)
    summary: dict[str, Any] = {"run_id": uuid.uuid4().hex[:12]}
    started = time.perf_counter()
    for stage in selected:
        t0, began, before = time.perf_counter(), _now(), lake.versions()
        try:  # the fingerprint reads the registry too: an outage there fails the stage like any other error
            if stage in FULL_RUN_ONLY and ctx.relist_since():
                if not any(summary.get(s, {}).get("status") == "skipped" for s in FULL_RUN_ONLY):
                    out(f"[ nightly] {_relist_reason(ctx)}")
                summary[stage] = {"status": "skipped", "seconds": 0.0}
                out(f"[{stage:>8}] skipped (relist night)")
                record_run(lake, summary["run_id"], stage, began, "skipped", before, None, _relist_reason(ctx))
                continue
            # partial ingests always run: they are idempotent, and cheap next to a fingerprint of their inputs
            key = fingerprint(stage, ctx) if stage != "ingest" or not (since or drop_day) else None
            if key and not force and state.get(stage) == key and _outputs_exist(stage, lake):
                summary[stage] = {"status": "up to date", "seconds": 0.0}
                out(f"[{stage:>8}] up to date (inputs unchanged; --force to redo)")
                record_run(lake, summary["run_id"], stage, began, "up to date", before, None, "inputs unchanged")
                continue
            out(f"[{stage:>8}] running ...")
            with described(lake.spark, stage):
                result = RUNNERS[stage](ctx)
            release(lake.spark)  # what the stage let go of, handed back before the next one grows
        except Exception as exc:
            published = lake.version(RECOMMENDATIONS)
            message = f"{type(exc).__name__}: {exc}"
            try:
                record_run(lake, summary["run_id"], stage, began, "failed", before, None, message)
            except Exception as record_error:  # noqa: BLE001 - the stage's own error is the one to raise
                exc.add_note(f"(and its failure could not be recorded in {PIPELINE_RUNS}: {record_error})")
            raise StageFailed(
                f"stage '{stage}' failed: {message}. The published recommendations are unchanged "
                f"(version {published})."
            ) from exc
        seconds = round(time.perf_counter() - t0, 1)
        summary[stage] = {"status": "done", "seconds": seconds, **_short(result)}
        record_success(lake, stage, fingerprint(stage, ctx))
        headline = _headline(stage, result)
        record_run(lake, summary["run_id"], stage, began, "done", before, _rows(result), headline)
        out(f"[{stage:>8}] done in {seconds:.1f}s  {headline}")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if nightly or drop_day:
        since = ctx.relist_since()
        summary["mode"] = {"relist": True, "since": since.isoformat()} if since else {"relist": False}
    if summary.get("ingest", {}).get("drop") == "unchanged":
        out(_unchanged_day(summary, selected))
    if "score" in selected:
        from recsys import status

        summary["status_page"] = str(status.write_html(lake))
    return summary


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _rows(result: dict[str, Any]) -> int | None:
    """The stage's main output size: published rows, training rows, transactions..."""
    for key in ("rows", "training_rows", "examples"):
        if isinstance(result.get(key), int):
            return result[key]
    return None


def record_run(lake: Lakehouse, run_id: str, stage: str, began: dt.datetime, status: str,
               before: dict[str, int], rows: int | None, message: str) -> None:
    """Append one `pipeline_runs` row: the table versions the stage started from, and those it moved."""
    after = lake.versions()
    written = {name: v for name, v in after.items() if before.get(name) != v and name != PIPELINE_STATE}
    ended = _now()
    row = (run_id, stage, began, ended, status, round((ended - began).total_seconds(), 1), rows,
           json.dumps(before, sort_keys=True), json.dumps(written, sort_keys=True), message[:4000])
    lake.write(lake.spark.createDataFrame([row], PIPELINE_RUNS_SCHEMA), PIPELINE_RUNS, mode="append")


def _unchanged_day(summary: dict[str, Any], selected: list[str]) -> str:
    """What a run whose drop was already loaded did: nothing, or the stages that had not finished before."""
    head = f"nightly {summary['ingest']['day']}: the day was already loaded with the same rows"
    again = [s for s in selected if s != "ingest" and summary[s]["status"] == "done"]
    if again:
        return f"{head}; {', '.join(again)} ran again because their inputs had changed since their last success"
    if set(selected) == set(STAGES):
        return f"{head} and every stage it runs is up to date: nothing new is published"
    return f"{head}; {', '.join(selected)}: nothing changed"


def _select(steps: list[str] | None, from_stage: str | None) -> list[str]:
    unknown = [s for s in (steps or []) + ([from_stage] if from_stage else []) if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    selected = [s for s in STAGES if not steps or s in steps]
    if from_stage:
        selected = [s for s in selected if STAGES.index(s) >= STAGES.index(from_stage)]
    return selected


def _short(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (str, int, float, dict)) and k != "metrics"}


def _headline(stage: str, result: dict[str, Any]) -> str:
    if stage == "ingest":
        day = f"day {result['day']} {result['drop']}; " if "drop" in result else ""
        return f"{day}{result['rows']:,} transactions up to {result['last_day']}"
    if stage == "features":
        return "snapshots " + ", ".join(f"{day} (buyers only)" if tables.get("partial") else day
                                        for day, tables in result.items())
    if stage == "train":
        return (f"two-tower version {result['model_version']} (training rows before {result['as_of']}; "
                f"{result['refresh'].split(':')[0]})")
    if stage == "rank":
        return (f"ranker version {result['ranker_version']} on two-tower {result['two_tower_version']} "
                f"(labels {result['label_window']})")
    if stage == "evaluate":
        best = max(result["map_at_k"].items(), key=lambda kv: kv[1])
        return f"best MAP@K {best[1]:.4f} ({best[0]}); publish: {result['gate']['publish']}"
    if isinstance(result.get("relisted"), int):
        return (f"{result['relisted']:,} customers relisted (bought since {result['relisted_since']}), "
                f"{result['customers'] - result['relisted']:,} kept: {result['customers']:,} x {result.get('k')} "
                f"published ({result.get('published')}, {result.get('model_version')}); "
                f"{result.get('checks', 'checks: n/a')}")
    if isinstance(result.get("customers"), int):
        return (f"{result['customers']:,} customers x {result.get('k')} published ({result.get('published')}, "
                f"{result.get('model_version')}); {result.get('checks', 'checks: n/a')}")
    return "published"


def nightly(config: Config, date: str, force: bool = False, replace_day: bool = False, full: bool = False,
            out: Callable[[str], None] = print) -> dict:
    """Merge day `date`'s drop (YYYY-MM-DD or 'latest') into `transactions`, then the later stages as of the day
    after the newest purchase (the day after `date` when it is the newest). A full run (features, training by
    `model.refresh`, rank, evaluate + gate, score + publish for everyone) when `full` or once the last full
    publish is `nightly.full_every_days` old; otherwise a relist (module docstring). A day already loaded with
    the same rows changes nothing, and says so."""
    return run(config, drop_day=date, force=force, replace_day=replace_day, nightly=not full, out=out)


# --- the demo -----------------------------------------------------------------------------------------------
def demo(config: Config) -> int:
    """Generate the profile's data if absent, run every stage, show a few customers' lists."""
    from recsys import recommend, synth
    from recsys.tables import RAW_FILES

    raw = config.path(config.paths.raw_dir)
    if not all((raw / name).exists() for name in RAW_FILES.values()):
        print(f"[   synth] generating the '{config.profile}' data into {raw} ...")
        stats = synth.generate(config.synth, str(raw))
        print(f"[   synth] done: {json.dumps({k: v for k, v in stats.items() if k != 'paths'}, default=str)}")
    try:
        run(config)
    except StageFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    from recsys.spark import get_spark

    lake = Lakehouse(get_spark(config), config)
    counts = lake.sql("SELECT count(DISTINCT customer_id) AS customers, count(*) AS rows FROM recommendations").first()
    sources = lake.sql("SELECT source, count(*) AS n FROM recommendations GROUP BY source ORDER BY n DESC").collect()
    print(f"\nrecommendations: {counts.customers:,} customers, {counts.rows:,} rows; by source: "
          + ", ".join(f"{r.source} {r.n:,}" for r in sources))
    for customer_id in _sample_customers(lake):
        print()
        print(recommend.format_list(recommend.lookup(lake, customer_id)))
    from recsys.gate import latest_decision

    decision = latest_decision(lake)
    if decision is not None:
        published = ("the full system (candidates + ranker), which beats every baseline"
                     if decision["publish"] == "model" else
                     f"the best baseline ({decision['publish'].split(':', 1)[1]}): no model beat it on the week")
        print(f"\npublished: {published}\n  gate: {decision['reason']}")
    return 0


def _sample_customers(lake: Lakehouse, n: int = 2) -> list[str]:
    """A customer with a model list and a cold-start customer, so both paths show."""
    rows = lake.sql(
        "SELECT customer_id, max(source) AS source FROM recommendations WHERE rank = 1 GROUP BY customer_id"
    )
    picks = []
    for source in [r.source for r in rows.select("source").distinct().orderBy("source").collect()][:n]:
        picks.append(rows.filter(rows.source == source).orderBy("customer_id").first().customer_id)
    return picks
