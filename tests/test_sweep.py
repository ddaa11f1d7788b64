"""The sweeper of orphan originals, against the session broker (and moto S3): what it removes and what it keeps."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from pipeline.app import STATUS_TABLE
from pipeline.ids import object_key
from pipeline.local.ports import free_port
from pipeline.records import status_event
from pipeline.settings import Settings
from pipeline.storage import sweep as sweep_module
from pipeline.storage.file import FileStorage
from pipeline.storage.s3 import S3Storage
from pipeline.storage.sweep import (
    STATUS_CHANGELOG,
    SweepRefused,
    SweepUnavailable,
    document_of,
    named_documents,
    sweep_orphans,
)
from pipeline.topics import DOCUMENTS_RAW, create_topics
from tables.document_status import fold
from tests.stack import document_uploaded

HOUR = 3600.0


@pytest.fixture(scope="session")
async def naming_topics(kafka_settings) -> Settings:
    """documents.raw and the status changelog (compacted, as Faust creates it) on the session broker."""
    await create_topics(kafka_settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    try:
        topic = NewTopic(
            STATUS_CHANGELOG, kafka_settings.topic_partitions, 1, topic_configs={"cleanup.policy": "compact"}
        )
        try:
            await admin.create_topics([topic])
        except TopicAlreadyExistsError:
            pass  # a web worker of another test made it
    finally:
        await admin.close()
    return kafka_settings


async def announce(settings: Settings, *, status_row: list[str] = (), raw_event: list[str] = ()) -> None:
    """A status changelog row for each of status_row, a DocumentUploaded on documents.raw for each of raw_event."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for document_id in status_row:
            # A whole DocumentStatus: web workers of later tests recover this changelog too.
            row = fold(None, status_event(document_id, "acme", "uploaded", filename="a.txt"))
            await producer.send_and_wait(STATUS_CHANGELOG, row.dumps(), key=document_id.encode())
        for document_id in raw_event:
            uploaded = document_uploaded(
                "acme", f"file:///objects/acme/{document_id}/a.txt", document_id=document_id, sha256="0" * 64,
                chunk_size=250, chunk_overlap=30,
            )  # fmt: skip
            await producer.send_and_wait(DOCUMENTS_RAW.name, uploaded.dumps(), key=document_id.encode())
    finally:
        await producer.stop()


def age(storage: FileStorage, key: str, seconds: float) -> None:
    path = storage.root / key
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
async def documents(naming_topics, tmp_path):
    """Old objects of a document with a status row, one with a raw event, an orphan; a young orphan; a stray file."""
    storage = FileStorage(tmp_path / "objects")
    ids = {name: str(uuid.uuid4()) for name in ("status", "raw", "orphan", "young")}
    keys = {name: object_key("acme", document_id, f"{name}.txt") for name, document_id in ids.items()}
    for name, key in keys.items():
        await storage.put(key, name.encode())
        if name != "young":
            age(storage, key, 2 * HOUR)
    (storage.root / "stray.txt").write_bytes(b"not an original")
    age(storage, "stray.txt", 2 * HOUR)
    await announce(naming_topics, status_row=[ids["status"]], raw_event=[ids["raw"]])
    yield storage, keys
    await storage.close()


def test_the_changelog_is_the_one_faust_names_for_the_status_table():
    assert STATUS_CHANGELOG == f"docflow-web-{STATUS_TABLE}-changelog"


@pytest.mark.parametrize(
    "key, document_id",
    [
        ("acme/doc-1/a.pdf", "doc-1"),
        ("acme/doc-1/.upload-x1y2", "doc-1"),
        ("stray.txt", None),
        ("acme/a.pdf", None),
        ("acme/doc-1/sub/a.pdf", None),
        ("acme/doc-1/", None),
        ("acme/..doc/a.pdf", None),
    ],
)
def test_only_company_document_name_keys_have_a_document(key, document_id):
    assert document_of(key) == document_id


async def test_sweep_removes_only_old_objects_no_event_names(naming_topics, documents):
    storage, keys = documents
    dry = await sweep_orphans(naming_topics, storage, older_than_seconds=HOUR, dry_run=True)
    assert dry.orphan_keys == [keys["orphan"]]
    assert dry.removed == 0
    assert await storage.exists(keys["orphan"])

    report = await sweep_orphans(naming_topics, storage, older_than_seconds=HOUR, dry_run=False)
    assert report.removed_keys == [keys["orphan"]]
    assert (report.listed, report.kept_named, report.kept_young, report.removed, report.failed) == (5, 2, 1, 1, 0)
    assert report.unrecognized_keys == ["stray.txt"]
    remaining = {item.key async for item in storage.listing()}
    assert remaining == {keys["status"], keys["raw"], keys["young"], "stray.txt"}


async def test_the_default_grace_is_the_setting(naming_topics, documents):
    storage, keys = documents
    settings = naming_topics.model_copy(update={"storage_sweep_grace_seconds": 3 * HOUR})
    report = await sweep_orphans(settings, storage, dry_run=False)
    assert report.older_than_seconds == 3 * HOUR
    assert (report.kept_young, report.removed) == (4, 0)


async def test_a_failed_removal_is_logged_with_its_key_and_the_others_go_on(naming_topics, documents, caplog):
    storage, keys = documents
    second = object_key("acme", str(uuid.uuid4()), "second.txt")
    await storage.put(second, b"2")
    age(storage, second, 2 * HOUR)
    delete = storage.delete

    async def refuses_the_first(key: str) -> None:
        if key == keys["orphan"]:
            raise PermissionError(13, "Permission denied")
        await delete(key)

    storage.delete = refuses_the_first
    with caplog.at_level(logging.ERROR, logger="pipeline.storage.sweep"):
        report = await sweep_orphans(naming_topics, storage, older_than_seconds=HOUR, dry_run=False)
    assert report.failed_keys == [keys["orphan"]]
    assert "Permission denied" in report.errors[keys["orphan"]]
    assert report.removed_keys == [second]
    assert any(keys["orphan"] in record.getMessage() for record in caplog.records)


async def test_sweep_on_s3_by_the_clock(naming_topics, s3_endpoint):
    from aiobotocore.session import get_session

    bucket = f"docflow-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as client:
        await client.create_bucket(Bucket=bucket)
    named, orphan = str(uuid.uuid4()), str(uuid.uuid4())
    async with S3Storage(bucket, "originals", endpoint_url=s3_endpoint) as storage:
        for document_id in (named, orphan):
            await storage.put(object_key("acme", document_id, "a.txt"), b"a")
        await announce(naming_topics, raw_event=[named])
        young = await sweep_orphans(naming_topics, storage, dry_run=False)
        assert (young.kept_young, young.removed) == (2, 0)
        report = await sweep_orphans(
            naming_topics, storage, older_than_seconds=0, dry_run=False, clock=lambda: time.time() + 2 * HOUR
        )
        assert report.removed_keys == [object_key("acme", orphan, "a.txt")]
        assert report.kept_named == 1
        assert [item.key async for item in storage.listing()] == [object_key("acme", named, "a.txt")]


async def test_a_missing_naming_topic_removes_nothing(naming_topics, monkeypatch):
    monkeypatch.setattr(sweep_module, "NAMING_TOPICS", (f"nowhere-{uuid.uuid4().hex}", DOCUMENTS_RAW.name))
    with pytest.raises(SweepRefused, match="does not exist"):
        await named_documents(naming_topics, {"some-document"})
    assert await named_documents(naming_topics, set()) == set()  # nothing to decide: nothing refused


async def test_an_unreachable_broker_removes_nothing(tmp_path, documents):
    storage, keys = documents
    settings = Settings(home=tmp_path, kafka_port=free_port())
    with pytest.raises(SweepUnavailable, match="unreachable"):
        await sweep_orphans(settings, storage, older_than_seconds=HOUR, dry_run=False, kafka_timeout_seconds=5)
    assert await storage.exists(keys["orphan"])


def _cli(settings: Settings, storage: FileStorage, *args: str) -> subprocess.CompletedProcess:
    env = {
        "DOCFLOW_HOME": str(settings.home),
        "DOCFLOW_KAFKA_PORT": str(settings.kafka_port),
        "DOCFLOW_STORAGE_URL": storage.root.as_uri(),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "storage", "sweep", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_sweep_prints_what_it_removed_and_a_summary(naming_topics, documents):
    storage, keys = documents
    dry = _cli(naming_topics, storage, "--older-than", "3600", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {keys['orphan']}" in dry.stdout
    assert "1 orphans (0 removed, 0 failed, dry run)" in dry.stdout
    assert (storage.root / keys["orphan"]).exists()

    result = _cli(naming_topics, storage, "--older-than", "3600")
    assert result.returncode == 0, result.stderr
    assert f"removed {keys['orphan']}" in result.stdout
    assert "left alone (not company/document/name): stray.txt" in result.stdout
    assert (
        "5 listed: 2 named by an event, 1 younger than 3600s, 1 orphans (1 removed, 0 failed), 1 left alone"
        in result.stdout
    )
    assert not (storage.root / keys["orphan"]).exists()


def test_cli_sweep_exits_3_when_the_broker_is_unreachable_and_2_on_a_grace_too_short(tmp_path, documents):
    storage, keys = documents
    settings = Settings(home=tmp_path, kafka_port=free_port())
    result = _cli(settings, storage, "--older-than", "3600", "--timeout", "5")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "unreachable" in result.stderr
    assert (storage.root / keys["orphan"]).exists()
    too_short = _cli(settings, storage, "--older-than", "1")
    assert too_short.returncode == 2
    assert "--older-than" in too_short.stderr
