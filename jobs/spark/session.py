"""The SparkSession of docflow's Spark jobs (archive.py, daily_report.py).

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
