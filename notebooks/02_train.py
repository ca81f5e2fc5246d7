# Databricks notebook source
# MAGIC %md
# MAGIC # 02 · Train the two stages interactively
# MAGIC
# MAGIC The stage functions the nightly job runs, one cell each, so a data scientist can change a setting
# MAGIC (`overrides`, e.g. `model.epochs=5;ranker.max_depth=8`) and look at each result:
# MAGIC
# MAGIC 1. feature snapshots: training rows as of A = test start - `ranker.label_days`, and the test week's start
# MAGIC    (nothing from the test week leaks into training),
# MAGIC 2. the two-tower model (an MLflow run; registered with the alias `challenger`),
# MAGIC 3. the ranker on the candidates as of A, labels = the purchases of A .. test start - 1,
# MAGIC 4. evaluation of the challenger system (and the champion, and the two-tower alone) against the baselines.
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

import datetime as dt

from recsys import evaluate, features, notebook, train, two_stage
from recsys.model import load_encoder
from recsys.report import format_report
from recsys.split import default_test_start
from recsys.tables import TRANSACTIONS

params = notebook.widgets(profile=notebook.default_profile(), overrides="", test_start="")
config, lake = notebook.open_lakehouse(params, "recsys-train-notebook")
test_start = params["test_start"] or default_test_start(lake.read(TRANSACTIONS), config.split.test_days).isoformat()
train_as_of = (dt.date.fromisoformat(test_start) - dt.timedelta(days=config.ranker.label_days)).isoformat()
print(f"profile {config.profile}; two-tower trained on purchases before {train_as_of}, ranker labels "
      f"{train_as_of} .. the day before {test_start}, testing on the {config.split.test_days} days from {test_start}")

# COMMAND ----------

# MAGIC %md ## 1 · Features as of A (with training rows) and as of the test start

# COMMAND ----------

feature_summary = {as_of: features.run(lake, as_of=as_of, training=as_of == train_as_of)
                   for as_of in (train_as_of, test_start)}
print(json.dumps(feature_summary, indent=2, default=str))

# COMMAND ----------

# MAGIC %md ## 2 · Train the two-tower model (MLflow run + registry alias `challenger`)

# COMMAND ----------

trained = train.run(lake, as_of=train_as_of)
print(json.dumps(trained["metrics"], indent=2, default=str))

# COMMAND ----------

# MAGIC %md ## 3 · Train the ranker on the two-tower's candidates (+ the other sources)

# COMMAND ----------

encoder = load_encoder(f"models:/{config.mlflow.registered_model}/{trained['model_version']}",
                       config.tracking_uri, config.registry_uri)
ranker = two_stage.fit_ranker(lake, encoder, dt.date.fromisoformat(test_start))
print(two_stage.describe(ranker))
ranker_version = two_stage.log_ranker(config, ranker, trained["model_version"], dt.date.fromisoformat(test_start))

# COMMAND ----------

# MAGIC %md ## 4 · Evaluate on the test week against the baselines

# COMMAND ----------

report = evaluate.run(lake, test_start=test_start)
print(format_report(report))
