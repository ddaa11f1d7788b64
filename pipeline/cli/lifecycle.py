"""`docflow cancel` and `docflow delete`: ending a document through the web API."""

from __future__ import annotations

import click

from pipeline.cli.api import caller_options, client_for, with_api
from pipeline.settings import get_settings


@click.command()
@click.argument("document_ids", nargs=-1, required=True)
@caller_options
def cancel(document_ids: tuple[str, ...], company: str | None, api_key: str | None) -> None:
    """Cancel documents still in progress: their remaining work is skipped, nothing of them is searchable."""
    _end(document_ids, company, api_key, "cancel")


@click.command()
@click.argument("document_ids", nargs=-1, required=True)
@caller_options
def delete(document_ids: tuple[str, ...], company: str | None, api_key: str | None) -> None:
    """Delete documents: their originals and their chunks go; each status stays as a tombstone."""
    _end(document_ids, company, api_key, "delete")


def _end(document_ids: tuple[str, ...], company: str | None, api_key: str | None, how: str) -> None:
    settings = get_settings()

    async def run() -> None:
        async with client_for(settings, company, api_key) as client:
            for document_id in document_ids:
                answer = await getattr(client, how)(document_id)
                click.echo(f"{answer['document_id']}  {answer['state']}")

    with_api(run)
