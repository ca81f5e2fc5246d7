"""spark-submit entry point: point-in-time customer/article feature snapshots, popularity and id maps.

Same options as `recsys features` (--profile, --conf, --set, and the sub-command's own flags); see docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("features")
