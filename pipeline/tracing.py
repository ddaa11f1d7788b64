"""OpenTelemetry tracing: one document's trace from its upload through every agent.

Off unless ``DOCFLOW_OTEL_ENDPOINT`` names an OTLP/HTTP endpoint: then :func:`setup` gives
the process an SDK tracer provider (``service.name`` ``docflow-<role>``) whose batch span
processor exports from its own thread, never from the event loop. Off, the OpenTelemetry
API's no-op tracer answers every call here, and no exporter exists.

The trace context crosses Kafka in message headers (W3C ``traceparent``, through the
global propagator): :func:`kafka_headers` when sending, :func:`context_from_headers` when
reading. Faust wraps aiokafka, so aiokafka's own instrumentation would see Faust's fetch
loop, not the agent that works on a message (Faust hands messages to agents through its
own queues, in other tasks), and would add a span per message sent. docflow instead reads
``event.headers`` in its agents and passes ``headers=`` to ``topic.send``.

How an agent's batch joins its messages' traces is :func:`batch_span`'s docstring.
docs/architecture.md, "Tracing", shows the spans of one document.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from pipeline.settings import Settings

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
# Probes and scrapes come every few seconds and say nothing about documents: no traces for
# them unless the operator names other exclusions (the aiohttp instrumentation's own variable).
EXCLUDED_URLS_VARIABLE = "OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS"
DEFAULT_EXCLUDED_URLS = "^/health$,^/metrics$"
FLUSH_TIMEOUT_MILLIS = 5000

# A proxy: it follows the provider :func:`setup` installs, and is the no-op tracer until then.
tracer = trace.get_tracer("docflow")
_provider: Optional[TracerProvider] = None


def setup(settings: Settings, role: str) -> Optional[TracerProvider]:
    """This process's tracer provider exporting to ``settings.otel_endpoint``; None when that is empty.

    Once per process (OpenTelemetry keeps one global provider): a second call returns the first provider.
    """
    global _provider
    if not settings.otel_endpoint:
        return None
    if _provider is not None:
        return _provider
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from pipeline import __version__

    resource = Resource.create({"service.name": f"docflow-{role}", "service.version": __version__})
    # The sampler comes from OTEL_TRACES_SAMPLER (parent-based, always on by default); the
    # processor's delay and sizes from OTEL_BSP_*. On exit the provider flushes what is left.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(settings.otel_endpoint))))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing to %s as docflow-%s", traces_url(settings.otel_endpoint), role)
    return provider


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of an endpoint given as its base (``http://HOST:4318``) or in full."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def http_middlewares() -> list:
    """aiohttp middlewares that give every request of the web role a server span, continuing a
    ``traceparent`` the client sent; none while tracing is off.

    Faust builds its aiohttp Application with ``web_application_options``, so the middleware is
    handed over there. The instrumentor is still run once: it sets up the middleware's module
    state (excluded URLs, its metrics). It also swaps ``aiohttp.web.Application`` for a subclass
    carrying the same middleware; Faust's driver is imported first, so it keeps the original
    class and every request gets one server span, not two.
    """
    if _provider is None:
        return []
    import faust.web.drivers.aiohttp  # noqa: F401  (binds Faust's Application before the swap)
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor, create_aiohttp_middleware

    os.environ.setdefault(EXCLUDED_URLS_VARIABLE, DEFAULT_EXCLUDED_URLS)
    instrumentor = AioHttpServerInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=_provider)
    return [create_aiohttp_middleware(tracer_provider=_provider)]


async def flush() -> None:
    """Export the spans ended so far (at a worker's stop), in a thread: the export is blocking HTTP.

    Within FLUSH_TIMEOUT_MILLIS: a collector that is away must not hold up a stopping worker.
    """
    if _provider is not None:
        await asyncio.to_thread(_provider.force_flush, FLUSH_TIMEOUT_MILLIS)


def kafka_headers(context: Context | None = None) -> dict[str, bytes]:
    """A trace context (the current one by default) as Kafka message headers; empty when nothing is traced."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return {name: value.encode() for name, value in carrier.items()}


def context_from_headers(headers: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> Context:
    """The trace context a message's headers carry (an empty context when they carry none)."""
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    carrier = {}
    for name, value in items:
        if isinstance(value, bytes):
            value = value.decode("latin-1")  # traceparent and tracestate are ASCII
        if isinstance(name, str) and isinstance(value, str):
            carrier[name.lower()] = value
    return propagate.extract(carrier)


@contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Context | None = None,
) -> Iterator[Span]:
    """A span that is current within the block, child of ``context`` (else of the current span)."""
    with tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes) as current:
        yield current


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the current span (a no-op when nothing is traced)."""
    trace.get_current_span().set_attributes(attributes)


@contextmanager
def send_span(topic: str, messages: int = 1, context: Context | None = None) -> Iterator[Span]:
    """A producer span for sending ``messages`` to a topic; :func:`kafka_headers` inside it carries it along."""
    with tracer.start_as_current_span(
        f"send {topic}", context=context, kind=SpanKind.PRODUCER, attributes=_send_attributes(topic, messages)
    ) as current:
        yield current


def _send_attributes(topic: str, messages: int) -> dict[str, Any]:
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.destination.name": topic,
        "messaging.batch.message_count": messages,
    }


class BatchTrace:
    """Where the work on each document of a batch is traced: see :func:`batch_span`."""

    def __init__(self, batch: Span, documents: Mapping[str, Context]) -> None:
        self.span = batch
        self._documents = documents
        self._batch_context = trace.set_span_in_context(batch)

    def context_of(self, document_id: str) -> Context:
        """The parent of spans about one document: its trace's span of this batch."""
        return self._documents.get(document_id, self._batch_context)

    @contextmanager
    def sending(self, topic: str, messages_per_document: Mapping[str, int]) -> Iterator[dict[str, dict[str, bytes]]]:
        """A producer span per document for sending its messages of this batch, each in that
        document's trace; yields every document's headers, which carry its span along."""
        sends = {
            document_id: tracer.start_span(
                f"send {topic}",
                context=self.context_of(document_id),
                kind=SpanKind.PRODUCER,
                attributes=_send_attributes(topic, messages),
            )
            for document_id, messages in messages_per_document.items()
        }
        with _ended(sends.values()):
            yield {document_id: kafka_headers(trace.set_span_in_context(send)) for document_id, send in sends.items()}


@contextmanager
def batch_span(
    name: str,
    messages: Sequence,
    headers: Sequence[Mapping | None] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[BatchTrace]:
    """The span of one agent batch, continuing the traces of its messages (each names its ``document_id``).

    - Every message of one trace (one document, the usual case): the batch span is a child of
      the span that sent them, so the document's trace runs on through this agent, with the
      shared work (the embedding request, the index write) inside it.
    - Messages of several traces (several documents in one batch): the batch span starts a
      trace of its own, linking every message's trace, and holds the shared work; each
      document's trace gets a span of the same name, its child, linking the batch span, so
      that trace goes on: the spans about that document and the messages it causes hang there.

    ``headers`` are the messages' headers, in order; None for messages read without them.
    """
    parents: dict[int, Context] = {}  # trace id → the context of its first message
    trace_of: dict[str, int] = {}  # document id → its trace id
    for message, message_headers in zip(messages, headers or [None] * len(messages)):
        context = context_from_headers(message_headers)
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            parents.setdefault(span_context.trace_id, context)
            trace_of.setdefault(message.document_id, span_context.trace_id)
    attributes = {"messaging.batch.message_count": len(messages), "docflow.traces": len(parents), **(attributes or {})}
    kind = SpanKind.CONSUMER
    if len(parents) <= 1:
        parent = next(iter(parents.values()), None)
        with tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as batch:
            yield BatchTrace(batch, {})
        return
    links = [Link(trace.get_current_span(context).get_span_context()) for context in parents.values()]
    with tracer.start_as_current_span(name, kind=kind, links=links, attributes=attributes) as batch:
        shared = [Link(batch.get_span_context())]
        parts = {
            trace_id: tracer.start_span(
                name, context=context, kind=kind, links=shared, attributes={"docflow.batch.shared": True}
            )
            for trace_id, context in parents.items()
        }
        with _ended(parts.values()):
            yield BatchTrace(
                batch, {document: trace.set_span_in_context(parts[trace_id]) for document, trace_id in trace_of.items()}
            )


@contextmanager
def _ended(spans) -> Iterator[None]:
    """End ``spans`` (started without being made current) after the block, marked failed if it raised."""
    try:
        yield
    except BaseException as exc:
        for failed in spans:
            failed.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        for started in spans:
            started.end()
