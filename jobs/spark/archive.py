"""Archive every docflow topic to Parquet on HDFS, exactly once (Spark Structured Streaming).

It stands in for the HDFS sink connector of the seeds: every message of the docflow topics
lands once in ``OUTPUT/topic=TOPIC/date=YYYY-MM-DD/part-*.parquet``, with its key, its
JSON value as a string, its Kafka coordinates (topic, partition, offset, timestamp) and
the fields a report groups by (document_id, company_id, chunk_id), parsed from the value.

``date`` is the UTC day of the record's own time (``created_ms``, ``uploaded_ms``,
``at_ms``, ``failed_ms`` or ``window_start_ms``, whichever it has), else of its Kafka
timestamp: a message redelivered a day later still lands on the day it happened.

Exactly once: the Kafka offsets of each micro-batch are written to the checkpoint before
the batch runs, and the file sink lists the files of a batch in ``OUTPUT/_spark_metadata``
only once they are all written. A job killed at any point and started again with the same
``--checkpoint`` re-runs its last batch over the same offsets, and the sink skips a batch it
already committed. Files of a batch that was killed half-way stay on disk but not in the
log: read the archive through Spark at its root (``spark.read.parquet(OUTPUT)``), which
follows the log, never a ``topic=``/``date=`` folder on its own.

It runs in its own virtualenv (jobs/spark/.venv) and never imports docflow: the topics are
an argument, docflow's by default. The Kafka source's jars come from Maven Central through
jobs/spark/pom.xml (``make jobs``) and are passed as local files in ``spark.jars``, so
nothing is downloaded when the job starts.

    jobs/spark/.venv/bin/python jobs/spark/archive.py \\
        --bootstrap-servers 127.0.0.1:9092 \\
        --output hdfs://127.0.0.1:8020/docflow/archive \\
        --checkpoint hdfs://127.0.0.1:8020/docflow/checkpoints/archive

A broker with TLS or SASL: ``--kafka-properties FILE``, the client properties that
``python -m pipeline.broker_security --output FILE`` writes from the DOCFLOW_KAFKA_* settings.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

# Beside this file; on YARN it comes with spark-submit --py-files (jobs/emr/submit.py).
from session import kafka_options, spark_session

# pipeline/topics.py names them; kept here because the job does not import docflow.
DOCFLOW_TOPICS = (
    "documents.raw",
    "chunks.processed",
    "embeddings.ready",
    "documents.status",
    "analytics.flink",
    "documents.dlq",
    "documents.lifecycle",
)
# The record's own time, one per record type (docs/architecture.md, "Topics and records"):
# the first one present dates the message.
EVENT_TIME_FIELDS = ("created_ms", "uploaded_ms", "at_ms", "failed_ms", "window_start_ms")
# Spark's Kafka source and what it needs beside pyspark's own jars (jobs/spark/pom.xml).
KAFKA_JAR_PREFIXES = (
    "spark-sql-kafka-0-10_2.13-",
    "spark-token-provider-kafka-0-10_2.13-",
    "kafka-clients-",
    "commons-pool2-",
)
DEFAULT_JARS_DIR = Path(__file__).resolve().parent / "lib"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Archive docflow's Kafka topics to Parquet (partitioned by topic and UTC date), exactly once "
            "across restarts: restart with the same --checkpoint and --output and nothing is lost or duplicated."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="Kafka brokers, host:port[,host:port].")
    parser.add_argument(
        "--kafka-properties",
        default=None,
        help="Kafka client properties file for a broker with TLS or SASL (security.protocol, sasl.*, ssl.*), as "
        "`python -m pipeline.broker_security --output FILE` writes it; given to the Kafka source as kafka.*. "
        "AWS_MSK_IAM also needs the aws-msk-iam-auth jar beside the Kafka source's.",
    )
    parser.add_argument(
        "--topics", default=",".join(DOCFLOW_TOPICS), help="Comma-separated topics to archive (docflow's by default)."
    )
    parser.add_argument(
        "--output",
        required=True,
        help="Root of the archive, e.g. hdfs://127.0.0.1:8020/docflow/archive (or s3a://, file://). "
        "Read it through Spark at this root: its _spark_metadata log says which files are committed.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Checkpoint location (offsets and commits), e.g. hdfs://127.0.0.1:8020/docflow/checkpoints/archive. "
        "One per --output; keep it to resume where the job stopped.",
    )
    parser.add_argument("--trigger-seconds", type=float, default=30.0, help="Start a micro-batch every N seconds.")
    parser.add_argument(
        "--available-now",
        action="store_true",
        help="Archive what the topics hold now, in as many batches as needed, then stop (for a scheduled catch-up).",
    )
    parser.add_argument(
        "--starting-offsets",
        default="earliest",
        help="Where a new checkpoint starts: earliest, latest, or Spark's JSON of offsets per topic and partition. "
        "Ignored once the checkpoint has offsets.",
    )
    parser.add_argument(
        "--max-offsets-per-trigger",
        type=int,
        default=None,
        help="Most messages per micro-batch (all that is available when unset).",
    )
    parser.add_argument(
        "--fail-on-data-loss",
        choices=("true", "false"),
        default="true",
        help="Fail when messages were deleted (retention) before they were archived, instead of skipping them.",
    )
    parser.add_argument(
        "--jars-dir",
        default=str(DEFAULT_JARS_DIR),
        help="Folder with the Kafka source's jars (make jobs fetches them). Empty: the cluster provides them "
        "(spark-submit --jars on EMR).",
    )
    parser.add_argument(
        "--master",
        default=None,
        help="Spark master; default local[2], or the one spark-submit was given when it launched this script.",
    )
    parser.add_argument("--driver-memory", default="1g", help="Driver heap when this script starts Spark itself.")
    parser.add_argument("--ui-port", type=int, default=None, help="Serve Spark's web UI on this port (off when unset).")
    parser.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any other Spark setting, repeatable, e.g. spark.hadoop.fs.s3a.endpoint=http://127.0.0.1:9000.",
    )
    args = parser.parse_args(argv)
    args.topics = [topic.strip() for topic in args.topics.split(",") if topic.strip()]
    if not args.topics:
        parser.error("--topics names no topic")
    if args.trigger_seconds <= 0:
        parser.error("--trigger-seconds must be positive")
    for setting in args.spark_conf:
        if "=" not in setting:
            parser.error(f"--spark-conf {setting!r} is not KEY=VALUE")
    try:
        args.kafka_options = kafka_options(args.kafka_properties)
    except (OSError, ValueError) as exc:
        parser.error(f"--kafka-properties: {exc}")
    return args


def kafka_jars(jars_dir: str) -> list[str]:
    """The Kafka source's jar files in ``jars_dir``; exits with a hint when one is missing."""
    if not jars_dir:
        return []
    folder = Path(jars_dir)
    jars = []
    for prefix in KAFKA_JAR_PREFIXES:
        found = sorted(folder.glob(f"{prefix}*.jar"))
        if not found:
            sys.exit(f"error: no {prefix}*.jar in {folder}: run `make jobs` (Maven fetches them), or pass --jars-dir")
        jars.append(str(found[-1].resolve()))
    return jars


def spark_conf(args: argparse.Namespace, jars: list[str]) -> dict[str, str]:
    """The archive's own Spark settings (session.py adds what both jobs share)."""
    conf = {
        "spark.ui.enabled": str(args.ui_port is not None).lower(),
        # Few, larger files: one shuffle partition per (topic, date) written in a batch, at most this many.
        "spark.sql.shuffle.partitions": "4",
    }
    if jars:
        conf["spark.jars"] = ",".join(jars)
    if args.ui_port is not None:
        conf["spark.ui.port"] = str(args.ui_port)
    return conf


def archive_rows(kafka: DataFrame) -> DataFrame:
    """What is kept of each Kafka message, and the (topic, date) it is filed under."""
    value = F.col("value").cast("string")
    event_ms = F.coalesce(
        *[F.get_json_object(value, f"$.{field}").try_cast("long") for field in EVENT_TIME_FIELDS],
        F.unix_millis(F.col("timestamp")),
    )
    return kafka.select(
        F.col("key").cast("string").alias("key"),
        value.alias("value"),
        F.col("topic"),
        F.col("partition"),
        F.col("offset"),
        F.col("timestamp").alias("kafka_timestamp"),
        F.get_json_object(value, "$.document_id").alias("document_id"),
        F.get_json_object(value, "$.company_id").alias("company_id"),
        F.get_json_object(value, "$.chunk_id").alias("chunk_id"),
        event_ms.alias("event_ms"),
        F.date_format(F.timestamp_millis(event_ms), "yyyy-MM-dd").alias("date"),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jars = kafka_jars(args.jars_dir)
    began = time.monotonic()
    spark = spark_session(args, "docflow-archive", spark_conf(args, jars))
    spark.sparkContext.setLogLevel("WARN")
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", args.bootstrap_servers)
        .option("subscribe", ",".join(args.topics))
        .option("startingOffsets", args.starting_offsets)
        .option("failOnDataLoss", args.fail_on_data_loss)
        .options(**args.kafka_options)
    )
    if args.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(args.max_offsets_per_trigger))
    writer = (
        archive_rows(reader.load())
        .repartition("topic", "date")
        .writeStream.format("parquet")
        .option("path", args.output)
        .option("checkpointLocation", args.checkpoint)
        .partitionBy("topic", "date")
        .queryName("docflow-archive")
    )
    if args.available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{args.trigger_seconds} seconds")
    query = writer.start()
    print(
        f"archive: started in {time.monotonic() - began:.1f}s: {','.join(args.topics)} from {args.bootstrap_servers}"
        f" to {args.output} (checkpoint {args.checkpoint})",
        flush=True,
    )

    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The handler only takes note: the main loop stops the query between two py4j calls.
        signal.signal(signum, lambda number, frame: stopping.append(number))
    reported: set[int] = set()

    def report_committed_batches() -> None:
        for progress in query.recentProgress:
            # Only a batch that ran has an addBatch time (idle triggers report progress too); its
            # progress comes after its files are in the sink's log: those rows are archived.
            if "addBatch" in progress.durationMs and progress.batchId not in reported:
                reported.add(progress.batchId)
                # JSON per source, {topic: {partition: next offset}}: where the archive is complete up to.
                offsets = ",".join(
                    offset if isinstance(offset, str) else json.dumps(offset, separators=(",", ":"))
                    for offset in (source.endOffset for source in progress.sources)
                )
                print(
                    f"archive: batch {progress.batchId} committed {progress.numInputRows} rows, "
                    f"up to offsets {offsets}",
                    flush=True,
                )

    try:
        while query.isActive and not stopping:
            query.awaitTermination(1)
            report_committed_batches()
        report_committed_batches()
    finally:
        if query.isActive:
            query.stop()
        error = query.exception()
        spark.stop()
    if error is not None:
        print(f"archive: failed: {error}", file=sys.stderr, flush=True)
        return 1
    print("archive: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
