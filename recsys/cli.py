"""`recsys` command line: one sub-command per pipeline stage, each a thin call into its module.

Global options (before or after the sub-command): `--profile tiny|small|full`, `--conf FILE`, `--set key=value`,
`--verbose` (Spark's and the dependencies' logs and warnings, which a normal run keeps quiet: recsys.console).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from recsys.config import Config, ConfigError, load_config
from recsys.registry import RegistryUnavailable

COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _spark(config: Config, name: str):
    from recsys.spark import get_spark
    from recsys.tables import Lakehouse

    spark = get_spark(config, f"recsys-{name}")
    return spark, Lakehouse(spark, config)


@command("synth")
def _synth(config: Config, args: argparse.Namespace) -> int:
    from recsys import realism, synth

    if args.compare:
        report = realism.compare(args.compare)
        print(realism.format_report(report))
        return 0
    if args.scale:
        config = load_config(args.scale, args.set, args.conf)
    if args.seed is not None:
        config.synth.seed = args.seed
    if args.articles:
        config.synth.articles_path = args.articles
    out = args.out or config.paths.raw_dir
    landing = None if args.out else config.landing_dir  # beside --out, like the default landing_dir
    stats = synth.generate(config.synth, out, drop_days=args.drop_days, landing_dir=landing)
    print(json.dumps(stats, indent=2, default=str))
    return 0


@command("ingest")
def _ingest(config: Config, args: argparse.Namespace) -> int:
    from recsys import ingest

    spark, lake = _spark(config, "ingest")
    report = ingest.run(lake, args.raw or config.paths.raw_dir, since=args.since or config.ingest.since or None)
    print(report.format())
    return 0


@command("features")
def _features(config: Config, args: argparse.Namespace) -> int:
    from recsys import features

    spark, lake = _spark(config, "features")
    summary = features.run(lake, as_of=args.as_of or config.features.as_of or None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


@command("train")
def _train(config: Config, args: argparse.Namespace) -> int:
    from recsys import train

    spark, lake = _spark(config, "train")
    result = train.run(lake, as_of=args.as_of or config.features.as_of or None)
    print(json.dumps(result, indent=2, default=str))
    return 0


@command("score")
def _score(config: Config, args: argparse.Namespace) -> int:
    from recsys import score

    spark, lake = _spark(config, "score")
    if args.model_uri:  # one two-tower model alone, whatever the gate said
        summary = score.run(lake, model_uri=args.model_uri)
    else:
        summary = score.publish_decided(lake, as_of=args.as_of or None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


@command("rank")
def _rank(config: Config, args: argparse.Namespace) -> int:
    from recsys import pipeline

    result = pipeline.run(config, steps=["rank"], as_of=args.as_of, force=True)
    print(json.dumps(result, indent=2, default=str))
    return 0


@command("recommend-popular")
def _popular(config: Config, args: argparse.Namespace) -> int:
    from recsys import recommend

    spark, lake = _spark(config, "recommend-popular")
    summary = recommend.run_popularity(lake, cutoff=args.as_of or None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


@command("recommend")
def _recommend(config: Config, args: argparse.Namespace) -> int:
    if args.spark:  # the Spark path, e.g. for Unity Catalog tables
        from recsys import recommend

        spark, lake = _spark(config, "recommend")
        for customer_id in args.customer_id:
            print(recommend.format_list(recommend.lookup(lake, customer_id)))
        return 0
    from recsys import lookup  # delta-rs + pyarrow: no JVM, answers in well under 2 s

    found = lookup.lookup(config, args.customer_id, k=args.k, version=args.table_version)
    if args.json:
        print(json.dumps([entry.to_dict() for entry in found], indent=2, default=str))
    else:
        print("\n\n".join(lookup.format_list(entry) for entry in found))
    return 0


@command("serve")
def _serve(config: Config, args: argparse.Namespace) -> int:
    from recsys import serve

    if args.no_preload:
        config.serving.preload = False
    if args.workers:
        config.serving.workers = args.workers
    return serve.run(config, host=args.host, port=args.port, verbose=args.verbose)


@command("export-submission")
def _export_submission(config: Config, args: argparse.Namespace) -> int:
    from recsys import recommend

    spark, lake = _spark(config, "export-submission")
    print(json.dumps(recommend.export_submission(lake, args.out), indent=2, default=str))
    return 0


@command("publish")
def _publish(config: Config, args: argparse.Namespace) -> int:
    from recsys import publish

    spark, lake = _spark(config, "publish")
    if args.rollback:
        print(json.dumps(publish.rollback(lake), indent=2, default=str))
        return 0
    for commit in publish.history(lake):  # which model produced which version
        print(json.dumps(commit, default=str))
    return 0


@command("evaluate")
def _evaluate(config: Config, args: argparse.Namespace) -> int:
    from recsys import evaluate
    from recsys.report import format_report

    spark, lake = _spark(config, "evaluate")
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    report = evaluate.run(lake, test_start=args.test_start or config.split.test_start or None, models=models,
                          gate_challenger=args.gate)
    print(format_report(report))
    return 0


@command("pipeline")
def _pipeline(config: Config, args: argparse.Namespace) -> int:
    from recsys import pipeline

    result = pipeline.run(config, steps=args.steps.split(",") if args.steps else None, as_of=args.as_of,
                          force=args.force, from_stage=args.from_stage, since=args.since, drop_day=args.date,
                          replace_day=args.replace_day, nightly=args.nightly)
    print(json.dumps(result, indent=2, default=str))
    return 0


@command("nightly")
def _nightly(config: Config, args: argparse.Namespace) -> int:
    from recsys import pipeline

    result = pipeline.nightly(config, args.date, force=args.force, replace_day=args.replace_day, full=args.full)
    print(json.dumps(result, indent=2, default=str))
    return 0


@command("demo")
def _demo(config: Config, args: argparse.Namespace) -> int:
    from recsys import pipeline

    outcome = pipeline.demo(config)
    if outcome == 0:
        from recsys import status
        from recsys.spark import get_spark
        from recsys.tables import Lakehouse

        lake = Lakehouse(get_spark(config), config)
        state = status.collect(lake)
        print(next_steps(config))
        print(f"  run status   {'.venv/bin/recsys --profile ' + config.profile} status    "
              f"({status.write_html(lake, state)})")
        print("\n" + status.format_text(state))
    return outcome


def next_steps(config: Config) -> str:
    """The demo's last lines: where to look next (the page, one list without Spark, the report, SQL)."""
    from recsys import lookup, serve

    recsys = f".venv/bin/recsys --profile {config.profile}"
    try:
        example = lookup.PublishedVersion(lookup.table_uri(config, lookup.RECOMMENDATIONS)).sample_ids(1)[0]
    except (FileNotFoundError, ValueError, IndexError):
        example = "CUSTOMER_ID"
    report = serve.report_path(config)
    url = f"http://{config.serving.host}:{config.serving.port}/"
    return "\n".join([
        "",
        "next:",
        f"  the page     {recsys} serve    then open {url}?customer={example}",
        f"  one list     {recsys} recommend {example}    (no Spark)",
        f"  the report   {report if report.exists() else '(not written: run evaluate)'}",
        f"  SQL          {recsys} sql \"SELECT source, count(*) AS n FROM recommendations GROUP BY source\"",
    ])


@command("status")
def _status(config: Config, args: argparse.Namespace) -> int:
    from recsys import status

    _, lake = _spark(config, "status")
    state = status.collect(lake)
    print(status.format_text(state))
    print(f"(also in {status.write_html(lake, state)})")
    return 0


@command("sql")
def _sql(config: Config, args: argparse.Namespace) -> int:
    spark, lake = _spark(config, "sql")
    df = lake.sql(args.query)
    rows = df.limit(args.limit).toPandas()
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 70):
        print(rows.to_string(index=False))
    return 0


def drop_options(p: argparse.ArgumentParser, required: bool) -> None:
    """--date / --replace-day: the ingest step merges one day's drop from paths.landing_dir (recsys.drop)."""
    p.add_argument("--date", required=required, default=None,
                   help="load the drop <paths.landing_dir>/transactions/DATE.csv (YYYY-MM-DD, or 'latest': the "
                        "newest file there) instead of the raw CSVs")
    p.add_argument("--replace-day", dest="replace_day", action="store_true",
                   help="the day is already loaded with other rows: replace them with the file's (one MERGE)")


def build_parser() -> argparse.ArgumentParser:
    def options(suppress: bool) -> argparse.ArgumentParser:
        # Sub-commands accept the global options too, without resetting values given before them.
        opts = argparse.ArgumentParser(add_help=False)
        default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
        opts.add_argument("--profile", default=default(None),
                          help="tiny | small | full, or a YAML file (default: small)")
        opts.add_argument("--conf", default=default(None), help="an extra YAML file merged after the profile")
        opts.add_argument("--set", action="append", default=default([]), metavar="KEY=VALUE",
                          help="override a config key")
        opts.add_argument("--verbose", "-v", action="store_true", default=default(False),
                          help="show Spark's and the dependencies' logs and warnings (quiet by default)")
        return opts

    common = options(suppress=True)
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0], parents=[options(False)])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", parents=[common],
                       help="generate H&M-shaped CSVs, or compare them with the real statistics")
    p.add_argument("--scale", choices=["tiny", "small", "full"], default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="output folder (default: paths.raw_dir)")
    p.add_argument("--articles", default=None, help="a real articles.csv or .parquet to use as the catalogue")
    p.add_argument("--compare", default=None, metavar="DIR", help="print the statistics of DIR next to the real ones")
    p.add_argument("--drop-days", dest="drop_days", type=int, default=0, metavar="N",
                   help="also N days after the end, one daily drop each: <landing>/transactions/YYYY-MM-DD.csv "
                        "(paths.landing_dir; beside --out when given)")

    p = sub.add_parser("ingest", parents=[common], help="raw CSVs -> validated Delta tables (+ quarantine)")
    p.add_argument("--raw", default=None, help="folder with the three CSVs (default: paths.raw_dir)")
    p.add_argument("--since", default=None, help="replace only transactions on or after this date")

    p = sub.add_parser("features", parents=[common], help="point-in-time feature tables, popularity, id maps")
    p.add_argument("--as-of", dest="as_of", default=None)

    p = sub.add_parser("train", parents=[common], help="train the two-tower model (MLflow run + registry)")
    p.add_argument("--as-of", dest="as_of", default=None)

    p = sub.add_parser("score", parents=[common],
                       help="publish what the last gate chose (the champion system or the best baseline) for everyone")
    p.add_argument("--model-uri", dest="model_uri", default=None, help="publish this two-tower model alone instead")
    p.add_argument("--as-of", dest="as_of", default=None, help="feature snapshot to score from (default: latest)")

    p = sub.add_parser("rank", parents=[common],
                       help="train the ranker on the challenger's candidates (label window before the test week)")
    p.add_argument("--as-of", dest="as_of", default=None, help="publish snapshot date (default: day after the data)")

    p = sub.add_parser("recommend-popular", parents=[common], help="popularity recommendations for every customer")
    p.add_argument("--as-of", dest="as_of", default=None)

    p = sub.add_parser("recommend", parents=[common], help="print customers' published lists with article names")
    p.add_argument("customer_id", nargs="+")
    p.add_argument("--k", type=int, default=None, help="only the first K of each list")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--table-version", dest="table_version", type=int, default=None,
                   help="read this Delta version of recommendations (default: the latest)")
    p.add_argument("--spark", action="store_true",
                   help="read with Spark (e.g. Unity Catalog tables) instead of delta-rs")

    p = sub.add_parser("serve", parents=[common], help="HTTP API + a page over the published lists (no Spark)")
    p.add_argument("--host", default=None, help="default: serving.host")
    p.add_argument("--port", type=int, default=None, help="default: serving.port")
    p.add_argument("--workers", type=int, default=None, help="uvicorn processes (default: serving.workers)")
    p.add_argument("--no-preload", dest="no_preload", action="store_true",
                   help="read row groups per request instead of holding the version in memory")

    p = sub.add_parser("export-submission", parents=[common], help="published lists -> Kaggle submission CSV")
    p.add_argument("--out", required=True, help="the CSV file to write (customer_id,prediction)")

    p = sub.add_parser("publish", parents=[common],
                       help="recommendations table history; --rollback to the previous run")
    p.add_argument("--rollback", action="store_true", help="restore the previously published run")

    p = sub.add_parser("evaluate", parents=[common], help="Recall/NDCG/MAP@12 of the model against baselines")
    p.add_argument("--test-start", "--test-week", dest="test_start", default=None, help="first day of the test week")
    p.add_argument("--models", default=None,
                   help="comma-separated: baselines (e.g. als,repurchase) and/or challenger,champion,two_tower")
    p.add_argument("--gate", action="store_true",
                   help="then promote the challenger only if it beats every baseline and the champion")

    p = sub.add_parser("pipeline", parents=[common], help="every stage in order (the nightly job)")
    p.add_argument("--steps", default=None, help="comma-separated subset, e.g. features,train,score")
    p.add_argument("--from", dest="from_stage", default=None, help="resume from this stage")
    p.add_argument("--as-of", dest="as_of", default=None, help="publish snapshot date (default: day after the data)")
    p.add_argument("--force", action="store_true", help="recompute stages whose inputs did not change")
    p.add_argument("--since", default=None, help="ingest only the purchases from this date on (incremental)")
    drop_options(p, required=False)
    p.add_argument("--nightly", action="store_true",
                   help="as `recsys nightly`: between full runs (nightly.full_every_days) relist the buyers since "
                        "the last publish and skip train, rank and evaluate (each bundle task runs one step so)")

    p = sub.add_parser("nightly", parents=[common],
                       help="merge day DATE's drop file, then new lists for its buyers, or (weekly) a full run")
    drop_options(p, required=True)
    p.add_argument("--force", action="store_true", help="recompute stages whose inputs did not change")
    p.add_argument("--full", action="store_true",
                   help="a full run (retrain, rank, gate, publish everyone) even if the last is recent")

    sub.add_parser("demo", parents=[common],
                   help="synth + pipeline on the profile's data, then show some recommendations")

    sub.add_parser("status", parents=[common],
                   help="the last run, what is published and its checks, the gate, warnings")
    p = sub.add_parser("sql", parents=[common], help="SQL over the project's tables by name")
    p.add_argument("query")
    p.add_argument("--limit", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recsys import console, progress

    console.configure(args.verbose)
    progress.enable(not args.verbose)
    try:
        config = load_config(args.profile, args.set, args.conf)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        with progress.spark_jobs(args.command):
            return COMMANDS[args.command](config, args)
    except Exception as exc:
        pipeline = sys.modules.get("recsys.pipeline")  # only a pipeline run raises StageFailed
        if pipeline is not None and isinstance(exc, pipeline.StageFailed):
            print(f"pipeline failed: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (ConfigError, FileNotFoundError, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, RegistryUnavailable):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
