"""The web role's API: upload, text ingestion, a document's status, a company's list.

docs/architecture.md ("Web API") says how the views, the accept path and the errors fit.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from faust.web import Request, Response, View

from pipeline import metrics
from pipeline.errors import RequestError
from pipeline.records import FINAL_STATES
from web.ingest import accept, company_from, discard, receive

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

PIECE_BYTES = 64 * 1024
MAX_FIELD_BYTES = 64 * 1024
MAX_TEXT_BYTES_OVERHEAD = 64 * 1024  # JSON quoting around the text itself
LOCAL_ONLY = "local"  # query flag a web worker sets when it asks a peer for its share of a list


def error(view: View, status: int, code: str, message: str) -> Response:
    return view.json({"error": {"code": code, "message": message}}, status=status)


def api_view(handler):
    """Answer RequestError as the JSON error contract, and time every API request."""

    async def respond(view: View, request: Request, *args, **kwargs) -> Response:
        started = time.perf_counter()
        try:
            return await handler(view, request, *args, **kwargs)
        except RequestError as exc:
            return error(view, exc.status, exc.code, exc.message)
        finally:
            metrics.ingest_request_processing_duration_seconds.observe(time.perf_counter() - started)

    return respond


def admitted_company(request: Request, limit: int, overhead: int) -> str:
    """The request's company id, once the declared body size is within the upload limit."""
    company_id = company_from(request.headers.get("X-Company-ID"))
    if request.content_length is not None and request.content_length > limit + overhead:
        metrics.ingest_uploads_total.labels(company_id, "unknown", "too_large").inc()
        raise RequestError(413, "too_large", f"the upload is larger than the {limit}-byte limit")
    return company_id


async def json_object(request: Request, limit: int) -> dict:
    """The request's JSON object body, refused (413) past ``limit`` bytes before it is parsed."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, "too_large", f"the request body is larger than the {limit}-byte limit")
    body = bytearray()
    while piece := await request.content.read(PIECE_BYTES):
        body += piece
        if len(body) > limit:  # a chunked body says no length up front
            raise RequestError(413, "too_large", f"the request body is larger than the {limit}-byte limit")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, "invalid_json", "the body must be a JSON object")
    return parsed


def accepted(view: View, document_id: str) -> Response:
    return view.json(
        {"document_id": document_id, "status": "uploaded", "status_url": f"/api/v1/documents/{document_id}"}, status=202
    )


async def _part_pieces(part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
    while piece := await part.read_chunk(PIECE_BYTES):
        yield piece


INDEX_PAGE = Path(__file__).parent / "static" / "index.html"


def register(app: DocflowApp) -> None:
    settings = app.settings
    table = app.status_table
    index_page = INDEX_PAGE.read_text().replace("__FINAL_STATES__", json.dumps(FINAL_STATES))

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
            company_id = admitted_company(request, settings.max_upload_bytes, MAX_FIELD_BYTES)
            if not request.content_type.startswith("multipart/"):
                raise RequestError(
                    400, "expected_multipart", "send the document as multipart/form-data in a 'file' field"
                )
            reader = await request.multipart()
            fields: dict[str, str] = {}
            received = None
            try:
                async for part in reader:
                    if part.name != "file":
                        fields[part.name or ""] = (await part.read_chunk(MAX_FIELD_BYTES)).decode(errors="replace")
                        continue
                    if received is not None:
                        raise RequestError(422, "invalid_parameter", "send exactly one file per upload")
                    received = await receive(
                        app,
                        company_id,
                        part.filename or "document",
                        part.headers.get("Content-Type"),
                        _part_pieces(part),
                        fields,
                    )
            except BaseException:
                if received is not None:
                    await discard(app, received)
                raise
            if received is None:
                raise RequestError(422, "missing_file", "no 'file' field in the upload")
            await accept(app, received, fields)
            return accepted(self, received.document_id)

    @app.page("/api/v1/documents/text")
    class TextDocument(View):
        """JSON ``{"text", "title", "filename", "tags", "chunk_size", "chunk_overlap"}``."""

        @api_view
        async def post(self, request: Request) -> Response:
            company_id = admitted_company(request, settings.max_upload_bytes, MAX_TEXT_BYTES_OVERHEAD)
            body = await json_object(request, settings.max_upload_bytes + MAX_TEXT_BYTES_OVERHEAD)
            if body.get("company_id", company_id) != company_id:
                raise RequestError(400, "invalid_company_id", "company_id in the body differs from X-Company-ID")
            text = body.get("text")
            if not isinstance(text, str):
                raise RequestError(422, "invalid_parameter", "text must be a string")
            title = body.get("title") if isinstance(body.get("title"), str) else ""
            filename = body.get("filename") or f"{title or 'text'}.txt"
            declared = "text/markdown" if str(filename).endswith(".md") else "text/plain"
            # Whitespace alone is an empty document.
            data = text.encode() if text.strip() else b""

            async def pieces() -> AsyncIterator[bytes]:
                yield data

            received = await receive(app, company_id, str(filename), declared, pieces(), body)
            await accept(app, received, body)
            return accepted(self, received.document_id)

    @app.page("/api/v1/documents/{document_id}")
    class DocumentStatusView(View):
        """A document's status, answered by whichever web worker owns its partition."""

        @api_view
        @app.table_route(table=table, match_info="document_id")
        async def get(self, request: Request, document_id: str) -> Response:
            company_id = company_from(request.headers.get("X-Company-ID") or request.query.get("company_id"))
            status = table.get(document_id.encode())
            if status is None or status.company_id != company_id:
                # Another company's document is as unknown as a missing one.
                return error(self, 404, "not_found", f"no document {document_id} for company {company_id}")
            body = status.public()
            body["stale"] = bool(app.rebalancing or app.in_recovery)
            return self.json(body)

    @app.page("/api/v1/documents")
    class DocumentList(View):
        """The company's documents across every web worker, newest first."""

        @api_view
        async def get(self, request: Request) -> Response:
            company_id = company_from(request.query.get("company_id") or request.headers.get("X-Company-ID"))
            documents = [status.public() for status in table.values() if status.company_id == company_id]
            partial = False
            if request.query.get(LOCAL_ONLY) != "1":
                peer_documents, partial = await _from_peers(app, company_id)
                documents.extend(peer_documents)
            documents.sort(key=lambda doc: doc["created_ms"], reverse=True)
            return self.json(
                {
                    "company_id": company_id,
                    "documents": documents,
                    "count": len(documents),
                    "partial": partial,
                    "stale": bool(app.rebalancing or app.in_recovery),
                }
            )


async def _from_peers(app: DocflowApp, company_id: str) -> tuple[list[dict], bool]:
    """Each other web worker's share of the list; partial when a peer did not answer."""
    own = str(app.conf.canonical_url).rstrip("/")
    try:
        hosts = app.router.table_metadata(app.status_table.name)
    except KeyError:
        return [], True
    peers = [str(url).rstrip("/") for url in hosts if str(url).rstrip("/") != own]
    if not peers:
        return [], False

    async def fetch(peer: str) -> list[dict] | None:
        try:
            async with app.http_client.get(
                f"{peer}/api/v1/documents",
                params={"company_id": company_id, LOCAL_ONLY: "1"},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                if response.status != 200:
                    return None
                return (await response.json())["documents"]
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
            return None

    answers = await asyncio.gather(*(fetch(peer) for peer in peers))
    documents = [doc for answer in answers if answer is not None for doc in answer]
    return documents, any(answer is None for answer in answers)
