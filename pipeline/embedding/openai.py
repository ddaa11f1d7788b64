"""The ``openai`` backend: any OpenAI-compatible ``/embeddings`` server through the official client.

Over 300 lines because one class holds what one request's fate depends on: splitting a
batch into requests, the error each HTTP answer becomes (permanent or not), and the checks
a 200 answer must pass before its vectors are trusted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai
from opentelemetry.trace import SpanKind

from pipeline import metrics, tracing
from pipeline.embedding.base import EmbeddingBackend, require_strings
from pipeline.errors import EmbeddingError
from pipeline.settings import Settings

DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` is taken to cost: one per 3 UTF-8 bytes, plus one.

    tiktoken would count exactly, but downloads its BPE tables at run time, and
    OpenAI-compatible servers run other tokenizers anyway. English prose averages about
    4 bytes per token in cl100k_base, so this overestimates it by a third; text that
    tokenizes worse than 3 bytes per token (long digit runs, rare scripts) can exceed it,
    and a server that then rejects a request fails the batch permanently (400).
    """
    return len(text.encode()) // 3 + 1


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` by :func:`estimate_tokens`, never inside a character."""
    if estimate_tokens(text) <= max_tokens:
        return text
    # (max_tokens - 1) * 3 bytes estimate to exactly max_tokens; a split character is dropped.
    return text.encode()[: (max_tokens - 1) * 3].decode(errors="ignore")


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MalformedEmbeddingResponse(Exception):
    """A 200 answer whose vectors cannot be trusted (wrong count, indexes, types or lengths)."""


# The client retries these itself (408, 409, 429, 5xx); once it gives up, a later attempt may work.
_TRANSIENT_STATUS = {408, 409, 429}


class OpenAIBackend(EmbeddingBackend):
    """Embeddings from an OpenAI-compatible ``/embeddings`` endpoint through ``openai.AsyncOpenAI``.

    One :meth:`embed` call becomes requests of at most ``max_batch_inputs`` texts and
    ``max_batch_tokens`` estimated tokens (:func:`estimate_tokens`), at most ``concurrency``
    of them in flight; vectors come back in input order. A text over ``max_input_tokens``
    estimated tokens is truncated to that estimate before it is sent (its vector then
    represents the beginning of the text), never sent whole.

    Retries are the client's own: up to ``max_retries`` more attempts on connection errors,
    timeouts, 408/409/429 and 5xx, honouring ``Retry-After``, else exponential backoff
    (0.5 s doubling to 8 s). Each attempt may take ``timeout`` seconds, so one request can
    take about ``(max_retries + 1) * timeout + 16`` seconds before it fails. What fails after
    that is an :class:`EmbeddingError`: permanent for refusals that repeat the same way
    (400, 401, 403, 404, 422 and other 4xx), transient for exhausted retries and malformed
    answers.

    Vectors are requested as JSON floats (``encoding_format="float"``), not the client's
    default base64 float32: every OpenAI-compatible server supports floats, and they arrive
    exactly as the server computed them.

    Without an API key (argument or ``OPENAI_API_KEY``) the backend refuses to start, unless
    the server is on loopback, where servers usually need none: it then sends ``unused``.
    The client is created on first use, inside the running event loop, and bound to it.
    """

    name = "openai"

    def __init__(
        self,
        model: str = DEFAULT_OPENAI_MODEL,
        base_url: str | None = None,
        api_key: str | None = None,
        dimensions: int | None = None,
        max_batch_inputs: int = 256,
        max_batch_tokens: int = 250_000,
        max_input_tokens: int = 8191,
        concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 30.0,
    ) -> None:
        if dimensions is not None and dimensions < 1:
            raise ValueError("dimensions must be at least 1")
        if min(max_batch_inputs, max_input_tokens, concurrency) < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("batch limits and concurrency must be at least 1, max_retries at least 0, timeout > 0")
        if max_batch_tokens < max_input_tokens:
            raise ValueError("max_batch_tokens must hold at least one input of max_input_tokens")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
        self.dimensions = dimensions
        self.max_batch_inputs = max_batch_inputs
        self.max_batch_tokens = max_batch_tokens
        self.max_input_tokens = max_input_tokens
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self._api_key = self._resolve_api_key(api_key)
        self._dims = dimensions
        self._requests_allowed = asyncio.Semaphore(concurrency)
        self._client: openai.AsyncOpenAI | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIBackend:
        return cls(
            model=settings.embedding_model or DEFAULT_OPENAI_MODEL,
            base_url=settings.openai_base_url or None,
            api_key=settings.openai_api_key or None,
            dimensions=settings.openai_dimensions or None,
            concurrency=settings.openai_concurrency,
            max_retries=settings.openai_max_retries,
            timeout=settings.openai_timeout_seconds,
        )

    def _resolve_api_key(self, api_key: str | None) -> str:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if key:
            return key
        if _is_loopback(self.base_url):
            return "unused"
        raise EmbeddingError(
            f"the openai embedding backend has no API key for {self.base_url}: "
            "set DOCFLOW_OPENAI_API_KEY or OPENAI_API_KEY",
            permanent=True,
        )

    @property
    def dims(self) -> int:
        """``dimensions`` when given, else the length of the first vector the server returned."""
        if self._dims is None:
            raise RuntimeError("OpenAIBackend.dims is read from the server's answer: await embed() first")
        return self._dims

    @property
    def vector_space(self) -> str:
        # Another server may serve other weights under the same model name.
        return f"{self.name}/{self.base_url}/{self.model}/{self.dimensions or 'native'}"

    async def load(self) -> None:
        self._get_client()

    def _get_client(self) -> openai.AsyncOpenAI:
        if self._closed:
            # Not permanent: the events were not embedded, and another worker can embed them.
            raise EmbeddingError("the openai embedding backend is closed", permanent=False)
        if self._client is None:
            # Created here, in the running loop, because its connection pool belongs to that loop.
            self._client = openai.AsyncOpenAI(
                api_key=self._api_key, base_url=self.base_url, max_retries=self.max_retries, timeout=self.timeout
            )
        return self._client

    def requests_for(self, texts: list[str]) -> Iterator[tuple[int, list[str]]]:
        """The requests ``texts`` become, as (offset of the first text, texts to send), truncated."""
        start, batch, batch_tokens = 0, [], 0
        for position, text in enumerate(texts):
            text = truncate_to_tokens(text, self.max_input_tokens)
            tokens = estimate_tokens(text)
            if batch and (len(batch) == self.max_batch_inputs or batch_tokens + tokens > self.max_batch_tokens):
                yield start, batch
                start, batch, batch_tokens = position, [], 0
            batch.append(text)
            batch_tokens += tokens
        if batch:
            yield start, batch

    async def embed(self, texts: list[str]) -> list[list[float]]:
        require_strings(texts)
        if not texts:
            return []
        client = self._get_client()
        vectors: list[list[float]] = [[] for _ in texts]

        async def embed_request(offset: int, batch: list[str]) -> None:
            vectors[offset : offset + len(batch)] = await self._request(client, batch)

        try:
            # A TaskGroup cancels the other requests as soon as one fails: the batch fails anyway.
            async with asyncio.TaskGroup() as requests:
                for offset, batch in self.requests_for(texts):
                    requests.create_task(embed_request(offset, batch))
        except* EmbeddingError as failed:
            errors = [error for error in failed.exceptions if isinstance(error, EmbeddingError)]
            # Report a permanent failure first: retrying the batch cannot get past it.
            error = max(errors, key=lambda error: error.permanent)
            raise error from error.__cause__
        return vectors

    async def _request(self, client: openai.AsyncOpenAI, batch: list[str]) -> list[list[float]]:
        request = {"docflow.embedding.model": self.model, "docflow.embedding.texts": len(batch)}
        async with self._requests_allowed:
            # A span per HTTP request, once a slot is free: a child of the batch's embed span.
            with tracing.span("embedding request", request, kind=SpanKind.CLIENT):
                started = time.perf_counter()
                try:
                    response = await client.embeddings.create(
                        input=batch,
                        model=self.model,
                        encoding_format="float",
                        **({"dimensions": self.dimensions} if self.dimensions else {}),
                    )
                    vectors = self._vectors_from(response, len(batch))
                except Exception as exc:
                    metrics.embedding_openai_api_errors_total.labels(
                        model_name=self.model, error_type=type(exc).__name__
                    ).inc()
                    raise self._embedding_error(exc, len(batch)) from exc
                finally:
                    metrics.embedding_openai_api_duration_seconds.observe(time.perf_counter() - started)
        return vectors

    def _vectors_from(self, response: object, expected: int) -> list[list[float]]:
        """The response's vectors in input order, or :class:`MalformedEmbeddingResponse` if they cannot be trusted."""
        # The client does not validate responses against its types: a server can send anything.
        data = getattr(response, "data", None)
        if not isinstance(data, list) or len(data) != expected:
            count = len(data) if isinstance(data, list) else "no"
            raise MalformedEmbeddingResponse(f"{count} vectors for {expected} inputs")
        items = sorted(data, key=lambda item: item.index if isinstance(item.index, int) else -1)
        if [item.index for item in items] != list(range(expected)):
            raise MalformedEmbeddingResponse(f"indexes {[item.index for item in data]} are not 0..{expected - 1}")
        vectors = []
        for item in items:
            vector = item.embedding
            if (
                not isinstance(vector, list)
                or not vector
                or not all(isinstance(value, (float, int)) and not isinstance(value, bool) for value in vector)
            ):
                raise MalformedEmbeddingResponse(f"embedding {item.index} is not a list of numbers")
            vectors.append([float(value) for value in vector])
        lengths = {len(vector) for vector in vectors}
        if len(lengths) != 1 or (self._dims is not None and lengths != {self._dims}):
            expected_dims = f", expected {self._dims}" if self._dims is not None else ""
            raise MalformedEmbeddingResponse(f"vectors of {sorted(lengths)} dimensions{expected_dims}")
        if self._dims is None:
            self._dims = lengths.pop()
        return vectors

    def _embedding_error(self, exc: Exception, inputs: int) -> EmbeddingError:
        server = f"the OpenAI-compatible server at {self.base_url}"
        detail = _error_detail(exc)
        attempts = f"{self.max_retries + 1} attempts"
        match exc:
            case openai.AuthenticationError():
                return EmbeddingError(f"{server} refused the API key (401): {detail}", permanent=True)
            case openai.PermissionDeniedError():
                return EmbeddingError(f"{server} denied access to model {self.model!r} (403): {detail}", permanent=True)
            case openai.NotFoundError():
                return EmbeddingError(
                    f"{server} has no model {self.model!r} or no embeddings endpoint (404): {detail}", permanent=True
                )
            case openai.BadRequestError() | openai.UnprocessableEntityError():
                return EmbeddingError(
                    f"{server} rejected a request of {inputs} inputs ({exc.status_code}): {detail}", permanent=True
                )
            case openai.APIStatusError() if exc.status_code < 500 and exc.status_code not in _TRANSIENT_STATUS:
                return EmbeddingError(f"{server} refused the request ({exc.status_code}): {detail}", permanent=True)
            case openai.APIStatusError():
                return EmbeddingError(
                    f"retries exhausted: {server} answered {exc.status_code} to {attempts}: {detail}", permanent=False
                )
            case openai.APITimeoutError():
                return EmbeddingError(
                    f"retries exhausted: {server} did not answer within {self.timeout} s, {attempts}", permanent=False
                )
            case openai.APIConnectionError():
                return EmbeddingError(
                    f"retries exhausted: cannot reach {server}, {attempts}: {_short(repr(exc.__cause__ or exc))}",
                    permanent=False,
                )
            case MalformedEmbeddingResponse() | openai.APIResponseValidationError() | ValueError():
                # A proxy or an overloaded server can garble one answer; the next may be fine.
                return EmbeddingError(f"malformed response from {server}: {detail}", permanent=False)
            case _:
                return EmbeddingError(f"embedding request to {server} failed: {detail}", permanent=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            await self._client.close()


def _error_detail(exc: Exception) -> str:
    """The server's own words where it sent an OpenAI error body, else the exception's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return _short(body["message"])
    return _short(getattr(exc, "message", None) or str(exc) or type(exc).__name__)


def _short(text: str, limit: int = 300) -> str:
    # A proxy's error page can be kilobytes of HTML; the start says what happened.
    return text if len(text) <= limit else text[:limit] + "..."
