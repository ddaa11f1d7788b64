"""What every API view shares: the JSON error contract, request timing, and bounded bodies."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from faust.web import Request, Response, View
from faust.web.exceptions import WebError

from pipeline import metrics
from pipeline.errors import RequestError
from pipeline.ids import valid_id
from web.auth import Caller, Gate, RateLimited

log = logging.getLogger(__name__)

PIECE_BYTES = 64 * 1024


def error(view: View, status: int, code: str, message: str) -> Response:
    return view.json({"error": {"code": code, "message": message}}, status=status)


def api_view(handler):
    """Answer RequestError as the JSON error contract, and time every API request."""

    async def respond(view: View, request: Request, *args, **kwargs) -> Response:
        started = time.perf_counter()
        try:
            return await handler(view, request, *args, **kwargs)
        except RequestError as exc:
            response = error(view, exc.status, exc.code, exc.message)
            if isinstance(exc, RateLimited):
                response.headers["Retry-After"] = str(exc.retry_after)
            return response
        finally:
            metrics.ingest_request_processing_duration_seconds.observe(time.perf_counter() - started)

    return respond


def within_limit(request: Request, limit: int, overhead: int) -> None:
    """Refuse (413) a body whose declared size is past the upload limit, before reading it."""
    if request.content_length is not None and request.content_length > limit + overhead:
        raise RequestError(413, "too_large", f"the upload is larger than the {limit}-byte limit")


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
        # A text document's body may be megabytes: parsed off the loop.
        parsed = json.loads(body) if len(body) < PIECE_BYTES else await asyncio.to_thread(json.loads, body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "invalid_json", "the body must be a JSON object") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", "the JSON body is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise RequestError(400, "invalid_json", "the body must be a JSON object")
    return parsed


def document_caller(gate: Gate, request: Request, document_id: str) -> Caller:
    """The caller of a request about one document; a malformed id is as unknown as a missing one."""
    caller = gate.caller(request)
    if not valid_id(document_id):
        raise RequestError(404, "not_found", f"no document {document_id!r}")
    return caller


async def routed(document_id: str, answer) -> Response:
    """A table-routed answer; a routing failure just after start is 503, not 500."""
    try:
        return await answer
    except (RequestError, WebError):
        raise
    except Exception:
        # Just after start the producer may not know the changelog's partitions yet.
        log.warning("routing a request for %s failed", document_id, exc_info=True)
        raise RequestError(503, "starting", "the status table is not ready yet; retry shortly") from None
