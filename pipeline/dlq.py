"""documents.dlq for operators: list the dead letters, and replay them once their cause is fixed.

Every stage that gives up on a message (``agents/dead_letters.give_up``) puts a
:class:`~pipeline.records.DeadLetter` on documents.dlq, with the message as it was
(``original``, the record's fields) and fails its document. A message no stage could even
decode (``pipeline/app.py``, ``DeadLetteringTopic``, stage ``decode``) is there too, with
``original={"key", "value", "partition", "offset"}``: its raw text, not a record.

Reading takes the whole topic from its beginning to the end offsets found at the start,
every partition, no consumer group (:func:`pipeline.follow.follow_topic`): nothing is
committed and nothing is removed, so the same letters are listed again until the topic's
retention drops them.

Replaying a letter re-injects its original into the topic it was read from (only one of
docflow's data topics, never whatever topic a message names), after a StatusEvent with
``replayed=True`` that reopens the failed document (``tables/document_status.py``). It is
safe to replay a letter twice, or a letter whose document has completed meanwhile: chunk
ids derive from the document id and the chunk index, the embedder and the indexer upsert
by chunk id and the status table counts distinct chunk indexes, so a second pass produces
the same chunks and vectors and the document ends in the same state. An undecodable
message is replayed only when asked (``include_undecodable``): as it was, it will most
likely fail again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from pipeline.broker_security import client_options
from pipeline.errors import DlqUnavailable, TopicUnavailable
from pipeline.follow import follow_topic
from pipeline.ids import valid_id
from pipeline.records import DeadLetter, DocumentState, status_event
from pipeline.settings import Settings
from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_DLQ, DOCUMENTS_RAW, DOCUMENTS_STATUS, EMBEDDINGS_READY, TOPICS

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 30.0

# The topics a letter may be replayed into, and the stage its document is reopened at: the
# state the document is in while that topic's message waits for its stage.
REPLAY_STAGES: dict[str, DocumentState] = {
    DOCUMENTS_RAW.name: "uploaded",
    CHUNKS_PROCESSED.name: "chunked",
    EMBEDDINGS_READY.name: "embedding",
}
# What DeadLetteringTopic keeps of a message it could not decode.
UNDECODABLE_FIELDS = frozenset({"key", "value", "partition", "offset"})
_LETTER_TYPES: dict[str, type | tuple[type, ...]] = {
    "document_id": str,
    "company_id": str,
    "topic": str,
    "stage": str,
    "error": str,
    "attempts": int,
    "failed_ms": int,
    "original": dict,
}


class ListedDeadLetter(DeadLetter):
    """A dead letter as read from documents.dlq, with where it lies there (for display)."""

    partition: int = -1
    offset: int = -1


def is_undecodable(letter: DeadLetter) -> bool:
    """Whether the letter holds a message no stage could decode (its raw text), not a record's fields."""
    original = letter.original
    return "document_id" not in original and UNDECODABLE_FIELDS <= set(original) and isinstance(original["value"], str)


def parse_letter(message: ConsumerRecord) -> ListedDeadLetter:
    """The dead letter a documents.dlq message holds; ValueError when it holds none."""
    data = json.loads(message.value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fields: dict[str, Any] = {}
    for name, kind in _LETTER_TYPES.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"field {name} is missing or not a {getattr(kind, '__name__', kind)}")
        fields[name] = value
    return ListedDeadLetter(**fields, partition=message.partition, offset=message.offset)


def matches(
    letter: DeadLetter, *, document_id: str | None = None, stage: str | None = None, company_id: str | None = None
) -> bool:
    return (
        (document_id is None or letter.document_id == document_id)
        and (stage is None or letter.stage == stage)
        and (company_id is None or letter.company_id == company_id)
    )


async def dead_letters(
    settings: Settings,
    *,
    document_id: str | None = None,
    stage: str | None = None,
    company_id: str | None = None,
    timeout: float = READ_TIMEOUT_SECONDS,
) -> list[ListedDeadLetter]:
    """Every letter on documents.dlq (as of now) matching the filters, oldest first.

    Messages of documents.dlq that hold no dead letter are logged and left out.
    DlqUnavailable when the broker cannot be reached or the topic is not read to its end
    within ``timeout`` seconds.
    """
    found: list[ListedDeadLetter] = []

    def on_message(message: ConsumerRecord) -> None:
        try:
            letter = parse_letter(message)
        except ValueError as exc:
            log.warning("documents.dlq[%s]@%s holds no dead letter: %s", message.partition, message.offset, exc)
            return
        if matches(letter, document_id=document_id, stage=stage, company_id=company_id):
            found.append(letter)

    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)  # "unable to connect" is said once, as the error
    try:
        await asyncio.wait_for(follow_topic(settings, DOCUMENTS_DLQ.name, on_message, follow=False), timeout)
    except TimeoutError as exc:
        raise DlqUnavailable(
            f"{DOCUMENTS_DLQ.name} at {settings.bootstrap_servers} was not read to its end within {timeout:g}s"
        ) from exc
    except (KafkaError, OSError, TopicUnavailable) as exc:
        raise DlqUnavailable(
            f"cannot read {DOCUMENTS_DLQ.name}: Kafka at {settings.bootstrap_servers} is unreachable: {exc}"
        ) from exc
    finally:
        aiokafka_log.setLevel(level)
    found.sort(key=lambda letter: (letter.failed_ms, letter.partition, letter.offset))
    return found


Action = Literal["replayed", "would replay", "skipped", "refused"]


@dataclass(frozen=True)
class ReplayOutcome:
    letter: DeadLetter
    action: Action
    reason: str = ""  # why it was skipped or refused; what was noted for a replayed one


@dataclass
class ReplayReport:
    dry_run: bool
    outcomes: list[ReplayOutcome] = field(default_factory=list)

    def of(self, *actions: Action) -> list[ReplayOutcome]:
        return [outcome for outcome in self.outcomes if outcome.action in actions]

    @property
    def replayed(self) -> list[ReplayOutcome]:
        """The letters re-injected (or, in a dry run, that would be)."""
        return self.of("replayed", "would replay")

    @property
    def skipped(self) -> list[ReplayOutcome]:
        return self.of("skipped")

    @property
    def refused(self) -> list[ReplayOutcome]:
        return self.of("refused")


@dataclass(frozen=True)
class _Plan:
    """What replaying one letter sends: the original's key and value to its topic."""

    letter: DeadLetter
    topic: str
    key: bytes
    value: bytes
    filename: str
    # Only with valid ids: a status naming no company would claim the document for none.
    reopen: bool


def refusal(letter: DeadLetter, include_undecodable: bool = False) -> tuple[Action, str] | None:
    """Why a letter is not replayed (skipped, or refused outright), or None when it is replayable."""
    docflow_topics = {spec.name for spec in TOPICS}
    if letter.topic not in docflow_topics:
        return "refused", f"{letter.topic!r} is not one of docflow's topics: nothing is produced to it"
    if letter.topic not in REPLAY_STAGES:
        return "refused", (
            f"{letter.topic} is not a topic docflow replays into (only {', '.join(REPLAY_STAGES)}): "
            f"no stage takes its messages back"
        )
    if is_undecodable(letter):
        if not include_undecodable:
            return "skipped", "undecodable: it will most likely fail again (replay it with --include-undecodable)"
        if letter.original["key"] != letter.document_id:
            return "refused", f"the message's key {letter.original['key']!r} is not the letter's document"
        if not valid_id(letter.document_id):
            return "refused", f"the message's key {letter.document_id!r} is not a valid document id"
        return None
    original = letter.original
    if original.get("document_id") != letter.document_id or original.get("company_id") != letter.company_id:
        return "refused", (
            f"the original names document {original.get('document_id')!r} of company "
            f"{original.get('company_id')!r}, the letter {letter.document_id!r} of {letter.company_id!r}"
        )
    if not (valid_id(letter.document_id) and valid_id(letter.company_id)):
        return "refused", "the letter's document or company id is not a valid id"
    return None


def _plan(letter: DeadLetter) -> _Plan:
    if is_undecodable(letter):
        raw = letter.original["value"]
        try:
            decoded = json.loads(raw)
            filename = str(decoded.get("filename", "")) if isinstance(decoded, dict) else ""
        except ValueError:
            filename = ""
        return _Plan(
            letter,
            letter.topic,
            letter.document_id.encode(),
            raw.encode(),
            filename,
            reopen=valid_id(letter.company_id),
        )
    return _Plan(
        letter,
        letter.topic,
        letter.document_id.encode(),
        json.dumps(letter.original).encode(),
        str(letter.original.get("filename", "") or ""),
        reopen=True,
    )


async def replay(
    settings: Settings,
    letters: list[DeadLetter],
    *,
    dry_run: bool = False,
    include_undecodable: bool = False,
    timeout: float = READ_TIMEOUT_SECONDS,
) -> ReplayReport:
    """Re-inject each letter's original into the topic it was read from, keyed by its document id.

    Before the originals, one StatusEvent with ``replayed=True`` per document and topic
    (stage ``uploaded`` for documents.raw, ``chunked`` for chunks.processed, ``embedding``
    for embeddings.ready) reopens the failed document; every one is on the broker
    (acks=all) before any original is sent, so the stage's own statuses come after it.

    Replaying the same letter twice is safe: chunk ids are deterministic (document id and
    chunk index) and everything downstream is idempotent (upserts by chunk id, distinct
    chunk indexes in the status table), so a second pass ends where the first did. Letters
    holding the same message (a redelivered message dead-lettered twice) are sent once.

    Refused, never produced: a letter naming a topic that is not one of docflow's data
    topics, or whose original is not of its own document. Skipped unless
    ``include_undecodable``: a message no stage could decode (its raw value is sent as it
    was). A dry run produces nothing and says what would be replayed. DlqUnavailable when
    the broker cannot be reached; what was sent before that stays sent, and replaying
    again is safe.
    """
    report = ReplayReport(dry_run=dry_run)
    plans: list[_Plan] = []
    seen: dict[tuple[str, bytes, bytes], DeadLetter] = {}
    for letter in letters:
        refused = refusal(letter, include_undecodable)
        if refused is not None:
            report.outcomes.append(ReplayOutcome(letter, *refused))
            continue
        plan = _plan(letter)
        same = seen.get((plan.topic, plan.key, plan.value))
        if same is not None:
            where = _where(same)
            report.outcomes.append(ReplayOutcome(letter, "skipped", f"the same message as the letter {where}"))
            continue
        seen[(plan.topic, plan.key, plan.value)] = letter
        plans.append(plan)
        note = "" if plan.reopen else "no replayed status: the letter names no valid company"
        report.outcomes.append(ReplayOutcome(letter, "would replay" if dry_run else "replayed", note))
    if dry_run or not plans:
        return report
    try:
        await asyncio.wait_for(_send(settings, plans), timeout)
    except TimeoutError as exc:
        raise DlqUnavailable(
            f"replaying to Kafka at {settings.bootstrap_servers} did not finish within {timeout:g}s "
            "(some letters may have been replayed; replaying them again is safe)"
        ) from exc
    except (KafkaError, OSError) as exc:
        raise DlqUnavailable(
            f"cannot replay: Kafka at {settings.bootstrap_servers} is unreachable: {exc} "
            "(some letters may have been replayed; replaying them again is safe)"
        ) from exc
    return report


async def _send(settings: Settings, plans: list[_Plan]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        request_timeout_ms=int(settings.produce_timeout_seconds * 1000),
        client_id="docflow-dlq-replay",
        **client_options(settings),
    )
    await producer.start()
    try:
        statuses: dict[tuple[str, str], bytes] = {}
        for plan in plans:
            letter = plan.letter
            if plan.reopen and (letter.document_id, plan.topic) not in statuses:
                event = status_event(
                    letter.document_id,
                    letter.company_id,
                    REPLAY_STAGES[plan.topic],
                    replayed=True,
                    filename=plan.filename,
                )
                statuses[(letter.document_id, plan.topic)] = event.dumps()
        # Every reopening status on the broker first: the stages' own statuses must follow it.
        await _all_acknowledged(
            producer, [(DOCUMENTS_STATUS.name, document.encode(), value) for (document, _), value in statuses.items()]
        )
        await _all_acknowledged(producer, [(plan.topic, plan.key, plan.value) for plan in plans])
        for plan in plans:
            log.info("replayed the dead letter of document %s into %s", plan.letter.document_id, plan.topic)
    finally:
        await producer.stop()


async def _all_acknowledged(producer: AIOKafkaProducer, messages: list[tuple[str, bytes, bytes]]) -> None:
    deliveries = [await producer.send(topic, key=key, value=value) for topic, key, value in messages]
    await asyncio.gather(*deliveries)


def _where(letter: DeadLetter) -> str:
    if isinstance(letter, ListedDeadLetter) and letter.offset >= 0:
        return f"at {DOCUMENTS_DLQ.name}[{letter.partition}]@{letter.offset}"
    return f"of document {letter.document_id}"
