"""`docflow storage`: the object storage of originals; `sweep` removes orphans (pipeline/storage/sweep.py).

Exit codes as every command's (pipeline/cli/api.py): 0 success, 1 a removal failed or the
sweeper refused, 2 usage or configuration error, 3 the broker or the storage is unreachable.
"""

from __future__ import annotations

import sys

import click

from pipeline.cli.api import EXIT_FAILED, EXIT_UNREACHABLE, run_or_exit
from pipeline.errors import StorageError
from pipeline.settings import Settings, get_settings
from pipeline.storage import open_storage
from pipeline.storage.sweep import SweepRefused, SweepReport, SweepUnavailable, sweep_orphans


def shortest_grace(settings: Settings) -> float:
    """The least --older-than accepted: an upload's two events may take this long after its object is stored."""
    return 2 * (settings.produce_timeout_seconds + 5)


@click.group()
def storage() -> None:
    """The object storage of originals."""


@storage.command()
@click.option(
    "--older-than",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Only objects older than this (default: DOCFLOW_STORAGE_SWEEP_GRACE_SECONDS).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the broker, and for each record while reading the topics.",
)
def sweep(older_than: float | None, dry_run: bool, timeout: float) -> None:
    """Remove stored originals that no event names, once older than the grace."""
    settings = get_settings()
    if older_than is not None and older_than < shortest_grace(settings):
        raise click.BadParameter(
            f"at least {shortest_grace(settings):g}: a younger object may be an upload whose events are on their way",
            param_hint="--older-than",
        )
    report = run_or_exit(
        _sweep(settings, older_than, dry_run, timeout),
        # OSError: a file:// root that cannot be read
        {(SweepUnavailable, StorageError, OSError): EXIT_UNREACHABLE, SweepRefused: EXIT_FAILED},
    )
    for line in report_lines(report):
        click.echo(line)
    for key in report.failed_keys:
        click.echo(f"error: could not remove {key}: {report.errors[key]}", err=True)
    if report.failed:
        sys.exit(EXIT_FAILED)


async def _sweep(settings: Settings, older_than: float | None, dry_run: bool, timeout: float) -> SweepReport:
    async with open_storage(settings) as objects:
        return await sweep_orphans(
            settings, objects, older_than_seconds=older_than, dry_run=dry_run, kafka_timeout_seconds=timeout
        )


def report_lines(report: SweepReport) -> list[str]:
    """What `docflow storage sweep` prints: each orphan, each key left alone, then the summary."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [f"{verb} {key}" for key in (report.orphan_keys if report.dry_run else report.removed_keys)]
    lines += [f"left alone (not company/document/name): {key}" for key in report.unrecognized_keys]
    lines.append(
        f"{report.listed} listed: {report.kept_named} named by an event, "
        f"{report.kept_young} younger than {report.older_than_seconds:g}s, "
        f"{report.orphans} orphans ({report.removed} removed, {report.failed} failed"
        f"{', dry run' if report.dry_run else ''}), {report.unrecognized} left alone"
    )
    return lines
