"""The embedder agent's throughput: a real `docflow worker --role embedder` process.

A local broker is started for the measurement; chunks are produced to chunks.processed
and the time runs until the last embedding is read back from embeddings.ready, after a
warm-up batch (model load, group join). bench/embed.py sets it against the raw backend
on the same texts: the ratio is what Kafka and Faust cost on top of the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.broker import LocalBroker
from pipeline.chunking import chunk_id
from pipeline.records import Chunk, now_ms
from pipeline.settings import Settings
from pipeline.stack import worker_command
from pipeline.topics import CHUNKS_PROCESSED, EMBEDDINGS_READY
from tests.conftest import free_port


async def _produce_and_wait(settings: Settings, texts: list[str], company: str) -> float:
    """Seconds from the first chunk produced to the last embedding read back."""
    document_id = str(uuid.uuid4())
    consumer = AIOKafkaConsumer(
        EMBEDDINGS_READY.name, bootstrap_servers=settings.bootstrap_servers, group_id=None,
        auto_offset_reset="latest",
    )
    await consumer.start()
    await consumer.getmany(timeout_ms=500)  # join the topic's end before producing
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        started = time.perf_counter()
        for index, text in enumerate(texts):
            chunk = Chunk(chunk_id=chunk_id(document_id, index), document_id=document_id, company_id=company,
                          text=text, page=1, index=index, total=len(texts), created_ms=now_ms())
            await producer.send(CHUNKS_PROCESSED.name, chunk.dumps(), key=document_id.encode())
        await producer.flush()
        seen: set[int] = set()
        while len(seen) < len(texts):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    value = json.loads(record.value)
                    if value["document_id"] == document_id:
                        seen.add(value["index"])
        return time.perf_counter() - started
    finally:
        await producer.stop()
        await consumer.stop()


def measure_agent(backend_name: str, texts: list[str], batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="docflow-bench-") as home:
        settings = Settings(home=Path(home), kafka_port=free_port(), kafka_controller_port=free_port())
        broker = LocalBroker(settings)
        broker.start()
        port = free_port()
        env = dict(
            os.environ, DOCFLOW_HOME=home, DOCFLOW_KAFKA_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
            DOCFLOW_WEB_PORT=str(port), DOCFLOW_EMBEDDING_BACKEND=backend_name,
            DOCFLOW_EMBEDDING_BATCH_SIZE=str(batch_size), DOCFLOW_EMBEDDING_CACHE="false",
        )
        worker = subprocess.Popen(
            worker_command("embedder", "warning"),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_healthy(f"http://127.0.0.1:{port}/health")
            asyncio.run(_produce_and_wait(settings, texts[:batch_size], "warm-up"))
            elapsed = asyncio.run(_produce_and_wait(settings, texts, "bench"))
        finally:
            worker.terminate()
            worker.wait(60)
            broker.stop()
    return {"texts": len(texts), "batch": batch_size, "seconds": round(elapsed, 3),
            "texts_per_s": round(len(texts) / elapsed, 1)}


def _wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"embedder worker not healthy at {url}")
