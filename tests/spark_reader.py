"""Print a Parquet dataset's rows as JSON lines, read through Spark (run by jobs/spark/.venv/bin/python).

The tests read what the Spark jobs wrote the way a user must: through Spark at the
dataset's root, so that the file sink's _spark_metadata log decides which files count.
It does not import docflow: it runs in the Spark jobs' virtualenv.

    jobs/spark/.venv/bin/python tests/spark_reader.py hdfs://127.0.0.1:8020/archive [--where "topic = 'x'"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pyspark.sql import SparkSession


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="Root of the Parquet dataset.")
    parser.add_argument("--where", default=None, help="A Spark SQL condition on its rows.")
    parser.add_argument("--columns", default=None, help="Comma-separated columns to print (all by default).")
    args = parser.parse_args()
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("docflow-test-reader")
        .config("spark.driver.memory", "512m")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        rows = spark.read.parquet(args.path)
        if args.where:
            rows = rows.where(args.where)
        if args.columns:
            rows = rows.select(*args.columns.split(","))
        for row in rows.toLocalIterator():
            print(json.dumps(row.asDict(), default=str), flush=False)
    finally:
        spark.stop()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
