"""What every command that talks to the web API shares: where it is, how its failures exit.

Exit codes: 0 success, 1 a document failed, 2 usage error (click's own), 3 the service is
unreachable, 4 a worker refuses its configuration (it would be unsafe).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import aiohttp
import click

from pipeline.client import DocflowClient
from pipeline.errors import ApiError, KafkaSecurityError
from pipeline.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2  # click's own for bad options; also bad Kafka security settings
EXIT_UNREACHABLE = 3
EXIT_CONFIGURATION = 4


def api_url(settings: Settings) -> str:
    return f"http://{settings.web_host}:{settings.web_port}"


def chunks_progress(status: dict) -> str:
    total = status["chunks_total"]
    return f"{status['chunks_embedded']}/{total if total is not None else '?'}"


def with_api(coroutine_fn):
    """Run an API call; an unreachable service exits 3, an API refusal exits 1."""
    try:
        return asyncio.run(coroutine_fn())
    except aiohttp.ClientConnectionError as exc:
        click.echo(f"error: docflow is unreachable: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except ApiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE if exc.status == 503 else EXIT_FAILED)


def caller_options(command):
    """--company and --api-key: who a command acts as."""
    command = click.option(
        "--api-key", default=None, help="API key (default: DOCFLOW_API_KEY); the company is the key's."
    )(command)
    return click.option(
        "--company", default=None, help="Company id: needed where the service runs without keys, else checked."
    )(command)


def client_for(settings: Settings, company: str | None, api_key: str | None) -> DocflowClient:
    api_key = api_key or settings.api_key or None
    if not company and not api_key:
        raise click.UsageError("give --company, or an API key with --api-key or DOCFLOW_API_KEY")
    return DocflowClient(api_url(settings), company, api_key=api_key)


def run_or_exit(coroutine, exits: dict):
    """Run a command's coroutine; an expected failure (``exits``: error types to exit codes) prints
    its message and exits with its code, and bad Kafka security settings exit as a usage error."""
    try:
        return asyncio.run(coroutine)
    except Exception as exc:
        for errors, code in [*exits.items(), (KafkaSecurityError, EXIT_USAGE)]:
            if isinstance(exc, errors):
                click.echo(f"error: {exc}", err=True)
                sys.exit(code)
        raise


def utc_time(ms: int | None) -> str:
    """An epoch-milliseconds time as the CLI prints it; ``-`` for none."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"
