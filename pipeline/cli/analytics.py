"""`docflow analytics`: a company's chunks per minute, as the Flink job wrote them."""

from __future__ import annotations

import asyncio
import sys

import click

from pipeline.analytics import format_windows, read_company_windows
from pipeline.cli.api import EXIT_UNREACHABLE
from pipeline.errors import AnalyticsUnavailable
from pipeline.settings import get_settings


@click.command()
@click.option("--company", required=True, help="Company id whose windows to show.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many windows, newest first."
)
@click.option(
    "--timeout", type=float, default=15.0, show_default=True, help="Seconds to wait for the broker and the topic."
)
def analytics(company: str, limit: int, timeout: float) -> None:
    """Chunks embedded per minute for a company, from analytics.flink (written by the Flink job)."""
    settings = get_settings()
    try:
        result = asyncio.run(read_company_windows(settings, company, timeout))
    except AnalyticsUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if not result.windows:
        click.echo(
            f"no windows yet for company {company} in analytics.flink: a window appears once the Flink job "
            f"(jobs/flink/chunk_counts.py) sees events past its end"
        )
    else:
        shown = result.windows[:limit]
        click.echo(f"company {company}: {len(shown)} of {len(result.windows)} windows, newest first")
        for line in format_windows(shown):
            click.echo(line)
    if not result.complete:
        click.echo(
            f"error: analytics.flink was not read to its end within {timeout:g}s: windows may be missing", err=True
        )
        sys.exit(EXIT_UNREACHABLE)
