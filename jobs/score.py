"""spark-submit entry point for the pipeline stage `score`.

Top-K recommendations for every customer from the champion, published in one Delta commit.

Runs `recsys pipeline --steps score` with this job's arguments (--profile, --conf, --set, --as-of, --force).
See docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("pipeline", "--steps", "score")
