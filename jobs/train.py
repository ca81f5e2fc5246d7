"""spark-submit entry point for the pipeline stage `train`.

Train the two-tower model on purchases before the test week; MLflow run, registry alias challenger.

Runs `recsys pipeline --steps train` with this job's arguments (--profile, --conf, --set, --as-of, --force).
See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("pipeline", "--steps", "train")
