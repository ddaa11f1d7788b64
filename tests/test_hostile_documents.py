"""Hostile input to the chunker: forged events, page-count bombs, decompression bombs, documents that never end.

The PDFs are built here, by hand: a page tree declaring 100,000 pages, a /FlateDecode
content stream of about a megabyte that inflates to 1.1 GB, encrypted files. The limits
(``max_pages``, ``extraction_timeout_seconds``, ``extraction_memory_mb``) are tested on
the extraction functions and on :class:`agents.chunker.ExtractionPool` directly; the last
test runs real workers against the session broker with a forged ``documents.raw`` event.
Memory stays bounded throughout: every bomb runs in a pool process capped at 512 MB.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
import zlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from agents.chunker import ExtractionPool
from pipeline.errors import EncryptedPDFError, ExtractionError, ExtractionLimitExceeded
from pipeline.local import documents
from pipeline.records import DocumentUploaded
from pipeline.settings import Settings
from pipeline.text.chunking import chunk_document, process_ready
from pipeline.text.extract import extract_pages
from tests.hostile_files import BOMB_MB, aes_encrypted_pdf, flate_bomb, page_count_bomb, slow_pdf
from tests.stack import document_uploaded, json_or_none

PDF = "application/pdf"
LIMIT_MB = 512  # the memory limit the bombs run under


def good_pdf(seed: int = 1, pages: int = 2) -> bytes:
    return documents.make_pdf(documents.lorem_pages(pages, 200, seed=seed))


def event(content_type: str = PDF, unit: str = "chars") -> DocumentUploaded:
    size, overlap = (250, 30) if unit == "tokens" else (500, 50)
    return document_uploaded(
        "hostile", filename="x.pdf", content_type=content_type, chunk_size=size, chunk_overlap=overlap,
        chunk_size_unit=unit,
    )  # fmt: skip


# Run in pool processes: top level, so that they pickle by name.
def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes << 20))


def process_gone(pid: int, wait: float = 10.0) -> bool:
    """Whether the process has ended and been reaped (a zombie still has its /proc entry)."""
    deadline = time.monotonic() + wait
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- the hostile files themselves --------------------------------------------------------------


def test_the_bombs_are_what_they_claim():
    bomb, double = flate_bomb(), flate_bomb(double=True)
    assert len(bomb) < 1_500_000 and len(double) < 20_000
    # Inflate the single bomb's stream piece by piece, never more than 1 MiB at once.
    stream = bomb[bomb.index(b"stream\n", bomb.index(b"/FlateDecode")) + 7 :]
    inflater, inflated, pending = zlib.decompressobj(), 0, stream
    while pending and not inflater.eof:
        inflated += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    assert inflater.eof and inflated > BOMB_MB << 20 > 1_000_000_000
    assert b"/Count 100000" in page_count_bomb()


# --- page limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_a_pdf_declaring_100000_pages_fails_unread(extractor):
    max_pages = Settings().max_pages
    with pytest.raises(ExtractionLimitExceeded, match=f"^PDF has 100000 pages, more than the {max_pages} "):
        extract_pages(page_count_bomb(), PDF, extractor, max_pages=max_pages)
    # Declared within the limit, the one real page is read.
    assert extract_pages(page_count_bomb(3), PDF, "pypdf", max_pages=3) == ["one real page"]


def test_pypdf_refuses_a_bomb_by_its_own_inflation_limit():
    with pytest.raises(ExtractionLimitExceeded, match="^PDF is too large to extract"):
        extract_pages(flate_bomb(), PDF, "pypdf", max_pages=10)


# --- the extraction pool: memory -----------------------------------------------------------------


@pytest.mark.parametrize("double", [False, True], ids=["flate", "flate-twice"])
async def test_a_decompression_bomb_fails_by_the_memory_limit_and_the_pool_goes_on(double):
    pool = ExtractionPool(1, max_pages=10, timeout_seconds=60, memory_mb=LIMIT_MB)
    try:
        started = time.monotonic()
        [result] = await pool.chunk_all([(event(), flate_bomb(double=double))], "pdfium")
        assert isinstance(result, ExtractionLimitExceeded), result
        assert str(result) == f"document needs more than {LIMIT_MB} MB of memory to extract"
        assert time.monotonic() - started < 30
        # The process the bomb killed was replaced: the next document is chunked.
        [after] = await pool.chunk_all([(event(), good_pdf())], "pdfium")
        assert after == chunk_document(good_pdf(), PDF, 500, 50)
    finally:
        pool.close()


async def test_python_running_out_of_memory_leaves_the_process_alive():
    pool = ExtractionPool(1, memory_mb=LIMIT_MB)
    try:
        pid = await pool.run(process_ready)
        assert await pool.run(allocate, 64) == 64 << 20
        with pytest.raises(MemoryError):
            await pool.run(allocate, 2 * LIMIT_MB)
        assert await pool.run(process_ready) == pid
    finally:
        pool.close()


@pytest.mark.parametrize(
    "memory_mb",
    [Settings().extraction_memory_mb, Settings.model_fields["extraction_memory_mb"].metadata[0].ge],
    ids=["default", "least-allowed"],
)
async def test_the_tokenizer_loads_and_counts_under_the_memory_limit(memory_mb):
    data = documents.make_pdf(documents.lorem_pages(3, 600, seed=31))
    expected = chunk_document(data, PDF, 250, 30, "pdfium", "tokens")
    pool = ExtractionPool(1, max_pages=Settings().max_pages, memory_mb=memory_mb)
    try:
        [chunked] = await pool.chunk_all([(event(unit="tokens"), data)], "pdfium")
    finally:
        pool.close()
    assert chunked == expected and len(chunked.chunks) > 3


# --- the extraction pool: time -------------------------------------------------------------------


async def test_a_document_past_the_time_limit_is_stopped_and_its_process_replaced():
    pool = ExtractionPool(1, timeout_seconds=1.0, memory_mb=LIMIT_MB)
    try:
        before = await pool.run(process_ready)
        started = time.monotonic()
        with pytest.raises(ExtractionLimitExceeded, match="^document took longer than 1 s to extract"):
            await pool.run(sleep_for, 120)
        assert time.monotonic() - started < 10
        assert process_gone(before), "the process that ran past the limit is still there"
        assert await pool.run(process_ready) != before
        assert await pool.run(sleep_for, 0.1) == "woke"
    finally:
        pool.close()


async def test_a_pdf_that_takes_minutes_fails_by_the_time_limit():
    pool = ExtractionPool(1, timeout_seconds=2.0, memory_mb=LIMIT_MB)
    try:
        started = time.monotonic()
        [result] = await pool.chunk_all([(event(), slow_pdf())], "pypdf")
        assert isinstance(result, ExtractionLimitExceeded), result
        assert "took longer than 2 s" in str(result)
        assert time.monotonic() - started < 15
        [after] = await pool.chunk_all([(event(), good_pdf())], "pypdf")
        assert after.pages == 2
    finally:
        pool.close()


async def test_documents_running_beside_one_that_is_stopped_come_back_to_run_again():
    pool = ExtractionPool(2, timeout_seconds=2.0, memory_mb=LIMIT_MB)

    async def later():
        await asyncio.sleep(0.8)
        return await pool.run(sleep_for, 1.6)  # would end at 2.4 s; its neighbour is stopped at 2 s

    try:
        assert len({await pool.run(process_ready)}) == 1  # started: the times below are the tasks' own
        stuck, beside = await asyncio.gather(pool.run(sleep_for, 120), later(), return_exceptions=True)
        assert isinstance(stuck, ExtractionLimitExceeded)
        assert isinstance(beside, BrokenProcessPool)
        assert await pool.run(sleep_for, 0.1) == "woke"
    finally:
        pool.close()


# --- a batch of hostile documents -----------------------------------------------------------------


async def test_a_batch_of_hostile_documents_fails_each_with_its_reason_and_the_good_ones_complete():
    pool = ExtractionPool(2, max_pages=50, timeout_seconds=30, memory_mb=LIMIT_MB)
    batch = [
        ("good", good_pdf(1)),
        ("bomb", flate_bomb()),
        ("pages", page_count_bomb()),
        ("rc4", documents.make_encrypted_pdf()),
        ("aes", aes_encrypted_pdf()),
        ("corrupt", documents.corrupt_pdf()),
        ("good-too", good_pdf(2, pages=4)),
    ]
    try:
        started = time.monotonic()
        results = dict(
            zip([name for name, _ in batch], await pool.chunk_all([(event(), d) for _, d in batch], "pdfium"))
        )
        elapsed = time.monotonic() - started
        # The worker process never saw any of it: it is still here, and so is its pool.
        assert (await pool.chunk_all([(event(), good_pdf(3))], "pdfium"))[0].pages == 2
    finally:
        pool.close()

    assert results["good"] == chunk_document(good_pdf(1), PDF, 500, 50)
    assert results["good-too"] == chunk_document(good_pdf(2, pages=4), PDF, 500, 50)
    assert str(results["bomb"]) == f"document needs more than {LIMIT_MB} MB of memory to extract"
    assert str(results["pages"]).startswith("PDF has 100000 pages, more than the 50")
    for name in ("rc4", "aes"):
        assert isinstance(results[name], EncryptedPDFError) and str(results[name]).startswith("PDF is encrypted")
    assert isinstance(results["corrupt"], ExtractionError) and "not a valid PDF" in str(results["corrupt"])
    assert elapsed < 45


# --- against the real broker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(kafka_settings, tmp_path_factory):
    from pipeline.local.workers import WorkerStack, worker_env

    env = worker_env(
        kafka_settings,
        DOCFLOW_EXTRACTION_MEMORY_MB=str(LIMIT_MB),
        DOCFLOW_MAX_PAGES="50",
        DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10",
    )
    workers = WorkerStack(kafka_settings, env, tmp_path_factory.mktemp("hostile-worker-logs"))
    try:
        workers.launch({"web": 1, "chunker": 1, "embedder": 1})
        yield workers
    finally:
        workers.stop_all()


def _client_options(settings) -> dict:
    try:
        from pipeline.broker_security import client_options
    except ImportError:
        return {}
    return client_options(settings)


async def read_whole_topic(settings, topic: str) -> list[dict]:
    """Every message on a topic up to its end as of now: enough to say what is not there."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **_client_options(settings),
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found = []
        deadline = time.monotonic() + 60

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            assert time.monotonic() < deadline, "the topic was not read to its end in time"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [value for value in map(json_or_none, (r.value for r in records)) if value is not None]
        return found
    finally:
        await consumer.stop()


async def wait_final(client, document_id: str, timeout: float = 180.0) -> dict:
    """A document's final status. Unlike DocflowClient.wait, a 500 is waited out too: a web worker
    that has not written its status table's changelog yet cannot route a status request."""
    from pipeline.errors import ApiError
    from pipeline.records import FINAL_STATES

    deadline = time.monotonic() + timeout
    while True:
        try:
            status = await client.status(document_id)
            if status["state"] in FINAL_STATES:
                return status
        except ApiError as exc:
            if exc.status not in (404, 500, 503):
                raise
        assert time.monotonic() < deadline, f"document {document_id} did not finish within {timeout:.0f}s"
        await asyncio.sleep(0.25)


async def test_a_forged_event_naming_another_companys_object_fails_as_tampered_end_to_end(
    stack, kafka_settings, tmp_path
):
    from aiokafka import AIOKafkaProducer

    from pipeline.client import DocflowClient
    from pipeline.storage import storage_for_url
    from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_DLQ, DOCUMENTS_RAW
    from tests.stack import read_topic

    web = stack.of_role("web")[0].url
    chunker = stack.of_role("chunker")[0]
    victim, mallory = f"victim-{uuid.uuid4().hex[:8]}", f"mallory-{uuid.uuid4().hex[:8]}"
    secret = "the victim keeps its quarterly numbers here " * 20

    async with DocflowClient(web, victim) as client:
        (tmp_path / "secret.txt").write_text(secret)
        victim_doc = (await client.upload(tmp_path / "secret.txt"))["document_id"]
        assert (await wait_final(client, victim_doc))["state"] == "completed"
    victim_uri = storage_for_url(kafka_settings.objects_url).uri(f"{victim}/{victim_doc}/secret.txt")

    def forged(s3_path: str) -> DocumentUploaded:
        return document_uploaded(mallory, s3_path, filename="secret.txt", size_bytes=len(secret))

    events = [forged(victim_uri), forged("file:///etc/hostname")]
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_settings.bootstrap_servers, acks="all", **_client_options(kafka_settings)
    )
    await producer.start()
    try:
        for uploaded in events:
            value = json.dumps(uploaded.asdict()).encode()
            await producer.send_and_wait(DOCUMENTS_RAW.name, value, key=uploaded.document_id.encode())
    finally:
        await producer.stop()
    forged_ids = {uploaded.document_id for uploaded in events}

    async with DocflowClient(web, mallory) as client:
        statuses = {doc: await wait_final(client, doc) for doc in forged_ids}
        # A good document uploaded afterwards, and two hostile ones, meet a worker that goes on.
        uploads = {}
        for name, data in [
            ("after.md", documents.make_markdown("ok", ["still working " * 50])),
            ("pages.pdf", page_count_bomb()),
            ("bomb.pdf", flate_bomb()),
        ]:
            (tmp_path / name).write_bytes(data)
            uploads[name] = (await client.upload(tmp_path / name))["document_id"]
        after = {name: await wait_final(client, doc) for name, doc in uploads.items()}

    for status in statuses.values():
        assert status["state"] == "failed", status
        assert "the event names an object outside the document's own prefix" in status["error"]
    dead = await read_topic(kafka_settings, DOCUMENTS_DLQ.name, forged_ids, len(forged_ids), timeout=30)
    assert {letter["document_id"] for letter in dead} == forged_ids
    assert {letter["stage"] for letter in dead} == {"validate"}
    assert victim_uri in {letter["original"]["s3_path"] for letter in dead}

    chunks = await read_whole_topic(kafka_settings, CHUNKS_PROCESSED.name)
    assert not [chunk for chunk in chunks if chunk["document_id"] in forged_ids]
    assert not [chunk for chunk in chunks if "quarterly numbers" in chunk["text"] and chunk["company_id"] != victim]
    assert [chunk for chunk in chunks if chunk["document_id"] == victim_doc]

    assert after["after.md"]["state"] == "completed", after
    assert after["pages.pdf"]["state"] == "failed" and "PDF has 100000 pages" in after["pages.pdf"]["error"]
    assert after["bomb.pdf"]["state"] == "failed"
    assert after["bomb.pdf"]["error"] == f"document needs more than {LIMIT_MB} MB of memory to extract"
    # The chunker worker itself lived through all of it, and kept its partitions.
    assert chunker.alive() and stack.of_role("chunker") == [chunker]
    stack.wait_balanced(["chunker"], timeout=30)
    assert os.path.exists(f"/proc/{chunker.process.pid}")
