"""Live progress over GET /ws/documents (web/live.py).

First the event mapping and the hub's bounded queues, in process. Then a real broker with
two web workers (keys required), one chunker and one embedder: a client of the web worker
that does NOT own a document's partition hears every state change of it, in order, without
polling; a client that never reads is cut off (1013) while another client of the same
worker goes on; a bad token is refused with 401 and the JSON error; `docflow upload --wait`
follows its documents over the WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest
from aiokafka.partitioner import DefaultPartitioner

from pipeline import api_keys
from pipeline.client import DocflowClient, EventStreamClosed
from pipeline.errors import ApiError
from pipeline.local import documents
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.records import PROGRESS_STATES
from pipeline.topics import DOCUMENTS_STATUS
from tests.stack import create_key, guarded
from web.auth import Caller
from web.live import CUT_OFF_CODE, QUEUE_SIZE, Connection, Hub, Seen, live_events, percentage, snapshot_events

SECRET = "live-events-test-secret"


def status(state: str, **fields) -> dict:
    base = {
        "document_id": "doc-1",
        "company_id": "acme",
        "filename": "report.pdf",
        "state": state,
        "pages": None,
        "chunks_total": None,
        "chunks_embedded": 0,
        "chunks_indexed": 0,
        "error": None,
        "created_ms": 1_000,
        "updated_ms": 1_000,
    }
    return {**base, **fields}


def kinds(events: list[dict]) -> list[str]:
    return [event["type"] if event["type"] != "processing_milestone" else event["milestone"] for event in events]


# --- the mapping ------------------------------------------------------------------------------

MAPPING = [
    # (previous, current, require_indexed, the events: their type, or the milestone's name)
    (None, status("uploaded"), False, ["task_status", "task_progress"]),
    (status("uploaded"), status("extracting", updated_ms=1_100), False, ["task_status", "task_progress"]),
    (
        status("extracting"),
        status("chunked", pages=3, chunks_total=12, updated_ms=1_200),
        False,
        ["task_status", "chunked", "task_progress"],
    ),
    (
        status("chunked", pages=3, chunks_total=12),
        status("embedding", pages=3, chunks_total=12, chunks_embedded=4, updated_ms=1_300),
        False,
        ["task_status", "task_progress"],
    ),
    (
        status("embedding", pages=3, chunks_total=12, chunks_embedded=4),
        status("embedding", pages=3, chunks_total=12, chunks_embedded=8, updated_ms=1_400),
        False,
        ["task_progress"],
    ),
    (
        status("embedding", pages=3, chunks_total=12, chunks_embedded=8),
        status("completed", pages=3, chunks_total=12, chunks_embedded=12, updated_ms=1_500),
        False,
        ["task_status", "embedded", "completed", "task_progress"],
    ),
    # With a vector index: all embedded is a milestone, completed waits for the index.
    (
        status("embedding", pages=3, chunks_total=12, chunks_embedded=8),
        status("embedding", pages=3, chunks_total=12, chunks_embedded=12, updated_ms=1_500),
        True,
        ["embedded", "task_progress"],
    ),
    (
        status("embedding", pages=3, chunks_total=12, chunks_embedded=12, chunks_indexed=6),
        status("completed", pages=3, chunks_total=12, chunks_embedded=12, chunks_indexed=12, updated_ms=1_600),
        True,
        ["task_status", "indexed", "completed", "task_progress"],
    ),
    # Chunks embedded before the chunker's own status arrived: state and chunks at once.
    (
        status("extracting"),
        status("embedding", pages=2, chunks_total=5, chunks_embedded=1, updated_ms=1_200),
        False,
        ["task_status", "chunked", "task_progress"],
    ),
    (
        status("embedding", chunks_total=5, chunks_embedded=2),
        status("failed", chunks_total=5, chunks_embedded=2, error="embedding server refused", updated_ms=1_300),
        False,
        ["task_status", "error"],
    ),
    (
        status("completed", chunks_total=5, chunks_embedded=5),
        status("superseded", chunks_total=5),
        False,
        ["task_status"],
    ),
    (
        status("embedding", chunks_total=5, chunks_embedded=2),
        status("cancelled", chunks_total=5),
        False,
        ["task_status"],
    ),
    # A redelivered event: the same status again, only later.
    (status("chunked", chunks_total=5), status("chunked", chunks_total=5, updated_ms=9_999), False, []),
    (None, status("failed", error="no text"), False, ["task_status", "error"]),
]


@pytest.mark.parametrize("previous, current, require_indexed, expected", MAPPING)
def test_status_pairs_map_to_the_seeds_events(previous, current, require_indexed, expected):
    events = live_events(Seen.of(previous) if previous else None, current, require_indexed)
    assert kinds(events) == expected
    for event in events:
        assert event["event_type"] == event["type"]
        assert event["document_id"] == "doc-1"
        assert event["timestamp"] == current["updated_ms"]
        json.dumps(event)  # every event is plain JSON
        if event["type"] == "task_status":
            assert event["current_status"] == current["state"]
            assert event["previous_status"] == (previous["state"] if previous else None)
            assert event["document"] == current
        elif event["type"] == "task_progress":
            assert event["status"] == current["state"]
            assert 0 <= event["percentage"] <= 100 and event["message"]
        elif event["type"] == "error":
            assert event["message"] == event["error_message"] == current["error"]
            assert event["error_code"] == "processing_failed"
        else:
            assert event["message"] and "details" in event


def test_the_percentage_moves_forward_along_the_happy_path():
    path = [
        status("uploaded"),
        status("extracting"),
        status("chunked", chunks_total=4),
        status("embedding", chunks_total=4, chunks_embedded=1),
        status("embedding", chunks_total=4, chunks_embedded=3),
        status("completed", chunks_total=4, chunks_embedded=4),
    ]
    percentages = [percentage(Seen.of(step), False) for step in path]
    assert percentages == sorted(percentages) and percentages[0] == 0 and percentages[-1] == 100
    assert percentage(Seen.of(status("embedding", chunks_total=4, chunks_embedded=4)), True) < 100
    chunked = live_events(Seen.of(status("extracting")), status("chunked", pages=3, chunks_total=12))
    assert chunked[1]["details"] == {"chunks_total": 12, "pages": 3}
    assert chunked[1]["message"] == "split into 12 chunks from 3 pages"


def test_a_snapshot_says_where_the_document_is_now():
    events = snapshot_events(status("embedding", chunks_total=10, chunks_embedded=5))
    assert kinds(events) == ["task_status", "task_progress"]
    assert events[0]["snapshot"] is True and events[0]["previous_status"] is None
    assert events[1]["percentage"] == 55


async def test_the_hub_cuts_off_a_full_queue_and_serves_the_others():
    hub = Hub()
    slow = Connection(Caller("acme", None), queue_size=3)
    fast = Connection(Caller("acme", None))
    one = Connection(Caller("acme", None), document_id="doc-2")
    other = Connection(Caller("globex", None))
    for conn in (slow, fast, one, other):
        hub.subscribe(conn)
    hub.apply(status("uploaded"))
    hub.apply(status("extracting", updated_ms=1_001))
    assert slow.closing is not None and slow.closing[0] == CUT_OFF_CODE
    assert fast.closing is None and fast.queue.qsize() == 4
    assert one.queue.qsize() == 0 and other.queue.qsize() == 0  # another document, another company
    hub.apply(status("uploaded", document_id="doc-2"))
    assert one.queue.qsize() == 2 and fast.queue.qsize() == 6
    hub.apply(status("uploaded", document_id="doc-2", updated_ms=5_000))  # nothing new
    assert one.queue.qsize() == 2
    # The remembered statuses are bounded.
    small = Hub(last_seen_size=2)
    for n in range(5):
        small.apply(status("uploaded", document_id=f"doc-{n}"))
    assert list(small.last_seen) == ["doc-3", "doc-4"]


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send_str(self, text: str) -> None:
        self.sent.append(json.loads(text))


class Message:
    def __init__(self, value: dict | None, key: str = "doc-1") -> None:
        self.key, self.value = key.encode(), json.dumps(value).encode() if value else None
        self.topic, self.partition, self.offset = "changelog", 0, 0


async def test_a_burst_of_changelog_messages_is_no_burst_into_a_reading_clients_queue():
    # A fetch hands the follower hundreds of messages at once; a client that reads keeps up.
    hub = Hub()
    conn = Connection(Caller("acme", None), queue_size=4)
    hub.subscribe(conn)
    socket_ = FakeSocket()
    writer = asyncio.create_task(conn.write(socket_))
    dispatcher = asyncio.create_task(hub.dispatch())
    burst = 300
    for n in range(burst):
        hub.on_message(Message(status("embedding", chunks_total=burst, chunks_embedded=n + 1, updated_ms=2_000 + n)))
    hub.on_message(Message(None, key="doc-9"))  # a removed row
    hub.on_message(Message({"document_id": "doc-1"}))  # unreadable: logged and skipped
    while hub.inbox or not conn.queue.empty():
        await asyncio.sleep(0.01)
    dispatcher.cancel()
    writer.cancel()
    assert conn.closing is None
    progress = [event for event in socket_.sent if event["type"] == "task_progress"]
    assert [event["chunks_embedded"] for event in progress] == list(range(1, burst + 1))


# --- the real stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_settings(kafka_settings):
    return guarded(kafka_settings, SECRET)[0]


@pytest.fixture(scope="module")
def stack(guarded_settings, tmp_path_factory):
    env = worker_env(
        guarded_settings,
        **guarded(guarded_settings, SECRET)[1],
        DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10",
        DOCFLOW_RATE_LIMIT_UPLOADS_PER_MINUTE="0",
    )
    workers = WorkerStack(guarded_settings, env, tmp_path_factory.mktemp("live-worker-logs"))
    try:
        workers.launch({"web": 2, "chunker": 1, "embedder": 1})
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture(scope="module")
def keys(guarded_settings, stack):
    made = {
        name: create_key(guarded_settings, f"{name}-{uuid.uuid4().hex[:6]}").key for name in ("order", "slow", "cli")
    }
    made["other"] = create_key(guarded_settings, "other-company").key
    time.sleep(1)  # every web worker follows auth.keys: well within a second
    return made


async def owner_and_other(stack: WorkerStack, document_id: str, partitions: int):
    """The web worker owning the document's partition of documents.status (murmur2 of the key), and the other."""
    partition = DefaultPartitioner()(document_id.encode(), list(range(partitions)), list(range(partitions)))
    owners, others = [], []
    for worker in stack.of_role("web"):
        async with DocflowClient(worker.url) as client:
            assigned = (await client.health())["checks"]["assigned"].get(DOCUMENTS_STATUS.name, [])
        (owners if partition in assigned else others).append(worker)
    assert len(owners) == 1 and len(others) == 1, (partition, owners, others)
    return owners[0], others[0]


async def collect(stream, until, timeout: float = 90.0, linger: float = 1.0) -> list[dict]:
    """Events of a stream until ``until(events)`` holds, and those that follow within ``linger`` seconds."""
    events: list[dict] = []

    async def read() -> None:
        async for event in stream:
            events.append(event)
            if until(events):
                return

    await asyncio.wait_for(read(), timeout)
    try:
        await asyncio.wait_for(read_all(stream, events), linger)
    except TimeoutError:
        pass
    return events


async def read_all(stream, events: list[dict]) -> None:
    async for event in stream:
        events.append(event)


def completed(document_ids):
    wanted = set(document_ids)

    def done(events: list[dict]) -> bool:
        finished = {
            event["document_id"]
            for event in events
            if event["type"] == "task_status" and event["current_status"] == "completed"
        }
        return wanted <= finished

    return done


async def test_a_worker_that_does_not_own_the_document_tells_every_state_change(
    stack, keys, guarded_settings, tmp_path
):
    webs = stack.of_role("web")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(documents.make_pdf(documents.lorem_pages(6, 350, seed=7)))
    async with contextlib.AsyncExitStack() as opened:
        clients = [
            await opened.enter_async_context(DocflowClient(worker.url, api_key=keys["order"])) for worker in webs
        ]
        # Both workers' company streams, open before the upload: whichever turns out not to own it.
        streams = [await client.events().connect() for client in clients]
        started = time.perf_counter()
        document_id = (await clients[0].upload(pdf))["document_id"]
        heard = await asyncio.gather(*(collect(stream, completed([document_id])) for stream in streams))
        took = time.perf_counter() - started
        for stream in streams:
            await stream.close()

        owner, other = await owner_and_other(stack, document_id, guarded_settings.topic_partitions)
        events = [event for event in heard[webs.index(other)] if event["document_id"] == document_id]
        changes = [event for event in events if event["type"] == "task_status"]
        states = [event["current_status"] for event in changes]
        assert states[-1] == "completed" and states[0] in ("uploaded", "extracting"), states
        assert [PROGRESS_STATES.index(state) for state in states] == sorted({PROGRESS_STATES.index(s) for s in states})
        assert changes[0]["previous_status"] is None
        assert [event["previous_status"] for event in changes[1:]] == states[:-1]
        assert changes[-1]["document"]["chunks_embedded"] == changes[-1]["document"]["chunks_total"] > 1
        milestones = [event["milestone"] for event in events if event["type"] == "processing_milestone"]
        assert milestones[-1] == "completed" and "chunked" in milestones and "embedded" in milestones
        chunked = next(event for event in events if event.get("milestone") == "chunked")
        assert chunked["details"]["pages"] == 6
        percentages = [event["percentage"] for event in events if event["type"] == "task_progress"]
        assert percentages == sorted(percentages) and percentages[-1] == 100
        timestamps = [event["timestamp"] for event in events]
        assert timestamps == sorted(timestamps)
        # The owner's clients hear the same story.
        owned = [event for event in heard[webs.index(owner)] if event["document_id"] == document_id]
        assert [event["current_status"] for event in owned if event["type"] == "task_status"] == states
        print(f"\nlive: {states} in {took:.1f}s")

        # A client that connects late, to one document, first hears where it is now.
        async with clients[webs.index(other)].events(document_id) as late:
            first = await asyncio.wait_for(late.__anext__(), 10)
        assert first["type"] == "task_status" and first["snapshot"] is True
        assert first["current_status"] == "completed" and first["document"]["document_id"] == document_id

        # Another company's document is not found, before any upgrade.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(
                    f"{other.url}/ws/documents", params={"token": keys["other"], "document_id": document_id}
                )
            assert refused.value.status == 404


def tiny_receive_buffer(addr_info) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def cut_off_logged(worker) -> bool:
    return "cut off a slow WebSocket client" in worker.log_path.read_text(errors="replace")


async def test_a_client_that_never_reads_is_cut_off_and_the_others_go_on(stack, keys):
    web = stack.of_role("web")[0]
    assert not cut_off_logged(web)
    url = f"{web.url}/ws/documents"
    uploaded: list[str] = []
    connector = aiohttp.TCPConnector(socket_factory=tiny_receive_buffer)
    async with (
        aiohttp.ClientSession(connector=connector) as raw,
        DocflowClient(web.url, api_key=keys["slow"]) as client,
    ):
        # Never reads until the worker says it cut it off: its socket fills, then its queue.
        slow = await raw.ws_connect(url, params={"token": keys["slow"]}, compress=0)
        fast = await client.events().connect()
        heard: list[dict] = []

        async def listen() -> None:
            async for event in fast:
                heard.append(event)

        listener = asyncio.create_task(listen())

        # Each tiny document makes about ten events: upload until the slow client is cut off
        # (its queue of QUEUE_SIZE events overflows once the socket buffers are full).
        started = time.perf_counter()
        for batch in range(40):
            answers = await asyncio.gather(
                *(client.upload_text(f"note {batch}-{n}: " + "words " * 40, title=f"n{batch}-{n}") for n in range(25))
            )
            uploaded += [answer["document_id"] for answer in answers]
            await asyncio.sleep(0.5)
            if cut_off_logged(web):
                break
        assert cut_off_logged(web), f"{len(uploaded)} documents did not overflow a queue of {QUEUE_SIZE}"
        cut_after = time.perf_counter() - started

        # Read now, within the close grace: what was queued, then the close frame.
        received, close = 0, None
        while True:
            message = await asyncio.wait_for(slow.receive(), 30)
            if message.type == aiohttp.WSMsgType.TEXT:
                received += 1
                continue
            close = (message.type, message.data, message.extra)
            break
        assert close == (aiohttp.WSMsgType.CLOSE, CUT_OFF_CODE, f"too slow: more than {QUEUE_SIZE} events unread")

        # The other client of the same worker heard every document through to the end.
        deadline = time.monotonic() + 180
        while not completed(uploaded)(heard) and time.monotonic() < deadline:
            assert not listener.done(), listener.exception()
            await asyncio.sleep(0.5)
        assert completed(uploaded)(heard), f"{len(uploaded)} uploaded"
        listener.cancel()
        await fast.close()
        assert received < len(heard)
        print(f"\nslow client cut off after {cut_after:.1f}s, {len(uploaded)} documents, {received} events read")

        # A new connection of the same company is served again.
        async with client.events() as again:
            document_id = (await client.upload_text("after the cut " * 30))["document_id"]
            await collect(again, completed([document_id]), timeout=60)


async def test_a_bad_token_is_refused_with_the_json_error(stack, keys, guarded_settings):
    web = stack.of_role("web")[1]
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    made_up = "dfk_" + "a" * 16 + "_" + "b" * 43
    async with aiohttp.ClientSession() as session:
        for params, status, code in [
            ({"token": made_up}, 401, "invalid_credentials"),
            ({"token": "let-me-in"}, 401, "invalid_credentials"),
            ({}, 401, "missing_credentials"),
            ({"token": keys["order"], "company_id": "someone-else"}, 403, "company_mismatch"),
        ]:
            async with session.get(f"{web.url}/ws/documents", params=params, headers=upgrade) as response:
                assert response.status == status, params
                body = await response.json()
                assert body["error"]["code"] == code and body["error"]["message"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{web.url}/ws/documents", params=params)
            assert refused.value.status == status
    async with DocflowClient(web.url, api_key=made_up) as client:
        with pytest.raises(ApiError) as refused:
            await client.events().connect()
    assert (refused.value.status, refused.value.code) == (401, "invalid_credentials")
    # A good key on a plain GET: not a WebSocket.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{web.url}/ws/documents", params={"token": keys["order"]}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "expected_websocket"
        async with session.get(f"{web.url}/") as response:
            page = await response.text()
        assert "/ws/documents?" in page and "__AUTH_REQUIRED__" not in page

    # A key revoked while its stream is open: the stream ends (1008) within seconds.
    revoked = api_keys.new_key(api_keys.server_secret(guarded_settings), "order-revoked", "live test")
    await api_keys.publish(guarded_settings, revoked.record)
    await asyncio.sleep(1)
    async with DocflowClient(web.url, api_key=revoked.key) as client:
        stream = await client.events().connect()
        started = time.monotonic()
        await api_keys.revoke(guarded_settings, revoked.record.key_id)
        with pytest.raises(EventStreamClosed) as ended:
            await asyncio.wait_for(stream.__anext__(), 15)
    assert ended.value.code == 1008 and "revoked" in ended.value.reason
    print(f"\nrevoked stream ended after {time.monotonic() - started:.1f}s")


def test_upload_wait_follows_the_documents_over_the_websocket(stack, keys, guarded_settings, tmp_path):
    web = stack.of_role("web")[1]
    paths = []
    for n in range(3):
        path = tmp_path / f"cli-{n}.pdf"
        path.write_bytes(documents.make_pdf(documents.lorem_pages(3 + n, 300, seed=40 + n)))
        paths.append(path)
    env = worker_env(
        guarded_settings, DOCFLOW_WEB_PORT=str(web.port), DOCFLOW_WEB_HOST="127.0.0.1", DOCFLOW_API_KEY=keys["cli"]
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "upload", "--wait", "--timeout", "120", *map(str, paths)],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "polling instead" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6, lines
    ids = [line.split()[0] for line in lines[:3]]
    assert [line.split()[1] for line in lines[:3]] == list(map(str, paths))
    for line, document_id in zip(lines[3:], ids):
        parts = line.split()
        assert parts[0] == document_id and parts[1] == "completed" and parts[2] == "chunks"
        embedded, total = parts[3].split("/")
        assert embedded == total and int(total) > 0

    # A document that fails: its error line, and exit code 1, as before.
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(documents.corrupt_pdf())
    failed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "upload", "--wait", "--timeout", "120", str(bad)],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert failed.returncode == 1, failed.stderr
    assert "polling instead" not in failed.stderr, failed.stderr
    assert "  failed  chunks " in failed.stdout and "not a valid PDF" in failed.stdout, failed.stdout


async def test_a_stopping_worker_tells_its_clients_it_is_going_away(stack, keys):
    # Last in this module: it stops a web worker.
    web = stack.of_role("web")[0]
    async with DocflowClient(web.url, api_key=keys["order"]) as client:
        stream = await client.events().connect()
        started = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(stack.stop, web))
        with pytest.raises(EventStreamClosed) as ended:
            await asyncio.wait_for(stream.__anext__(), 30)
        await stopping
    assert ended.value.code == 1001
    assert time.monotonic() - started < 20, "open WebSockets held the worker's shutdown up"
