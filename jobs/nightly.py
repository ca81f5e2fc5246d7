"""spark-submit entry point: one new day end to end (ingest --since DATE, features, train, evaluate/gate, score).

Runs `recsys nightly` with this job's arguments (--date DATE required; --profile, --conf, --set). A failing stage
exits non-zero and leaves the published recommendations as they were. See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("nightly")
