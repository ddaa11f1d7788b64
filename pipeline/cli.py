"""The ``docflow`` command line (DESIGN §10).

Exit codes: 0 success, 1 a document failed, 2 usage error, 3 the service is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import aiohttp
import click

from pipeline import stack
from pipeline.analytics import AnalyticsUnavailable, format_windows, read_company_windows
from pipeline.app import ROLES
from pipeline.broker import BrokerError, LocalBroker
from pipeline.client import ApiError, DocflowClient
from pipeline.hdfs import HdfsError, LocalHdfs
from pipeline.settings import get_settings

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


@click.group()
def main() -> None:
    """docflow: streaming document ingestion on Kafka."""


def _api_url(settings) -> str:
    return f"http://{settings.web_host}:{settings.web_port}"


def _chunks(status: dict) -> str:
    total = status["chunks_total"]
    return f"{status['chunks_embedded']}/{total if total is not None else '?'}"


def _with_api(coroutine_fn):
    """Run an API call; an unreachable service exits 3, an API refusal exits 1."""
    try:
        return asyncio.run(coroutine_fn())
    except aiohttp.ClientConnectionError as exc:
        click.echo(f"error: docflow is unreachable: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except ApiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE if exc.status == 503 else EXIT_FAILED)


SAMPLE_DOCUMENT = Path(__file__).parent / "samples" / "welcome.md"


def _follow_sample(settings) -> None:
    """Upload the bundled sample once the web role answers, and report when it completes."""

    async def run() -> None:
        async with DocflowClient(_api_url(settings), "demo") as client:
            for _ in range(600):
                try:
                    if (await client.health()).get("status") == "ok":
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            answer = await client.upload(SAMPLE_DOCUMENT)
            click.echo(f"sample uploaded: {_api_url(settings)}{answer['status_url']}?company_id=demo")
            status = await client.wait(answer["document_id"])
            click.echo(
                f"sample {status['state']}: {status['chunks_embedded']}/{status['chunks_total']} chunks embedded"
                + (f" ({status['error']})" if status.get("error") else "")
            )

    try:
        asyncio.run(run())
    except Exception as exc:  # the stack keeps running; the user sees why the sample did not finish
        click.echo(f"sample upload failed: {exc}", err=True)


@main.command()
@click.option("--loglevel", default="warning", show_default=True, help="Log level of the worker processes.")
@click.option("--sample", is_flag=True, help="Upload a bundled sample document and follow it to completed.")
def up(loglevel: str, sample: bool) -> None:
    """Run the local stack in the foreground: broker, web, chunker, embedder. Ctrl-C stops all of it."""
    settings = get_settings()
    broker = LocalBroker(settings)
    try:
        started = broker.start()
    except BrokerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"kafka at {broker.address}")
    processes = stack.start_roles(settings, loglevel=loglevel)
    for proc in processes:
        click.echo(f"{proc.role} worker (pid {proc.process.pid}) on http://{settings.web_host}:{proc.port}")
    click.echo(f"docflow is starting at {_api_url(settings)}  (Ctrl-C stops it)")
    if sample:
        threading.Thread(target=_follow_sample, args=(settings,), daemon=True).start()
    code = stack.supervise(processes)
    if started:
        broker.stop()
    click.echo("docflow stopped")
    sys.exit(code)


@main.command()
@click.option("--role", type=click.Choice([*ROLES, "all"]), required=True, help="Which agents this process runs.")
@click.option("--web-port", type=int, default=None, help="Port of this process's web server (overrides DOCFLOW_WEB_PORT).")
@click.option("--loglevel", default="info", show_default=True)
def worker(role: str, web_port: int | None, loglevel: str) -> None:
    """Run one worker process of a role; `all` runs one process per role."""
    settings = get_settings()
    if web_port is not None:
        settings = settings.model_copy(update={"web_port": web_port})
    if role == "all":
        sys.exit(stack.supervise(stack.start_roles(settings, loglevel=loglevel)))
    stack.run_worker(settings, role, loglevel)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--company", required=True, help="Company id the documents belong to.")
@click.option("--chunk-size", type=int, default=None)
@click.option("--chunk-overlap", type=int, default=None)
@click.option("--title", default=None)
@click.option("--tags", default=None, help="Comma-separated tags.")
@click.option("--wait", is_flag=True, help="Follow the documents until completed or failed.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits.")
def upload(paths, company, chunk_size, chunk_overlap, title, tags, wait, timeout) -> None:
    """Upload files through the web API, with a progress bar."""
    settings = get_settings()
    total_bytes = sum(path.stat().st_size for path in paths)

    async def run() -> int:
        failed = 0
        async with DocflowClient(_api_url(settings), company) as client:
            uploaded = []
            with click.progressbar(length=total_bytes, label="uploading", file=sys.stderr) as bar:
                for path in paths:
                    try:
                        answer = await client.upload(
                            path, bar.update, chunk_size=chunk_size, chunk_overlap=chunk_overlap, title=title,
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
                for path, document_id in uploaded:
                    status = await client.wait(document_id, timeout)
                    line = f"{document_id}  {status['state']}  chunks {_chunks(status)}"
                    if status["state"] != "completed":
                        failed += 1
                        line += f"  error: {status.get('error')}"
                    click.echo(line)
        return failed

    sys.exit(EXIT_FAILED if _with_api(run) else 0)


@main.command()
@click.argument("document_id")
@click.option("--company", required=True, help="Company id the document belongs to.")
def status(document_id: str, company: str) -> None:
    """Show a document's status."""
    settings = get_settings()

    async def run() -> dict:
        async with DocflowClient(_api_url(settings), company) as client:
            return await client.status(document_id)

    answer = _with_api(run)
    click.echo(json.dumps(answer, indent=2))
    sys.exit(EXIT_FAILED if answer["state"] == "failed" else 0)


@main.command("list")
@click.option("--company", required=True, help="Company id whose documents to list.")
def list_documents(company: str) -> None:
    """List a company's documents."""
    settings = get_settings()

    async def run() -> dict:
        async with DocflowClient(_api_url(settings), company) as client:
            return await client.list()

    answer = _with_api(run)
    click.echo(f"{'document_id':36}  {'state':10}  {'chunks':>11}  filename")
    for doc in answer["documents"]:
        click.echo(f"{doc['document_id']:36}  {doc['state']:10}  {_chunks(doc):>11}  {doc['filename']}")
    if answer.get("partial"):
        click.echo("(partial: a web worker did not answer)", err=True)


@main.command()
@click.option("--company", required=True, help="Company id whose windows to show.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many windows, newest first.")
@click.option("--timeout", type=float, default=15.0, show_default=True, help="Seconds to wait for the broker and the topic.")
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
        click.echo(f"error: analytics.flink was not read to its end within {timeout:g}s: windows may be missing", err=True)
        sys.exit(EXIT_UNREACHABLE)


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


@main.group()
def hdfs() -> None:
    """The local HDFS (namenode and datanode in one JVM, on 127.0.0.1, data under DOCFLOW_HOME)."""


@hdfs.command("start")
def hdfs_start() -> None:
    """Start HDFS; returns once it takes writes."""
    cluster = LocalHdfs(get_settings())
    try:
        started = cluster.start()
    except HdfsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    state = "started" if started else "already running"
    click.echo(f"hdfs {state} at {cluster.url}, web {cluster.http_url} (pid {cluster.pid()}, logs in {cluster.logs_dir})")


@hdfs.command("stop")
def hdfs_stop() -> None:
    """Stop HDFS cleanly."""
    cluster = LocalHdfs(get_settings())
    click.echo("hdfs stopped" if cluster.stop() else "hdfs was not running")


@hdfs.command("status")
def hdfs_status() -> None:
    """Say whether HDFS runs, and where."""
    cluster = LocalHdfs(get_settings())
    pid = cluster.pid()
    if pid is None:
        click.echo(f"hdfs stopped ({cluster.url})")
        sys.exit(EXIT_UNREACHABLE)
    if not cluster.takes_writes():
        click.echo(f"hdfs process {pid} runs but does not take writes yet ({cluster.http_url})")
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"hdfs running at {cluster.url}, web {cluster.http_url} (pid {pid})")


if __name__ == "__main__":
    main()
