"""`docflow up` (the whole local stack in the foreground) and `docflow worker` (one role's process)."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import aiohttp
import click

from pipeline import api_keys
from pipeline.app import ROLES
from pipeline.cli.api import EXIT_CONFIGURATION, EXIT_UNREACHABLE, api_url
from pipeline.client import DocflowClient
from pipeline.errors import InsecureConfiguration, KeyStoreUnavailable, LocalServerError
from pipeline.local import workers
from pipeline.local.kafka import LocalBroker
from pipeline.local.milvus import LocalMilvus
from pipeline.local.server import LocalServer
from pipeline.settings import get_settings

SAMPLE_DOCUMENT = Path(__file__).resolve().parent.parent / "samples" / "welcome.md"
SAMPLE_QUERY = "how do I follow a document's progress?"
DEMO_COMPANY = "demo"


def _follow_sample(settings, api_key: str | None) -> None:
    """Upload the bundled sample once the web role answers, and report when it completes."""

    async def run() -> None:
        async with DocflowClient(api_url(settings), None if api_key else DEMO_COMPANY, api_key=api_key) as client:
            for _ in range(600):
                try:
                    if (await client.health()).get("status") == "ok":
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            answer = await client.upload(SAMPLE_DOCUMENT)
            click.echo(f"sample uploaded: {api_url(settings)}{answer['status_url']}")
            status = await client.wait(answer["document_id"])
            click.echo(
                f"sample {status['state']}: {status['chunks_embedded']}/{status['chunks_total']} chunks embedded"
                + (f", {status['chunks_indexed']} indexed" if settings.index != "none" else "")
                + (f" ({status['error']})" if status.get("error") else "")
            )
            if status["state"] == "completed" and settings.index != "none":
                found = await client.search(SAMPLE_QUERY, top_k=1)
                for hit in found["results"]:
                    click.echo(f"search {SAMPLE_QUERY!r}: score {hit['score']:.3f}, {hit['text'][:80]!r}")

    try:
        asyncio.run(run())
    except Exception as exc:  # the stack keeps running; the user sees why the sample did not finish
        click.echo(f"sample upload failed: {exc}", err=True)


def _demo_key(settings, started: list[LocalServer]) -> str | None:
    """With auth on, a new key of the demo company, printed; with auth off, a loud word about it."""
    if settings.auth != "required":
        click.echo(
            "WARNING: authentication is off: anyone who can reach "
            f"{api_url(settings)} acts as any company it names (DOCFLOW_AUTH=required turns keys on)",
            err=True,
        )
        return None
    created = api_keys.new_key(api_keys.server_secret(settings), DEMO_COMPANY, "docflow up")
    try:
        asyncio.run(api_keys.publish(settings, created.record))
    except KeyStoreUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        for running in reversed(started):
            running.stop()
        sys.exit(EXIT_UNREACHABLE)
    click.echo(f"API key of company {DEMO_COMPANY}: {created.key}")
    return created.key


@click.command()
@click.option("--loglevel", default="warning", show_default=True, help="Log level of the worker processes.")
@click.option("--sample", is_flag=True, help="Upload a bundled sample document and follow it to completed.")
def up(loglevel: str, sample: bool) -> None:
    """Run the local stack in the foreground: broker, Milvus, one worker per role. Ctrl-C stops all of it."""
    settings = get_settings()
    servers: list[LocalServer] = []
    if not settings.kafka_bootstrap_servers:
        servers.append(LocalBroker(settings))
    if settings.index == "milvus" and not settings.milvus_uri:
        servers.append(LocalMilvus(settings))
    started = []
    for server in servers:
        try:
            if server.start():
                started.append(server)
        except LocalServerError as exc:
            click.echo(f"error: {exc}", err=True)
            for running in reversed(started):
                running.stop()
            sys.exit(EXIT_UNREACHABLE)
        click.echo(f"{server.label} at {server.where}")
    api_key = _demo_key(settings, started)
    processes = workers.start_roles(settings, loglevel=loglevel)
    for proc in processes:
        click.echo(f"{proc.role} worker (pid {proc.process.pid}) on http://{settings.web_host}:{proc.port}")
    click.echo(f"docflow is starting at {api_url(settings)}  (Ctrl-C stops it)")
    if sample:
        threading.Thread(target=_follow_sample, args=(settings, api_key), daemon=True).start()
    code = workers.supervise(processes)
    for server in reversed(started):
        server.stop()
    click.echo("docflow stopped")
    sys.exit(code)


@click.command()
@click.option("--role", type=click.Choice([*ROLES, "all"]), required=True, help="Which agents this process runs.")
@click.option(
    "--web-port", type=int, default=None, help="Port of this process's web server (overrides DOCFLOW_WEB_PORT)."
)
@click.option("--loglevel", default="info", show_default=True)
def worker(role: str, web_port: int | None, loglevel: str) -> None:
    """Run one worker process of a role; `all` runs one process per role."""
    settings = get_settings()
    if web_port is not None:
        settings = settings.model_copy(update={"web_port": web_port})
    if role == "all":
        sys.exit(workers.supervise(workers.start_roles(settings, loglevel=loglevel)))
    try:
        workers.run_worker(settings, role, loglevel)
    except InsecureConfiguration as exc:
        click.echo(f"error: refusing to start: {exc}", err=True)
        sys.exit(EXIT_CONFIGURATION)
