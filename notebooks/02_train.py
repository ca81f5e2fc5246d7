# Databricks notebook source
# MAGIC %md
# MAGIC # 02 · Train the two-tower model interactively
# MAGIC
# MAGIC The stage functions the nightly job runs, one cell each, so a data scientist can change a setting
# MAGIC (`overrides`, e.g. `model.epochs=5;model.learning_rate=0.001`) and look at each result:
# MAGIC
# MAGIC 1. feature snapshot as of the test week's first day (nothing from the test week leaks into training),
# MAGIC 2. training (an MLflow run; the model is registered with the alias `challenger`),
# MAGIC 3. evaluation of the registry's challenger (and champion) against the baselines on the test week.
# MAGIC
# MAGIC Nothing is published and nothing is promoted: the nightly job's gate moves `champion`, and its score
# MAGIC stage republishes `recommendations`. Use a development catalog (the bundle's `dev` target).

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

from recsys import evaluate, features, notebook, train
from recsys.split import default_test_start
from recsys.tables import TRANSACTIONS

params = notebook.widgets(profile=notebook.default_profile(), overrides="", test_start="")
config, lake = notebook.open_lakehouse(params, "recsys-train-notebook")
test_start = params["test_start"] or default_test_start(lake.read(TRANSACTIONS), config.split.test_days).isoformat()
print(f"profile {config.profile}; training on purchases before {test_start}, "
      f"testing on the {config.split.test_days} days from it")

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

# MAGIC %md ## 3 · Evaluate on the test week against the baselines

# COMMAND ----------

report = evaluate.run(lake, test_start=test_start)
print(evaluate.format_report(report))
