"""Seed 001's names for two endpoints, served by the same views as their /api/v1 paths.

``POST /ingest/upload`` is ``POST /api/v1/upload`` and ``GET /ingest/status/{document_id}``
is ``GET /api/v1/documents/{document_id}``: each alias subclasses the view registered on the
canonical path (so authentication, limits, table routing and errors are the same code), and
the status alias leaves out DELETE. Registered after web.api; web/static/openapi.json lists both
with ``x-alias-of``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from faust.web import View

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

ALIASES = {"/ingest/upload": "/api/v1/upload", "/ingest/status/{document_id}": "/api/v1/documents/{document_id}"}
ONLY = {"/ingest/status/{document_id}": {"get"}}  # the status alias reads; it does not delete


def register(app: DocflowApp) -> None:
    for alias, canonical in ALIASES.items():
        view_class = type(app.web.views[canonical])
        namespace = {"__doc__": f"Alias of {canonical}: {view_class.__doc__ or ''}"}
        if alias in ONLY:
            # A method left as View's own is not routed (faust's View.get_methods).
            for method in ("get", "post", "put", "patch", "delete"):
                if method not in ONLY[alias]:
                    namespace[method] = getattr(View, method)
        name = "Alias" + view_class.__name__
        app.page(alias, name=name)(type(name, (view_class,), namespace))
