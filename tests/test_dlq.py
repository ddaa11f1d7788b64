"""`docflow dlq list|replay` (pipeline/dlq.py) against the session broker and real worker processes.

Documents are announced on documents.raw directly (as the web role would, after storing the
original), naming an original that is not stored yet: the chunker dead-letters them with stage
``download`` and fails them. Once the original is stored, a replay completes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.broker_security import client_options
from pipeline.client import DocflowClient
from pipeline.dlq import ListedDeadLetter, dead_letters, replay
from pipeline.errors import ApiError
from pipeline.follow import follow_topic
from pipeline.ids import object_key
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.records import DeadLetter, now_ms, status_event
from pipeline.storage import open_storage
from pipeline.topics import DOCUMENTS_DLQ, DOCUMENTS_RAW, DOCUMENTS_STATUS
from tests.stack import document_uploaded

TEXT = ("Dead letters are kept for operators, who replay them once the cause is fixed. " * 40).encode()


@pytest.fixture(scope="module")
def env(kafka_settings) -> dict[str, str]:
    return worker_env(kafka_settings)


@pytest.fixture(scope="module")
def stack(kafka_settings, env, tmp_path_factory):
    workers = WorkerStack(kafka_settings, env, tmp_path_factory.mktemp("dlq-worker-logs"))
    try:
        workers.launch({"web": 1, "chunker": 1, "embedder": 1})
        yield workers
    finally:
        workers.stop_all()


def docflow(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dlq", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def produce(settings, messages: list[tuple[str, str, bytes]]) -> None:
    """(topic, key, value) each, in order, acknowledged by the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", **client_options(settings))
    await producer.start()
    try:
        for topic, key, value in messages:
            await producer.send_and_wait(topic, key=key.encode(), value=value)
    finally:
        await producer.stop()


async def announce(settings, company: str, filename: str = "notes.txt", s3_path: str | None = None) -> str:
    """Announce a document whose original is not stored (yet), as the web role would; returns its id."""
    document_id = str(uuid.uuid4())
    uploaded = document_uploaded(
        company,
        s3_path or open_storage(settings).uri(object_key(company, document_id, filename)),
        document_id=document_id,
        filename=filename,
        size_bytes=len(TEXT),
        sha256=hashlib.sha256(TEXT).hexdigest(),
    )
    await produce(
        settings,
        [
            (DOCUMENTS_RAW.name, document_id, uploaded.dumps()),
            (DOCUMENTS_STATUS.name, document_id, status_event(document_id, company, "uploaded").dumps()),
        ],
    )
    return document_id


async def store_original(settings, company: str, document_id: str, filename: str = "notes.txt") -> None:
    async with open_storage(settings) as storage:
        await storage.put(object_key(company, document_id, filename), TEXT, "text/plain")


async def wait_state(stack: WorkerStack, company: str, document_id: str, state: str, timeout: float = 90.0) -> dict:
    """Poll a document until it is in ``state`` (a final state it leaves, as a replayed failure, is waited past)."""
    url = stack.of_role("web")[0].url
    deadline = time.monotonic() + timeout
    status: dict = {}
    async with DocflowClient(url, company) as client:
        while time.monotonic() < deadline:
            try:
                status = await client.status(document_id)
                if status["state"] == state:
                    return status
            except ApiError as exc:
                if exc.status not in (404, 503):
                    raise
            await asyncio.sleep(0.25)
    raise AssertionError(f"document {document_id} not {state} within {timeout:g}s: {status}")


async def letters_of(settings, document_id: str, count: int = 1, timeout: float = 30.0) -> list[ListedDeadLetter]:
    """The document's letters, once there are at least ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        letters = await dead_letters(settings, document_id=document_id)
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.5)


async def keyed(settings, topic: str, key: str) -> list[bytes]:
    """Every value on ``topic`` under ``key``, read whole."""
    values: list[bytes] = []
    await follow_topic(
        settings, topic, lambda m: values.append(m.value) if m.key == key.encode() else None, follow=False
    )
    return values


async def test_a_document_dead_lettered_for_its_missing_original_completes_once_replayed(stack, kafka_settings, env):
    company = f"dlq-{uuid.uuid4().hex[:8]}"
    document_id = await announce(kafka_settings, company)
    failed = await wait_state(stack, company, document_id, "failed")
    assert "not in storage" in failed["error"]

    [letter] = await letters_of(kafka_settings, document_id)
    assert (letter.stage, letter.topic, letter.company_id) == ("download", DOCUMENTS_RAW.name, company)
    assert letter.original["document_id"] == document_id and letter.partition >= 0 and letter.offset >= 0

    listed = docflow(env, "list", "--document", document_id)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if document_id in line]
    assert "download" in row and company in row and "not in storage" in row
    assert listed.stdout.splitlines()[-1] == "1 dead letter"
    as_json = json.loads(docflow(env, "list", "--document", document_id, "--json").stdout)
    assert [(entry["document_id"], entry["partition"], entry["offset"]) for entry in as_json] == [
        (document_id, letter.partition, letter.offset)
    ]

    await store_original(kafka_settings, company, document_id)
    dry = docflow(env, "replay", "--document", document_id, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would replay  {DOCUMENTS_RAW.name}  {document_id}" in dry.stdout
    assert "1 would be replayed (dry run), 0 skipped, 0 refused" in dry.stdout
    await asyncio.sleep(2)
    assert (await wait_state(stack, company, document_id, "failed", timeout=1))["state"] == "failed"

    replayed = docflow(env, "replay", "--document", document_id)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed  {DOCUMENTS_RAW.name}  {document_id}  {company}  (download)" in replayed.stdout
    assert "1 replayed, 0 skipped, 0 refused" in replayed.stdout
    completed = await wait_state(stack, company, document_id, "completed")
    assert completed["error"] is None and completed["chunks_embedded"] == completed["chunks_total"] > 0

    # A second replay of the same letter changes nothing: same chunks, and the document stays completed.
    again = await replay(kafka_settings, [letter])
    assert [outcome.action for outcome in again.outcomes] == ["replayed"]
    await asyncio.sleep(3)
    async with DocflowClient(stack.of_role("web")[0].url, company) as client:
        after = await client.status(document_id)
    assert after["state"] == "completed" and after["chunks_total"] == completed["chunks_total"]
    assert after["chunks_embedded"] == completed["chunks_embedded"]


async def test_filters_select_by_document_stage_and_company(stack, kafka_settings):
    company, other = f"filt-{uuid.uuid4().hex[:8]}", f"filt-{uuid.uuid4().hex[:8]}"
    missing = await announce(kafka_settings, company)
    # Naming another company's object: refused unread, as tampered (stage validate).
    foreign = open_storage(kafka_settings).uri(object_key(other, str(uuid.uuid4()), "notes.txt"))
    tampered = await announce(kafka_settings, company, s3_path=foreign)
    elsewhere = await announce(kafka_settings, other)
    for document_id, owner in ((missing, company), (tampered, company), (elsewhere, other)):
        await wait_state(stack, owner, document_id, "failed")
        await letters_of(kafka_settings, document_id)

    def ids(letters) -> set[str]:
        return {letter.document_id for letter in letters}

    assert ids(await dead_letters(kafka_settings, company_id=company)) == {missing, tampered}
    assert ids(await dead_letters(kafka_settings, company_id=company, stage="download")) == {missing}
    assert ids(await dead_letters(kafka_settings, company_id=company, stage="validate")) == {tampered}
    assert ids(await dead_letters(kafka_settings, document_id=elsewhere)) == {elsewhere}
    assert ids(await dead_letters(kafka_settings, document_id=elsewhere, company_id=company)) == set()
    assert ids(await dead_letters(kafka_settings, company_id=f"nobody-{uuid.uuid4().hex}")) == set()
    every = await dead_letters(kafka_settings)
    assert {missing, tampered, elsewhere} <= ids(every)
    assert [letter.failed_ms for letter in every] == sorted(letter.failed_ms for letter in every)


async def test_a_dry_run_produces_nothing(stack, kafka_settings):
    company = f"dry-{uuid.uuid4().hex[:8]}"
    document_id = await announce(kafka_settings, company)
    await wait_state(stack, company, document_id, "failed")
    letters = await letters_of(kafka_settings, document_id)
    await store_original(kafka_settings, company, document_id)
    raw_before = await keyed(kafka_settings, DOCUMENTS_RAW.name, document_id)
    status_before = await keyed(kafka_settings, DOCUMENTS_STATUS.name, document_id)

    report = await replay(kafka_settings, letters, dry_run=True)
    assert report.dry_run and [outcome.action for outcome in report.outcomes] == ["would replay"]

    await asyncio.sleep(3)
    assert await keyed(kafka_settings, DOCUMENTS_RAW.name, document_id) == raw_before
    assert await keyed(kafka_settings, DOCUMENTS_STATUS.name, document_id) == status_before
    assert len(await dead_letters(kafka_settings, document_id=document_id)) == 1
    assert (await wait_state(stack, company, document_id, "failed", timeout=1))["state"] == "failed"


async def test_a_letter_naming_a_foreign_topic_is_refused_and_nothing_is_produced(stack, kafka_settings, env):
    company = f"evil-{uuid.uuid4().hex[:8]}"
    document_id = str(uuid.uuid4())
    foreign_topic = f"not-docflow-{uuid.uuid4().hex[:8]}"
    original = {"document_id": document_id, "company_id": company, "filename": "x.txt"}
    forged = [
        DeadLetter(
            document_id=document_id,
            company_id=company,
            topic=topic,
            stage="download",
            error="forged",
            attempts=1,
            failed_ms=now_ms(),
            original=original,
        )
        for topic in (foreign_topic, DOCUMENTS_STATUS.name)
    ]
    await produce(kafka_settings, [(DOCUMENTS_DLQ.name, document_id, letter.dumps()) for letter in forged])
    letters = await letters_of(kafka_settings, document_id, count=2)
    assert {letter.topic for letter in letters} == {foreign_topic, DOCUMENTS_STATUS.name}

    report = await replay(kafka_settings, letters)
    assert [outcome.action for outcome in report.outcomes] == ["refused", "refused"]
    reasons = {outcome.letter.topic: outcome.reason for outcome in report.outcomes}
    assert "not one of docflow's topics" in reasons[foreign_topic]
    assert "not a topic docflow replays into" in reasons[DOCUMENTS_STATUS.name]

    cli = docflow(env, "replay", "--document", document_id)
    assert cli.returncode == 1
    assert f"refused  {foreign_topic}  {document_id}" in cli.stdout and "0 replayed, 0 skipped, 2 refused" in cli.stdout

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers, **client_options(kafka_settings))
    await admin.start()
    try:
        assert foreign_topic not in await admin.list_topics()
    finally:
        await admin.close()
    assert await keyed(kafka_settings, DOCUMENTS_STATUS.name, document_id) == []


async def test_an_undecodable_message_is_replayed_only_when_asked(stack, kafka_settings):
    document_id = str(uuid.uuid4())
    broken = b'{"document_id": "' + document_id.encode() + b'", "company_id": "undecodable-co", "s3_'
    await produce(kafka_settings, [(DOCUMENTS_RAW.name, document_id, broken)])
    [letter] = await letters_of(kafka_settings, document_id)
    assert letter.stage == "decode" and letter.topic == DOCUMENTS_RAW.name
    assert letter.original["value"] == broken.decode() and letter.original["key"] == document_id

    skipped = await replay(kafka_settings, [letter])
    assert [outcome.action for outcome in skipped.outcomes] == ["skipped"]
    assert "--include-undecodable" in skipped.outcomes[0].reason
    assert await keyed(kafka_settings, DOCUMENTS_RAW.name, document_id) == [broken]

    replayed = await replay(kafka_settings, [letter], include_undecodable=True)
    assert [outcome.action for outcome in replayed.outcomes] == ["replayed"]
    assert "no replayed status" in replayed.outcomes[0].reason  # its company could not be read
    assert await keyed(kafka_settings, DOCUMENTS_RAW.name, document_id) == [broken, broken]
    # As it was, it fails again, and no status claims the document for an empty company.
    assert len(await letters_of(kafka_settings, document_id, count=2)) == 2
    assert await keyed(kafka_settings, DOCUMENTS_STATUS.name, document_id) == []


async def test_replaying_everything_asks_first(kafka_settings, env):
    # At least one letter, refused if it were replayed.
    document_id = str(uuid.uuid4())
    letter = DeadLetter(
        document_id=document_id,
        company_id="ask-co",
        topic=f"not-docflow-{uuid.uuid4().hex[:8]}",
        stage="download",
        error="forged",
        attempts=1,
        failed_ms=now_ms(),
        original={"document_id": document_id, "company_id": "ask-co"},
    )
    await produce(kafka_settings, [(DOCUMENTS_DLQ.name, document_id, letter.dumps())])
    declined = await asyncio.to_thread(docflow, env, "replay", stdin="n\n")
    assert declined.returncode == 1
    assert "replay all" in declined.stderr and "replayed," not in declined.stdout


def test_an_unreachable_broker_exits_3(env):
    unreachable = dict(env, DOCFLOW_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    for command in (["list"], ["replay", "--document", str(uuid.uuid4())]):
        result = docflow(unreachable, *command, "--timeout", "5")
        assert result.returncode == 3, result.stderr
        assert "unreachable" in result.stderr
