"""spark-submit entry point: train the two-tower model, log it to MLflow and register it as the challenger.

Same options as `recsys train` (--profile, --conf, --set, and the sub-command's own flags); see docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("train")
