"""The SparkSession of docflow's Spark jobs (archive.py, daily_report.py), and their Kafka client properties.

A job run as ``jobs/spark/.venv/bin/python jobs/spark/JOB.py`` or through a local
spark-submit finds this module beside it (Python puts the script's folder on sys.path).
On YARN the driver and executors run in containers that get only what spark-submit
ships, so the EMR steps pass this file with ``--py-files`` (jobs/emr/submit.py).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from pyspark.sql import SparkSession


def launched_by_spark_submit() -> bool:
    """Whether spark-submit started this Python (and its JVM), rather than the job itself."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_session(args: argparse.Namespace, app_name: str, conf: Mapping[str, str]) -> SparkSession:
    """A session for a job whose arguments include --master, --driver-memory and --spark-conf.

    ``conf`` is the job's own settings; --spark-conf overrides them and everything else here.
    """
    builder = SparkSession.builder.appName(app_name)
    own_jvm = not launched_by_spark_submit()
    settings: dict[str, str] = {}
    if args.master or own_jvm:
        builder = builder.master(args.master or "local[2]")
    if own_jvm:
        # A JVM this script starts itself: loopback only (SPARK_LOCAL_IP keeps Spark from picking
        # another interface of the host), a modest heap, and no web UI unless the job asks.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings.update(
            {
                "spark.driver.memory": args.driver_memory,
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.ui.enabled": "false",
            }
        )
    settings.update(
        {
            "spark.sql.session.timeZone": "UTC",  # the archive's date partitions and the report's day are UTC days
            "spark.ui.showConsoleProgress": "false",  # the jobs print their own progress lines
            **conf,
            **dict(setting.split("=", 1) for setting in args.spark_conf),
        }
    )
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def kafka_options(path: str | None) -> dict[str, str]:
    """Spark's Kafka source options (kafka.*) from a client properties file (--kafka-properties).

    The file is what ``python -m pipeline.broker_security --output FILE`` writes from docflow's
    DOCFLOW_KAFKA_* settings (security.protocol, sasl.*, ssl.*): the properties are computed
    there, once; the jobs only read them back.
    """
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        properties = read_properties(handle.read())
    if "bootstrap.servers" in properties:
        raise ValueError(f"{path} sets bootstrap.servers, which the job takes from --bootstrap-servers")
    return {f"kafka.{key}": value for key, value in properties.items()}


def read_properties(text: str) -> dict[str, str]:
    """A java.util.Properties file: key=value (or key: value), # and ! comments, backslash escapes.

    A small reader of the jobs' own (jobs/flink/chunk_counts.py has the same one): they run in
    their own venvs, and on EMR with only their own folder on the nodes, so they cannot import docflow.
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
