"""`docflow upload`, `docflow status`, `docflow list`, `docflow search`: documents through the web API."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import click

from pipeline.cli.api import EXIT_FAILED, api_url, chunks_progress, with_api
from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.settings import get_settings


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--company", required=True, help="Company id the documents belong to.")
@click.option("--chunk-size", type=int, default=None)
@click.option("--chunk-overlap", type=int, default=None)
@click.option(
    "--chunk-size-unit", type=click.Choice(["tokens", "chars"]), default=None, help="What the chunk sizes count."
)
@click.option("--title", default=None)
@click.option("--tags", default=None, help="Comma-separated tags.")
@click.option("--wait", is_flag=True, help="Follow the documents until completed or failed.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits.")
def upload(paths, company, chunk_size, chunk_overlap, chunk_size_unit, title, tags, wait, timeout) -> None:
    """Upload files through the web API, with a progress bar."""
    settings = get_settings()
    total_bytes = sum(path.stat().st_size for path in paths)

    async def run() -> int:
        failed = 0
        async with DocflowClient(api_url(settings), company) as client:
            uploaded = []
            with click.progressbar(length=total_bytes, label="uploading", file=sys.stderr) as bar:
                for path in paths:
                    try:
                        answer = await client.upload(
                            path,
                            bar.update,
                            chunk_size=chunk_size,
                            chunk_overlap=chunk_overlap,
                            chunk_size_unit=chunk_size_unit,
                            title=title,
                            tags=tags,
                        )
                    except ApiError as exc:
                        if exc.status == 503:
                            raise
                        click.echo(f"\n{path}: refused: {exc.message} ({exc.status} {exc.code})", err=True)
                        failed += 1
                        continue
                    uploaded.append((path, answer["document_id"]))
            for path, document_id in uploaded:
                click.echo(f"{document_id}  {path}")
            if wait:
                for _, document_id in uploaded:
                    status = await client.wait(document_id, timeout)
                    line = f"{document_id}  {status['state']}  chunks {chunks_progress(status)}"
                    if status["state"] != "completed":
                        failed += 1
                        line += f"  error: {status.get('error')}"
                    click.echo(line)
        return failed

    sys.exit(EXIT_FAILED if with_api(run) else 0)


@click.command()
@click.argument("document_id")
@click.option("--company", required=True, help="Company id the document belongs to.")
def status(document_id: str, company: str) -> None:
    """Show a document's status."""
    settings = get_settings()

    async def run() -> dict:
        async with DocflowClient(api_url(settings), company) as client:
            return await client.status(document_id)

    answer = with_api(run)
    click.echo(json.dumps(answer, indent=2))
    sys.exit(EXIT_FAILED if answer["state"] == "failed" else 0)


@click.command("list")
@click.option("--company", required=True, help="Company id whose documents to list.")
def list_documents(company: str) -> None:
    """List a company's documents."""
    settings = get_settings()

    async def run() -> dict:
        async with DocflowClient(api_url(settings), company) as client:
            return await client.list()

    answer = with_api(run)
    click.echo(f"{'document_id':36}  {'state':10}  {'chunks':>11}  filename")
    for doc in answer["documents"]:
        click.echo(f"{doc['document_id']:36}  {doc['state']:10}  {chunks_progress(doc):>11}  {doc['filename']}")
    if answer.get("partial"):
        click.echo("(partial: a web worker did not answer)", err=True)


@click.command()
@click.argument("query")
@click.option("--company", required=True, help="Company id whose documents to search.")
@click.option("--top-k", type=click.IntRange(1, 100), default=5, show_default=True, help="How many chunks.")
@click.option("--tags", default=None, help="Comma-separated tags: only chunks of documents with one of them.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as JSON.")
def search(query: str, company: str, top_k: int, tags: str | None, as_json: bool) -> None:
    """Search a company's documents: the chunks nearest QUERY, best first."""
    settings = get_settings()
    tag_list = [tag.strip() for tag in tags.split(",") if tag.strip()] if tags else None

    async def run() -> dict:
        async with DocflowClient(api_url(settings), company) as client:
            return await client.search(query, top_k, tags=tag_list)

    answer = with_api(run)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    if not answer["results"]:
        click.echo(f"no chunks found for company {company} ({answer['took_ms']} ms)")
    for rank, hit in enumerate(answer["results"], start=1):
        source = hit["title"] or hit["filename"]
        click.echo(f"{rank}. {hit['score']:.3f}  {source}, page {hit['page']}  ({hit['document_id']})")
        click.echo(textwrap.indent(textwrap.shorten(hit["text"], 300, placeholder=" ..."), "   "))
