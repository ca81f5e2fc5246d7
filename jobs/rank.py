"""spark-submit entry point for the pipeline stage `rank`.

Candidates from every source, then the gradient-boosted ranker that learns from the label window before
the evaluation week; logged to MLflow as the `recsys-ranker` challenger.

Runs `recsys pipeline --steps rank` with this job's arguments (--profile, --conf, --set, --as-of, --force).
See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("pipeline", "--steps", "rank")
