"""spark-submit entry point: raw Kaggle CSVs -> validated Delta tables (articles, customers, transactions) + quarantine.

Same options as `recsys ingest` (--profile, --conf, --set, and the sub-command's own flags); see docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("ingest")
