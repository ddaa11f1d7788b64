"""The pipeline end to end: real broker, real worker processes (2 web, 2 chunker, 1 embedder), RocksDB."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.local import documents
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.settings import REPO_ROOT
from pipeline.text.chunking import chunk_document
from pipeline.topics import DOCUMENTS_DLQ, EMBEDDINGS_READY
from tests.stack import corpus, expected_chunk_ids, read_topic, upload_all, wait_all

MAX_UPLOAD_BYTES = 1_000_000


@pytest.fixture(scope="module")
def stack(kafka_settings, tmp_path_factory):
    logs = tmp_path_factory.mktemp("worker-logs")
    env = worker_env(
        kafka_settings, DOCFLOW_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES), DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10"
    )
    workers = WorkerStack(kafka_settings, env, logs)
    try:
        workers.launch({"web": 2, "chunker": 2, "embedder": 1})
        yield workers
    finally:
        workers.stop_all()


async def test_twenty_documents_complete_and_every_chunk_is_embedded_exactly_once(stack, kafka_settings, tmp_path):
    company = f"acme-{uuid.uuid4().hex[:8]}"
    files = corpus(20, seed=1)
    started = time.perf_counter()
    uploaded = await upload_all(stack, company, files, tmp_path)
    statuses = await wait_all(stack.of_role("web")[0].url, company, list(uploaded))
    elapsed = time.perf_counter() - started

    expected = {doc: expected_chunk_ids(doc, filename, data) for doc, (filename, data) in uploaded.items()}
    for doc, status in statuses.items():
        assert status["state"] == "completed", status
        assert status["chunks_embedded"] == status["chunks_total"] == len(expected[doc])
    all_expected = set().union(*expected.values())
    embeddings = await read_topic(kafka_settings, EMBEDDINGS_READY.name, set(uploaded), len(all_expected))
    ids = [embedding["chunk_id"] for embedding in embeddings]
    assert set(ids) == all_expected
    assert len(ids) == len(all_expected), "a chunk was embedded more than once"
    assert {len(embedding["vector"]) for embedding in embeddings} == {384}

    # Every web worker answers for every document, whichever owns its partition.
    for worker in stack.of_role("web"):
        async with DocflowClient(worker.url, company) as client:
            for doc, status in statuses.items():
                answer = await client.status(doc)
                answer.pop("stale"), status.pop("stale", None)
                assert answer == status
            listed = await client.list()
            assert {d["document_id"] for d in listed["documents"]} == set(uploaded)
            assert listed["partial"] is False
    print(f"\n20 documents, {len(all_expected)} chunks in {elapsed:.1f}s: {len(all_expected) / elapsed:.1f} chunks/s")


async def test_chunker_killed_mid_run_every_document_still_completes(stack, tmp_path):
    company = f"kill-{uuid.uuid4().hex[:8]}"
    files = [(f"long-{n}.pdf", documents.make_pdf(documents.lorem_pages(12, 400, seed=100 + n))) for n in range(16)]
    uploaded = await upload_all(stack, company, files, tmp_path)
    web = stack.of_role("web")[0].url
    victim = stack.of_role("chunker")[0]
    stack.stop(victim, signal.SIGKILL)
    async with DocflowClient(web, company) as client:
        states_at_kill = [doc["state"] for doc in (await client.list())["documents"]]
    assert states_at_kill.count("completed") < len(uploaded), "the chunker was killed after the run, not during it"

    statuses = await wait_all(web, company, list(uploaded), timeout=240)
    assert {status["state"] for status in statuses.values()} == {"completed"}
    stack.launch({"chunker": 1})


async def test_restarted_web_worker_serves_the_same_statuses(stack, tmp_path):
    company = f"restart-{uuid.uuid4().hex[:8]}"
    uploaded = await upload_all(stack, company, corpus(6, seed=50), tmp_path)
    first, second = stack.of_role("web")
    before = await wait_all(first.url, company, list(uploaded))
    stack.stop(second)
    restarted = stack.start("web", second.port)
    stack.wait_healthy([restarted])
    stack.wait_balanced()
    for worker in (restarted, first):
        async with DocflowClient(worker.url, company) as client:
            deadline = time.monotonic() + 60
            for doc, status in before.items():
                while True:
                    try:
                        after = await client.status(doc)
                        if not after["stale"]:
                            break
                    except ApiError as exc:
                        if exc.status not in (404, 503) or time.monotonic() > deadline:
                            raise
                    await asyncio.sleep(0.5)
                after.pop("stale"), status.pop("stale", None)
                assert after == status


async def test_bad_inputs_get_clear_errors_and_workers_go_on(stack, kafka_settings, tmp_path):
    company = f"bad-{uuid.uuid4().hex[:8]}"
    web = stack.of_role("web")[0].url

    def file(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    async with DocflowClient(web, company) as client:
        corrupt = (await client.upload(file("broken.pdf", documents.corrupt_pdf())))["document_id"]
        encrypted = (await client.upload(file("secret.pdf", documents.make_encrypted_pdf())))["document_id"]
        image_only = (await client.upload(file("scan.pdf", documents.make_image_only_pdf())))["document_id"]
        titled = await client.upload(file("plain.txt", b"plain words " * 100), title="Plain", tags="a,b")
        refusals = {}
        for name, data in [
            ("empty.txt", b""),
            ("big.txt", b"x" * (MAX_UPLOAD_BYTES + 1)),
            ("sheet.xlsx", b"PK\x03\x04"),
        ]:
            with pytest.raises(ApiError) as refused:
                await client.upload(file(name, data))
            refusals[name] = (refused.value.status, refused.value.code)
        good = await client.upload(file("after.md", documents.make_markdown("ok", ["still working " * 50])))
        with pytest.raises(ApiError) as unknown:
            await client.status(str(uuid.uuid4()))

    assert refusals == {
        "empty.txt": (422, "empty_file"),
        "big.txt": (413, "too_large"),
        "sheet.xlsx": (415, "unsupported_type"),
    }
    assert unknown.value.status == 404
    company_objects = kafka_settings.home / "objects" / company
    stored_names = {path.name for path in company_objects.rglob("*") if path.is_file()}
    assert "big.txt" not in stored_names and "empty.txt" not in stored_names

    statuses = await wait_all(web, company, [corrupt, encrypted, image_only, good["document_id"]])
    assert statuses[good["document_id"]]["state"] == "completed"
    for doc, reason in [(corrupt, "not a valid PDF"), (encrypted, "encrypted"), (image_only, "no extractable text")]:
        assert statuses[doc]["state"] == "failed"
        assert reason in statuses[doc]["error"]
    dead = await read_topic(kafka_settings, DOCUMENTS_DLQ.name, {corrupt, encrypted, image_only}, 3)
    assert {letter["document_id"] for letter in dead} == {corrupt, encrypted, image_only}
    assert all(letter["stage"] == "extract" and letter["original"]["document_id"] for letter in dead)

    # Another company's document is as unknown as a missing one, and a missing company is a bad request.
    async with DocflowClient(web, "someone-else") as other:
        with pytest.raises(ApiError) as foreign:
            await other.status(good["document_id"])
    assert foreign.value.status == 404
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{web}/api/v1/documents/{good['document_id']}") as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "missing_company_id"
        form = aiohttp.FormData()
        form.add_field("file", b"hello there", filename="../../etc/passwd", content_type="text/plain")
        async with session.post(f"{web}/api/v1/upload", data=form, headers={"X-Company-ID": company}) as response:
            assert response.status == 202
            climbing = (await response.json())["document_id"]
    assert (company_objects / climbing / "passwd").read_bytes() == b"hello there"
    assert not (kafka_settings.home / "etc").exists()
    statuses = await wait_all(web, company, [climbing, titled["document_id"]])
    assert {status["state"] for status in statuses.values()} == {"completed"}
    assert statuses[climbing]["filename"] == "passwd"


async def test_web_role_serves_the_upload_page(stack):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.of_role('web')[0].url}/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            page = await response.text()
    assert 'id="upload"' in page and "/api/v1/documents" in page
    assert "const AUTH_REQUIRED = false;" in page  # the page names its company: auth is off here


async def test_messages_on_every_topic_match_their_json_schemas(stack, kafka_settings, tmp_path):
    from jsonschema import Draft202012Validator

    from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_RAW, DOCUMENTS_STATUS

    company = f"schema-{uuid.uuid4().hex[:8]}"
    files = corpus(2, seed=7) + [("bad.pdf", documents.corrupt_pdf())]
    uploaded = await upload_all(stack, company, files, tmp_path)
    await wait_all(stack.of_role("web")[0].url, company, list(uploaded))
    for spec in (DOCUMENTS_RAW, CHUNKS_PROCESSED, EMBEDDINGS_READY, DOCUMENTS_STATUS, DOCUMENTS_DLQ):
        schema = json.loads((REPO_ROOT / "pipeline" / "schemas" / f"{spec.name}.json").read_text())
        validator = Draft202012Validator(schema)
        messages = await read_topic(kafka_settings, spec.name, set(uploaded), 1, timeout=15)
        assert messages, f"no message on {spec.name}"
        for message in messages:
            assert "__faust" not in message
            errors = [error.message for error in validator.iter_errors(message)]
            assert not errors, f"{spec.name}: {errors}"


async def test_undecodable_message_goes_to_the_dead_letter_topic_and_the_chunker_goes_on(
    stack, kafka_settings, tmp_path
):
    from aiokafka import AIOKafkaProducer

    from pipeline.topics import DOCUMENTS_RAW

    poison_key = f"poison-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(DOCUMENTS_RAW.name, b'{"document_id": "half a record"}', key=poison_key.encode())
        await producer.send_and_wait(DOCUMENTS_RAW.name, b"not json at all", key=poison_key.encode())
    finally:
        await producer.stop()
    company = f"after-poison-{uuid.uuid4().hex[:8]}"
    uploaded = await upload_all(stack, company, corpus(4, seed=9), tmp_path)  # some share the poisoned partition
    statuses = await wait_all(stack.of_role("web")[0].url, company, list(uploaded), timeout=120)
    assert {status["state"] for status in statuses.values()} == {"completed"}
    dead = await read_topic(kafka_settings, DOCUMENTS_DLQ.name, {poison_key}, 2, timeout=20)
    assert [letter["stage"] for letter in dead] == ["decode", "decode"]
    assert dead[1]["original"]["value"] == "not json at all"


async def test_text_ingestion_completes_with_its_own_chunking_options(stack):
    company = f"text-{uuid.uuid4().hex[:8]}"
    text = "\n\n".join(documents.lorem_pages(3, 200, seed=3))
    async with DocflowClient(stack.of_role("web")[1].url, company) as client:
        answer = await client.upload_text(text, title="Meeting notes", tags=["q3"], chunk_size=300, chunk_overlap=50)
        with pytest.raises(ApiError) as refused:
            await client.upload_text(text, chunk_size=300, chunk_overlap=300)
        status = await client.wait(answer["document_id"], timeout=120)
    assert refused.value.status == 422 and refused.value.code == "invalid_parameter"
    expected = chunk_document(text.encode(), "text/plain", 300, 50)
    assert status["state"] == "completed"
    assert status["chunks_total"] == len(expected.chunks)
    assert status["filename"] == "Meeting notes.txt"


async def test_waiting_for_many_documents_follows_them_all_through_the_companys_list(stack):
    company = f"many-{uuid.uuid4().hex[:8]}"
    async with DocflowClient(stack.of_role("web")[0].url, company) as client:
        ids = [
            (await client.upload_text(f"note {n}: " + documents.lorem_pages(1, 80, seed=n)[0]))["document_id"]
            for n in range(4)
        ]
        finished = await client.wait_all(ids, timeout=120, interval=0.1)
    assert set(finished) == set(ids)
    assert {status["state"] for status in finished.values()} == {"completed"}
    assert all(status["chunks_embedded"] == status["chunks_total"] for status in finished.values())


def test_cli_uploads_and_follows_documents_with_its_exit_codes(stack, tmp_path):
    import subprocess
    import sys

    web = stack.of_role("web")[0]
    env = dict(stack.env, DOCFLOW_WEB_PORT=str(web.port))
    good = tmp_path / "good.md"
    good.write_bytes(documents.make_markdown("cli", documents.lorem_pages(2, 150, seed=11)))
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(documents.corrupt_pdf())

    def docflow(*args: str, port_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=port_env or env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    done = docflow("upload", str(good), "--company", "cli-co", "--wait")
    assert done.returncode == 0, done.stderr
    document_id = done.stdout.split()[0]
    assert f"{document_id}  completed" in done.stdout
    failed = docflow("upload", str(bad), "--company", "cli-co", "--wait")
    assert failed.returncode == 1
    assert "not a valid PDF" in failed.stdout
    assert docflow("status", document_id, "--company", "cli-co").returncode == 0
    assert document_id in docflow("list", "--company", "cli-co").stdout
    assert docflow("status", str(uuid.uuid4()), "--company", "cli-co").returncode == 1
    assert docflow("upload", str(good)).returncode == 2  # --company is required
    unreachable = dict(env, DOCFLOW_WEB_PORT=str(free_port()))
    assert docflow("status", document_id, "--company", "cli-co", port_env=unreachable).returncode == 3
