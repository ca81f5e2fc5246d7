"""The two-stage system, the two-tower alone and every baseline on the real last week of H&M purchases.

Needs ../shared/data/hm-real (the real articles and the real last week; never copied into the project). Builds
Kaggle-format CSVs from them in a temporary folder (customers derived from the week's ids: their attributes are
not in that data, so they are empty and every age is 'unknown'), ingests them with `recsys.ingest`, and runs the
pipeline's own functions with the dates of the four fitting days (09-16..19) and the three test days (09-20..22):

    two-tower   point-in-time training rows before A = 09-18 (examples see the customer as of their own day)
    ranker      candidates as of 09-18 (history 09-16..17), labels = the purchases of 09-18..19
    scoring     candidates and features as of 09-20 (all four days), for the test days' buyers
    baselines   fitted on 09-16..19

`published` is what the gate would publish: the full system when it beats every baseline's MAP@12 on this week,
else the best baseline. With --ablation it also measures each candidate source removed in turn, the ranker
against a plain merge of the sources, and the two-tower with and without the history input / the customer-id
embedding. Writes benchmarks/results/real_week.json and the "Real week" section of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/real_week.py [--ablation] [--two-tower-n 50,25] [--popularity-n 12]
        [--ranker-sizes 100x4@0.15] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import parse_args  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "hm-real"
TRAIN_START, TEST_START, TEST_END = dt.date(2020, 9, 16), dt.date(2020, 9, 20), dt.date(2020, 9, 22)
LABEL_DAYS = 2
RESULT = ROOT / "benchmarks" / "results" / "real_week.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Real week"
# candidate settings `--two-tower-n` / `--popularity-n` sweep, and their tables' titles
CANDIDATE_SWEEPS = {"two_tower_n": "The two-tower's candidates per customer",
                    "popularity_n": "The popularity source's candidates per customer"}
HEADLINE = ["map_at_12", "recall_at_12", "ndcg_at_12", "precision_at_12", "hit_rate_at_12", "coverage_at_12",
            "popularity_bias_at_12"]


def write_kaggle_csvs(out: Path) -> dict[str, int]:
    """The real files -> the three Kaggle CSVs, formatted as Kaggle ships them (ids without the leading zero)."""
    import pandas as pd

    from recsys.tables import RAW_COLUMNS, RAW_FILES

    out.mkdir(parents=True, exist_ok=True)
    articles = pd.read_parquet(REAL / "articles.parquet")
    articles["article_id"] = articles["article_id"].astype("int64")
    articles[RAW_COLUMNS["articles"]].to_csv(out / RAW_FILES["articles"], index=False)
    week = pd.read_parquet(REAL / "transactions_2020-09-16_to_22.parquet")
    week["article_id"] = week["article_id"].astype("int64")
    week["price"] = week["price"].astype("float64")
    week[RAW_COLUMNS["transactions"]].to_csv(out / RAW_FILES["transactions"], index=False)
    customers = pd.DataFrame({"customer_id": sorted(week["customer_id"].unique())})
    for column in RAW_COLUMNS["customers"][1:]:
        customers[column] = ""
    customers.to_csv(out / RAW_FILES["customers"], index=False)
    return {"articles": len(articles), "transactions": len(week), "customers": len(customers)}


def settings(work: Path, driver_memory: str) -> list[str]:
    """The `small` profile with the real week's dates: three test days, a two-day label window, and training
    rows that see the customer as of their own day (there are only two days before A)."""
    return [
        f"paths.data_dir={work}", f"paths.raw_dir={work}/raw", f"paths.tables_dir={work}/delta",
        f"paths.artifacts_dir={work}/artifacts", f"paths.checkpoint_dir={work}/checkpoints",
        "split.test_days=3", "split.backtest_weeks=1", f"spark.driver_memory={driver_memory}",
        f"ranker.label_days={LABEL_DAYS}", "features.training_snapshot_days=1",
        "model.validation_days=0",  # two training days: no day to spare for early stopping; fixed epochs
    ]


class Bench:
    """The lake, the test week and the timings of one benchmark run."""

    def __init__(self, work: Path, driver_memory: str):
        from recsys import evaluate, ingest
        from recsys.config import load_config
        from recsys.spark import get_spark
        from recsys.tables import TRANSACTIONS, Lakehouse

        self.config = load_config("small", settings(work, driver_memory))
        self.lake = Lakehouse(get_spark(self.config, "recsys-real-week"), self.config)
        self.timings: dict[str, float] = {}
        self.rows = write_kaggle_csvs(work / "raw")
        if not self.lake.exists(TRANSACTIONS):  # a kept folder is ingested once
            with self.timed("ingest_s"):
                ingest.run(self.lake, str(work / "raw"), today=dt.date(2020, 9, 23))
        self.week = evaluate.load_week(self.lake, TEST_START)
        self.train_as_of = TEST_START - dt.timedelta(days=LABEL_DAYS)

    def timed(self, key: str):
        bench = self

        class Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                bench.timings[key] = round(bench.timings.get(key, 0.0) + time.perf_counter() - self.start, 1)

        return Timer()

    def features(self) -> None:
        from recsys import features

        with self.timed("features_s"):
            features.run(self.lake, as_of=self.train_as_of)
            features.run(self.lake, as_of=TEST_START, training=False)

    def two_tower(self, **model) -> tuple[object, str]:
        """Train a two-tower model as of A (model settings overridden by `model`); (encoder, version)."""
        from recsys import train
        from recsys.model import load_encoder

        with overridden(self.config.model, **model):
            result = train.run(self.lake, as_of=self.train_as_of.isoformat())
        encoder = load_encoder(f"models:/{self.config.mlflow.registered_model}/{result['model_version']}",
                               self.config.tracking_uri, self.config.registry_uri)
        return encoder, str(result["model_version"])

    def two_tower_lists(self, encoder):
        from recsys import score

        return score.recommend(self.lake, encoder, as_of=TEST_START, customers=self.week.target)

    def system(self, encoder, sources: list[str] | None = None, candidates: dict | None = None,
               ranker: dict | None = None):
        """(fit, lists) of the ranker on `sources` (default: the configured ones), the two-tower proposing
        `candidates` settings overriding the configured ones (e.g. two_tower_n), `ranker` settings overriding
        the configured ones (e.g. n_estimators)."""
        from recsys import two_stage

        section = self.config.candidates
        with overridden(section, sources=list(sources) if sources is not None else section.sources,
                        **(candidates or {})), \
                overridden(self.config.ranker, **(ranker or {})):
            fit = two_stage.fit_ranker(self.lake, encoder, TEST_START)
            lists = two_stage.recommend(self.lake, encoder, fit.model, as_of=TEST_START, customers=self.week.target)
            lists = lists.cache()
            lists.count()
        return fit, lists

    def variant(self, encoder, timer: str, **system) -> tuple[object, dict]:
        """`system(encoder, **system)` timed under `timer`, its lists scored and released: (fit, MAP@12 and
        Recall@12 of the lists + fit_system_s)."""
        with self.timed(timer):
            fit, lists = self.system(encoder, **system)
        row = {**_pick(self.scores({"x": lists}).loc["x"]), "fit_system_s": self.timings[timer]}
        lists.unpersist()
        return fit, row

    def ranking_sample(self, encoder, n: int = 200_000):
        """Up to `n` of the test week's ranker rows (pandas): what a booster's prediction is timed on."""
        from recsys import two_stage

        _, rows = two_stage.ranking_rows(self.lake, encoder, TEST_START, self.week.target)
        return rows.limit(n).toPandas()

    def merged(self, encoder):
        from recsys import two_stage

        return two_stage.merged(self.lake, encoder, as_of=TEST_START, customers=self.week.target)

    def scores(self, recommenders: dict) -> "object":
        """Metrics of each recommender on the test days: pandas rows model -> headline metrics ('all')."""
        from recsys import evaluate
        from recsys.spark_metrics import ALL

        metrics, _, _ = evaluate.evaluate_week(self.week, recommenders, self.config, curves=False)
        overall = metrics[metrics["segment"] == ALL]
        return overall.pivot_table(index="model", columns="metric", values="value")

    def baselines(self) -> dict:
        from recsys import baselines
        from recsys.tables import ARTICLES, CUSTOMERS

        out = {}
        for name in self.config.evaluation.baselines:  # one at a time, so each timing is that baseline's own
            with self.timed(f"fit_{name}_s"):
                (recs,) = baselines.recommend(self.config, self.week.train, self.lake.read(CUSTOMERS),
                                              self.lake.read(ARTICLES), self.week.target, TEST_START, [name]).values()
                out[name] = recs.cache()
                out[name].count()
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", action="store_true", help="also each source removed, merge vs ranker, "
                                                                 "two-tower inputs")
    parser.add_argument("--keep", default=None, help="work folder to keep and reuse (default: a temporary one)")
    parser.add_argument("--driver-memory", default="6g", help="Spark driver memory")
    parser.add_argument("--ranker-sizes", default="", help="also the system with rankers of these sizes, "
                        "TREESxDEPTH[@LEARNING_RATE] comma-separated (e.g. 80x6,60x5@0.15), the same two-tower model; "
                        "each booster's prediction timed on the same rows")
    for key in CANDIDATE_SWEEPS:
        source = key.removesuffix("_n").replace("_", "-")
        parser.add_argument(_option(key), default="", help=f"also the system with the {source} source "
                            "proposing each of these numbers of articles per customer (comma-separated), the same "
                            "two-tower model")
    args = parse_args(parser)
    if not REAL.is_dir():
        print(f"skipped: {REAL} not present")
        return 0
    from recsys import two_stage
    from recsys.gate import gate

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="real-week-"))
    started = time.perf_counter()
    try:
        bench = Bench(work, args.driver_memory)
        config = bench.config
        recommenders = bench.baselines()
        bench.features()
        with bench.timed("fit_two_tower_s"):
            encoder, version = bench.two_tower()
        recommenders["two_tower"] = bench.two_tower_lists(encoder)
        with bench.timed("fit_system_s"):
            fit, recommenders["two_stage"] = bench.system(encoder)
        print(two_stage.describe(fit))
        with bench.timed("evaluate_s"):
            table = bench.scores(recommenders)
        scores = {m: dict(row) for m, row in table.iterrows()}
        baselines = {m: v for m, v in scores.items() if m in config.evaluation.baselines}
        decision = gate(config, scores["two_stage"], None, baselines)
        published = "two_stage" if decision.publish == "model" else decision.publish.split(":", 1)[1]
        rows = [{"model": "published", **scores[published]}] + [
            {"model": m, **v} for m, v in sorted(scores.items(), key=lambda kv: -kv[1]["map_at_12"])]
        notes = [
            f"published = {'the two-stage system' if published == 'two_stage' else 'the best baseline ' + published}"
            f" ({decision.reason})",
            f"two-stage: two-tower version {version} trained on point-in-time rows before {bench.train_as_of}; "
            f"ranker: {fit.facts['rows']:,} rows of {fit.facts['customers']:,} customers, candidates as of "
            f"{fit.facts['candidates_as_of']}, labels {fit.facts['label_window']}",
            "customers' attributes are not in the real week's data: every age is 'unknown' (the age features "
            "and the per-age popularity carry nothing here)",
            "cross-check: DATA.md measured recall@12 of 2.4 % for the 12 best sellers of 09-16..19 over "
            "09-20..22; popularity_last_week's recall_at_12 here is the same rule through this project's path",
        ]
        result = {
            "benchmark": "real_week", "date": dt.date.today().isoformat(),
            "machine": f"{os.cpu_count()} cores / 24 GiB (shared with other jobs while measured)",
            "python": platform.python_version(),
            "train_days": f"{TRAIN_START} .. {TEST_START - dt.timedelta(days=1)}",
            "test_days": f"{TEST_START} .. {TEST_END}",
            "rows": {**bench.rows, "train_transactions": bench.week.train.count(),
                     "test_transactions": bench.week.test.count(),
                     "test_customers": int(scores[published]["customers"])},
            "metrics": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "gate": decision.as_dict(),
            "candidates": fit.coverage.round(4).to_dict(orient="records"),
            "feature_importance": fit.model.importances().head(15).round(4).to_dict(orient="records"),
            "notes": notes,
        }
        def save() -> None:  # after the headline and after each ablation variant: a long run keeps what it has
            result["timings"] = {**bench.timings, "total_s": round(time.perf_counter() - started, 1)}
            RESULT.parent.mkdir(parents=True, exist_ok=True)
            RESULT.write_text(json.dumps(result, indent=2, default=str))
            write_section(result)

        save()
        print(json.dumps(result["metrics"], indent=1, default=str), flush=True)
        for key in CANDIDATE_SWEEPS:  # the same two-tower, the ranker refitted on each number of candidates
            sweep = [int(n) for n in getattr(args, key).split(",") if n.strip()]
            if sweep:
                result[key] = [{key: getattr(config.candidates, key), **_pick(scores["two_stage"]),
                                "fit_system_s": bench.timings["fit_system_s"]}]
            for n in sweep:
                _, row = bench.variant(encoder, f"fit_system_{key}_{n}_s", candidates={key: n})
                result[key].append({key: n, **row})
                print(f"{key}: {result[key][-1]}", flush=True)
                save()
        sizes = [size_of(s) for s in args.ranker_sizes.split(",") if s.strip()]
        if sizes:
            sample = bench.ranking_sample(encoder)
            ranker = config.ranker
            result["ranker_sizes"] = [{
                "n_estimators": ranker.n_estimators, "max_depth": ranker.max_depth,
                "learning_rate": ranker.learning_rate, **_pick(scores["two_stage"]),
                "predict_us_per_row": predict_cost(fit.model, sample), "fit_system_s": bench.timings["fit_system_s"]}]
            for size in sizes:
                size = {"learning_rate": ranker.learning_rate, **size}
                timer = "fit_system_{n_estimators}x{max_depth}@{learning_rate}_s".format(**size)
                sized, row = bench.variant(encoder, timer, ranker=size)
                result["ranker_sizes"].append({**size, **row, "predict_us_per_row": predict_cost(sized.model, sample)})
                print(f"ranker size: {result['ranker_sizes'][-1]}", flush=True)
                save()
        if args.ablation:
            result["ablation"] = []
            for row in ablation(bench, encoder, scores):
                result["ablation"].append(row)
                print(f"ablation: {row}", flush=True)
                save()
        print(f"wrote {RESULT} and the '{SECTION}' section of {DOC}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def ablation(bench: Bench, encoder, full: dict):
    """MAP@12 / Recall@12 of the system with each source removed, of a plain merge, and of two-tower variants,
    one row at a time as each is measured."""
    sources = list(bench.config.candidates.sources)
    yield {"variant": "full system", **_pick(full["two_stage"])}
    with bench.timed("ablation_s"):
        for source in sources:
            _, lists = bench.system(encoder, [s for s in sources if s != source])
            yield {"variant": f"without {source}", **_pick(bench.scores({"x": lists}).loc["x"])}
            lists.unpersist()
        yield {"variant": "plain merge of the sources (no ranker)",
               **_pick(bench.scores({"x": bench.merged(encoder)}).loc["x"])}
        yield {"variant": "two-tower alone (history + id)", **_pick(full["two_tower"])}
        for label, model in (("two-tower alone, no history input", {"use_history": False}),
                             ("two-tower alone, no customer-id embedding", {"customer_id_embedding": False})):
            variant, _ = bench.two_tower(**model)
            yield {"variant": label, **_pick(bench.scores({"x": bench.two_tower_lists(variant)}).loc["x"])}


@contextlib.contextmanager
def overridden(section, **values):
    """A config section with `values` set for the block, its own values back afterwards (also on failure)."""
    saved = {key: getattr(section, key) for key in values}
    for key, value in values.items():
        setattr(section, key, value)
    try:
        yield section
    finally:
        for key, value in saved.items():
            setattr(section, key, value)


def _option(key: str) -> str:
    """A candidate sweep's command-line option: two_tower_n -> --two-tower-n."""
    return "--" + key.replace("_", "-")


def size_of(text: str) -> dict:
    """'80x6' / '60x5@0.15' -> ranker settings (the learning rate as configured when not given)."""
    match = re.fullmatch(r"\s*(\d+)x(\d+)(?:@([0-9.]+))?\s*", text)
    if not match:
        raise SystemExit(f"--ranker-sizes: {text!r} is not TREESxDEPTH[@LEARNING_RATE], e.g. 80x6 or 60x5@0.15")
    size = {"n_estimators": int(match[1]), "max_depth": int(match[2])}
    return {**size, "learning_rate": float(match[3])} if match[3] else size


def predict_cost(model, sample, batch: int = 10_000) -> float:
    """Microseconds per row of the booster's prediction on `sample`, in the scoring's batches, on one thread
    (as a Spark task predicts), the best of three passes."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for first in range(0, len(sample), batch):
            model.predict_pandas(sample.iloc[first:first + batch])
        best = min(best, time.perf_counter() - started)
    return round(best / max(len(sample), 1) * 1e6, 3)


def _pick(row) -> dict:
    return {k: round(float(row[k]), 6) for k in ("map_at_12", "recall_at_12")}


def write_section(result: dict) -> None:
    """Replace (or add) this benchmark's section of docs/BENCHMARKS.md; other sections stay as they are."""
    metrics = result["metrics"]
    columns = [c for c in HEADLINE if c in metrics[0]]
    lines = [
        SECTION, "",
        f"The real H&M articles and the real last week of purchases ({result['rows']['transactions']:,} rows, "
        f"`../shared/data/hm-real`, not copied). Fitted on {result['train_days']} "
        f"({result['rows']['train_transactions']:,} rows), evaluated on {result['test_days']} "
        f"({result['rows']['test_transactions']:,} rows, {result['rows']['test_customers']:,} customers who bought). "
        "MAP@12 as Kaggle defines it; customers without a list count as 0. "
        f"Measured {result['date']} on {result['machine']}; reproduce with "
        "`.venv/bin/python benchmarks/real_week.py [--ablation]`.", "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "|".join(["---:"] * len(columns)) + "|",
    ]
    for row in metrics:
        lines.append(f"| {row['model']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    lines += ["", "Candidates (the label window's buyers, as of the ranker's training date): "
              + "; ".join(f"{c['source']} {c['candidates_per_customer']:.1f}/customer, recall {c['recall']:.4f}"
                          for c in result["candidates"]) + "."]
    lines += ["", "Ranker features by gain: " + ", ".join(
        f"{f['feature']} {f['gain_share']:.2f}" for f in result["feature_importance"][:10]) + "."]
    if result.get("ablation"):
        lines += ["", "### Ablation", "", "| variant | map_at_12 | recall_at_12 |", "|---|---:|---:|"]
        lines += [f"| {a['variant']} | {a['map_at_12']:.4f} | {a['recall_at_12']:.4f} |" for a in result["ablation"]]
    for key, title in CANDIDATE_SWEEPS.items():
        if result.get(key):
            lines += ["", f"### {title} (`{_option(key)}`, the same two-tower model)", "",
                      f"| {key} | map_at_12 | recall_at_12 | ranker fit + lists (s) |", "|---:|---:|---:|---:|"]
            lines += [f"| {r[key]} | {r['map_at_12']:.4f} | {r['recall_at_12']:.4f} | {r['fit_system_s']} |"
                      for r in result[key]]
    if result.get("ranker_sizes"):
        lines += ["", "### The ranker's size (`--ranker-sizes`, the same two-tower model and candidates)", "",
                  "| trees | depth | learning rate | map_at_12 | recall_at_12 | prediction (us/row, one thread) "
                  "| ranker fit + lists (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n_estimators']} | {r['max_depth']} | {r['learning_rate']} | {r['map_at_12']:.4f} "
                  f"| {r['recall_at_12']:.4f} | {r['predict_us_per_row']} | {r['fit_system_s']} |"
                  for r in result["ranker_sizes"]]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()) + "."]
    lines += [f"- {note}" for note in result["notes"]]
    section = "\n".join(lines) + "\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
