"""What integration tests do with a running stack: upload through it, wait for it, read its topics.

The worker processes themselves come from :mod:`pipeline.local.workers`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from pipeline.client import DocflowClient
from pipeline.local.workers import WorkerStack


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
    )
    await consumer.start()
    found = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    value = json.loads(record.value)
                    if value["document_id"] in document_ids:
                        assert record.key.decode() == value["document_id"]
                        found.append(value)
            if len(found) >= until_count and not batches:
                break
    finally:
        await consumer.stop()
    return found
