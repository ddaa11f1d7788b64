"""Reading ``analytics.flink``: a company's chunks per minute, as the Flink job wrote them.

The topic is upsert-style, keyed by company_id: the Flink job writes each closed window once,
and again with the same count when it replays after a restart (at-least-once). A reader
keeps the latest message per (company, window start); messages of one company share a
partition, so offset order is write order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError, UnknownTopicOrPartitionError, for_code

from pipeline.broker_security import client_options
from pipeline.errors import AnalyticsUnavailable
from pipeline.records import CompanyWindowCount
from pipeline.settings import Settings
from pipeline.topics import ANALYTICS_FLINK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompanyWindows:
    windows: list[CompanyWindowCount]  # newest first
    complete: bool  # False when the read timed out before reaching the end of the topic


async def read_company_windows(settings: Settings, company_id: str, timeout: float = 15.0) -> CompanyWindows:
    """Every window of one company in analytics.flink, latest value per window, newest first.

    Reads the whole topic from the beginning without a consumer group (nothing is
    committed) up to the end offsets it finds at the start, within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    request_timeout_ms = max(1000, int(timeout * 1000))
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)  # "unable connect" is said once, as the command's error
    try:
        partitions = await asyncio.wait_for(_partitions(settings, request_timeout_ms), timeout)
    except (TimeoutError, KafkaConnectionError, OSError) as exc:
        raise AnalyticsUnavailable(
            f"Kafka at {settings.bootstrap_servers} is unreachable: {exc or type(exc).__name__}"
        ) from exc
    finally:
        aiokafka_log.setLevel(level)
    if not partitions:  # the topic was never created: nothing was ever written
        return CompanyWindows([], complete=True)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        # With --delivery-guarantee exactly-once the job writes in transactions: only
        # committed windows are final. For non-transactional messages this changes nothing.
        isolation_level="read_committed",
        request_timeout_ms=request_timeout_ms,
        client_id="docflow-analytics",
        **client_options(settings),
    )
    try:
        await consumer.start()
        return await _read(consumer, partitions, company_id.encode(), deadline)
    except KafkaError as exc:
        raise AnalyticsUnavailable(f"reading {ANALYTICS_FLINK.name} failed: {exc}") from exc
    finally:
        await consumer.stop()


async def _partitions(settings: Settings, request_timeout_ms: int) -> list[TopicPartition]:
    """The topic's partitions, or none when it does not exist (asking does not create it)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=request_timeout_ms,
        client_id="docflow-analytics",
        **client_options(settings),
    )
    await admin.start()
    try:
        [topic] = await admin.describe_topics([ANALYTICS_FLINK.name])
    finally:
        await admin.close()
    if topic["error_code"] == UnknownTopicOrPartitionError.errno:
        return []
    if topic["error_code"]:
        raise for_code(topic["error_code"])(f"describing {ANALYTICS_FLINK.name}")
    return sorted(TopicPartition(ANALYTICS_FLINK.name, p["partition"]) for p in topic["partitions"])


async def _read(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], key: bytes, deadline: float
) -> CompanyWindows:
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    end = await consumer.end_offsets(partitions)
    remaining = {tp for tp in partitions if end[tp] > 0}
    latest: dict[int, CompanyWindowCount] = {}
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            return CompanyWindows(_newest_first(latest), complete=False)
        batches = await consumer.getmany(*remaining, timeout_ms=int(min(left, 1.0) * 1000))
        for records in batches.values():
            for record in records:
                # Every company's messages are in this topic: parse only this company's.
                if record.key != key or record.value is None:
                    continue
                window = CompanyWindowCount.from_wire(record.value)
                if window is None or window.company_id != key.decode():
                    log.warning("skipping a message that is not a CompanyWindowCount at offset %s", record.offset)
                    continue
                latest[window.window_start_ms] = window
        for tp in list(remaining):
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
    return CompanyWindows(_newest_first(latest), complete=True)


def _newest_first(latest: dict[int, CompanyWindowCount]) -> list[CompanyWindowCount]:
    return [latest[start] for start in sorted(latest, reverse=True)]


def utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_windows(windows: list[CompanyWindowCount]) -> list[str]:
    """The table `docflow analytics` prints: one line per window, as given (newest first)."""
    lines = [f"{'window start (UTC)':19}  {'window end (UTC)':19}  {'chunks':>8}"]
    lines += [f"{utc(w.window_start_ms):19}  {utc(w.window_end_ms):19}  {w.count:>8}" for w in windows]
    return lines
