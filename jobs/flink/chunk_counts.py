"""Chunks embedded per company per minute: embeddings.ready -> analytics.flink (docs/architecture.md, "Analytics").

A PyFlink Table API job, plain SQL, no Python UDFs (so no Python worker processes run):

- reads ``embeddings.ready`` as JSON (only company_id, chunk_id and created_ms are
  declared; other fields are ignored, and a message that is not JSON is skipped),
- takes event time from ``created_ms`` with a bounded-out-of-orderness watermark
  (``--watermark-seconds``), tracked per Kafka partition by the source,
- counts the *distinct* chunk ids per company in 1-minute tumbling windows,
- writes ``{timestamp, company_id, window_start_ms, window_end_ms, count}`` as JSON to
  ``analytics.flink``, keyed by the company id's UTF-8 bytes.

Why distinct chunk ids: embeddings.ready is written at-least-once and a chunk's id is
derived from its document and index, so a redelivered copy carries the same chunk_id.
Copies that fall in the same minute (a producer retry carries the very same created_ms)
count once. A chunk re-embedded after a restart in a *later* minute is stamped with that
later created_ms and counts there too: it was embedded again in that minute.

A window is emitted once, when the watermark passes its end: that needs a later event
(created_ms >= window end + watermark bound) on every partition that is not idle. A
partition with no data for ``--idle-timeout-seconds`` stops holding the watermark back; an
event that then arrives behind the watermark for an already emitted window is dropped
(Flink's window TVFs have no allowed lateness), so the published count of a window is final.

Run it with this directory's own virtualenv (apache-flink pins apache-beam and pyarrow
versions that the workers' .venv must not get):

    jobs/flink/.venv/bin/python jobs/flink/chunk_counts.py --bootstrap-servers 127.0.0.1:9092

A broker with TLS or SASL: ``--kafka-properties FILE``, the client properties that
``python -m pipeline.broker_security --output FILE`` writes from the DOCFLOW_KAFKA_* settings.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

JOB_DIR = Path(__file__).resolve().parent
WINDOW = "INTERVAL '1' MINUTE"
# Kafka brokers refuse transactions longer than transaction.max.timeout.ms (15 minutes by
# default); the connector's own default (1 hour) would make every exactly-once commit fail.
TRANSACTION_TIMEOUT_MS = 15 * 60 * 1000
# The SQL connector jar relocates kafka-clients into this package: a class a client property
# names (a JAAS login module, a callback handler) must be named as relocated to be found.
SHADED_KAFKA = "org.apache.flink.kafka.shaded."
# Client properties the job sets from its own arguments; a --kafka-properties file may not.
OWN_PROPERTIES = ("bootstrap.servers", "group.id", "auto.offset.reset", "transaction.timeout.ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chunk_counts.py",
        description=(
            "Count the distinct chunks embedded per company in 1-minute event-time windows "
            "(event time: created_ms) from embeddings.ready and write each closed window to "
            "analytics.flink as JSON {timestamp, company_id, window_start_ms, window_end_ms, count}, "
            "keyed by company_id. "
            "Runs until stopped (Ctrl-C or SIGTERM cancel the job)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kafka = parser.add_argument_group("Kafka")
    kafka.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="Kafka brokers, host:port[,host:port].")
    kafka.add_argument(
        "--kafka-properties",
        type=Path,
        help="Kafka client properties file for a broker with TLS or SASL (security.protocol, sasl.*, ssl.*), as "
        "`python -m pipeline.broker_security --output FILE` writes it; given to the source and sink as properties.*.",
    )
    kafka.add_argument("--source-topic", default="embeddings.ready", help="Topic of ChunkEmbedding JSON values.")
    kafka.add_argument("--sink-topic", default="analytics.flink", help="Topic the window counts go to.")
    kafka.add_argument(
        "--group-id",
        default="docflow-flink-chunk-counts",
        help="Consumer group the source commits its offsets under (on each checkpoint); it is what --starting-offsets "
        "group resumes from and what lag monitoring shows.",
    )
    kafka.add_argument(
        "--starting-offsets",
        default="group",
        type=_starting_offsets,
        help="Where to start reading when no checkpoint is restored: earliest, latest, group (the group's committed "
        "offsets, earliest where it has none) or timestamp:EPOCH_MS (the first record at or after that time).",
    )
    kafka.add_argument(
        "--delivery-guarantee",
        choices=("at-least-once", "exactly-once"),
        default="at-least-once",
        help="at-least-once: a window may be written again after a restart (with the same count); readers keep the "
        "latest message per (company_id, window_start_ms). exactly-once: Kafka transactions committed on each "
        "checkpoint, so readers must use isolation.level=read_committed and see a window only after the "
        "checkpoint that follows it.",
    )
    event_time = parser.add_argument_group("event time")
    event_time.add_argument(
        "--watermark-seconds",
        type=float,
        default=5.0,
        help="Bound of out-of-orderness: an event up to this much older than the newest seen on its partition is "
        "still counted; a window closes this long after an event past its end.",
    )
    event_time.add_argument(
        "--idle-timeout-seconds",
        type=float,
        default=30.0,
        help="A partition without events for this long no longer holds the watermark back (8 partitions keyed by "
        "document: some are often quiet). 0 disables it: then every partition must carry data for windows to close.",
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--jars-dir",
        type=Path,
        default=JOB_DIR / "lib",
        help="Folder of connector jars (the Kafka SQL connector from Maven Central, fetched by "
        "`mvn -f jobs/flink/pom.xml dependency:copy-dependencies`), added through pipeline.jars.",
    )
    runtime.add_argument("--parallelism", type=int, default=1, help="Parallelism of every operator.")
    runtime.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path(".docflow/flink/checkpoints"),
        help="Where checkpoints (window state and source offsets) are kept; they are retained when the job stops.",
    )
    runtime.add_argument(
        "--checkpoint-interval-seconds",
        type=float,
        default=30.0,
        help="Checkpoint interval; 0 disables checkpoints (then nothing is restored and offsets are not committed).",
    )
    runtime.add_argument(
        "--restore",
        default="latest",
        help="latest: resume from the newest complete checkpoint under --checkpoint-dir (open windows and offsets as "
        "they were; --starting-offsets is then ignored), none: start fresh, or a checkpoint/savepoint path.",
    )
    runtime.add_argument("--jvm-heap", default="768m", help="Heap of the JVM that runs the job (local execution).")
    runtime.add_argument(
        "--log-dir", type=Path, default=Path(".docflow/flink/logs"), help="Where Flink's own log file goes."
    )
    runtime.add_argument("--job-name", default="docflow-chunk-counts", help="Name of the Flink job.")
    args = parser.parse_args(argv)
    if args.parallelism < 1:
        parser.error("--parallelism must be at least 1")
    if args.watermark_seconds < 0 or args.idle_timeout_seconds < 0 or args.checkpoint_interval_seconds < 0:
        parser.error("--watermark-seconds, --idle-timeout-seconds and --checkpoint-interval-seconds must be >= 0")
    if args.delivery_guarantee == "exactly-once" and args.checkpoint_interval_seconds == 0:
        parser.error(
            "--delivery-guarantee exactly-once commits on checkpoints: it needs --checkpoint-interval-seconds > 0"
        )
    try:
        args.client_properties = client_properties(args.kafka_properties)
    except (OSError, ValueError) as exc:
        parser.error(f"--kafka-properties {args.kafka_properties}: {exc}")
    return args


def read_properties(text: str) -> dict[str, str]:
    """A java.util.Properties file: key=value (or key: value), # and ! comments, backslash escapes.

    The job's own small reader: it runs in its own venv, and on EMR with only jobs/flink on the
    nodes, so it cannot import docflow. The properties are computed once, by docflow's
    pipeline.broker_security; this only reads them back.
    """
    properties: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        line = line.lstrip()
        if not line or line[0] in "#!":
            continue
        while (len(line) - len(line.rstrip("\\"))) % 2:  # an odd run of backslashes at the end: continued
            line = line[:-1] + next(lines, "").lstrip()
        key, index = _unescaped(line, 0, "=: \t")
        index = len(line) - len(line[index:].lstrip(" \t"))
        if line[index : index + 1] in ("=", ":"):
            index += 1
        properties[key], _ = _unescaped(line[index:].lstrip(" \t"), 0, "")
    return properties


def _unescaped(text: str, index: int, stops: str) -> tuple[str, int]:
    """``text`` from ``index`` up to the first unescaped character of ``stops``, unescaped; and where it stopped."""
    out = []
    while index < len(text) and text[index] not in stops:
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            index += 1
            char = text[index]
            if char == "u" and index + 4 < len(text):
                char, index = chr(int(text[index + 1 : index + 5], 16)), index + 4
            else:
                char = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(char, char)
        out.append(char)
        index += 1
    return "".join(out), index


def client_properties(path: Path | None) -> dict[str, str]:
    """The Kafka client properties of a --kafka-properties file, for the SQL connector's relocated client."""
    if path is None:
        return {}
    properties = read_properties(path.read_text())
    own = sorted(set(properties) & set(OWN_PROPERTIES))
    if own:
        raise ValueError(f"sets {', '.join(own)}, which the job sets from its own arguments")
    if properties.get("sasl.mechanism") == "AWS_MSK_IAM":
        # aws-msk-iam-auth's callback handler implements the unrelocated Kafka interface, so the
        # relocated client refuses it (ClassCastException, aws/aws-msk-iam-auth#190).
        raise ValueError(
            "AWS_MSK_IAM does not work with the shaded flink-sql-connector-kafka: it needs flink-connector-kafka, "
            "kafka-clients and aws-msk-iam-auth (unshaded) in --jars-dir"
        )
    for key, value in properties.items():
        if key == "sasl.jaas.config" or key.endswith(".class"):
            properties[key] = re.sub(r"(?<![\w.])org\.apache\.kafka\.", SHADED_KAFKA + "org.apache.kafka.", value)
    return properties


def _starting_offsets(value: str) -> dict[str, str]:
    """The Kafka SQL connector's startup options for one --starting-offsets value."""
    if value == "earliest":
        return {"scan.startup.mode": "earliest-offset"}
    if value == "latest":
        return {"scan.startup.mode": "latest-offset"}
    if value == "group":
        # Without this fallback a group that never committed fails the job at start.
        return {"scan.startup.mode": "group-offsets", "properties.auto.offset.reset": "earliest"}
    match = re.fullmatch(r"timestamp:(\d+)", value)
    if match:
        return {"scan.startup.mode": "timestamp", "scan.startup.timestamp-millis": match.group(1)}
    raise argparse.ArgumentTypeError(f"expected earliest, latest, group or timestamp:EPOCH_MS, not {value!r}")


def _with_options(options: dict[str, str]) -> str:
    return ",\n  ".join(f"'{key}' = '{_quote(value)}'" for key, value in options.items())


def _quote(value: str) -> str:
    return str(value).replace("'", "''")


def source_ddl(args: argparse.Namespace) -> str:
    options = {
        "connector": "kafka",
        "topic": args.source_topic,
        "properties.bootstrap.servers": args.bootstrap_servers,
        "properties.group.id": args.group_id,
        **{f"properties.{key}": value for key, value in args.client_properties.items()},
        **args.starting_offsets,
        "format": "json",
        # A message that is not JSON (or not an object) is skipped instead of failing the job;
        # a missing field reads as NULL and the view below drops that row.
        "json.ignore-parse-errors": "true",
        "json.fail-on-missing-field": "false",
    }
    # The watermark is pushed into the Kafka source, which tracks it per partition: one
    # partition's backlog does not make another partition's events late.
    return f"""
CREATE TEMPORARY TABLE embeddings_ready (
  company_id STRING,
  chunk_id STRING,
  created_ms BIGINT,
  event_time AS TO_TIMESTAMP_LTZ(created_ms, 3),
  WATERMARK FOR event_time AS event_time - INTERVAL '{args.watermark_seconds:.3f}' SECOND
) WITH (
  {_with_options(options)}
)"""


# Rows without a company, a chunk id or a timestamp cannot be counted anywhere; a NULL
# rowtime would also fail the window operator, so they are dropped before it.
COUNTABLE_VIEW = """
CREATE TEMPORARY VIEW countable_chunks AS
SELECT company_id, chunk_id, event_time
FROM embeddings_ready
WHERE company_id IS NOT NULL AND chunk_id IS NOT NULL AND created_ms IS NOT NULL"""


def sink_ddl(args: argparse.Namespace) -> str:
    options = {
        "connector": "kafka",
        "topic": args.sink_topic,
        "properties.bootstrap.servers": args.bootstrap_servers,
        **{f"properties.{key}": value for key, value in args.client_properties.items()},
        # The message key is the company id's UTF-8 bytes: the topic is keyed by company_id.
        "key.format": "raw",
        "key.fields": "company_id",
        "value.format": "json",
        "value.fields-include": "ALL",
        "sink.delivery-guarantee": args.delivery_guarantee,
    }
    if args.delivery_guarantee == "exactly-once":
        options["sink.transactional-id-prefix"] = f"{args.job_name}-{args.sink_topic}"
        options["properties.transaction.timeout.ms"] = str(TRANSACTION_TIMEOUT_MS)
    return f"""
CREATE TEMPORARY TABLE analytics_flink (
  `timestamp` STRING NOT NULL,
  company_id STRING NOT NULL,
  window_start_ms BIGINT NOT NULL,
  window_end_ms BIGINT NOT NULL,
  `count` BIGINT NOT NULL
) WITH (
  {_with_options(options)}
)"""


# window_start/window_end are TIMESTAMP(3) wall-clock values in the session time zone,
# which main() sets to UTC, so UNIX_TIMESTAMP reads them back as epoch seconds and
# DATE_FORMAT writes the seeds' `timestamp` as UTC with a Z. Minute
# windows start on whole seconds, so seconds * 1000 is exact.
WINDOW_COUNTS = f"""
INSERT INTO analytics_flink
SELECT
  DATE_FORMAT(window_start, 'yyyy-MM-dd''T''HH:mm:ss.SSS''Z''') AS `timestamp`,
  company_id,
  UNIX_TIMESTAMP(CAST(window_start AS STRING), 'yyyy-MM-dd HH:mm:ss.SSS') * 1000 AS window_start_ms,
  UNIX_TIMESTAMP(CAST(window_end AS STRING), 'yyyy-MM-dd HH:mm:ss.SSS') * 1000 AS window_end_ms,
  COUNT(DISTINCT chunk_id) AS `count`
FROM TABLE(TUMBLE(TABLE countable_chunks, DESCRIPTOR(event_time), {WINDOW}))
GROUP BY company_id, window_start, window_end"""


def connector_jars(jars_dir: Path) -> list[Path]:
    jars = sorted(jars_dir.glob("*.jar"))
    if not any(jar.name.startswith("flink-sql-connector-kafka") for jar in jars):
        sys.exit(
            f"error: no flink-sql-connector-kafka jar in {jars_dir}: fetch it from Maven Central with\n"
            f"  mvn -q -B -f {JOB_DIR / 'pom.xml'} dependency:copy-dependencies"
        )
    return jars


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (a chk-N folder with its _metadata) under checkpoint_dir/JOB_ID/."""
    complete = [meta.parent for meta in checkpoint_dir.glob("*/chk-*/_metadata")]
    return max(complete, key=lambda chk: chk.stat().st_mtime, default=None)


def restore_path(args: argparse.Namespace) -> Path | None:
    if args.restore == "none" or args.checkpoint_interval_seconds == 0:
        return None
    if args.restore == "latest":
        return latest_checkpoint(args.checkpoint_dir.resolve())
    path = Path(args.restore).resolve()
    if not path.exists():
        sys.exit(f"error: --restore {path}: no such checkpoint or savepoint")
    return path


def configure(config, args: argparse.Namespace, jars: list[Path], restore_from: Path | None) -> None:
    config.set("pipeline.name", args.job_name)
    config.set("pipeline.jars", ";".join(jar.as_uri() for jar in jars))
    config.set("parallelism.default", str(args.parallelism))
    config.set("table.local-time-zone", "UTC")
    if args.idle_timeout_seconds > 0:
        config.set("table.exec.source.idle-timeout", f"{int(args.idle_timeout_seconds * 1000)} ms")
    if args.checkpoint_interval_seconds > 0:
        config.set("execution.checkpointing.interval", f"{int(args.checkpoint_interval_seconds * 1000)} ms")
        config.set("execution.checkpointing.dir", args.checkpoint_dir.resolve().as_uri())
        # Kept when the job is cancelled (Ctrl-C, SIGTERM) so the next start resumes from it.
        config.set("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
        config.set("execution.checkpointing.num-retained", "3")
    if restore_from is not None:
        config.set("execution.state-recovery.path", restore_from.as_uri())


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    jars = connector_jars(args.jars_dir.resolve())
    restore_from = restore_path(args)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    # The gateway JVM (which runs the job in local execution) reads these when pyflink starts it.
    os.environ["JVM_ARGS"] = f"-Xms{args.jvm_heap} -Xmx{args.jvm_heap}"
    os.environ["FLINK_LOG_DIR"] = str(args.log_dir.resolve())

    from pyflink.table import EnvironmentSettings, TableEnvironment

    table_env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    configure(table_env.get_config(), args, jars, restore_from)
    table_env.execute_sql(source_ddl(args))
    table_env.execute_sql(COUNTABLE_VIEW)
    table_env.execute_sql(sink_ddl(args))
    result = table_env.execute_sql(WINDOW_COUNTS)
    job = result.get_job_client()

    def cancel(signum, _frame):
        print(f"chunk_counts: {signal.Signals(signum).name}: cancelling job {job.get_job_id()}", flush=True)
        try:
            job.cancel().result()
        except Exception as exc:  # the JVM got the signal too (a process-group kill) and is gone already
            print(f"chunk_counts: could not cancel the job cleanly: {type(exc).__name__}", flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    status = str(job.get_job_status().result())
    while status in ("INITIALIZING", "CREATED"):  # submitted, not yet scheduled
        time.sleep(0.1)
        status = str(job.get_job_status().result())
    origin = f"checkpoint {restore_from}" if restore_from else f"offsets {args.starting_offsets}"
    print(
        f"chunk_counts: job {job.get_job_id()} {status} after "
        f"{time.monotonic() - started:.1f}s: {args.source_topic} -> {args.sink_topic} at {args.bootstrap_servers}, "
        f"from {origin}, watermark {args.watermark_seconds:g}s, idle timeout {args.idle_timeout_seconds:g}s, "
        f"{args.delivery_guarantee}, parallelism {args.parallelism}",
        flush=True,
    )
    result.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
