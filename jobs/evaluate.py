"""spark-submit entry point: score the challenger against the baselines and promote it to champion if it passes the gate.

Same options as `recsys evaluate` (--profile, --conf, --set, and the sub-command's own flags); see docs/DEPLOY.md.
"""
from recsys.jobs_entry import run

if __name__ == "__main__":
    run("evaluate")
