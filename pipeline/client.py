"""A small asynchronous client of docflow's web API, used by the CLI and the tests."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import Callable
from pathlib import Path

import aiohttp

from pipeline.errors import ApiError
from pipeline.records import FINAL_STATES

UPLOAD_PIECE_BYTES = 256 * 1024


class DocflowClient:
    def __init__(self, base_url: str, company_id: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.company_id = company_id
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def __aenter__(self) -> DocflowClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    def _headers(self) -> dict[str, str]:
        return {"X-Company-ID": self.company_id} if self.company_id else {}

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

    async def status(self, document_id: str) -> dict:
        async with self._session.get(
            f"{self.base_url}/api/v1/documents/{document_id}", headers=self._headers()
        ) as response:
            return await self._json(response)

    async def list(self) -> dict:
        async with self._session.get(
            f"{self.base_url}/api/v1/documents", params={"company_id": self.company_id or ""}, headers=self._headers()
        ) as response:
            return await self._json(response)

    async def search(self, query: str, top_k: int = 5, **filters) -> dict:
        """The company's chunks nearest ``query``: ``{"results": [...], "took_ms"}``."""
        body = {"query": query, "top_k": top_k, **{name: value for name, value in filters.items() if value is not None}}
        async with self._session.post(f"{self.base_url}/api/v1/search", json=body, headers=self._headers()) as response:
            return await self._json(response)

    async def health(self) -> dict:
        async with self._session.get(f"{self.base_url}/health") as response:
            return await response.json(content_type=None)

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
                listed = (await self.list())["documents"]
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
