"""Asking every other web worker for its share: the status table is split across them by partition."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from faust.web import Request

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

FORWARDED_HEADERS = ("Authorization", "X-API-Key", "X-Company-ID")
LOCAL_ONLY = "local"  # query flag a web worker sets when it asks a peer for its own share only
PEER_TIMEOUT_SECONDS = 5


def asked_by_peer(request: Request) -> bool:
    return request.query.get(LOCAL_ONLY) == "1"


async def ask_peers(
    app: DocflowApp, request: Request, method: str, path: str, params: dict[str, str]
) -> tuple[list[dict], bool]:
    """Each other web worker's JSON answer to the same caller's request for its own share
    (the caller's credentials go along); partial when a peer did not answer.
    """
    own = str(app.conf.canonical_url).rstrip("/")
    try:
        hosts = app.router.table_metadata(app.status_table.name)
    except KeyError:
        return [], True
    peers = [str(url).rstrip("/") for url in hosts if str(url).rstrip("/") != own]
    if not peers:
        return [], False
    headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
    params = {**params, LOCAL_ONLY: "1"}

    async def fetch(peer: str) -> dict | None:
        try:
            async with app.http_client.request(
                method, f"{peer}{path}", params=params, headers=headers,
                timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_SECONDS),
            ) as response:  # fmt: skip
                return await response.json() if response.status < 300 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    answers = await asyncio.gather(*(fetch(peer) for peer in peers))
    return [answer for answer in answers if answer is not None], any(answer is None for answer in answers)
