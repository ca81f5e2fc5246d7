# Databricks notebook source
# MAGIC %md
# MAGIC # 03 · Look up a customer's recommendations
# MAGIC
# MAGIC The published `recommendations` table with article names, next to what the customer bought before, and
# MAGIC how the whole table splits between the model and the popularity fallback.
# MAGIC
# MAGIC Widgets: `customer_id` (empty: the first customer in the table), `profile`, `overrides`.

# COMMAND ----------

# The package: installed on the cluster (the bundle's wheel), else the checkout one folder above notebooks/.
import os
import sys

try:
    import recsys  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(".."))

# COMMAND ----------

from pyspark.sql import functions as F

from recsys import notebook
from recsys.recommend import lookup
from recsys.tables import ARTICLES, RECOMMENDATIONS, TRANSACTIONS

params = notebook.widgets(profile=notebook.default_profile(), overrides="", customer_id="", history="12")
config, lake = notebook.open_lakehouse(params, "recsys-lookup-notebook")
recommendations, articles = lake.read(RECOMMENDATIONS), lake.read(ARTICLES)
customer_id = params["customer_id"] or recommendations.agg(F.min("customer_id")).first()[0]
print(f"customer {customer_id}")

# COMMAND ----------

# MAGIC %md ## The customer's list

# COMMAND ----------

notebook.show(lookup(lake, customer_id), n=config.scoring.k)  # a clear error for an unknown customer

# COMMAND ----------

# MAGIC %md ## What they bought before (latest first)

# COMMAND ----------

history = (
    lake.read(TRANSACTIONS).where(F.col("customer_id") == customer_id)
    .join(articles.select("article_id", "prod_name", "product_type_name", "colour_group_name"), "article_id", "left")
    .select("t_dat", "article_id", "prod_name", "product_type_name", "colour_group_name", "price")
    .orderBy(F.desc("t_dat"), "article_id")
)
notebook.show(history, n=int(params["history"]))

# COMMAND ----------

# MAGIC %md ## The whole table: lists per source and model version

# COMMAND ----------

notebook.show(
    recommendations.groupBy("source", "model_version")
    .agg(F.countDistinct("customer_id").alias("customers"), F.count("*").alias("rows"))
    .orderBy(F.desc("customers"))
)
