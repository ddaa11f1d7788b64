"""`docflow kafka|hdfs|milvus start|stop|status`: the local servers, one implementation for all of them."""

from __future__ import annotations

import sys

import click

from pipeline.cli.api import EXIT_UNREACHABLE
from pipeline.errors import LocalServerError
from pipeline.local.hdfs import LocalHdfs
from pipeline.local.kafka import LocalBroker
from pipeline.local.milvus import LocalMilvus
from pipeline.local.server import LocalServer
from pipeline.settings import get_settings


def server_group(server_of: type[LocalServer], description: str) -> click.Group:
    """The start, stop and status commands of one local server."""
    label = server_of.label

    @click.group(label, help=description)
    def group() -> None:
        pass

    @group.command("start")
    def start() -> None:
        """Start the server; returns once it serves."""
        server = server_of(get_settings())
        try:
            started = server.start()
        except LocalServerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_UNREACHABLE)
        state = "started" if started else "already running"
        click.echo(f"{label} {state} at {server.where} (pid {server.pid()}, logs in {server.logs_dir})")

    @group.command("stop")
    def stop() -> None:
        """Stop the server cleanly."""
        server = server_of(get_settings())
        click.echo(f"{label} stopped" if server.stop() else f"{label} was not running")

    @group.command("status")
    def status() -> None:
        """Say whether the server runs and serves, and where; exit 3 when it does not."""
        server = server_of(get_settings())
        pid = server.pid()
        if pid is None:
            click.echo(f"{label} stopped ({server.where})")
            sys.exit(EXIT_UNREACHABLE)
        if not server.serving():
            click.echo(f"{label} process {pid} runs but does not {server.ready_means} yet ({server.where})")
            sys.exit(EXIT_UNREACHABLE)
        click.echo(f"{label} running at {server.where} (pid {pid})")

    return group


kafka = server_group(LocalBroker, "The local Kafka broker (KRaft, single node, data under DOCFLOW_HOME).")
hdfs = server_group(
    LocalHdfs, "The local HDFS (namenode and datanode in one JVM, on 127.0.0.1, data under DOCFLOW_HOME)."
)
milvus = server_group(LocalMilvus, "The local Milvus (milvus-lite's server on 127.0.0.1, data under DOCFLOW_HOME).")
