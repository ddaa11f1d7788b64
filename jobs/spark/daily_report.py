"""Chunks embedded per document and company on one UTC day, from the archive, to Parquet (Spark batch).

It reads the archive that jobs/spark/archive.py writes, through Spark at the archive's root
(its ``_spark_metadata`` log says which files are committed; Spark prunes to the day's
``topic=embeddings.ready/date=DAY`` folder), and counts the distinct ``chunk_id`` of each
(document_id, company_id): processing is at-least-once upstream, so a chunk embedded twice
(a redelivery) counts once. The day is that of the embedding's ``created_ms``, in UTC.

The report is written to ``OUTPUT/date=DAY/`` (columns document_id, company_id, chunks),
replacing only that day: running it again for a day gives the same report, and every
other day's report stays. OUTPUT may be on HDFS (``hdfs://``), S3 or a local folder
(``file://``). On S3 through Hadoop's S3A connector (``s3a://bucket/prefix``) Spark needs
the ``hadoop-aws`` jar of the Hadoop version pyspark bundles (``pyspark/jars/hadoop-client-api-*.jar``:
3.5.0 for pyspark 4.2.0) and the AWS SDK bundle that hadoop-aws declares, e.g.
``--spark-conf spark.jars=/path/hadoop-aws-3.5.0.jar,/path/bundle-2.x.jar``,
and credentials from the usual AWS sources; ``--spark-conf spark.hadoop.fs.s3a.endpoint=URL``
and ``spark.hadoop.fs.s3a.path.style.access=true`` point it at MinIO. On EMR, ``s3://`` works as is.

    jobs/spark/.venv/bin/python jobs/spark/daily_report.py \\
        --archive hdfs://127.0.0.1:8020/docflow/archive \\
        --output hdfs://127.0.0.1:8020/docflow/reports/chunks-per-document --date 2024-03-15
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

# Beside this file; on YARN it comes with spark-submit --py-files (jobs/emr/submit.py).
from session import spark_session

EMBEDDINGS_TOPIC = "embeddings.ready"


def yesterday_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Count the chunks embedded per (document_id, company_id) on one UTC day, from the archive of "
            "jobs/spark/archive.py, and write them as Parquet to OUTPUT/date=DAY (replacing only that day)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--archive",
        required=True,
        help="Root of the archive (archive.py's --output), e.g. hdfs://127.0.0.1:8020/docflow/archive.",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="Root of the report, e.g. hdfs://127.0.0.1:8020/docflow/reports/chunks-per-document, "
        "s3a://bucket/reports/chunks-per-document (needs the S3A jars, see the module's doc) or file:///path.",
    )
    parser.add_argument(
        "--date",
        type=dt.date.fromisoformat,
        default=yesterday_utc(),
        help="The UTC day to report, YYYY-MM-DD (default: yesterday, UTC).",
    )
    parser.add_argument("--topic", default=EMBEDDINGS_TOPIC, help="The archived topic of ChunkEmbedding events.")
    parser.add_argument(
        "--master",
        default=None,
        help="Spark master; default local[2], or the one spark-submit was given when it launched this script.",
    )
    parser.add_argument("--driver-memory", default="1g", help="Driver heap when this script starts Spark itself.")
    parser.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any other Spark setting, repeatable, e.g. spark.hadoop.fs.s3a.endpoint=http://127.0.0.1:9000.",
    )
    args = parser.parse_args(argv)
    for setting in args.spark_conf:
        if "=" not in setting:
            parser.error(f"--spark-conf {setting!r} is not KEY=VALUE")
    return args


def chunks_per_document(archive: DataFrame, day: dt.date, topic: str = EMBEDDINGS_TOPIC) -> DataFrame:
    """One row per (document_id, company_id) with the number of distinct chunks embedded on ``day``."""
    return (
        archive.where((F.col("topic") == topic) & (F.col("date") == F.lit(day)))
        .where(F.col("document_id").isNotNull() & F.col("chunk_id").isNotNull())
        .groupBy("document_id", "company_id")
        .agg(F.countDistinct("chunk_id").alias("chunks"))
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    spark = spark_session(
        args,
        "docflow-daily-report",
        {
            # Overwrite only the partitions (days) this run writes, never the whole report.
            "spark.sql.sources.partitionOverwriteMode": "dynamic"
        },
    )
    spark.sparkContext.setLogLevel("WARN")
    try:
        report = chunks_per_document(spark.read.parquet(args.archive), args.date, args.topic).cache()
        documents, chunks = report.agg(F.count("*"), F.coalesce(F.sum("chunks"), F.lit(0))).first()
        if documents:
            (
                report.withColumn("date", F.lit(args.date.isoformat()))
                .coalesce(1)  # one day's report is small: one file
                .write.mode("overwrite")
                .partitionBy("date")
                .parquet(args.output)
            )
    finally:
        spark.stop()
    where = f"{args.output}/date={args.date}" if documents else "nothing written"
    print(
        f"daily report {args.date}: {documents} documents, {chunks} chunks -> {where} "
        f"in {time.monotonic() - began:.1f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
