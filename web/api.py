"""The web role's API: upload, text ingestion, a document's status, a company's list.

docs/architecture.md ("Web API") says how the views, the accept path and the errors fit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from faust.web import Request, Response, View

from pipeline.errors import RequestError
from pipeline.records import FINAL_STATES
from tables.company_index import SortKey, cursor_of, parse_cursor
from web import lifecycle
from web.auth import Caller
from web.http import PIECE_BYTES, api_view, document_caller, json_object, routed, within_limit
from web.ingest import Accepted, accept, discard, receive, receive_url, url_from
from web.peers import ask_peers, asked_by_peer

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
MAX_FORM_OVERHEAD = MAX_FIELDS * MAX_FIELD_BYTES  # the form fields around the file itself
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_URL_BODY_BYTES = 64 * 1024
MAX_TEXT_BYTES_OVERHEAD = 64 * 1024  # JSON quoting around the text itself


def accepted(view: View, outcome: Accepted) -> Response:
    return view.json(outcome.body(), status=200 if outcome.unchanged else 202)


async def _part_pieces(part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
    while piece := await part.read_chunk(PIECE_BYTES):
        yield piece


async def _field_text(part: aiohttp.BodyPartReader) -> str:
    """A form field read whole, up to MAX_FIELD_BYTES (413 past it)."""
    value = bytearray()
    async for piece in _part_pieces(part):
        value += piece
        if len(value) > MAX_FIELD_BYTES:
            raise RequestError(413, "too_large", f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise RequestError(400, "invalid_field", f"form field {part.name!r} is not UTF-8 text") from None


log = logging.getLogger(__name__)

INDEX_PAGE = Path(__file__).parent / "static" / "index.html"


def register(app: DocflowApp) -> None:
    settings = app.settings
    table = app.status_table
    index = app.company_index
    gate = app.gate

    index_page = (
        INDEX_PAGE.read_text()
        .replace("__FINAL_STATES__", json.dumps(FINAL_STATES))
        .replace("__AUTH_REQUIRED__", json.dumps(gate.required))
        # A valid id (the settings check it) holds nothing HTML would read as markup.
        .replace("__DEFAULT_COMPANY_ID__", settings.default_company_id or "demo")
    )

    @app.page("/")
    class Index(View):
        """A page to upload documents and watch a company's documents progress."""

        async def get(self, request: Request) -> Response:
            return self.html(index_page)

    @app.page("/api/v1/upload")
    class Upload(View):
        """multipart/form-data: ``file`` plus optional chunk_size, chunk_overlap, title, tags."""

        @api_view
        async def post(self, request: Request) -> Response:
            caller = gate.caller(request)
            within_limit(request, settings.max_upload_bytes, MAX_FORM_OVERHEAD)
            await gate.admit(caller, "upload")
            if not request.content_type.startswith("multipart/"):
                raise RequestError(
                    400, "expected_multipart", "send the document as multipart/form-data in a 'file' field"
                )
            try:
                reader = await request.multipart()
            except (ValueError, AssertionError) as exc:
                raise RequestError(400, "invalid_multipart", f"the multipart body is malformed: {exc}") from None
            fields: dict[str, str] = {}
            received = None
            try:
                async for part in reader:
                    if part.name != "file":
                        if len(fields) >= MAX_FIELDS:
                            raise RequestError(413, "too_large", f"more than {MAX_FIELDS} form fields")
                        fields[part.name or ""] = await _field_text(part)
                        continue
                    if received is not None:
                        raise RequestError(422, "invalid_parameter", "send exactly one file per upload")
                    received = await receive(
                        app,
                        caller,
                        part.filename or "document",
                        part.headers.get("Content-Type"),
                        _part_pieces(part),
                        fields,
                    )
            except (ValueError, HttpProcessingError) as exc:  # aiohttp's own complaints about a malformed body
                if received is not None:
                    await discard(app, received)
                raise RequestError(400, "invalid_multipart", f"the multipart body is malformed: {exc}") from None
            except BaseException:
                if received is not None:
                    await discard(app, received)
                raise
            if received is None:
                raise RequestError(422, "missing_file", "no 'file' field in the upload")
            return accepted(self, await accept(app, received, fields, request))

    @app.page("/api/v1/documents/text")
    class TextDocument(View):
        """JSON ``{"text", "title", "filename", "tags", "chunk_size", "chunk_overlap"}``."""

        @api_view
        async def post(self, request: Request) -> Response:
            caller = gate.caller(request)
            within_limit(request, settings.max_upload_bytes, MAX_TEXT_BYTES_OVERHEAD)
            await gate.admit(caller, "upload")
            body = await json_object(request, settings.max_upload_bytes + MAX_TEXT_BYTES_OVERHEAD)
            caller = gate.caller(request, body_company=body.get("company_id"))
            text = body.get("text")
            if not isinstance(text, str):
                raise RequestError(422, "invalid_parameter", "text must be a string")
            title = body.get("title") if isinstance(body.get("title"), str) else ""
            filename = body.get("filename") or f"{title or 'text'}.txt"
            if not isinstance(filename, str):
                raise RequestError(422, "invalid_parameter", "filename must be a string")
            declared = "text/markdown" if filename.endswith(".md") else "text/plain"
            # Whitespace alone is an empty document.
            data = text.encode(errors="replace") if text.strip() else b""

            async def pieces() -> AsyncIterator[bytes]:
                yield data

            received = await receive(app, caller, filename, declared, pieces(), body)
            return accepted(self, await accept(app, received, body, request))

    @app.page("/api/v1/documents/url")
    class UrlDocument(View):
        """JSON ``{"url", "title", "tags", "document_key", "chunk_size", "chunk_overlap"}``: the chunker fetches it."""

        @api_view
        async def post(self, request: Request) -> Response:
            caller = gate.caller(request)
            await gate.admit(caller, "upload")
            body = await json_object(request, MAX_URL_BODY_BYTES)
            caller = gate.caller(request, body_company=body.get("company_id"))
            received = receive_url(app, caller, url_from(body.get("url")), body)
            return accepted(self, await accept(app, received, body, request))

    @app.page("/api/v1/documents/{document_id}")
    class DocumentView(View):
        """A document's status (GET) or its deletion (DELETE), by whichever web worker owns its partition."""

        @api_view
        async def get(self, request: Request, document_id: str) -> Response:
            caller = document_caller(gate, request, document_id)  # before routing: a refused caller costs no hop
            return await routed(document_id, self._status(request, document_id=document_id, caller=caller))

        @app.table_route(table=table, match_info="document_id")
        async def _status(self, request: Request, document_id: str, caller: Caller) -> Response:
            body = lifecycle.owned_status(app, document_id, caller).public()
            body["stale"] = bool(app.rebalancing or app.in_recovery)
            return self.json(body)

        @api_view
        async def delete(self, request: Request, document_id: str) -> Response:
            caller = document_caller(gate, request, document_id)
            return await routed(document_id, self._delete(request, document_id=document_id, caller=caller))

        @app.table_route(table=table, match_info="document_id")
        async def _delete(self, request: Request, document_id: str, caller: Caller) -> Response:
            return await lifecycle.delete_one(app, self, document_id, caller)

    @app.page("/api/v1/documents")
    class DocumentList(View):
        """The company's documents across every web worker, newest first, a page at a time."""

        @api_view
        async def get(self, request: Request) -> Response:
            caller = gate.caller(request)
            if "document_key" in request.query:
                return await self._versions(request, caller)
            limit, after = _page_request(request)
            local = [_listed(table, key) for key in index.page(caller.company_id, limit, after)]
            pages, partial = [local], False
            if not asked_by_peer(request):
                answers, partial = await ask_peers(
                    app, request, "GET", "/api/v1/documents", {**request.query, "limit": str(limit)}
                )
                pages += [answer["documents"] for answer in answers]
            documents = sorted(
                (doc for page in pages for doc in page if doc is not None),
                key=lambda doc: (-doc["created_ms"], doc["document_id"]),
            )
            more = len(documents) > limit or any(len(page) == limit for page in pages)
            documents = documents[:limit]
            last = documents[-1] if documents and more else None
            return self.json(
                {
                    "company_id": caller.company_id,
                    "documents": documents,
                    "count": len(documents),
                    "next_cursor": cursor_of(last["created_ms"], last["document_id"]) if last else None,
                    "partial": partial,
                    "stale": bool(app.rebalancing or app.in_recovery),
                }
            )

        async def _versions(self, request: Request, caller: Caller) -> Response:
            """Every version of a document key, newest first, and the one it stands for now."""
            document_key = lifecycle.document_key_from(request.query["document_key"]) or None
            if document_key is None:
                raise RequestError(422, "invalid_parameter", "document_key must not be empty")
            versions, partial = await lifecycle.versions_of(app, request, caller.company_id, document_key)
            current = lifecycle.current_version(versions)
            return self.json(
                {
                    "company_id": caller.company_id,
                    "document_key": document_key,
                    "current": current,
                    "documents": versions,
                    "count": len(versions),
                    "partial": partial,
                    "stale": bool(app.rebalancing or app.in_recovery),
                }
            )

        @api_view
        async def delete(self, request: Request) -> Response:
            """Every document of the company (offboarding): ``?all=true&confirm=COMPANY_ID``."""
            return await lifecycle.delete_all(app, self, request, gate.caller(request))


def _page_request(request: Request) -> tuple[int, SortKey | None]:
    raw_limit = request.query.get("limit", str(DEFAULT_PAGE))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise RequestError(422, "invalid_parameter", f"limit must be an integer from 1 to {MAX_PAGE}")
    cursor = request.query.get("cursor")
    try:
        after = parse_cursor(cursor) if cursor else None
    except ValueError:
        raise RequestError(422, "invalid_parameter", "cursor must be a next_cursor this API returned") from None
    return int(raw_limit), after


def _listed(table, key: SortKey) -> dict | None:
    status = table.get(key[1].encode())
    return status.public() if status is not None else None
