"""The embedder agent's throughput: a real `docflow worker --role embedder` process.

A local broker is started for the measurement; chunks are produced to chunks.processed
and the time runs until the last embedding is read back from embeddings.ready, after a
warm-up batch (model load, group join). bench/embed.py sets it against the raw backend
on the same texts: the ratio is what Kafka and Faust cost on top of the model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.local_stack import LocalStack
from pipeline.broker_security import client_options
from pipeline.ids import chunk_id
from pipeline.records import Chunk, now_ms
from pipeline.settings import Settings
from pipeline.topics import CHUNKS_PROCESSED, EMBEDDINGS_READY


async def _produce_and_wait(settings: Settings, texts: list[str], company: str) -> float:
    """Seconds from the first chunk produced to the last embedding read back."""
    document_id = str(uuid.uuid4())
    consumer = AIOKafkaConsumer(
        EMBEDDINGS_READY.name,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        auto_offset_reset="latest",
        **client_options(settings),
    )
    await consumer.start()
    await consumer.getmany(timeout_ms=500)  # join the topic's end before producing
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5, **client_options(settings))
    await producer.start()
    try:
        started = time.perf_counter()
        for index, text in enumerate(texts):
            chunk = Chunk(
                chunk_id=chunk_id(document_id, index),
                document_id=document_id,
                company_id=company,
                text=text,
                page=1,
                index=index,
                total=len(texts),
                created_ms=now_ms(),
            )
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
    with LocalStack(backend_name, batch_size) as stack:
        stack.workers.launch({"embedder": 1})
        asyncio.run(_produce_and_wait(stack.settings, texts[:batch_size], "warm-up"))
        elapsed = asyncio.run(_produce_and_wait(stack.settings, texts, "bench"))
    return {
        "texts": len(texts),
        "batch": batch_size,
        "seconds": round(elapsed, 3),
        "texts_per_s": round(len(texts) / elapsed, 1),
    }
