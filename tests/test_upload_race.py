"""The produce-timeout race: a broker that stops answering while an upload's event is on its way.

The broker (a dedicated one: this test freezes it) gets the produce request, but answers only
after the web worker has given up and told the client 503. The event then lands. It must
never name an object that is gone; what no event names is the storage sweeper's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.local.kafka import LocalBroker
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.settings import Settings
from pipeline.storage import open_storage
from pipeline.storage.sweep import sweep_orphans
from pipeline.topics import DOCUMENTS_RAW

PRODUCE_TIMEOUT_SECONDS = 2


@pytest.fixture(scope="module")
def frozen_broker_settings(tmp_path_factory):
    settings = Settings(
        home=tmp_path_factory.mktemp("race-home"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        index="none",
        topic_partitions=2,
    )
    broker = LocalBroker(settings)
    broker.start()
    yield settings, broker
    os.kill(broker.pid(), signal.SIGCONT)  # never leave a frozen JVM behind
    broker.stop()


async def raw_events(settings: Settings) -> list[dict]:
    consumer = AIOKafkaConsumer(
        DOCUMENTS_RAW.name, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        events = []
        while batches := await consumer.getmany(timeout_ms=3000):
            events += [json.loads(record.value) for records in batches.values() for record in records]
        return events
    finally:
        await consumer.stop()


def test_an_event_that_lands_after_its_upload_timed_out_still_finds_its_object(frozen_broker_settings, tmp_path):
    settings, broker = frozen_broker_settings
    env = worker_env(settings, DOCFLOW_PRODUCE_TIMEOUT_SECONDS=str(PRODUCE_TIMEOUT_SECONDS))
    workers = WorkerStack(settings, env, tmp_path)
    storage = open_storage(settings)
    try:
        [web] = workers.launch({"web": 1})
        path = tmp_path / "memo.txt"
        path.write_text("A memo about the quarterly numbers. " * 40)

        async def upload() -> dict | ApiError:
            async with DocflowClient(web.url, "acme", timeout=60) as client:
                try:
                    return await client.upload(path)
                except ApiError as exc:
                    return exc

        first = asyncio.run(upload())
        assert isinstance(first, dict), first  # the topic's metadata is known: the next sends go straight out
        os.kill(broker.pid(), signal.SIGSTOP)
        try:

            async def during_freeze():
                return await asyncio.gather(*(upload() for _ in range(3)))

            started = time.monotonic()
            answers = asyncio.run(during_freeze())
            took = time.monotonic() - started
        finally:
            os.kill(broker.pid(), signal.SIGCONT)
        assert all(isinstance(answer, ApiError) and answer.status == 503 for answer in answers), answers
        assert all(answer.code == "broker_unavailable" for answer in answers)
        assert took < PRODUCE_TIMEOUT_SECONDS + 10
        assert web.alive()

        time.sleep(5)  # the frozen broker now answers the produce requests it held
        stored = {entry.key for entry in asyncio.run(_listing(storage))}
        events = asyncio.run(raw_events(settings))
        named = {storage.key_of(event["s3_path"]) for event in events}
        assert named <= stored, f"events without their object: {named - stored}"
        assert first["document_id"] in {event["document_id"] for event in events}

        # What no event names (an event the broker never wrote) is an orphan; the sweeper removes exactly those.
        report = asyncio.run(sweep_orphans(settings, storage, older_than_seconds=0.001))
        assert set(report.removed_keys) == stored - named
        assert {entry.key for entry in asyncio.run(_listing(storage))} == named
        print(f"{len(named) - 1} of 3 timed-out events landed later; {len(report.removed_keys)} orphans swept")
    finally:
        workers.stop_all()
        asyncio.run(storage.close())


async def _listing(storage):
    return [entry async for entry in storage.listing()]
