"""An OpenAI-compatible embeddings and chat server on loopback, for tests and benchmarks.

Over 300 lines: every misbehaviour the backend must survive is one switch here, in one place.

``POST /v1/embeddings`` answers in the OpenAI response shape with deterministic vectors
(:func:`vector_for`), records every request, and misbehaves on demand: random 429/500
answers from a seeded RNG, a fixed number of failures in a row, 401 for every call,
a delay per request, or a malformed body.

``POST /v1/chat/completions`` stands in for a vision model (OCR, pipeline/text/ocr.py):
it records every request (:attr:`EmbeddingServer.chat_requests`, with the text and
``image_url`` parts of its messages) and answers in the OpenAI response shape with
``chat_text``, or with what a callback set by :meth:`EmbeddingServer.reply_to_chat`
returns for the request's body (None: a 500). The failure switches above apply to it
too. Behaviour is set through
:meth:`EmbeddingServer.configure` (thread-safe) or ``POST /control`` with the same
fields as JSON, so a test in another process can steer it; ``GET /control`` returns the
behaviour and request statistics.

In the test's own loop::

    async with EmbeddingServer() as server:
        client = AsyncOpenAI(base_url=server.url, api_key="unused")

Or on its own loop in a thread, which keeps the server's work off the caller's loop::

    server = ThreadedEmbeddingServer(); server.start(); ...; server.stop()
"""

from __future__ import annotations

import array
import asyncio
import base64
import dataclasses
import hashlib
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

DEFAULT_DIMS = 8
MALFORMED_KINDS = ("json", "missing_vector", "not_floats")


def vector_for(text: str, dims: int = DEFAULT_DIMS) -> list[float]:
    """The server's unit vector for ``text``: the same in every process, exact through JSON."""
    values = []
    for position in range(dims):
        digest = hashlib.sha256(f"{position}\x00{text}".encode()).digest()
        # 53 bits fill a float64 mantissa: every value is exact, and spread over [-1, 1).
        values.append(int.from_bytes(digest[:8], "big") / 2**63 - 1.0)
    norm = math.sqrt(sum(value * value for value in values))
    return [value / norm for value in values]


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One call of ``POST /v1/embeddings`` as the server saw it."""

    inputs: list[str]
    model: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int


@dataclasses.dataclass(frozen=True)
class RecordedChat:
    """One call of ``POST /v1/chat/completions`` as the server saw it."""

    model: str
    texts: list[str]  # the text parts of the messages, in order
    image_urls: list[str]  # the urls of the image_url parts (data URLs, for OCR), in order
    headers: dict[str, str]
    body: dict[str, Any]
    status: int


@dataclasses.dataclass
class Behaviour:
    """How the server answers; :meth:`EmbeddingServer.configure` and ``POST /control`` set these fields."""

    failure_rate: float = 0.0
    failure_statuses: tuple[int, ...] = (429, 500)
    seed: int = 0
    retry_after: str | None = "0.01"  # seconds, sent as Retry-After with every 429/500; None sends none
    fail_next: int = 0  # the next N requests fail with fail_next_status, before failure_rate applies
    fail_next_status: int = 429
    unauthorized: bool = False
    delay_ms: float = 0.0
    malformed: str | None = None  # one of MALFORMED_KINDS
    chat_text: str = "Text the model read."  # what /v1/chat/completions answers, without a reply_to_chat callback

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "failure_statuses": list(self.failure_statuses)}


class EmbeddingServer:
    """The server in the caller's event loop: ``async with EmbeddingServer() as server``."""

    def __init__(self, dims: int = DEFAULT_DIMS, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dims = dims
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._behaviour = Behaviour()
        self._rng = random.Random(self._behaviour.seed)
        self._requests: list[RecordedRequest] = []
        self._chat_requests: list[RecordedChat] = []
        self._chat_reply: Callable[[dict[str, Any]], str | None] | None = None
        self._in_flight = 0
        self._max_in_flight = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL to give the client, ``/v1`` included."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.port}/control"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/control", self._set_control)
        app.router.add_get("/control", self._get_control)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # Port 0 asks the OS for a free port; read back the one it picked.
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EmbeddingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- steering and observing, from any thread -------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change some :class:`Behaviour` fields; a new ``seed`` restarts the failure RNG."""
        unknown = set(changes) - {field.name for field in dataclasses.fields(Behaviour)}
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        if changes.get("malformed") not in (None, *MALFORMED_KINDS):
            raise ValueError(f"malformed must be one of {MALFORMED_KINDS} or None")
        if "failure_statuses" in changes:
            changes["failure_statuses"] = tuple(changes["failure_statuses"])
        with self._lock:
            self._behaviour = dataclasses.replace(self._behaviour, **changes)
            if "seed" in changes:
                self._rng = random.Random(self._behaviour.seed)

    def reset(self) -> None:
        """Well-behaved again, with no recorded requests."""
        with self._lock:
            self._behaviour = Behaviour()
            self._rng = random.Random(self._behaviour.seed)
            self._requests.clear()
            self._chat_requests.clear()
            self._chat_reply = None
            self._max_in_flight = self._in_flight

    def reply_to_chat(self, reply: Callable[[dict[str, Any]], str | None] | None) -> None:
        """Answer each chat request with ``reply(body)`` (None: a 500), instead of ``chat_text``.

        It runs on the server's loop, so it should be quick; None restores ``chat_text``.
        """
        with self._lock:
            self._chat_reply = reply

    @property
    def behaviour(self) -> Behaviour:
        with self._lock:
            return dataclasses.replace(self._behaviour)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedChat]:
        with self._lock:
            return list(self._chat_requests)

    @property
    def max_in_flight(self) -> int:
        """The most requests the server was handling at once since the last :meth:`reset`."""
        with self._lock:
            return self._max_in_flight

    # --- handlers ---------------------------------------------------------------------------

    async def _serve(self, request: web.Request, answer, record) -> web.Response:
        """One request of either endpoint: counted in flight, refused or answered, recorded, delayed."""
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            behaviour = dataclasses.replace(self._behaviour)
            reply = self._chat_reply
        try:
            # Read the body first: a client that times out during the delay leaves nothing unread.
            body = await request.json()
            status, response = self._refusal(behaviour) or answer(body, behaviour, reply)
            with self._lock:
                record(body, dict(request.headers), status)
            if behaviour.delay_ms:
                await asyncio.sleep(behaviour.delay_ms / 1000)
            return response
        finally:
            with self._lock:
                self._in_flight -= 1

    def _refusal(self, behaviour: Behaviour) -> tuple[int, web.Response] | None:
        """401 for every call, or a 429/5xx picked by the failure switches; None to answer."""
        if behaviour.unauthorized:
            return 401, _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        failure = self._pick_failure(behaviour)
        if failure:
            headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
            kind = "rate_limit_exceeded" if failure == 429 else "server_error"
            return failure, _error(failure, f"test server failure {failure}", kind, kind, headers)
        return None

    async def _embeddings(self, request: web.Request) -> web.Response:
        def record(body: dict[str, Any], headers: dict[str, str], status: int) -> None:
            inputs = body.get("input")
            self._requests.append(
                RecordedRequest(
                    inputs=[inputs] if isinstance(inputs, str) else list(inputs or []),
                    model=str(body.get("model")),
                    headers=headers,
                    body=body,
                    status=status,
                )
            )

        return await self._serve(request, lambda body, behaviour, reply: self._answer(body, behaviour), record)

    def _answer(self, body: dict[str, Any], behaviour: Behaviour) -> tuple[int, web.Response]:
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            return 400, _error(400, "input must be a non-empty string or list of strings", "invalid_request_error")
        dims = body.get("dimensions") or self.dims
        vectors = [vector_for(text, dims) for text in texts]

        if behaviour.malformed == "json":
            return 200, web.Response(text='{"object": "list", "data": [', content_type="application/json")
        if behaviour.malformed == "missing_vector":
            vectors = vectors[:-1]
        data = []
        for index, vector in enumerate(vectors):
            embedding: Any = vector
            if behaviour.malformed == "not_floats":
                embedding = ["not a number"] * len(vector)
            elif body.get("encoding_format") == "base64":
                embedding = base64.b64encode(array.array("f", vector).tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        # Out of order on purpose: clients must place vectors by index, not by position.
        data.reverse()
        tokens = sum(len(text.split()) for text in texts)
        return 200, web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _chat(self, request: web.Request) -> web.Response:
        def record(body: dict[str, Any], headers: dict[str, str], status: int) -> None:
            texts, image_urls = _message_parts(body.get("messages"))
            self._chat_requests.append(
                RecordedChat(
                    model=str(body.get("model")),
                    texts=texts,
                    image_urls=image_urls,
                    headers=headers,
                    body=body,
                    status=status,
                )
            )

        return await self._serve(request, self._chat_answer, record)

    def _chat_answer(
        self, body: dict[str, Any], behaviour: Behaviour, reply: Callable[[dict[str, Any]], str | None] | None
    ) -> tuple[int, web.Response]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error(400, "messages must be a non-empty list", "invalid_request_error")
        text = reply(body) if reply is not None else behaviour.chat_text
        if text is None:
            return 500, _error(500, "test server could not answer this request", "server_error", "server_error")
        if behaviour.malformed == "json":
            return 200, web.Response(text='{"object": "chat.completion", "choices": [', content_type="application/json")
        prompt_tokens = sum(len(part.split()) for part in _message_parts(messages)[0])
        completion_tokens = len(text.split())
        return 200, web.json_response(
            {
                "id": f"chatcmpl-{len(self._chat_requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def _pick_failure(self, behaviour: Behaviour) -> int | None:
        with self._lock:
            if self._behaviour.fail_next > 0:
                self._behaviour.fail_next -= 1
                return behaviour.fail_next_status
            if behaviour.failure_rate and self._rng.random() < behaviour.failure_rate:
                return self._rng.choice(behaviour.failure_statuses)
        return None

    async def _set_control(self, request: web.Request) -> web.Response:
        changes = await request.json()
        try:
            if changes.pop("reset", False):
                self.reset()
            self.configure(**changes)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return await self._get_control(request)

    async def _get_control(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "behaviour": self.behaviour.as_json(),
                "requests": len(self.requests),
                "chat_requests": len(self.chat_requests),
                "max_in_flight": self.max_in_flight,
            }
        )


def _message_parts(messages: Any) -> tuple[list[str], list[str]]:
    """The text parts and the image urls of chat messages, each in order; anything malformed is skipped."""
    texts: list[str] = []
    image_urls: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str):
                    image_urls.append(url)
    return texts, image_urls


def _error(
    status: int, message: str, kind: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class ThreadedEmbeddingServer(EmbeddingServer):
    """The same server on its own event loop in a daemon thread: ``start()`` and ``stop()`` block."""

    def __init__(self, dims: int = DEFAULT_DIMS, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(dims=dims, host=host, port=port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:  # type: ignore[override]
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(EmbeddingServer.start(self))
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(EmbeddingServer.stop(self))
            loop.close()

        self._thread = threading.Thread(target=serve, name="openai-test-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"the embedding server did not start within {timeout} s")
        if failure:
            raise failure[0]

    def stop(self, timeout: float = 10.0) -> None:  # type: ignore[override]
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> ThreadedEmbeddingServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
