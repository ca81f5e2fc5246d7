# Databricks notebook source
# MAGIC %md
# MAGIC # 02 · Train the two-tower model interactively
# MAGIC
# MAGIC The same stage functions the nightly job runs, one cell each, so a data scientist can change a setting
# MAGIC (`overrides`, e.g. `model.epochs=5;model.learning_rate=0.001`) and look at each result:
# MAGIC
# MAGIC 1. feature snapshot as of the test week's first day (nothing from the test week leaks into training),
# MAGIC 2. training (an MLflow run; the model is registered with the alias `challenger`),
# MAGIC 3. scoring with that challenger into `recommendations`,
# MAGIC 4. evaluation of those lists against the baselines on the test week.
# MAGIC
# MAGIC Step 3 republishes `recommendations`: run this notebook on a development catalog (the `dev` target),
# MAGIC not on the production one. Promotion to `champion` is left to the evaluation gate of the nightly job.

# COMMAND ----------

# The package: installed on the cluster (the bundle's wheel), else the checkout one folder above notebooks/.
import os
import sys

try:
    import recsys  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(".."))

# COMMAND ----------

import json

from recsys import evaluate, features, notebook, score, train
from recsys.split import default_test_start
from recsys.tables import TRANSACTIONS

params = notebook.widgets(profile=notebook.default_profile(), overrides="", test_start="")
config, lake = notebook.open_lakehouse(params, "recsys-train-notebook")
test_start = params["test_start"] or default_test_start(lake.read(TRANSACTIONS), config.split.test_days).isoformat()
print(f"profile {config.profile}; training on purchases before {test_start}, testing on the {config.split.test_days} days from it")

# COMMAND ----------

# MAGIC %md ## 1 · Features as of the test start

# COMMAND ----------

feature_summary = features.run(lake, as_of=test_start)
print(json.dumps(feature_summary, indent=2, default=str))

# COMMAND ----------

# MAGIC %md ## 2 · Train (MLflow run + registry alias `challenger`)

# COMMAND ----------

trained = train.run(lake, as_of=test_start)
print(json.dumps(trained["metrics"], indent=2, default=str))

# COMMAND ----------

# MAGIC %md ## 3 · Score every customer with the challenger

# COMMAND ----------

scored = score.run(lake, model_uri=trained["model_uri"], as_of=test_start)
print(json.dumps(scored, indent=2, default=str))

# COMMAND ----------

# MAGIC %md ## 4 · Evaluate on the test week against the baselines

# COMMAND ----------

report = evaluate.run(lake, test_start=test_start)
print(evaluate.format_report(report))
