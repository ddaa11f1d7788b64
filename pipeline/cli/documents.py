"""`docflow upload`, `docflow status`, `docflow list`, `docflow search`: documents through the web API."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import click

from pipeline.cli.api import EXIT_FAILED, caller_options, chunks_progress, client_for, with_api
from pipeline.client import DocflowClient, EventStream, EventStreamClosed
from pipeline.errors import ApiError
from pipeline.records import FINAL_STATES
from pipeline.settings import get_settings


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@caller_options
@click.option("--chunk-size", type=int, default=None)
@click.option("--chunk-overlap", type=int, default=None)
@click.option(
    "--chunk-size-unit", type=click.Choice(["tokens", "chars"]), default=None, help="What the chunk sizes count."
)
@click.option("--title", default=None)
@click.option("--tags", default=None, help="Comma-separated tags.")
@click.option(
    "--key", "document_key", default=None, help="Your own id of the document: an upload with the same key replaces it."
)
@click.option("--wait", is_flag=True, help="Follow the documents until completed or failed.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits.")
def upload(
    paths, company, api_key, chunk_size, chunk_overlap, chunk_size_unit, title, tags, document_key, wait, timeout
) -> None:
    """Upload files through the web API, with a progress bar."""
    settings = get_settings()
    if document_key is not None and len(paths) > 1:
        raise click.UsageError("--key names one document: upload one file with it")
    total_bytes = sum(path.stat().st_size for path in paths)

    async def run() -> int:
        failed = 0
        async with client_for(settings, company, api_key) as client:
            # Listening before uploading: no event of the new documents is missed.
            live = await _LiveProgress.open(client) if wait else None
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
                            document_key=document_key,
                        )
                    except ApiError as exc:
                        if exc.status == 503:
                            raise
                        click.echo(f"\n{path}: refused: {exc.message} ({exc.status} {exc.code})", err=True)
                        failed += 1
                        continue
                    if answer.get("unchanged"):
                        # The same content as the key's current version: nothing was queued, nothing to wait for.
                        click.echo(f"{answer['document_id']}  {path}  unchanged (version {answer['version']})")
                        continue
                    uploaded.append((path, answer["document_id"]))
            for path, document_id in uploaded:
                click.echo(f"{document_id}  {path}")
            if wait:
                statuses = await _wait_all(client, live, {document_id: path for path, document_id in uploaded}, timeout)
                for _, document_id in uploaded:
                    status = statuses[document_id]
                    line = f"{document_id}  {status['state']}  chunks {chunks_progress(status)}"
                    if status["state"] != "completed":
                        failed += 1
                        line += f"  error: {status.get('error')}"
                    click.echo(line)
        return failed

    sys.exit(EXIT_FAILED if with_api(run) else 0)


class _LiveProgress:
    """The company's live events (GET /ws/documents), read from before the uploads on.

    Keeps the latest progress of every document it hears of and the final status of those
    that finish; ``failure`` says why the stream ended early (then --wait polls instead).
    """

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.progress: dict[str, tuple[str, int, int, int | None]] = {}  # state, percent, embedded, total
        self.finals: dict[str, dict] = {}
        self.changed = asyncio.Event()
        self.failure: BaseException | None = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, client: DocflowClient) -> _LiveProgress | None:
        try:
            stream = await client.events().connect()
        except aiohttp.ClientConnectionError:
            return None  # the upload says it: the service is unreachable
        except (ApiError, aiohttp.ClientError, OSError) as exc:
            click.echo(f"live progress is unavailable ({exc}); polling instead", err=True)
            return None
        return cls(stream)

    async def _read(self) -> None:
        try:
            async for event in self.stream:
                document_id = event["document_id"]
                kind = event.get("type")
                if kind == "task_progress":
                    self.progress[document_id] = (
                        event["status"],
                        event["percentage"],
                        event.get("chunks_embedded") or 0,
                        event.get("chunks_total"),
                    )
                elif kind == "task_status":
                    document = event.get("document") or {}
                    if event["current_status"] in FINAL_STATES and document:
                        self.finals[document_id] = document
                    state, percent, embedded, total = self.progress.get(document_id, ("", 0, 0, None))
                    self.progress[document_id] = (event["current_status"], percent, embedded, total)
                self.changed.set()
            raise EventStreamClosed(1000, "the server ended the stream")
        except (EventStreamClosed, aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
            self.failure = exc
            self.changed.set()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.stream.close()


async def _wait_all(
    client: DocflowClient, live: _LiveProgress | None, documents: dict[str, Path], timeout: float
) -> dict[str, dict]:
    """Every document's final status: followed live with a bar each, else (or once the stream ends) polled."""
    if live is None:
        return await client.wait_all(list(documents), timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    board = _Board({document_id: path.name for document_id, path in documents.items()})
    try:
        # A document may have finished before its events could tell (an unchanged version).
        for document_id in documents:
            try:
                status = await client.status(document_id)
            except ApiError as exc:
                if exc.status not in (404, 503):
                    raise
                continue
            if status["state"] in FINAL_STATES:
                live.finals.setdefault(document_id, status)
        while True:
            for document_id in documents:
                if document_id in live.finals:
                    final = live.finals[document_id]
                    percent = 100 if final["state"] == "completed" else live.progress.get(document_id, ("", 0))[1]
                    board.update(document_id, final["state"], percent, final["chunks_embedded"], final["chunks_total"])
                elif document_id in live.progress:
                    board.update(document_id, *live.progress[document_id])
            board.draw()
            pending = [document_id for document_id in documents if document_id not in live.finals]
            if not pending or live.failure is not None:
                break
            live.changed.clear()
            try:
                await asyncio.wait_for(live.changed.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise TimeoutError(f"{len(pending)} documents did not finish within {timeout:.0f}s") from None
    finally:
        board.draw(final=True)
        await live.close()
    finished = {document_id: live.finals[document_id] for document_id in documents if document_id in live.finals}
    if len(finished) < len(documents):
        click.echo(f"live progress ended ({live.failure}); polling instead", err=True)
        rest = [document_id for document_id in documents if document_id not in finished]
        finished.update(await client.wait_all(rest, max(deadline - loop.time(), 1.0)))
    return finished


class _Board:
    """One progress bar per document, over its chunks, redrawn in place on a terminal (stderr)."""

    WIDTH = 24
    INTERVAL = 0.1

    def __init__(self, names: dict[str, str]) -> None:
        self.rows = {document_id: [name, "uploaded", 0, 0, None] for document_id, name in names.items()}
        self.stream = click.get_text_stream("stderr")
        self.tty = self.stream.isatty()
        self.drawn = 0
        self.last = 0.0

    def update(self, document_id: str, state: str, percent: int, embedded: int, total: int | None) -> None:
        self.rows[document_id][1:] = [state, percent, embedded, total]

    def draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not final and now - self.last < self.INTERVAL):
            return
        self.last = now
        lines = []
        for name, state, percent, embedded, total in self.rows.values():
            filled = self.WIDTH * max(0, min(percent, 100)) // 100
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            lines.append(
                f"{name[:32]:32}  [{bar}] {percent:3d}%  {embedded}/{total if total is not None else '?'}  {state}"
            )
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self.drawn = len(lines)


@click.command()
@click.argument("document_id")
@caller_options
def status(document_id: str, company: str | None, api_key: str | None) -> None:
    """Show a document's status."""
    settings = get_settings()

    async def run() -> dict:
        async with client_for(settings, company, api_key) as client:
            return await client.status(document_id)

    answer = with_api(run)
    click.echo(json.dumps(answer, indent=2))
    sys.exit(EXIT_FAILED if answer["state"] == "failed" else 0)


@click.command("list")
@caller_options
def list_documents(company: str | None, api_key: str | None) -> None:
    """List a company's documents."""
    settings = get_settings()

    async def run() -> dict:
        async with client_for(settings, company, api_key) as client:
            return await client.list_all()

    answer = with_api(run)
    click.echo(f"{'document_id':36}  {'state':10}  {'chunks':>11}  filename")
    for doc in answer["documents"]:
        click.echo(f"{doc['document_id']:36}  {doc['state']:10}  {chunks_progress(doc):>11}  {doc['filename']}")
    if answer["partial"]:
        click.echo("(partial: a web worker did not answer)", err=True)


@click.command()
@click.argument("query")
@caller_options
@click.option("--top-k", type=click.IntRange(1, 100), default=5, show_default=True, help="How many chunks.")
@click.option("--tags", default=None, help="Comma-separated tags: only chunks of documents with one of them.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as JSON.")
def search(query: str, company: str | None, api_key: str | None, top_k: int, tags: str | None, as_json: bool) -> None:
    """Search a company's documents: the chunks nearest QUERY, best first."""
    settings = get_settings()
    tag_list = [tag.strip() for tag in tags.split(",") if tag.strip()] if tags else None

    async def run() -> dict:
        async with client_for(settings, company, api_key) as client:
            return await client.search(query, top_k, tags=tag_list)

    answer = with_api(run)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    if not answer["results"]:
        click.echo(f"no chunks found ({answer['took_ms']} ms)")
    for rank, hit in enumerate(answer["results"], start=1):
        source = hit["title"] or hit["filename"]
        click.echo(f"{rank}. {hit['score']:.3f}  {source}, page {hit['page']}  ({hit['document_id']})")
        click.echo(textwrap.indent(textwrap.shorten(hit["text"], 300, placeholder=" ..."), "   "))
