"""spark-submit entry point: one new day end to end (the day's drop merged into transactions, features, train,
rank, evaluate/gate, score).

Runs `recsys nightly` with this job's arguments (--date DATE|latest required; --replace-day, --force, --profile,
--conf, --set). A failing stage exits non-zero and leaves the published recommendations as they were; a day
already loaded changes nothing. See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("nightly")
