"""``GET /docs``: the web API's OpenAPI 3.1 description (web/static/openapi.json) and a page listing it.

The page is rendered here once, at registration, from the same JSON: plain HTML, no script,
nothing fetched from elsewhere. Operations marked ``x-requires-index`` (search) are left out
of both when the pipeline runs without a vector index, so the description names only routes
this worker serves. Also registers seed 001's aliases (web/aliases.py).
"""

from __future__ import annotations

import copy
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from faust.web import Request, Response, View

from web import aliases

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

OPENAPI_PATH = Path(__file__).parent / "static" / "openapi.json"  # static/*: packaged (setup.cfg package_data)
METHODS = ("get", "post", "put", "patch", "delete")


def load(index: str = "milvus") -> dict:
    """The description; with ``index="none"`` without the operations that need a vector index."""
    spec = json.loads(OPENAPI_PATH.read_text())
    if index == "none":
        spec = copy.deepcopy(spec)
        for path in list(spec["paths"]):
            item = spec["paths"][path]
            for method in [m for m in METHODS if m in item and item[m].get("x-requires-index")]:
                del item[method]
            if not any(m in item for m in METHODS):
                del spec["paths"][path]
    return spec


def operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [
        (method.upper(), path, item[method])
        for path, item in spec["paths"].items()
        for method in METHODS
        if method in item
    ]


def render(spec: dict) -> str:
    """A readable page of the description: each operation, its parameters, body and answers."""
    e = html.escape
    rows = []
    for method, path, op in operations(spec):
        params = ", ".join(
            f"{p['name']} ({p['in']}{', required' if p.get('required') else ''})"
            for p in (_resolve(spec, p) for p in op.get("parameters", []))
            if p["in"] in ("path", "query")
        )
        body = ", ".join(op.get("requestBody", {}).get("content", {}))
        answers = ", ".join(op.get("responses", {}))
        alias = f"<p class=alias>alias of <code>{e(op['x-alias-of'])}</code></p>" if "x-alias-of" in op else ""
        rows.append(
            f"<section id={e(op.get('operationId', ''))}><h3><code>{method} {e(path)}</code></h3>"
            f"<p>{e(op.get('summary', ''))}</p>{alias}"
            + (f"<p>{e(op['description'])}</p>" if op.get("description") else "")
            + (f"<p><b>Parameters:</b> {e(params)}</p>" if params else "")
            + (f"<p><b>Body:</b> {e(body)}</p>" if body else "")
            + f"<p><b>Answers:</b> {e(answers)}</p></section>"
        )
    schemes = "".join(
        f"<li><b>{e(name)}</b>: {e(scheme.get('description', ''))}</li>"
        for name, scheme in spec["components"]["securitySchemes"].items()
    )
    info = spec["info"]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{e(info['title'])}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "section{border-top:1px solid #ddd}code{background:#f4f4f4}.alias{color:#666}</style></head><body>"
        f"<h1>{e(info['title'])}</h1><p>{e(info.get('description', ''))}</p>"
        '<p>Machine-readable: <a href="/docs/openapi.json">/docs/openapi.json</a> (OpenAPI 3.1).</p>'
        f"<h2>Credentials</h2><ul>{schemes}</ul>"
        '<h2>Errors</h2><p>Every error is <code>{"error": {"code": "...", "message": "..."}}</code>.</p>'
        f"<h2>Operations</h2>{''.join(rows)}</body></html>"
    )


def _resolve(spec: dict, node: dict) -> dict:
    if "$ref" not in node:
        return node
    _, _, kind, name = node["$ref"].split("/")
    return spec["components"][kind][name]


def register(app: DocflowApp) -> None:
    aliases.register(app)
    spec = load(app.settings.index)
    description = json.dumps(spec).encode()
    page = render(spec)

    @app.page("/docs")
    class Docs(View):
        """This API's operations, as a page."""

        async def get(self, request: Request) -> Response:
            return self.html(page)

    @app.page("/docs/openapi.json")
    class OpenApi(View):
        """This API's OpenAPI 3.1 description."""

        async def get(self, request: Request) -> Response:
            return self.bytes(description, content_type="application/json")
