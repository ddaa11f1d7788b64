"""What integration tests do with a running stack: upload through it, wait for it, read its topics.

The worker processes themselves come from :mod:`pipeline.local.workers`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from pipeline import api_keys
from pipeline.broker_security import client_options
from pipeline.client import DocflowClient
from pipeline.ids import chunk_id
from pipeline.local import documents
from pipeline.local.workers import WorkerStack
from pipeline.records import DocumentUploaded, now_ms
from pipeline.settings import Settings
from pipeline.text.chunking import ChunkText, chunk_document


async def upload_all(stack: WorkerStack, company: str, files, tmp_path: Path) -> dict[str, tuple[str, bytes]]:
    """Upload through the web workers in turn; returns document_id → (filename, data)."""
    webs = stack.of_role("web")
    uploaded = {}
    for n, (filename, data) in enumerate(files):
        path = tmp_path / filename
        path.write_bytes(data)
        async with DocflowClient(webs[n % len(webs)].url, company) as client:
            answer = await client.upload(path)
        uploaded[answer["document_id"]] = (filename, data)
    return uploaded


async def wait_all(url: str, company: str, document_ids, timeout: float = 180.0) -> dict[str, dict]:
    async with DocflowClient(url, company) as client:
        statuses = await asyncio.gather(*(client.wait(doc, timeout) for doc in document_ids))
    return dict(zip(document_ids, statuses))


async def read_topic(settings, topic: str, document_ids: set[str], until_count: int, timeout: float = 60.0):
    """Every message on a topic for the given documents, read from the beginning."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **client_options(settings),
    )
    await consumer.start()
    found = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    value = json_or_none(record.value)
                    if value is not None and value.get("document_id") in document_ids:
                        assert record.key.decode() == value["document_id"]
                        found.append(value)
            if len(found) >= until_count and not batches:
                break
    finally:
        await consumer.stop()
    return found


def guarded(settings: Settings, secret: str) -> tuple[Settings, dict[str, str]]:
    """Settings with API keys required, and the worker variables that say the same."""
    return (
        settings.model_copy(update={"auth": "required", "auth_secret": secret}),
        {"DOCFLOW_AUTH": "required", "DOCFLOW_AUTH_SECRET": secret},
    )


def create_key(settings: Settings, company: str, name: str = "test") -> api_keys.NewKey:
    """A new API key of a company, on auth.keys (from a test's own thread: not inside a running loop)."""
    created = api_keys.new_key(api_keys.server_secret(settings), company, name)
    asyncio.run(api_keys.publish(settings, created.record))
    return created


def document_uploaded(company_id: str, s3_path: str = "", **fields) -> DocumentUploaded:
    """A DocumentUploaded as a test writes it: a new document id and plain defaults, ``fields`` overriding them."""
    defaults = dict(
        document_id=str(uuid.uuid4()),
        filename="a.txt",
        content_type="text/plain",
        size_bytes=1,
        sha256="",
        uploaded_ms=now_ms(),
        chunk_size=1000,
        chunk_overlap=200,
        chunk_size_unit="chars",
        title="",
        tags=[],
    )
    return DocumentUploaded(company_id=company_id, s3_path=s3_path, **{**defaults, **fields})


def json_or_none(value: bytes | None) -> dict | None:
    """A message's JSON object; None for the undecodable ones some tests produce on purpose."""
    try:
        parsed = json.loads(value or b"")
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def corpus(count: int, seed: int) -> list[tuple[str, bytes]]:
    """Multi-page PDFs, text, Markdown and HTML, in turn."""
    files = []
    for n in range(count):
        pages = documents.lorem_pages(n_pages=3 + n % 4, words_per_page=350, seed=seed + n)
        kind = n % 4
        if kind == 0:
            files.append((f"report-{n}.pdf", documents.make_pdf(pages)))
        elif kind == 1:
            files.append((f"notes-{n}.txt", "\n\n".join(pages).encode()))
        elif kind == 2:
            files.append((f"readme-{n}.md", documents.make_markdown(f"Doc {n}", pages)))
        else:
            files.append((f"page-{n}.html", documents.make_html(f"Doc {n}", pages)))
    return files


CONTENT_TYPES = {".pdf": "application/pdf", ".txt": "text/plain", ".md": "text/markdown", ".html": "text/html"}


def expected_chunks(filename: str, data: bytes) -> tuple[ChunkText, ...]:
    """The chunks the pipeline makes of a corpus file with the default sizes."""
    return chunk_document(data, CONTENT_TYPES[Path(filename).suffix], 1000, 200).chunks


def expected_chunk_ids(document_id: str, filename: str, data: bytes) -> set[str]:
    return {chunk_id(document_id, piece.index) for piece in expected_chunks(filename, data)}
