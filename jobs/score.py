"""spark-submit entry point: top-K recommendations for every customer from the champion -> recommendations.

Same options as `recsys score` (--profile, --conf, --set, and the sub-command's own flags); see docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("score")
