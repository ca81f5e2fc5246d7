"""Hand-made frames for the declared tables: a test writes the columns it is about, the others get a filler.

`Lakehouse.write` takes exactly a declared table's columns; a frame with two of the 25 article columns gets
the other 23 here: null where the column may be null, else '' or 0 (a numeric column).
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.tables import declared_schema


def with_declared_columns(df: DataFrame, table: str) -> DataFrame:
    def filler(field: T.StructField):
        value = None if field.nullable else "" if isinstance(field.dataType, T.StringType) else 0
        return F.lit(value).cast(field.dataType).alias(field.name)

    return df.select(*[F.col(f.name) if f.name in df.columns else filler(f) for f in declared_schema(table).fields])


def with_units(transactions: DataFrame) -> DataFrame:
    """+ `unit`, the row key's ordinal among identical rows of a day (as ingest numbers them, in row order)."""
    from pyspark.sql import Window

    from recsys.tables import TRANSACTION_KEY

    same = Window.partitionBy(*TRANSACTION_KEY[:-1]).orderBy(F.monotonically_increasing_id())
    return transactions.withColumn("unit", F.row_number().over(same).cast("int"))
