"""A small asynchronous client of docflow's web API, used by the CLI and the tests."""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import Callable
from pathlib import Path

import aiohttp

from pipeline.errors import ApiError
from pipeline.records import FINAL_STATES

UPLOAD_PIECE_BYTES = 256 * 1024
EVENTS_HEARTBEAT_SECONDS = 30.0
# A document just uploaded may not be folded into the status table yet: its stream waits this long.
EVENTS_NOT_FOUND_SECONDS = 5.0


class DocflowClient:
    def __init__(
        self, base_url: str, company_id: str | None = None, timeout: float = 60.0, api_key: str | None = None
    ) -> None:
        """``api_key`` where the service requires keys (the company comes from it); else ``company_id``."""
        self.base_url = base_url.rstrip("/")
        self.company_id = company_id
        self.api_key = api_key
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def __aenter__(self) -> DocflowClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"X-Company-ID": self.company_id} if self.company_id else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def _json(self, response: aiohttp.ClientResponse) -> dict:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = {}
        if response.status >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise ApiError(response.status, err.get("code", "http_error"), err.get("message", response.reason or ""))
        return body

    async def upload(self, path: Path, progress: Callable[[int], None] | None = None, **fields: str) -> dict:
        """Upload one file, streaming it; ``progress`` is told the bytes sent as they go."""

        async def pieces():
            with open(path, "rb") as handle:
                while piece := handle.read(UPLOAD_PIECE_BYTES):
                    if progress:
                        progress(len(piece))
                    yield piece

        form = aiohttp.FormData()
        for name, value in fields.items():
            if value is not None:
                form.add_field(name, str(value))
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        form.add_field("file", pieces(), filename=path.name, content_type=content_type)
        async with self._session.post(f"{self.base_url}/api/v1/upload", data=form, headers=self._headers()) as response:
            return await self._json(response)

    async def upload_text(self, text: str, **fields) -> dict:
        async with self._session.post(
            f"{self.base_url}/api/v1/documents/text", json={"text": text, **fields}, headers=self._headers()
        ) as response:
            return await self._json(response)

    async def upload_url(self, url: str, **fields) -> dict:
        """Ingest the page or file at ``url``: the chunker fetches it (behind the SSRF guard)."""
        async with self._session.post(
            f"{self.base_url}/api/v1/documents/url", json={"url": url, **fields}, headers=self._headers()
        ) as response:
            return await self._json(response)

    async def status(self, document_id: str) -> dict:
        async with self._session.get(
            f"{self.base_url}/api/v1/documents/{document_id}", headers=self._headers()
        ) as response:
            return await self._json(response)

    async def list(self, limit: int | None = None, cursor: str | None = None) -> dict:
        """One page of the company's documents, newest first; ``next_cursor`` asks for the next."""
        params = {name: str(value) for name, value in (("limit", limit), ("cursor", cursor)) if value is not None}
        async with self._session.get(
            f"{self.base_url}/api/v1/documents", params=params, headers=self._headers()
        ) as response:
            return await self._json(response)

    async def list_all(self, page: int = 1000) -> dict:
        """Every document of the company, page after page: ``{"documents", "partial"}``."""
        documents, partial, cursor = [], False, None
        while True:
            answer = await self.list(page, cursor)
            documents += answer["documents"]
            partial = partial or answer["partial"]
            cursor = answer.get("next_cursor")
            if not cursor:
                return {"documents": documents, "partial": partial}

    async def search(self, query: str, top_k: int = 5, **filters) -> dict:
        """The company's chunks nearest ``query``: ``{"results": [...], "took_ms"}``."""
        body = {"query": query, "top_k": top_k, **{name: value for name, value in filters.items() if value is not None}}
        async with self._session.post(f"{self.base_url}/api/v1/search", json=body, headers=self._headers()) as response:
            return await self._json(response)

    async def cancel(self, document_id: str) -> dict:
        """Cancel a document's remaining work (409 once it is final)."""
        async with self._session.post(
            f"{self.base_url}/api/v1/documents/{document_id}/cancel", headers=self._headers()
        ) as response:
            return await self._json(response)

    async def delete(self, document_id: str) -> dict:
        """Delete a document: its original, its chunks in the index; its status stays as a tombstone."""
        async with self._session.delete(
            f"{self.base_url}/api/v1/documents/{document_id}", headers=self._headers()
        ) as response:
            return await self._json(response)

    async def versions(self, document_key: str) -> dict:
        """Every version of a document key and the current one: ``{"current", "documents", ...}``."""
        async with self._session.get(
            f"{self.base_url}/api/v1/documents", params={"document_key": document_key}, headers=self._headers()
        ) as response:
            return await self._json(response)

    async def health(self) -> dict:
        async with self._session.get(f"{self.base_url}/health") as response:
            return await response.json(content_type=None)

    def events(self, document_id: str | None = None) -> EventStream:
        """Live events (``GET /ws/documents``) of one document, or of the whole company.

        An async iterator of event dicts (``type``: task_status, task_progress,
        processing_milestone, error), connected on first use or with ``await
        stream.connect()``; also an async context manager that closes it. The key goes as
        ``?token=`` (else the company as ``?company_id=``). A stream the server ends (a
        cut-off, a restart) raises :class:`EventStreamClosed`.
        """
        return EventStream(self, document_id)

    async def wait(self, document_id: str, timeout: float = 600.0, interval: float = 0.25) -> dict:
        """Poll a document until it reaches a final state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                status = await self.status(document_id)
                if status["state"] in FINAL_STATES:
                    return status
            except ApiError as exc:
                if exc.status not in (404, 503):  # not folded into the table yet, or a rebalance
                    raise
            if loop.time() > deadline:
                raise TimeoutError(f"document {document_id} did not finish within {timeout:.0f}s")
            await asyncio.sleep(interval)

    async def wait_all(self, document_ids, timeout: float = 600.0, interval: float = 0.25) -> dict[str, dict]:
        """Poll the company's list until every document is in a final state: one request a round, however many."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(document_ids)
        finished: dict[str, dict] = {}
        while True:
            try:
                listed = (await self.list_all())["documents"]
            except ApiError as exc:
                if exc.status != 503:
                    raise
                listed = []
            for status in listed:
                if status["document_id"] in pending and status["state"] in FINAL_STATES:
                    pending.discard(status["document_id"])
                    finished[status["document_id"]] = status
            if not pending:
                return finished
            if loop.time() > deadline:
                raise TimeoutError(f"{len(pending)} documents did not finish within {timeout:.0f}s")
            await asyncio.sleep(interval)


class EventStreamClosed(ConnectionError):
    """The server ended a live event stream: ``code`` 1013 for a client too slow, 1001 for a restart."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"the event stream was closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class EventStream:
    """A WebSocket of live events (:meth:`DocflowClient.events`)."""

    def __init__(self, client: DocflowClient, document_id: str | None = None) -> None:
        self.client = client
        self.document_id = document_id
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    def _params(self) -> dict[str, str]:
        params = {"document_id": self.document_id} if self.document_id else {}
        if self.client.api_key:
            params["token"] = self.client.api_key
        elif self.client.company_id:
            params["company_id"] = self.client.company_id
        return params

    async def connect(self) -> EventStream:
        """Open the stream: ApiError when the server refuses it (401, 403, 404, 503)."""
        if self._ws is not None:
            return self
        url = f"{self.client.base_url}/ws/documents"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EVENTS_NOT_FOUND_SECONDS
        while True:
            try:
                self._ws = await self.client._session.ws_connect(
                    url,
                    params=self._params(),
                    heartbeat=EVENTS_HEARTBEAT_SECONDS,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                )
                return self
            except aiohttp.WSServerHandshakeError as exc:
                refusal = await self._refusal(url, exc)
            waiting = refusal.status == 503 or (refusal.status == 404 and self.document_id is not None)
            if not waiting or loop.time() > deadline:
                raise refusal
            await asyncio.sleep(0.25)

    async def _refusal(self, url: str, exc: aiohttp.WSServerHandshakeError) -> ApiError:
        if exc.status in (400, 401, 403):
            # Refused before the upgrade is looked at: a plain GET gets the JSON error itself.
            async with self.client._session.get(url, params=self._params()) as response:
                try:
                    await self.client._json(response)
                except ApiError as refused:
                    return refused
        codes = {404: "not_found", 503: "unavailable"}
        return ApiError(exc.status, codes.get(exc.status, "websocket_refused"), exc.message)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict:
        if self._ws is None:
            await self.connect()
        assert self._ws is not None
        while True:
            message = await self._ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                return json.loads(message.data)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                code, reason = self._ws.close_code, message.extra or ""
                await self.close()
                if code == aiohttp.WSCloseCode.OK:
                    raise StopAsyncIteration
                raise EventStreamClosed(code, str(reason))
            if message.type == aiohttp.WSMsgType.ERROR:
                await self.close()
                raise EventStreamClosed(None, str(message.data))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> EventStream:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
