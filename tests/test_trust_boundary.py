"""The trust boundary against the real stack: real broker, real Milvus, two web workers with
keys required, a chunker, an embedder and an indexer.

A table of hostile and malformed requests, each with the status and error code it must get;
none crashes a worker or stores anything it should not, and a good document still completes
after all of them. Then: revocation reaches the other web worker within 5 s, per-key rate
limits, and a forged documents.raw event naming another company's original.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from pipeline import api_keys
from pipeline.client import DocflowClient
from pipeline.local.documents import make_encrypted_pdf, make_pdf
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.text.content_types import SUPPORTED_CONTENT_TYPES
from tests.hostile_files import flate_bomb, page_count_bomb
from tests.stack import create_key, document_uploaded, guarded

SECRET = "trust-boundary-test-secret"
UPLOADS_PER_MINUTE = 60
SEARCHES_PER_MINUTE = 5
BIG = 60 * 1024 * 1024  # past the 50 MB upload limit


@pytest.fixture(scope="module")
def guarded_settings(milvus_settings):
    return guarded(milvus_settings, SECRET)[0]


@pytest.fixture(scope="module")
def stack(guarded_settings, tmp_path_factory):
    env = worker_env(
        guarded_settings,
        **guarded(guarded_settings, SECRET)[1],
        DOCFLOW_RATE_LIMIT_UPLOADS_PER_MINUTE=str(UPLOADS_PER_MINUTE),
        DOCFLOW_RATE_LIMIT_SEARCHES_PER_MINUTE=str(SEARCHES_PER_MINUTE),
        DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10",
        DOCFLOW_CORS_ORIGINS="https://app.example, https://admin.example",
        # The decompression bomb inflates to 2 GB: refused at 1 GB, or after 30 s at worst.
        DOCFLOW_EXTRACTION_MEMORY_MB="1024",
        DOCFLOW_EXTRACTION_TIMEOUT_SECONDS="30",
    )
    workers = WorkerStack(guarded_settings, env, tmp_path_factory.mktemp("trust-worker-logs"))
    try:
        workers.launch({"web": 2, "chunker": 1, "embedder": 1, "indexer": 1})
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture(scope="module")
def keys(guarded_settings, stack):
    made = {
        "acme": create_key(guarded_settings, "acme"),
        "globex": create_key(guarded_settings, "globex"),
        "revoked": create_key(guarded_settings, "acme"),
    }
    asyncio.run(api_keys.revoke(guarded_settings, made["revoked"].record.key_id))
    time.sleep(1)  # every web worker follows auth.keys: well within a second
    return made


def objects(settings) -> set[Path]:
    root = settings.home / "objects"
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


# ---------------------------------------------------------------------------------------------
# The table. A case is one request; `key` names whose credentials it carries (None: none).


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    code: str | None = None  # the error code, for refusals
    key: str | None = "acme"
    headers: dict = field(default_factory=dict)
    body: object = None  # bytes, or a callable building an aiohttp body
    json_body: object = None
    final_state: str | None = None  # accepted uploads: the state the document must reach
    error_contains: str | None = None


def form(filename: str, data: bytes, content_type: str = "application/octet-stream", **fields) -> aiohttp.FormData:
    built = aiohttp.FormData()
    for name, value in fields.items():
        built.add_field(name, value)
    built.add_field("file", data, filename=filename, content_type=content_type)
    return built


def raw_multipart(filename: str, data: bytes) -> bytes:
    """A one-file form written by hand: aiohttp's own client refuses control characters in a filename."""
    return (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="' + filename.encode() + b'"\r\n'
        b"Content-Type: text/plain\r\n\r\n" + data + b"\r\n--b0undary--\r\n"
    )


def nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


async def endless(size: int):
    piece = b"x" * (1024 * 1024)
    for _ in range(size // len(piece)):
        yield piece


WEBSOCKET_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}
LATIN_1 = "Façade café résumé naïve ".encode("latin-1")
HELLO = b"Plain words about invoices, sent by a well-behaved client. " * 20

CASES = [
    Case("no key", "POST", "/api/v1/upload", 401, "missing_credentials", key=None, body=lambda: form("a.txt", HELLO)),
    Case("no key on the list", "GET", "/api/v1/documents", 401, "missing_credentials", key=None),
    Case("empty bearer", "GET", "/api/v1/documents", 401, "missing_credentials", key=None,
         headers={"Authorization": "Bearer "}),
    Case("a made-up key", "GET", "/api/v1/documents", 401, "invalid_credentials", key=None,
         headers={"X-API-Key": "let-me-in"}),
    Case("a well-formed key nobody issued", "GET", "/api/v1/documents", 401, "invalid_credentials", key="unknown"),
    Case("a known key id with a wrong secret", "GET", "/api/v1/documents", 401, "invalid_credentials", key="forged"),
    Case("a revoked key", "POST", "/api/v1/search", 401, "invalid_credentials", key="revoked",
         json_body={"query": "invoices"}),
    Case("X-Company-ID of another company", "GET", "/api/v1/documents", 403, "company_mismatch",
         headers={"X-Company-ID": "globex"}),
    Case("?company_id= of another company", "GET", "/api/v1/documents?company_id=globex", 403, "company_mismatch"),
    Case("company_id in the body of another company", "POST", "/api/v1/documents/text", 403, "company_mismatch",
         json_body={"text": "hello there", "company_id": "globex"}),
    Case("another company's key on a document", "GET", "/api/v1/documents/{acme_document}", 404, "not_found",
         key="globex"),
    Case("another company's search", "POST", "/api/v1/search", 200, key="globex",
         json_body={"query": "invoices sent by a well-behaved client"}),
    Case("a document id that climbs", "GET", "/api/v1/documents/..%2F..%2Fetc", 404, "not_found"),
    Case("path traversal in the filename", "POST", "/api/v1/upload", 202,
         body=lambda: form("../../../../etc/passwd.txt", HELLO), final_state="completed"),
    Case("control characters in the filename's header", "POST", "/api/v1/upload", 400, "invalid_multipart",
         headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
         body=lambda: raw_multipart("bad\x00name\x1b[31m\x07.txt", HELLO)),
    Case("control characters quoted in the filename", "POST", "/api/v1/upload", 202,
         headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
         body=lambda: raw_multipart("bad%00name%1B[31m%07\u202etxt.exe.txt", HELLO), final_state="completed"),
    Case("a 60 MB body with Content-Length", "POST", "/api/v1/upload", 413, "too_large",
         body=lambda: form("big.txt", b"a" * BIG, "text/plain")),
    Case("a 60 MB body without Content-Length", "POST", "/api/v1/documents/text", 413, "too_large",
         headers={"Content-Type": "application/json"}, body=lambda: endless(BIG)),
    Case("a gzip body inflating past the limit", "POST", "/api/v1/documents/text", 413, "too_large",
         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
         body=lambda: gzip.compress(b'{"text": "' + b"a" * BIG + b'"}', 1)),
    Case("a PDF declaring 100,000 pages", "POST", "/api/v1/upload", 202,
         body=lambda: form("many.pdf", page_count_bomb(100_000), "application/pdf"),
         final_state="failed", error_contains="pages"),
    Case("a PDF decompression bomb", "POST", "/api/v1/upload", 202,
         body=lambda: form("bomb.pdf", flate_bomb(2048), "application/pdf"), final_state="failed"),
    Case("an encrypted PDF", "POST", "/api/v1/upload", 202,
         body=lambda: form("locked.pdf", make_encrypted_pdf(), "application/pdf"),
         final_state="failed", error_contains="encrypted"),
    Case("invalid UTF-8 in a text file", "POST", "/api/v1/upload", 202,
         body=lambda: form("latin.txt", LATIN_1 * 40 + b"\xff\xfe\xfd", "text/plain"),
         final_state="completed"),
    Case("invalid UTF-8 in a JSON body", "POST", "/api/v1/documents/text", 400, "invalid_json",
         headers={"Content-Type": "application/json"}, body=lambda: b'{"text": "\xff\xfe"}'),
    Case("a 10 MB JSON string field", "POST", "/api/v1/documents/text", 422, "invalid_parameter",
         json_body={"text": "short text", "title": "t" * (10 * 1024 * 1024)}),
    Case("10,000 tags", "POST", "/api/v1/documents/text", 422, "invalid_parameter",
         json_body={"text": "short text", "tags": [f"t{n}" for n in range(10_000)]}),
    Case("JSON nested 10,000 deep", "POST", "/api/v1/documents/text", 400, "invalid_json",
         headers={"Content-Type": "application/json"}, body=lambda: nested(10_000)),
    Case("a JSON array instead of an object", "POST", "/api/v1/search", 400, "invalid_json", json_body=[1, 2]),
    Case("a negative chunk size", "POST", "/api/v1/upload", 422, "invalid_parameter",
         body=lambda: form("a.txt", HELLO, chunk_size="-5")),
    Case("a huge chunk size", "POST", "/api/v1/upload", 422, "invalid_parameter",
         body=lambda: form("a.txt", HELLO, chunk_size=str(10**30))),
    Case("an overlap beyond the chunk size", "POST", "/api/v1/documents/text", 422, "invalid_parameter",
         json_body={"text": "short text", "chunk_size": 100, "chunk_overlap": 100}),
    Case("an unknown content type", "POST", "/api/v1/upload", 415, "unsupported_type",
         body=lambda: form("setup.exe", b"MZ\x90\x00" + bytes(range(256)) * 8, "application/x-msdownload")),
    Case("an empty file", "POST", "/api/v1/upload", 422, "empty_file", body=lambda: form("empty.txt", b"")),
    Case("not multipart", "POST", "/api/v1/upload", 400, "expected_multipart",
         headers={"Content-Type": "text/plain"}, body=lambda: HELLO),
    Case("a multipart body without its boundary", "POST", "/api/v1/upload", 400, "invalid_multipart",
         headers={"Content-Type": "multipart/form-data; boundary=zzz"}, body=lambda: b"garbage without parts"),
    Case("a form field past its limit", "POST", "/api/v1/upload", 413, "too_large",
         body=lambda: form("a.txt", HELLO, title="t" * (100 * 1024))),
    Case("two files in one upload", "POST", "/api/v1/upload", 422, "invalid_parameter",
         body=lambda: _two_files()),
    Case("a search query past its limit", "POST", "/api/v1/search", 422, "invalid_query",
         json_body={"query": "q" * 5000}),
    Case("a search for a billion chunks", "POST", "/api/v1/search", 422, "invalid_parameter",
         json_body={"query": "invoices", "top_k": 10**9}),
    Case("a WebSocket with a bad token", "GET", "/ws/documents?token=dfk_000000000000_" + "A" * 43, 401,
         "invalid_credentials", key=None, headers=WEBSOCKET_UPGRADE),
    Case("a WebSocket with no token", "GET", "/ws/documents", 401, "missing_credentials", key=None,
         headers=WEBSOCKET_UPGRADE),
    Case("a WebSocket for another company's document", "GET", "/ws/documents?document_id={acme_document}", 404,
         "not_found", key="globex", headers=WEBSOCKET_UPGRADE),
    Case("a page of no documents", "GET", "/api/v1/documents?limit=0", 422, "invalid_parameter"),
    Case("a forged cursor", "GET", "/api/v1/documents?cursor=%27%3B--", 422, "invalid_parameter"),
]  # fmt: skip


def _two_files() -> aiohttp.FormData:
    built = form("a.txt", HELLO)
    built.add_field("file", HELLO, filename="b.txt")
    return built


def credentials(case: Case, keys: dict) -> dict:
    if case.key is None:
        return {}
    if case.key == "unknown":
        return {"X-API-Key": f"dfk_{'0' * 12}_{'A' * 43}"}
    if case.key == "forged":
        return {"X-API-Key": f"dfk_{keys['acme'].record.key_id}_{'B' * 43}"}
    return {"Authorization": f"Bearer {keys[case.key].key}"}


@pytest.fixture(scope="module")
def acme_document(stack, keys):
    """A completed document of acme, for the cases that reach for it from elsewhere."""

    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, api_key=keys["acme"].key) as client:
            answer = await client.upload_text(HELLO.decode(), filename="acme.txt")
            return (await client.wait(answer["document_id"], 120))["document_id"]

    return asyncio.run(run())


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request_gets_its_status_and_code_and_stores_nothing(
    case, stack, keys, acme_document, guarded_settings
):
    web = stack.of_role("web")[CASES.index(case) % 2]  # both web workers take their share
    before = objects(guarded_settings)

    async def run():
        headers = {**credentials(case, keys), **case.headers}
        body = case.body() if callable(case.body) else case.body
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            async with session.request(
                case.method,
                web.url + case.path.format(acme_document=acme_document),
                headers=headers,
                data=body,
                json=case.json_body if case.body is None and case.json_body is not None else None,
            ) as response:
                return response.status, await response.json(content_type=None)

    status, answer = asyncio.run(run())
    assert status == case.status, answer
    if case.code is not None:
        assert answer["error"]["code"] == case.code, answer
        assert answer["error"]["message"]
    if case.name == "another company's search":
        assert all(hit["company_id"] == "globex" for hit in answer["results"])
        assert acme_document not in {hit["document_id"] for hit in answer["results"]}
    added = objects(guarded_settings) - before
    if status != 202:
        assert not added, f"a refused request stored {added}"
        return
    # Accepted: exactly its original, inside its own company's and document's prefix.
    [stored] = added
    objects_root = guarded_settings.home / "objects"
    assert stored.relative_to(objects_root).parts[:2] == ("acme", answer["document_id"])
    assert all(ch.isprintable() for ch in stored.name) and ".." not in stored.name

    async def final():
        async with DocflowClient(web.url, api_key=keys["acme"].key) as client:
            return await client.wait(answer["document_id"], 180)

    finished = asyncio.run(final())
    assert finished["state"] == case.final_state, finished
    if case.error_contains:
        assert case.error_contains in finished["error"].lower(), finished


def test_the_page_asks_for_a_key_and_sends_it_on_every_call(stack):
    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.get(stack.of_role("web")[0].url + "/") as response:
                return response.status, await response.text()

    status, page = asyncio.run(run())
    assert status == 200
    assert "const AUTH_REQUIRED = true;" in page and 'id="api-key"' in page
    assert page.count("headers: credentials(") == 3  # list, upload, search


def test_browsers_may_call_the_api_from_the_allowed_origins_only(stack):
    async def preflight(origin: str) -> tuple[int, str | None]:
        headers = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with aiohttp.ClientSession() as session:
            async with session.options(stack.of_role("web")[0].url + "/api/v1/search", headers=headers) as response:
                return response.status, response.headers.get("Access-Control-Allow-Origin")

    assert asyncio.run(preflight("https://app.example")) == (200, "https://app.example")
    status, allowed = asyncio.run(preflight("https://evil.example"))
    assert status == 403 and allowed is None


def test_after_every_hostile_request_the_workers_live_and_a_good_document_completes(stack, keys, tmp_path):
    # Named after the table so that it runs after it.
    assert all(worker.alive() for worker in stack.workers)
    path = tmp_path / "good.pdf"
    path.write_bytes(make_pdf(["A good document after the storm. " * 30, "Its second page. " * 30]))

    async def run():
        async with DocflowClient(stack.of_role("web")[1].url, api_key=keys["acme"].key) as client:
            answer = await client.upload(path)
            return await client.wait(answer["document_id"], 180)

    assert asyncio.run(run())["state"] == "completed"
    assert all(worker.alive() for worker in stack.workers)


def test_metric_labels_hold_only_authenticated_companies_and_known_content_types(stack):
    async def scrape(url: str) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as response:
                return await response.text()

    samples = []
    for web in stack.of_role("web"):
        page = asyncio.run(scrape(web.url))
        samples += re.findall(r'^ingest_uploads_total\{company_id="([^"]*)",content_type="([^"]*)"', page, re.M)
    assert samples
    assert {company for company, _ in samples} <= {"acme", "globex", "initech"}
    assert {content_type for _, content_type in samples} <= {*SUPPORTED_CONTENT_TYPES, "other"}
    assert "other" in {content_type for _, content_type in samples}  # the .exe, whatever it declared


def test_a_key_revoked_through_one_web_worker_is_refused_by_the_other_within_5_seconds(stack, guarded_settings, keys):
    created = create_key(guarded_settings, "acme")
    first, second = (worker.url for worker in stack.of_role("web"))

    async def listing(url: str) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{url}/api/v1/documents", headers={"X-API-Key": created.key}, timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                return response.status

    async def run() -> float:
        deadline = time.monotonic() + 10
        while await listing(first) != 200 or await listing(second) != 200:  # the new key reached both
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await api_keys.revoke(guarded_settings, created.record.key_id)
        revoked_at = time.monotonic()
        while await listing(second) != 401:
            assert time.monotonic() - revoked_at < 5, "the other web worker still accepts a revoked key"
            await asyncio.sleep(0.05)
        assert await listing(first) == 401
        return time.monotonic() - revoked_at

    took = asyncio.run(run())
    print(f"revocation reached the other web worker in {took * 1000:.0f} ms")


def test_uploads_and_searches_past_the_per_key_limit_get_429_with_retry_after(stack, guarded_settings):
    created, other = create_key(guarded_settings, "initech"), create_key(guarded_settings, "initech")
    web = stack.of_role("web")[0].url
    headers = {"X-API-Key": created.key}

    async def run():
        async with aiohttp.ClientSession() as session:
            searches = []
            for _ in range(SEARCHES_PER_MINUTE + 1):
                async with session.post(f"{web}/api/v1/search", json={"query": "q"}, headers=headers) as response:
                    searches.append((response.status, response.headers.get("Retry-After")))
            uploads = []
            for _ in range(UPLOADS_PER_MINUTE + 1):
                # Empty files: refused after the limit is counted, so nothing is stored or processed.
                async with session.post(f"{web}/api/v1/upload", data=form("e.txt", b""), headers=headers) as response:
                    uploads.append((response.status, response.headers.get("Retry-After")))
            async with session.post(
                f"{web}/api/v1/search", json={"query": "q"}, headers={"X-API-Key": other.key}
            ) as response:
                other_status = response.status
            return searches, uploads, other_status

    searches, uploads, other_status = asyncio.run(run())
    assert [status for status, _ in searches[:-1]] == [200] * SEARCHES_PER_MINUTE
    assert searches[-1][0] == 429 and 1 <= int(searches[-1][1]) <= 60
    assert {status for status, _ in uploads[:-1]} == {422}
    assert uploads[-1][0] == 429 and 1 <= int(uploads[-1][1]) <= 60
    assert other_status == 200  # limits are per key


def test_a_forged_raw_event_naming_another_companys_original_fails_unread(stack, guarded_settings, keys):
    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, api_key=keys["acme"].key) as client:
            secret = await client.upload_text("The acme merger closes on Friday. " * 30, filename="secret.txt")
            await client.wait(secret["document_id"], 120)
        [acme_object] = [path for path in objects(guarded_settings) if path.parent.name == secret["document_id"]]
        forged_id = str(uuid.uuid4())
        forged = document_uploaded(
            "globex", acme_object.as_uri(), document_id=forged_id, filename="secret.txt",
            size_bytes=acme_object.stat().st_size, sha256="0" * 64, chunk_overlap=100,
        )  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=guarded_settings.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait("documents.raw", key=forged_id.encode(), value=forged.dumps())
        finally:
            await producer.stop()
        async with DocflowClient(stack.of_role("web")[1].url, api_key=keys["globex"].key) as client:
            status = await client.wait(forged_id, 120)
            found = await client.search("acme merger Friday", top_k=20)
        return status, found

    status, found = asyncio.run(run())
    assert status["state"] == "failed" and "outside" in status["error"], status
    assert status["chunks_total"] is None
    assert not any("merger" in hit["text"] for hit in found["results"])


def test_a_deleted_document_leaves_no_original_in_file_storage_and_never_returns_in_search(
    stack, keys, guarded_settings
):
    words = f"The {uuid.uuid4().hex} protocol is retired next spring. " * 25

    async def run():
        async with DocflowClient(stack.of_role("web")[0].url, api_key=keys["acme"].key) as client:
            document_id = (await client.upload_text(words, filename="retired.txt"))["document_id"]
            await client.wait(document_id, 120)
            assert [path for path in objects(guarded_settings) if path.parent.name == document_id]
            found_before = await client.search(words[:60], top_k=5)
            assert (await client.delete(document_id))["state"] == "deleted"
            deadline = time.monotonic() + 15
            while (status := await client.status(document_id))["state"] != "deleted":
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.1)
            while [path for path in objects(guarded_settings) if path.parent.name == document_id]:
                assert time.monotonic() < deadline, "the original is still stored"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            found_after = await client.search(words[:60], top_k=20)
            return document_id, found_before, status, found_after

    document_id, before, status, after = asyncio.run(run())
    assert document_id in {hit["document_id"] for hit in before["results"]}
    assert status["state"] == "deleted" and status["stopped_by"].startswith("key:")
    assert document_id not in {hit["document_id"] for hit in after["results"]}
