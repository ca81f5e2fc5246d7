"""spark-submit entry point for the pipeline stage `evaluate`.

Challenger, champion and baselines on the test week, then the gate that promotes the champion.

Runs `recsys pipeline --steps evaluate` with this job's arguments (--profile, --conf, --set, --as-of, --force).
See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("pipeline", "--steps", "evaluate")
