"""The lifecycle from the API: cancel and delete a document, delete all of a company's, and
find the versions of a document key (docs/architecture.md, "Lifecycle").

A command goes to documents.lifecycle (every working role skips and undoes from there) and
its state to documents.status, from the web worker that owns the document's partition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from faust.web import Request, Response, View

from pipeline.errors import RequestError
from pipeline.lifecycle import end_document
from pipeline.records import FINAL_STATES
from web.http import api_view, document_caller, error, routed
from web.peers import ask_peers, asked_by_peer

if TYPE_CHECKING:
    from pipeline.app import DocflowApp
    from tables.document_status import DocumentStatus
    from web.auth import Caller

# A version that may still become, or already is, what a key stands for.
LIVE_STATES = ("uploaded", "extracting", "chunked", "embedding", "completed")
MAX_DOCUMENT_KEY_CHARS = 256


def document_key_from(raw: object) -> str:
    """A client's document key: printable, at most 256 characters ("" for none; 422 otherwise)."""
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str) or len(raw) > MAX_DOCUMENT_KEY_CHARS or not raw.isprintable():
        raise RequestError(
            422,
            "invalid_parameter",
            f"document_key must be printable text of at most {MAX_DOCUMENT_KEY_CHARS} characters",
        )
    return raw


async def versions_of(app: DocflowApp, request: Request, company_id: str, document_key: str) -> tuple[list[dict], bool]:
    """Every version of a company's document key on every web worker, newest first; and whether a peer was missing."""
    versions = local_versions(app, company_id, document_key)
    if not asked_by_peer(request):
        answers, partial = await ask_peers(app, request, "GET", "/api/v1/documents", {"document_key": document_key})
        versions += [doc for answer in answers for doc in answer["documents"]]
    else:
        partial = False
    return sorted(versions, key=lambda doc: (-doc["version"], doc["document_id"])), partial


def local_versions(app: DocflowApp, company_id: str, document_key: str) -> list[dict]:
    statuses = (app.status_table.get(doc.encode()) for doc in app.company_index.versions(company_id, document_key))
    return [status.public() for status in statuses if status is not None and status.company_id == company_id]


def current_version(versions: list[dict]) -> dict | None:
    """What a key stands for: its newest completed version, else its newest one still in progress."""
    completed = [doc for doc in versions if doc["state"] == "completed"]
    live = [doc for doc in versions if doc["state"] in LIVE_STATES]
    return (completed or live or [None])[0]


def owned_status(app: DocflowApp, document_id: str, caller: Caller) -> DocumentStatus:
    """The caller's document from this worker's share of the table; 404 for another company's."""
    status = app.status_table.get(document_id.encode())
    if status is None or status.company_id != caller.company_id:
        raise RequestError(404, "not_found", f"no document {document_id} for company {caller.company_id}")
    return status


async def cancel(app: DocflowApp, view: View, document_id: str, caller: Caller) -> Response:
    status = owned_status(app, document_id, caller)
    if status.state in FINAL_STATES:
        return error(view, 409, "not_cancellable", f"document {document_id} is {status.state} already")
    await end_document(app, caller.company_id, document_id, "cancel", caller.acting_as)
    return view.json({"document_id": document_id, "state": "cancelled"}, status=202)


async def delete_one(app: DocflowApp, view: View, document_id: str, caller: Caller) -> Response:
    status = owned_status(app, document_id, caller)
    if status.state != "deleted":  # deleting twice is deleting once
        await end_document(app, caller.company_id, document_id, "delete", caller.acting_as)
    return view.json({"document_id": document_id, "state": "deleted"}, status=202)


async def delete_all(app: DocflowApp, view: View, request: Request, caller: Caller) -> Response:
    """Offboarding: every document of the company, on every web worker, each deleted where it is owned."""
    if request.query.get("all") != "true" or request.query.get("confirm") != caller.company_id:
        raise RequestError(
            422, "confirmation_required", "deleting every document needs ?all=true&confirm=<your company id>"
        )
    deleted = 0
    for document_id in app.company_index.documents(caller.company_id):
        status = app.status_table.get(document_id.encode())
        if status is not None and status.company_id == caller.company_id and status.state != "deleted":
            await end_document(app, caller.company_id, document_id, "delete", caller.acting_as)
            deleted += 1
    partial = False
    if not asked_by_peer(request):
        answers, partial = await ask_peers(app, request, "DELETE", "/api/v1/documents", dict(request.query))
        deleted += sum(answer["deleted"] for answer in answers)
    return view.json({"company_id": caller.company_id, "deleted": deleted, "partial": partial}, status=202)


def register(app: DocflowApp) -> None:
    """The cancel endpoints; deleting is on the document's own path (web/api.py)."""
    gate, table = app.gate, app.status_table

    @app.page("/api/v1/documents/{document_id}/cancel")
    class CancelDocument(View):
        """Cancel a document's remaining work: 202, or 409 once it is final."""

        @api_view
        async def post(self, request: Request, document_id: str) -> Response:
            caller = document_caller(gate, request, document_id)
            return await routed(document_id, self._cancel(request, document_id=document_id, caller=caller))

        @app.table_route(table=table, match_info="document_id")
        async def _cancel(self, request: Request, document_id: str, caller: Caller) -> Response:
            return await cancel(app, self, document_id, caller)

    @app.page("/api/v1/tasks/{document_id}")
    class Task(View):
        """Seed 002's name for cancelling: ``DELETE /api/v1/tasks/{id}``."""

        @api_view
        async def delete(self, request: Request, document_id: str) -> Response:
            caller = document_caller(gate, request, document_id)
            return await routed(document_id, self._cancel(request, document_id=document_id, caller=caller))

        @app.table_route(table=table, match_info="document_id")
        async def _cancel(self, request: Request, document_id: str, caller: Caller) -> Response:
            return await cancel(app, self, document_id, caller)
