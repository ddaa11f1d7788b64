"""Following a whole topic from one process: every partition, no consumer group.

What a process must know in full (the API keys, the lifecycle commands) or see all of (the
live events every web worker serves) is read this way: each process reads every
partition, and no group rebalances when processes come and go.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from tenacity import AsyncRetrying, before_sleep_log, wait_exponential

from pipeline.broker_security import client_options
from pipeline.errors import TopicUnavailable
from pipeline.settings import Settings
from pipeline.topics import create_topics

log = logging.getLogger(__name__)

POLL_MS = 100


async def follow_topic(
    settings: Settings,
    topic: str,
    on_message: Callable[[ConsumerRecord], None],
    caught_up: asyncio.Event | None = None,
    *,
    follow: bool = True,
    from_end: bool = False,
) -> None:
    """Call ``on_message`` for every message of ``topic``, from its beginning (or its end);
    set ``caught_up`` once the end as of the start is reached; return there unless ``follow``.
    """
    await create_topics(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, **client_options(settings)
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, partition) for partition in sorted(await _partitions(consumer, topic))]
        consumer.assign(assigned)
        if from_end:
            await consumer.seek_to_end(*assigned)
        else:
            await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        at_end = from_end or not any(ends.values())
        while True:
            if at_end and caught_up is not None and not caught_up.is_set():
                caught_up.set()
            if at_end and not follow:
                return
            batches = await consumer.getmany(*assigned, timeout_ms=POLL_MS)
            for messages in batches.values():
                for message in messages:
                    try:
                        on_message(message)
                    except (ValueError, TypeError, KeyError) as exc:
                        log.error("unreadable message on %s[%s]@%s: %s", topic, message.partition, message.offset, exc)
            if not at_end:
                at_end = all([await consumer.position(tp) >= ends[tp] for tp in assigned])
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(40):
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return partitions
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.25)
    raise TopicUnavailable(f"topic {topic} has no partitions")


async def keep_following(what: str, follow: Callable[[], Awaitable[None]]) -> None:
    """Run a follower for as long as the worker runs, waiting out broker outages with backoff."""
    retrying = AsyncRetrying(wait=wait_exponential(multiplier=0.5, max=10), before_sleep=before_sleep_log(log, 30))
    async for attempt in retrying:
        with attempt:
            log.debug("following %s", what)
            await follow()
