# Databricks notebook source
# MAGIC %md
# MAGIC # 01 · Explore the H&M data
# MAGIC
# MAGIC The canonical tables written by `recsys ingest` (articles, customers, transactions): sizes, weekly sales,
# MAGIC customers by age bucket and last week's best sellers. Everything is computed by the `recsys` package;
# MAGIC this notebook only picks the tables and shows the results.
# MAGIC
# MAGIC Widgets: `profile` (`databricks` on a cluster), `overrides` (`key=value;key=value`, like `--set`).

# COMMAND ----------

# The package: installed on the cluster (the bundle's wheel), else the checkout one folder above notebooks/.
import os
import sys

try:
    import recsys  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(".."))

# COMMAND ----------

import datetime as dt

from pyspark.sql import functions as F

from recsys import notebook
from recsys.popularity import age_bucket, popularity
from recsys.split import last_date
from recsys.tables import ARTICLES, CUSTOMERS, TRANSACTIONS

params = notebook.widgets(profile=notebook.default_profile(), overrides="", top_n="5")
config, lake = notebook.open_lakehouse(params)
articles, customers, transactions = lake.read(ARTICLES), lake.read(CUSTOMERS), lake.read(TRANSACTIONS)

# COMMAND ----------

# MAGIC %md ## Tables and their sizes

# COMMAND ----------

sizes = lake.spark.createDataFrame(
    [(name, lake.location(name), lake.read(name).count()) for name in lake.existing()],
    "table string, location string, rows long",
)
notebook.show(sizes, n=50)

# COMMAND ----------

# MAGIC %md ## Sales per week (rows, buyers, articles, share of online sales)

# COMMAND ----------

weekly = (
    transactions.groupBy(F.date_trunc("week", "t_dat").cast("date").alias("week"))
    .agg(
        F.count("*").alias("rows"),
        F.countDistinct("customer_id").alias("customers"),
        F.countDistinct("article_id").alias("articles"),
        F.round(F.avg((F.col("sales_channel_id") == 2).cast("double")), 3).alias("channel2_share"),
    )
    .orderBy(F.desc("week"))
)
notebook.show(weekly, n=12)

# COMMAND ----------

# MAGIC %md ## Customers by age bucket (the project's one age-bucket definition)

# COMMAND ----------

notebook.show(customers.groupBy(age_bucket("age").alias("age_bucket")).count().orderBy("age_bucket"))

# COMMAND ----------

# MAGIC %md ## Last week's best sellers, overall and per index group (the popularity fallback)

# COMMAND ----------

cutoff = last_date(transactions) + dt.timedelta(days=1)
best = popularity(
    transactions, customers, articles, cutoff, config.features.popularity_window_days, int(params["top_n"]),
    config.features.decay_half_life_days,
).where(F.col("segment_type").isin("global", "index_group"))
notebook.show(
    best.join(articles.select("article_id", "prod_name", "product_type_name"), "article_id")
    .select("segment", "rank", "article_id", "prod_name", "product_type_name", F.round("score", 2).alias("score"))
    .orderBy("segment", "rank"),
    n=60,
)
