"""The ``docflow`` command line (DESIGN §10).

Exit codes: 0 success, 1 a document failed, 2 usage error, 3 the service is unreachable.
"""

from __future__ import annotations

import signal
import sys

import click

from pipeline.broker import BrokerError, LocalBroker
from pipeline.settings import get_settings

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


@click.group()
def main() -> None:
    """docflow: streaming document ingestion on Kafka."""


@main.command()
def up() -> None:
    """Run the local stack in the foreground on embedded defaults; Ctrl-C stops all of it."""
    settings = get_settings()
    broker = LocalBroker(settings)
    try:
        started = broker.start()
    except BrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"kafka at {broker.address}; Ctrl-C stops docflow")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        if started:
            broker.stop()
            click.echo("kafka stopped")


@main.group()
def kafka() -> None:
    """The local Kafka broker (KRaft, single node, data under DOCFLOW_HOME)."""


@kafka.command("start")
def kafka_start() -> None:
    """Start the broker and create the docflow topics."""
    broker = LocalBroker(get_settings())
    try:
        started = broker.start()
    except BrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    state = "started" if started else "already running"
    click.echo(f"kafka {state} at {broker.address} (pid {broker.pid()}, logs in {broker.logs_dir})")


@kafka.command("stop")
def kafka_stop() -> None:
    """Stop the broker cleanly."""
    broker = LocalBroker(get_settings())
    click.echo("kafka stopped" if broker.stop() else "kafka was not running")


@kafka.command("status")
def kafka_status() -> None:
    """Say whether the broker runs, and where."""
    broker = LocalBroker(get_settings())
    pid = broker.pid()
    if pid is None:
        click.echo(f"kafka stopped ({broker.address})")
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"kafka running at {broker.address} (pid {pid})")


if __name__ == "__main__":
    main()
