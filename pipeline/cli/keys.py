"""`docflow keys create|list|revoke`: a company's API keys, written to and read from auth.keys.

These talk to Kafka, not to the web API: whoever runs them holds the broker's credentials
and the server secret (DOCFLOW_AUTH_SECRET), as an operator does.
"""

from __future__ import annotations

import sys

import click

from pipeline import api_keys
from pipeline.cli.api import EXIT_FAILED, EXIT_UNREACHABLE, run_or_exit, utc_time
from pipeline.errors import KeyStoreUnavailable
from pipeline.settings import get_settings

UNAVAILABLE = {KeyStoreUnavailable: EXIT_UNREACHABLE}


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (every web worker sees a change within seconds)."""


@keys.command()
@click.option("--company", required=True, help="Company the key acts as.")
@click.option("--name", default="", help="What the key is for (shown by `keys list`).")
def create(company: str, name: str) -> None:
    """Create a key and print it: the only time it is shown."""
    settings = get_settings()
    try:
        created = api_keys.new_key(api_keys.server_secret(settings), company, name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    run_or_exit(api_keys.publish(settings, created.record), UNAVAILABLE)
    click.echo(created.key)
    click.echo(f"key {created.record.key_id} for company {company}: store it now, it is not shown again", err=True)


@keys.command("list")
@click.option("--company", required=True, help="Company whose keys to list.")
def list_keys(company: str) -> None:
    """List a company's keys (ids, names, dates; never the keys)."""
    ring = run_or_exit(api_keys.read_keys(get_settings()), UNAVAILABLE)
    click.echo(f"{'key_id':12}  {'created':23}  {'revoked':23}  name")
    for record in ring.of_company(company):
        click.echo(
            f"{record.key_id:12}  {utc_time(record.created_ms):23}  {utc_time(record.revoked_ms):23}  {record.name}"
        )


@keys.command()
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key by its id."""
    try:
        record = run_or_exit(api_keys.revoke(get_settings(), key_id), UNAVAILABLE)
    except KeyError:
        click.echo(f"error: no key {key_id}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"key {key_id} of company {record.company_id} revoked at {utc_time(record.revoked_ms)}")
