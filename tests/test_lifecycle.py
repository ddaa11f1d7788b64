"""The document lifecycle end to end: cancel, delete and replace, with real workers (two web, a
chunker, an embedder slowed by its embedding server, an indexer), the real broker, real Milvus
and originals on the S3 server.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime

import pytest
from aiobotocore.session import get_session
from aiokafka import AIOKafkaConsumer
from pymilvus import MilvusClient

from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.local import documents
from pipeline.local.openai_server import ThreadedEmbeddingServer
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.topics import DOCUMENTS_RAW
from tests.stack import json_or_none

BUCKET = "lifecycle-originals"
EMBED_DELAY_MS = 250  # per request of 8 chunks: a 40-page document embeds for several seconds


@pytest.fixture(scope="module")
def embedding_server():
    server = ThreadedEmbeddingServer()
    server.start()
    server.configure(delay_ms=EMBED_DELAY_MS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(milvus_settings, s3_endpoint, embedding_server, tmp_path_factory):
    async def bucket():
        async with get_session().create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as client:
            await client.create_bucket(Bucket=BUCKET)

    asyncio.run(bucket())
    settings = milvus_settings.model_copy(update={"storage_url": f"s3://{BUCKET}/o", "s3_endpoint_url": s3_endpoint})
    env = worker_env(
        settings,
        DOCFLOW_STORAGE_URL=settings.storage_url,
        DOCFLOW_S3_ENDPOINT_URL=s3_endpoint,
        DOCFLOW_EMBEDDING_BACKEND="openai",
        DOCFLOW_OPENAI_BASE_URL=embedding_server.url,
        DOCFLOW_OPENAI_API_KEY="test-key",
        DOCFLOW_OPENAI_CONCURRENCY="1",
        DOCFLOW_EMBEDDING_BATCH_SIZE="8",
        DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10",
    )
    workers = WorkerStack(settings, env, tmp_path_factory.mktemp("lifecycle-worker-logs"))
    try:
        workers.launch({"web": 2, "chunker": 1, "embedder": 1, "indexer": 1})
        yield workers
    finally:
        workers.stop_all()


def long_pdf(tag: str, pages: int = 40) -> bytes:
    """Pages no other test uploads: the embedding cache never answers for them."""
    return documents.make_pdf(
        [f"{tag} page {n}. " + text for n, text in enumerate(documents.lorem_pages(pages, 220, seed=7), start=1)]
    )


def indexed_chunks(settings, document_id: str) -> int:
    client = MilvusClient(uri=settings.milvus_address, timeout=10)
    try:
        total = 0
        for name in client.list_collections():
            if name.startswith("docflow_chunks_"):
                rows = client.query(
                    name, filter=f'document_id == "{document_id}"', output_fields=["count(*)"],
                    consistency_level="Strong",
                )  # fmt: skip
                total += rows[0]["count(*)"]
        return total
    finally:
        client.close()


def embedded_batches_after(stack: WorkerStack, document_id: str, since: float) -> int:
    """How many batches the embedder logged for a document after ``since`` (epoch seconds)."""
    [embedder] = stack.of_role("embedder")
    count = 0
    for line in embedder.log_path.read_text(errors="replace").splitlines():
        match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*embedded .*", line)
        if match and document_id in line:
            logged = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            count += logged > since
    return count


async def wait_for(client: DocflowClient, document_id: str, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = await client.status(document_id)
            if predicate(status):
                return status
        except ApiError as exc:
            if exc.status not in (404, 503):
                raise
        assert time.monotonic() < deadline, f"{document_id} never got there"
        await asyncio.sleep(0.1)


async def hits_of(client: DocflowClient, document_id: str, query: str) -> list[dict]:
    found = await client.search(query, top_k=100)
    return [hit for hit in found["results"] if hit["document_id"] == document_id]


def end_while_embedding(stack, tmp_path, how: str):
    """Upload a 40-page document, end it (cancel or delete) through the other web worker while
    its chunks are being embedded; return what the test checks."""
    company, tag = f"life-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    path = tmp_path / "long.pdf"
    path.write_bytes(long_pdf(tag))
    first, second = (worker.url for worker in stack.of_role("web"))

    async def run():
        async with DocflowClient(first, company) as client, DocflowClient(second, company) as other:
            document_id = (await client.upload(path))["document_id"]
            await wait_for(client, document_id, lambda s: s["chunks_embedded"] > 0 and s["state"] == "embedding")
            answer = await getattr(other, how)(document_id)
            ended_at = time.time()
            # The owner folds the command's state a moment later.
            status = await wait_for(client, document_id, lambda s: s["state"] in ("cancelled", "deleted"), 10)
            await asyncio.sleep(1)
            soon = await hits_of(client, document_id, f"{tag} page 3")
            # Drained: the chunker's and embedder's remaining messages of it are skipped, the indexer's too.
            await asyncio.sleep(6)
            late = await hits_of(client, document_id, f"{tag} page 30")
            return document_id, answer, ended_at, status, soon, late

    return asyncio.run(run())


def test_a_document_cancelled_while_embedding_stops_within_a_batch_and_never_returns_in_search(
    stack, milvus_settings, tmp_path
):
    document_id, answer, cancelled_at, status, soon, late = end_while_embedding(stack, tmp_path, "cancel")
    assert answer == {"document_id": document_id, "state": "cancelled"}
    assert status["state"] == "cancelled" and status["stopped_by"].startswith("company:")
    assert status["cancelled_ms"] and status["chunks_embedded"] < status["chunks_total"]
    assert soon == [] and late == []
    assert indexed_chunks(milvus_settings, document_id) == 0
    after = embedded_batches_after(stack, document_id, cancelled_at)
    print(f"embedder batches of the cancelled document logged after the cancel: {after}")
    assert after <= 1


def test_a_document_deleted_while_embedding_leaves_no_original_and_no_chunk(
    stack, milvus_settings, s3_endpoint, tmp_path
):
    document_id, answer, _, status, soon, late = end_while_embedding(stack, tmp_path, "delete")
    assert answer["state"] == "deleted" and status["state"] == "deleted" and status["deleted_ms"]
    assert soon == [] and late == []
    assert indexed_chunks(milvus_settings, document_id) == 0

    async def originals():
        async with get_session().create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as client:
            listed = await client.list_objects_v2(Bucket=BUCKET, Prefix="o/")
            return [item["Key"] for item in listed.get("Contents", []) if document_id in item["Key"]]

    assert asyncio.run(originals()) == []


def test_a_replaced_document_serves_the_old_version_until_the_new_one_completes(stack, tmp_path):
    company, key, tag = f"rep-{uuid.uuid4().hex[:6]}", "handbook", uuid.uuid4().hex[:10]
    web = stack.of_role("web")[0].url
    old_text = f"Version one of the handbook {tag}: the office opens at nine on weekdays. " * 30
    v1_path, v2_path, v3_path = tmp_path / "v1.txt", tmp_path / "v2.pdf", tmp_path / "v3.pdf"
    v1_path.write_text(old_text)
    v2_path.write_bytes(long_pdf(f"{tag} two", pages=12) + b"")
    v3_path.write_bytes(documents.corrupt_pdf())

    async def run():
        async with DocflowClient(web, company) as client:
            v1 = await client.upload(v1_path, document_key=key)
            assert v1["version"] == 1
            assert (await client.wait(v1["document_id"]))["state"] == "completed"
            v2 = await client.upload(v2_path, document_key=key)
            assert v2["version"] == 2 and v2["document_id"] != v1["document_id"]
            during = await wait_for(client, v2["document_id"], lambda s: s["state"] in ("chunked", "embedding"))
            # Version 1 is still served (version 2's first chunks may be searchable already; the
            # company has fewer chunks than hits_of asks for, so every searchable one comes back).
            served_during = await hits_of(client, v1["document_id"], f"handbook {tag} office opens")
            assert during["state"] != "completed" and served_during
            assert (await client.wait(v2["document_id"]))["state"] == "completed"
            old = await wait_for(client, v1["document_id"], lambda s: s["state"] == "superseded", timeout=30)
            assert old["superseded_by"] == v2["document_id"]
            await asyncio.sleep(1)
            served_after = await client.search(f"handbook {tag} office opens", top_k=20)
            assert v1["document_id"] not in {hit["document_id"] for hit in served_after["results"]}
            assert await hits_of(client, v2["document_id"], f"{tag} two page 4")
            # Version 3 fails: version 2 stays current and searchable.
            v3 = await client.upload(v3_path, document_key=key)
            assert (await client.wait(v3["document_id"]))["state"] == "failed"
            versions = await client.versions(key)
            assert versions["current"]["document_id"] == v2["document_id"]
            assert [doc["version"] for doc in versions["documents"]] == [3, 2, 1]
            assert (await client.status(v2["document_id"]))["state"] == "completed"
            assert await hits_of(client, v2["document_id"], f"{tag} two page 4")
            # The same content again: nothing to do.
            again = await client.upload(v2_path, document_key=key)
            return v1, v2, v3, again

    v1, v2, v3, again = asyncio.run(run())
    assert again["unchanged"] is True and again["document_id"] == v2["document_id"] and again["version"] == 2
    raw = asyncio.run(company_messages(stack.settings, DOCUMENTS_RAW.name, company))
    assert sorted((message["version"], message["document_key"]) for message in raw) == [(1, key), (2, key), (3, key)]
    assert v3["version"] == 3


async def company_messages(settings, topic: str, company: str) -> list[dict]:
    """Every message of a company on a topic, from its beginning."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest")
    await consumer.start()
    try:
        found = []
        while batches := await consumer.getmany(timeout_ms=3000):
            for records in batches.values():
                values = (json_or_none(record.value) for record in records)
                found += [value for value in values if value is not None and value.get("company_id") == company]
        return found
    finally:
        await consumer.stop()


def test_cancel_is_refused_once_final_and_seeds_task_path_cancels(stack, tmp_path):
    company = f"task-{uuid.uuid4().hex[:6]}"
    web = stack.of_role("web")[1].url
    short, long = tmp_path / "short.txt", tmp_path / "long.pdf"
    short.write_text(f"A short note {uuid.uuid4().hex} about nothing much. " * 10)
    long.write_bytes(long_pdf(uuid.uuid4().hex, pages=20))

    async def run():
        async with DocflowClient(web, company) as client:
            done = await client.upload(short)
            await client.wait(done["document_id"])
            with pytest.raises(ApiError) as refused:
                await client.cancel(done["document_id"])
            running = await client.upload(long)
            await wait_for(client, running["document_id"], lambda s: s["state"] in ("chunked", "embedding"))
            async with client._session.delete(
                f"{web}/api/v1/tasks/{running['document_id']}", headers=client._headers()
            ) as response:
                alias = (response.status, await response.json())
            cancelled = await client.wait(running["document_id"])
            with pytest.raises(ApiError) as unknown:
                await client.cancel(str(uuid.uuid4()))
            return refused.value, alias, cancelled, unknown.value

    refused, alias, cancelled, unknown = asyncio.run(run())
    assert (refused.status, refused.code) == (409, "not_cancellable")
    assert alias == (202, {"document_id": cancelled["document_id"], "state": "cancelled"})
    assert cancelled["state"] == "cancelled"
    assert (unknown.status, unknown.code) == (404, "not_found")


def test_a_company_deletes_all_its_documents_with_a_confirmation_only(stack, tmp_path):
    company, other = f"off-{uuid.uuid4().hex[:6]}", f"stay-{uuid.uuid4().hex[:6]}"
    webs = [worker.url for worker in stack.of_role("web")]

    async def run():
        async with DocflowClient(webs[0], company) as client, DocflowClient(webs[1], other) as bystander:
            ids = [(await client.upload_text(f"note {n} {uuid.uuid4().hex} " * 20))["document_id"] for n in range(6)]
            kept = (await bystander.upload_text(f"a bystander's note {uuid.uuid4().hex} " * 20))["document_id"]
            await client.wait_all(ids)
            async with client._session.delete(
                f"{webs[1]}/api/v1/documents", params={"all": "true"}, headers=client._headers()
            ) as response:
                unconfirmed = response.status
            async with client._session.delete(
                f"{webs[1]}/api/v1/documents", params={"all": "true", "confirm": company}, headers=client._headers()
            ) as response:
                confirmed = (response.status, await response.json())
            deadline = time.monotonic() + 30
            while (states := {doc["state"] for doc in (await client.list_all())["documents"]}) != {"deleted"}:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)  # each deletion's state is folded by the worker that owns it
            return unconfirmed, confirmed, states, (await bystander.wait(kept))["state"]

    unconfirmed, confirmed, states, bystander_state = asyncio.run(run())
    assert unconfirmed == 422
    assert confirmed[0] == 202 and confirmed[1]["deleted"] == 6 and not confirmed[1]["partial"]
    assert states == {"deleted"}
    assert bystander_state == "completed"
