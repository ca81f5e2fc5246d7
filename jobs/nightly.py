"""spark-submit entry point: one new day end to end (ingest --since, features, train, evaluate/gate, score, publish).

Same options as `recsys nightly` (--profile, --conf, --set, and the sub-command's own flags); see docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("nightly")
