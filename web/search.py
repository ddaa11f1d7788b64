"""``POST /api/v1/search``: a company's chunks nearest a query, from the vector index.

The query is embedded with the same backend and model the embedders use (so it lands in
the collection of the same embedding space), loaded once per web worker when it starts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

from faust.web import Request, Response, View

from pipeline import metrics, tracing
from pipeline.embedding import create_backend
from pipeline.errors import EmbeddingError, RequestError, VectorIndexError
from pipeline.ids import valid_id
from pipeline.index import open_index
from web.http import api_view, json_object
from web.ingest import MAX_TAGS

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

MAX_BODY_BYTES = 64 * 1024
MAX_TOP_K = 100
MAX_DOCUMENT_IDS = 100


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    query: str
    top_k: int
    document_ids: list[str]
    tags: list[str]
    min_score: float | None

    @classmethod
    def from_json(cls, body: dict, max_query_chars: int) -> SearchRequest:
        """The validated request, or 422 naming what is wrong."""
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise RequestError(422, "invalid_query", "query must be a non-empty string")
        if len(query) > max_query_chars:
            raise RequestError(422, "invalid_query", f"query must be at most {max_query_chars} characters")
        top_k = body.get("top_k", 5)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise RequestError(422, "invalid_parameter", f"top_k must be an integer from 1 to {MAX_TOP_K}")
        document_ids = body.get("document_ids") or []
        if (
            not isinstance(document_ids, list)
            or len(document_ids) > MAX_DOCUMENT_IDS
            or not all(isinstance(doc, str) and valid_id(doc) for doc in document_ids)
        ):
            raise RequestError(
                422, "invalid_parameter", f"document_ids must be a list of at most {MAX_DOCUMENT_IDS} document ids"
            )
        tags = body.get("tags") or []
        if not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(isinstance(tag, str) for tag in tags):
            raise RequestError(422, "invalid_parameter", f"tags must be a list of at most {MAX_TAGS} strings")
        min_score = body.get("min_score")
        if min_score is not None and (
            isinstance(min_score, bool) or not isinstance(min_score, int | float) or not math.isfinite(min_score)
        ):
            raise RequestError(422, "invalid_parameter", "min_score must be a number (cosine similarity, -1 to 1)")
        return cls(query.strip(), top_k, document_ids, tags, min_score)


def register(app: DocflowApp) -> None:
    settings = app.settings
    index = open_index(settings)
    backend = create_backend(settings)

    @app.task
    async def load_query_model() -> None:
        # A local model takes seconds to load: at start, not in the first search.
        await backend.load()

    @app.on_before_shutdown.connect
    async def close_search(app_, **kwargs) -> None:
        await backend.close()
        await index.close()

    @app.page("/api/v1/search")
    class Search(View):
        """JSON ``{"query", "top_k", "document_ids", "tags", "min_score"}`` → the company's best chunks."""

        @api_view
        async def post(self, request: Request) -> Response:
            started = time.perf_counter()
            caller = app.gate.caller(request)
            await app.gate.admit(caller, "search")
            try:
                body = await json_object(request, MAX_BODY_BYTES)
                caller = app.gate.caller(request, body_company=body.get("company_id"))
                search = SearchRequest.from_json(body, settings.search_max_query_chars)
                hits = await _search(caller.company_id, search)
            except RequestError as exc:
                metrics.search_requests_total.labels("rejected" if exc.status < 500 else "unavailable").inc()
                raise
            took = time.perf_counter() - started
            metrics.search_requests_total.labels("ok").inc()
            metrics.search_duration_seconds.observe(took)
            return self.json({"results": [dataclasses.asdict(hit) for hit in hits], "took_ms": round(took * 1000, 1)})

    async def _search(company_id: str, search: SearchRequest):
        try:
            with tracing.span("embed query", {"docflow.embedding.model": backend.model}):
                [vector] = await backend.embed([search.query])
        except EmbeddingError as exc:
            raise RequestError(503, "embedding_unavailable", f"the query could not be embedded: {exc}") from exc
        try:
            with tracing.span("search index", {"docflow.search.top_k": search.top_k}) as searching:
                hits = await index.search(
                    company_id, backend.model, vector, search.top_k, search.document_ids, search.tags, search.min_score
                )
                searching.set_attribute("docflow.search.hits", len(hits))
        except VectorIndexError as exc:
            if exc.permanent:
                raise RequestError(500, "index_error", f"the search index refused the search: {exc}") from exc
            raise RequestError(503, "index_unavailable", f"the search index is unavailable: {exc}") from exc
        # The indexer removes an ended document's chunks; until it has, they are left out here.
        return [hit for hit in hits if app.lifecycle.stopped(hit.document_id) is None]
