"""Live progress over a WebSocket: ``GET /ws/documents``, served by every web worker.

A client connects with ``?document_id=`` for one document, or without it for its whole
company, and gets events shaped as seed 002 shapes them (``task_status``,
``task_progress``, ``processing_milestone``, ``error``), each with ``type`` (and the seed's
``event_type``), ``document_id`` and ``timestamp`` (epoch ms: the status's ``updated_ms``).

Fan-out: every web worker follows the whole changelog of the status table
(``docflow-web-document_status-changelog``, every new full DocumentStatus) from its end,
without a consumer group (:func:`pipeline.follow.follow_topic`), so a client connected to a
worker that does not own its document's partition still hears of every change. The
:class:`Hub` compares each status with the last one it saw of that document (a bounded
LRU) and turns the difference into events (:func:`live_events`).

Slow clients: the follower hands messages to :meth:`Hub.dispatch`, which puts events
into each connection's bounded queue (:data:`QUEUE_SIZE`) without ever waiting, and
yields between messages; one task per connection writes to its socket. A connection
whose queue overflows is cut off with close code 1013 (try again later): it gets
CLOSE_GRACE_SECONDS to read up to the close frame, then its connection is dropped. The
worker's other clients go on.

Limits: a worker hears of changes from its follower's start on (a restart, or a broker
outage that restarts the follower, is a gap; clients re-list on reconnecting); the
snapshot sent first to a one-document client may repeat an event that follows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from aiokafka import ConsumerRecord
from faust.web import Request, Response, View

from pipeline.errors import RequestError
from pipeline.follow import follow_topic, keep_following
from pipeline.ids import valid_id
from pipeline.records import PROGRESS_STATES
from tables.document_status import DocumentStatus
from web.auth import Caller
from web.http import error

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)

# Events a connection may have waiting for its socket; one more and it is cut off.
QUEUE_SIZE = 256
# Documents whose last seen status the hub remembers, to tell what changed (~200 bytes each).
LAST_SEEN_SIZE = 100_000
# The close code of a client cut off for reading too slowly: it may reconnect and re-list.
CUT_OFF_CODE = WSCloseCode.TRY_AGAIN_LATER  # 1013
# The kernel's send buffer of a live connection (Linux doubles it): events are small, and
# autotuning would let a client that stops reading hold megabytes before its queue fills.
SEND_BUFFER_BYTES = 64 * 1024
# A cut-off client's time to read up to the close frame before its connection is dropped.
CLOSE_GRACE_SECONDS = 10.0
# Pings keep idle connections open through proxies and find vanished clients.
HEARTBEAT_SECONDS = 30.0
# How long a connection waits for the hub to reach the changelog's end (just after start).
HUB_READY_SECONDS = 5.0
# How often an idle connection checks that its API key is still valid.
KEY_CHECK_SECONDS = 5.0
SNAPSHOT_TIMEOUT_SECONDS = 5.0
# Changelog messages not yet turned into events past which the worker says it is behind.
INBOX_WARNING = 10_000

# task_progress's percentage before any chunk is embedded; embedding spans the rest.
EARLY_PERCENT = {"uploaded": 0, "extracting": 5, "chunked": 10, "embedding": 10}
CHUNKED_PERCENT = EARLY_PERCENT["chunked"]
ERROR_CODE = "processing_failed"
FORWARDED_AUTH_HEADERS = ("Authorization", "X-API-Key")


class Seen(NamedTuple):
    """What the hub remembers of a document's status: what its events are computed from."""

    company_id: str
    state: str
    pages: int | None
    chunks_total: int | None
    chunks_embedded: int
    chunks_indexed: int
    updated_ms: int

    @classmethod
    def of(cls, status: dict) -> Seen:
        return cls(
            # Interned: a hundred thousand remembered documents share a few companies and states.
            sys.intern(status["company_id"]),
            sys.intern(status["state"]),
            status.get("pages"),
            status.get("chunks_total"),
            status.get("chunks_embedded") or 0,
            status.get("chunks_indexed") or 0,
            status.get("updated_ms") or 0,
        )

    def changed_from(self, other: Seen | None) -> bool:
        """Whether anything an event reports differs (not only the time)."""
        return other is None or self[:-1] != other[:-1]


# --- the events ---------------------------------------------------------------------------------


def percentage(status: Seen, require_indexed: bool) -> int:
    """How far a document is, 0-100: a fixed step per early stage, then its chunks."""
    if status.state == "completed":
        return 100
    base = EARLY_PERCENT.get(status.state, 0)
    total = status.chunks_total
    if not total:
        return base
    done, span = status.chunks_embedded, total
    if require_indexed:
        done, span = done + status.chunks_indexed, 2 * total
    return min(99, max(base, CHUNKED_PERCENT + (100 - CHUNKED_PERCENT) * done // span))


def _progress_message(status: Seen, require_indexed: bool) -> str:
    total = status.chunks_total
    if status.state == "uploaded":
        return "uploaded, waiting to be read"
    if status.state == "extracting":
        return "extracting the text"
    if status.state == "completed":
        return f"all {total} chunks {'searchable' if require_indexed else 'embedded'}"
    if total is None:
        return f"{status.state}"
    message = f"{status.chunks_embedded} of {total} chunks embedded"
    if require_indexed:
        message += f", {status.chunks_indexed} searchable"
    return message


def _event(kind: str, seen: Seen, document_id: str, /, **fields) -> dict:
    return {"type": kind, "event_type": kind, "document_id": document_id, "timestamp": seen.updated_ms, **fields}


def live_events(previous: Seen | None, current: dict, require_indexed: bool = False) -> list[dict]:
    """The events that tell a client how a document went from ``previous`` to ``current``.

    ``current`` is the document's public status (:meth:`DocumentStatus.public`); ``previous``
    is None for a document the hub had not seen (new, or forgotten). In order: the state
    change, an error, the milestones reached, the progress.
    """
    now = Seen.of(current)
    if not now.changed_from(previous):
        return []
    document_id = current["document_id"]
    events = []
    if previous is None or previous.state != now.state:
        before = previous.state if previous is not None else None
        events.append(
            _event(
                "task_status",
                now,
                document_id,
                current_status=now.state,
                previous_status=before,
                message=f"{before} → {now.state}" if before else now.state,
                document=current,
            )
        )
        if now.state == "failed":
            reason = current.get("error") or "failed without a reason"
            events.append(
                _event(
                    "error",
                    now,
                    document_id,
                    message=reason,
                    error_code=ERROR_CODE,
                    error_message=reason,
                    details={"previous_status": before},
                )
            )
    if previous is not None:
        events += _milestones(previous, now, current, require_indexed)
    moved = previous is None or _counts(previous) != _counts(now)
    if moved and now.state in PROGRESS_STATES:
        events.append(
            _event(
                "task_progress",
                now,
                document_id,
                percentage=percentage(now, require_indexed),
                status=now.state,
                message=_progress_message(now, require_indexed),
                chunks_total=now.chunks_total,
                chunks_embedded=now.chunks_embedded,
                chunks_indexed=now.chunks_indexed,
            )
        )
    return events


def _counts(status: Seen) -> tuple:
    return status.state, status.chunks_total, status.chunks_embedded, status.chunks_indexed


def _milestones(previous: Seen, now: Seen, current: dict, require_indexed: bool) -> list[dict]:
    total = now.chunks_total
    reached = []
    if previous.chunks_total is None and total is not None:
        pages = f" from {now.pages} page{'s' if now.pages != 1 else ''}" if now.pages is not None else ""
        reached.append(("chunked", f"split into {total} chunks{pages}", {"chunks_total": total, "pages": now.pages}))
    if total and previous.chunks_embedded < total <= now.chunks_embedded:
        reached.append(("embedded", f"all {total} chunks embedded", {"chunks_total": total}))
    if require_indexed and total and previous.chunks_indexed < total <= now.chunks_indexed:
        reached.append(("indexed", f"all {total} chunks searchable", {"chunks_total": total}))
    if now.state == "completed" and previous.state != "completed":
        took = now.updated_ms - current["created_ms"] if current.get("created_ms") else None
        reached.append(("completed", "completed", {"chunks_total": total, "pages": now.pages, "duration_ms": took}))
    return [
        _event("processing_milestone", now, current["document_id"], milestone=name, message=message, details=details)
        for name, message, details in reached
    ]


def snapshot_events(current: dict, require_indexed: bool = False) -> list[dict]:
    """What a client connecting for one document is told first: where the document is now."""
    events = live_events(None, current, require_indexed)
    for event in events:
        if event["type"] == "task_status":
            event["snapshot"] = True
            event["message"] = f"currently {current['state']}"
    return events


def encode(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


# --- connections and the hub --------------------------------------------------------------------


class Connection:
    """One client's subscription: its queue of encoded events, drained by its own writer task."""

    def __init__(
        self,
        caller: Caller,
        document_id: str | None = None,
        queue_size: int = QUEUE_SIZE,
        still_allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.caller = caller
        self.company_id = caller.company_id
        self.document_id = document_id
        self.queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(queue_size)
        self.still_allowed = still_allowed
        self.not_before = 0  # events older than the snapshot sent first are already in it
        self.sent = 0
        # Set once the connection must end: the close code and reason it ends with.
        self.closing: tuple[int, str] | None = None
        self.stop = asyncio.Event()

    def offer(self, timestamp: int, text: str) -> None:
        """Queue an event; never waits. A full queue cuts the connection off."""
        if self.closing is not None:
            return
        try:
            self.queue.put_nowait((timestamp, text))
        except asyncio.QueueFull:
            self.end(CUT_OFF_CODE, f"too slow: more than {self.queue.maxsize} events unread")

    def end(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (int(code), reason)
            self.stop.set()
            try:
                self.queue.put_nowait(None)  # wakes an idle writer; a busy one sees ``closing`` next
            except asyncio.QueueFull:
                pass

    async def write(self, ws: web.WebSocketResponse, first: Iterable[str] = ()) -> None:
        """Send ``first``, then the queued events as they come, until the connection ends."""
        for text in first:
            await ws.send_str(text)
        while self.closing is None:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(KEY_CHECK_SECONDS):
                        item = await self.queue.get()
                except TimeoutError:
                    item = None
            if self.closing is not None:
                return
            if not self.still_allowed():
                self.end(WSCloseCode.POLICY_VIOLATION, "the API key was revoked")
                return
            if item is not None and item[0] >= self.not_before:
                # Returns at once unless the socket's buffer is full: then only this task waits.
                await ws.send_str(item[1])
                self.sent += 1


class Hub:
    """The live subscriptions of one web worker, fed every status the changelog carries."""

    def __init__(self, require_indexed: bool = False, last_seen_size: int = LAST_SEEN_SIZE) -> None:
        self.require_indexed = require_indexed
        self.last_seen_size = last_seen_size
        self.last_seen: OrderedDict[str, Seen] = OrderedDict()
        self.by_company: dict[str, set[Connection]] = {}
        self.by_document: dict[str, set[Connection]] = {}
        self.caught_up = asyncio.Event()
        self.inbox: deque[ConsumerRecord] = deque()
        self._wakeup = asyncio.Event()

    @property
    def connections(self) -> set[Connection]:
        every = {conn for conns in self.by_company.values() for conn in conns}
        return every.union(*self.by_document.values())

    def subscribe(self, conn: Connection) -> None:
        if conn.document_id is None:
            self.by_company.setdefault(conn.company_id, set()).add(conn)
        else:
            self.by_document.setdefault(conn.document_id, set()).add(conn)

    def unsubscribe(self, conn: Connection) -> None:
        registry, key = (
            (self.by_company, conn.company_id) if conn.document_id is None else (self.by_document, conn.document_id)
        )
        conns = registry.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del registry[key]

    def on_message(self, message: ConsumerRecord) -> None:
        """One changelog message, handed to :meth:`dispatch`: the follower's loop never waits on clients."""
        self.inbox.append(message)
        if len(self.inbox) == INBOX_WARNING:
            log.warning("live events are %d changelog messages behind", INBOX_WARNING)
        self._wakeup.set()

    async def dispatch(self) -> None:
        """Turn changelog messages into events for as long as the worker runs.

        It yields after each message, so the connections' writers drain their queues between
        them: a fetch of a thousand messages is not a burst of a thousand events into a queue.
        """
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.inbox:
                try:
                    self.take(self.inbox.popleft())
                except Exception:  # one bad status must not end every client's events
                    log.exception("turning a status into live events failed")
                await asyncio.sleep(0)

    def take(self, message: ConsumerRecord) -> None:
        """One changelog message: a document's new full status (None: the row was removed)."""
        if message.key is None:
            return
        if message.value is None:
            self.last_seen.pop(message.key.decode(errors="replace"), None)
            return
        try:
            status = DocumentStatus.from_data(json.loads(message.value)).public()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("unreadable status on %s[%s]@%s: %s", message.topic, message.partition, message.offset, exc)
            return
        self.apply(status)

    def apply(self, status: dict) -> None:
        document_id = status["document_id"]
        previous = self.last_seen.pop(document_id, None)
        self.last_seen[document_id] = current = Seen.of(status)
        if len(self.last_seen) > self.last_seen_size:
            self.last_seen.popitem(last=False)
        if not current.changed_from(previous):
            return  # a redelivered event folded to the same status
        listeners = [
            conn
            for conn in (*self.by_document.get(document_id, ()), *self.by_company.get(current.company_id, ()))
            if conn.company_id == current.company_id
        ]
        if not listeners:
            return
        for event in live_events(previous, status, self.require_indexed):
            text = encode(event)
            for conn in listeners:
                conn.offer(event["timestamp"], text)

    def close_all(self, code: int, reason: str) -> None:
        for conn in self.connections:
            conn.end(code, reason)


# --- the view -----------------------------------------------------------------------------------


def register(app: DocflowApp) -> Hub:
    """``GET /ws/documents`` on the web role, and the task that follows the status changelog."""
    settings = app.settings
    gate = app.gate
    require_indexed = settings.index != "none"
    hub = Hub(require_indexed)
    changelog = app.status_table.changelog_topic_name

    @app.task
    async def follow_status_changelog() -> None:
        async def follow() -> None:
            hub.caught_up.clear()  # a new start is a gap: new clients wait for the end again
            await follow_topic(settings, changelog, hub.on_message, hub.caught_up, from_end=True)

        await asyncio.gather(hub.dispatch(), keep_following(changelog, follow))

    async def going_away(web_app) -> None:
        # aiohttp waits for open handlers when it stops: end every connection first.
        hub.close_all(WSCloseCode.GOING_AWAY, "the server is shutting down")

    app.web.web_app.on_shutdown.append(going_away)

    def still_allowed(caller: Caller) -> Callable[[], bool]:
        if caller.key_id is None or gate.ring is None:
            return lambda: True

        def allowed() -> bool:
            record = gate.ring.get(caller.key_id)
            return record is not None and record.revoked_ms is None

        return allowed

    async def snapshot(request: Request, caller: Caller, document_id: str) -> dict:
        """The document's status from whichever worker owns it: this worker's own status route."""
        headers = {"X-Company-ID": caller.company_id}
        headers.update({name: request.headers[name] for name in FORWARDED_AUTH_HEADERS if name in request.headers})
        token = request.query.get("token")
        if caller.key_id and token and not any(name in headers for name in FORWARDED_AUTH_HEADERS):
            headers["Authorization"] = f"Bearer {token}"
        own = str(app.conf.canonical_url).rstrip("/")
        try:
            async with app.http_client.get(
                f"{own}/api/v1/documents/{document_id}",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=SNAPSHOT_TIMEOUT_SECONDS),
            ) as response:
                body = await response.json(content_type=None)
                if response.status == 200:
                    return body
                err = body.get("error", {}) if isinstance(body, dict) else {}
                raise RequestError(response.status, err.get("code", "unavailable"), err.get("message", ""))
        except (TimeoutError, aiohttp.ClientError, ValueError):
            raise RequestError(503, "starting", "the document's status is not available yet; retry shortly") from None

    @app.page("/ws/documents")
    class LiveDocuments(View):
        """A WebSocket of live events: one document (``?document_id=``) or the caller's company."""

        async def get(self, request: Request) -> Response:
            # faust's aiohttp driver hands views aiohttp's own request: the upgrade is aiohttp's.
            ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, compress=False, timeout=CLOSE_GRACE_SECONDS)
            try:
                caller = gate.caller(request, token=request.query.get("token"))
                document_id = request.query.get("document_id") or None
                if document_id is not None and not valid_id(document_id):
                    raise RequestError(404, "not_found", f"no document {document_id!r}")
                if not ws.can_prepare(request).ok:
                    raise RequestError(400, "expected_websocket", "connect with a WebSocket upgrade")
                try:
                    await asyncio.wait_for(hub.caught_up.wait(), HUB_READY_SECONDS)
                except TimeoutError:
                    raise RequestError(503, "starting", "live events are not ready yet; retry shortly") from None
            except RequestError as exc:
                return error(self, exc.status, exc.code, exc.message)

            conn = Connection(caller, document_id, still_allowed=still_allowed(caller))
            hub.subscribe(conn)  # before the snapshot: nothing that happens after it is missed
            try:
                first = []
                if document_id is not None:
                    try:
                        current = await snapshot(request, caller, document_id)
                    except RequestError as exc:
                        return error(self, exc.status, exc.code, exc.message)
                    current.pop("stale", None)
                    conn.not_before = current.get("updated_ms") or 0
                    first = [encode(event) for event in snapshot_events(current, require_indexed)]
                await ws.prepare(request)
                _bound_send_buffer(request)
                await serve(ws, conn, first)
            finally:
                hub.unsubscribe(conn)
            return ws

    return hub


async def serve(ws: web.WebSocketResponse, conn: Connection, first: list[str]) -> None:
    """Write events until the client leaves or the connection is ended; then close it.

    The writer is never cancelled while the client is there: it may be waiting for the
    socket to drain, and aiohttp's drain cannot be waited on again once cancelled. Ended, it
    sends nothing more and returns once its last send is through; a client that does not
    read that far within CLOSE_GRACE_SECONDS has its connection dropped.
    """
    writer = asyncio.create_task(conn.write(ws, first))
    reader = asyncio.create_task(_read_until_closed(ws))
    stopped = asyncio.create_task(conn.stop.wait())
    try:
        await asyncio.wait({writer, reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done() or ws.closed:
            return  # the client went away
        if conn.closing is None:  # the writer failed
            conn.end(WSCloseCode.INTERNAL_ERROR, "the server could not send an event")
        code, reason = conn.closing
        if code == CUT_OFF_CODE:
            log.warning(
                "cut off a slow WebSocket client of company %s after %d events: %s",
                conn.company_id, conn.sent, reason,
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE_SECONDS
        await asyncio.wait({writer}, timeout=CLOSE_GRACE_SECONDS)
        # Reading stops here: close() then waits for the client's own close frame instead of
        # dropping the connection under the close frame it has not read yet.
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if writer.done():
            try:
                await asyncio.wait_for(ws.close(code=code, message=reason.encode()), max(deadline - loop.time(), 0.1))
            except (TimeoutError, asyncio.CancelledError, ConnectionError):
                pass
        if not writer.done() or not ws.closed or ws.close_code == WSCloseCode.ABNORMAL_CLOSURE:
            log.info("dropped a WebSocket client of company %s that did not read its close frame", conn.company_id)
            transport = _transport(ws)
            if transport is not None:
                transport.abort()  # closing would wait for the unread buffer forever
    finally:
        for task in (writer, reader, stopped):
            task.cancel()
        await asyncio.gather(writer, reader, stopped, return_exceptions=True)


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    """Read what the client sends (nothing is expected) so pings, pongs and its close are handled."""
    async for message in ws:
        if message.type == WSMsgType.ERROR:
            return


def _bound_send_buffer(request: Request) -> None:
    """A small kernel send buffer: a client that stops reading holds little memory and is found sooner."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:
            pass


def _transport(ws: web.WebSocketResponse) -> asyncio.Transport | None:
    request = getattr(ws, "_req", None)
    return request.transport if request is not None else None
