"""spark-submit entry point for the pipeline stage `ingest`.

Raw Kaggle CSVs (paths.raw_dir) -> validated Delta tables + quarantine.

Runs `recsys pipeline --steps ingest` with this job's arguments (--profile, --conf, --set, --as-of, --force).
See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("pipeline", "--steps", "ingest")
