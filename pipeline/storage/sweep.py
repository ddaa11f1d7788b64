"""Removing orphan originals: stored objects that no event names.

The web role stores an original before it produces the document's events. When producing
fails or times out, the outcome is unknown (the event may still land), so the object
stays; if no event ever names it, it is an orphan, and this is what removes it.

An object is removed only when all of these hold:

* its key is ``{company_id}/{document_id}/{name}`` (anything else is reported and left alone);
* it is older than the grace (``DOCFLOW_STORAGE_SWEEP_GRACE_SECONDS``): an upload's events
  follow its object within seconds, so an object that young may still be announced;
* its document id is neither a key of the status table's changelog (every document that
  got any status event has a row there) nor the document of a message still retained on
  ``documents.raw``.

The objects are listed first and the topics read afterwards, to the end offsets found
then: an object old enough at listing time had its events produced before the read, so
however long the listing takes, no event is missed. The topics are only read (no consumer
group, nothing committed, nothing produced). A read that does not reach the end of both
topics removes nothing: an incomplete set of named documents would remove named objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code

from pipeline.broker_security import client_options
from pipeline.errors import DocflowError
from pipeline.ids import valid_id
from pipeline.settings import Settings
from pipeline.storage.base import ObjectStorage
from pipeline.topics import DOCUMENTS_RAW

log = logging.getLogger(__name__)

# The web role's status table (pipeline/app.py, STATUS_TABLE) as Faust names its changelog:
# "{app id}-{table}-changelog". Keys are the document id's raw bytes.
STATUS_CHANGELOG = "docflow-web-document_status-changelog"
NAMING_TOPICS = (STATUS_CHANGELOG, DOCUMENTS_RAW.name)


class SweepUnavailable(DocflowError):
    """The broker could not be reached, or the naming topics were not read to their end in time."""


class SweepRefused(DocflowError):
    """The sweeper will not remove anything: what it would need to tell orphans apart is missing."""


@dataclass
class SweepReport:
    older_than_seconds: float
    dry_run: bool
    listed: int = 0
    kept_named: int = 0  # old, and an event names its document
    kept_young: int = 0  # younger than the grace, named or not
    orphan_keys: list[str] = field(default_factory=list)  # old and named by no event: removed unless a dry run
    removed_keys: list[str] = field(default_factory=list)
    failed_keys: list[str] = field(default_factory=list)  # orphans whose removal failed (each one logged)
    errors: dict[str, str] = field(default_factory=dict)  # why each of failed_keys failed
    unrecognized_keys: list[str] = field(default_factory=list)  # not company/document/name: left alone

    @property
    def orphans(self) -> int:
        return len(self.orphan_keys)

    @property
    def removed(self) -> int:
        return len(self.removed_keys)

    @property
    def failed(self) -> int:
        return len(self.failed_keys)

    @property
    def unrecognized(self) -> int:
        return len(self.unrecognized_keys)


def document_of(key: str) -> str | None:
    """The document id of an original's key ``{company_id}/{document_id}/{name}``, or None when it is not one."""
    parts = key.split("/")
    if len(parts) != 3 or not parts[2] or not valid_id(parts[0]) or not valid_id(parts[1]):
        return None
    return parts[1]


async def sweep_orphans(
    settings: Settings,
    storage: ObjectStorage,
    *,
    older_than_seconds: float | None = None,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
    kafka_timeout_seconds: float = 30.0,
) -> SweepReport:
    """Remove the objects older than the grace that no event names (docstring of the module).

    ``older_than_seconds`` defaults to ``settings.storage_sweep_grace_seconds``; ``clock``
    gives now in seconds since the epoch. A dry run removes nothing and reports the orphans.
    Raises StorageError when the storage cannot be listed, SweepUnavailable when the broker
    cannot be read to the end, SweepRefused when a naming topic does not exist.
    """
    grace = settings.storage_sweep_grace_seconds if older_than_seconds is None else older_than_seconds
    report = SweepReport(older_than_seconds=grace, dry_run=dry_run)
    now_ms = clock() * 1000
    candidates: list[tuple[str, str]] = []
    async for listed in storage.listing():
        report.listed += 1
        document_id = document_of(listed.key)
        if document_id is None:
            log.warning("leaving %s alone: not a company/document/name key", listed.key)
            report.unrecognized_keys.append(listed.key)
        elif now_ms - listed.modified_ms < grace * 1000:
            report.kept_young += 1
        else:
            candidates.append((listed.key, document_id))

    named = await named_documents(settings, {document_id for _, document_id in candidates}, kafka_timeout_seconds)
    for key, document_id in candidates:
        if document_id in named:
            report.kept_named += 1
            continue
        report.orphan_keys.append(key)
        if dry_run:
            log.info("orphan %s (dry run: kept)", key)
            continue
        try:
            await storage.delete(key)
        except Exception as exc:  # each failure is reported; the others are still removed
            log.error("removing orphan %s failed: %s", key, exc)
            report.failed_keys.append(key)
            report.errors[key] = str(exc) or type(exc).__name__
        else:
            log.info("removed orphan %s", key)
            report.removed_keys.append(key)
    return report


async def named_documents(settings: Settings, wanted: set[str], timeout: float = 30.0) -> set[str]:
    """Which of the wanted document ids an event names: status changelog keys and documents.raw messages.

    Reads both topics from the beginning to the end offsets found at the start; raises
    SweepUnavailable when the broker is unreachable or no record arrives for ``timeout``
    seconds before the end, SweepRefused when a topic does not exist while there is
    something to decide (the broker is then not the one the web role writes to).
    """
    request_timeout_ms = max(1000, int(timeout * 1000))
    options = client_options(settings)  # TLS and SASL, as every docflow client; KafkaSecurityError when incomplete
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)  # "unable connect" is said once, as the command's error
    try:
        partitions = await asyncio.wait_for(_partitions(settings, options, request_timeout_ms), timeout)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise SweepUnavailable(
            f"Kafka at {settings.bootstrap_servers} is unreachable: {exc or type(exc).__name__}"
        ) from exc
    finally:
        aiokafka_log.setLevel(level)
    missing = [topic for topic in NAMING_TOPICS if not any(tp.topic == topic for tp in partitions)]
    if missing and wanted:
        raise SweepRefused(
            f"topic {', '.join(missing)} does not exist on {settings.bootstrap_servers}: without it no document "
            f"can be told to be named, so nothing is removed (is this the broker the web role uses?)"
        )
    if not wanted:
        return set()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=request_timeout_ms,
        client_id="docflow-sweeper",
        **options,
    )
    try:
        await consumer.start()
        return await _read(consumer, partitions, wanted, timeout)
    except (KafkaError, OSError) as exc:
        raise SweepUnavailable(f"reading {', '.join(NAMING_TOPICS)} failed: {exc}") from exc
    finally:
        await consumer.stop()


async def _partitions(settings: Settings, options: dict, request_timeout_ms: int) -> list[TopicPartition]:
    """The partitions of the naming topics that exist (all topics are described: asking creates none)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=request_timeout_ms,
        client_id="docflow-sweeper",
        **options,
    )
    try:
        await admin.start()
        topics = await admin.describe_topics()
    finally:
        await admin.close()
    partitions = []
    for topic in topics:
        if topic["topic"] not in NAMING_TOPICS:
            continue
        if topic["error_code"]:
            raise for_code(topic["error_code"])(f"describing {topic['topic']}")
        partitions += [TopicPartition(topic["topic"], p["partition"]) for p in topic["partitions"]]
    return sorted(partitions)


async def _read(consumer: AIOKafkaConsumer, partitions: list[TopicPartition], wanted: set[str], timeout: float):
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    end = await consumer.end_offsets(partitions)
    remaining = {tp for tp in partitions if end[tp] > 0}
    named: set[str] = set()
    stalled_since = time.monotonic()
    while remaining:
        for tp in list(remaining):
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
        if not remaining:
            break
        if time.monotonic() - stalled_since > timeout:
            behind = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(remaining))
            raise SweepUnavailable(f"no record arrived for {timeout:g}s before the end of {behind}: nothing removed")
        batches = await consumer.getmany(*remaining, timeout_ms=1000)
        for tp, records in batches.items():
            if records:
                stalled_since = time.monotonic()
            for record in records:
                if record.offset >= end[tp]:
                    continue
                for document_id in _documents_named(record, raw=tp.topic == DOCUMENTS_RAW.name):
                    if document_id in wanted:
                        named.add(document_id)
    return named


def _documents_named(record, *, raw: bool) -> list[str]:
    """The document ids a record names: its key (a tombstone's too), and a DocumentUploaded's document_id."""
    names = [record.key.decode(errors="replace")] if record.key else []
    if raw and record.value:
        try:
            value = json.loads(record.value)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("document_id"), str):
            names.append(value["document_id"])
    return names
