"""spark-submit entry point for the pipeline stage `features`.

Feature snapshots at the test week's start and at the publish date, popularity, id maps.

Runs `recsys pipeline --steps features` with this job's arguments (--profile, --conf, --set, --as-of, --force).
See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("pipeline", "--steps", "features")
