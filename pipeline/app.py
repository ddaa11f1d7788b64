"""The Faust app factory: one app definition, instantiated per role.

A Faust worker runs every agent its app defines, all in one consumer group (the app id).
So each role gets its own app id (``docflow-web``, ``docflow-chunker``,
``docflow-embedder``): running more processes of one role shares that role's
partitions and nothing else (docs/architecture.md, "Roles").
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

import faust
from faust.sensors.prometheus import setup_prometheus_sensors

from pipeline import broker_security, records, topics, tracing
from pipeline.follow import keep_following
from pipeline.lifecycle import LifecycleView
from pipeline.metrics_port import MetricsPort
from pipeline.settings import Settings
from pipeline.storage import ObjectStorage, open_storage
from tables.company_index import CompanyIndex
from tables.document_status import DocumentStatus

log = logging.getLogger(__name__)

ROLES = ("web", "chunker", "embedder", "indexer")
STATUS_TABLE = "document_status"


class DeadLetteringTopic(faust.Topic):
    """A topic whose undecodable messages go to documents.dlq, and the agent reading it goes on.

    Faust acknowledges such a message and then throws the error into the agent's stream;
    a poisoned partition would stop there. docflow keeps the message for operators instead.
    """

    async def on_key_decode_error(self, exc: Exception, message) -> None:
        await self._dead_letter(exc, message)

    async def on_value_decode_error(self, exc: Exception, message) -> None:
        await self._dead_letter(exc, message)

    async def _dead_letter(self, exc: Exception, message) -> None:
        key = (message.key or b"").decode(errors="replace")
        value = (message.value or b"").decode(errors="replace")
        try:
            company_id = str(json.loads(value).get("company_id", ""))
        except (ValueError, AttributeError):
            company_id = ""
        log.error("undecodable message on %s[%s]@%s: %s", message.topic, message.partition, message.offset, exc)
        letter = records.DeadLetter(
            document_id=key,
            company_id=company_id,
            topic=message.topic,
            stage="decode",
            error=f"undecodable message: {exc}",
            attempts=1,
            failed_ms=records.now_ms(),
            original={"key": key, "value": value, "partition": message.partition, "offset": message.offset},
        )
        await (await self.app.dlq_topic.send(key=key, value=letter))


class DocflowApp(faust.App):
    """A Faust app that also holds what docflow's agents and views share: built by :func:`create_app`."""

    settings: Settings
    role: str
    storage: ObjectStorage
    raw_topic: faust.TopicT
    chunks_topic: faust.TopicT
    embeddings_topic: faust.TopicT
    status_topic: faust.TopicT
    dlq_topic: faust.TopicT
    lifecycle_topic: faust.TopicT
    lifecycle: LifecycleView
    status_table: Optional[faust.Table] = None
    company_index: Optional[CompanyIndex] = None
    gate: Optional[Any] = None  # web.auth.Gate on the web role

    async def send_status(
        self, document_id: str, company_id: str, stage: records.DocumentState, **details
    ) -> asyncio.Future:
        """Send a StatusEvent stamped now; returns its delivery future for the caller to await."""
        return await self.status_topic.send(
            key=document_id, value=records.status_event(document_id, company_id, stage, **details)
        )

    async def on_stop(self) -> None:
        await super().on_stop()
        await self.storage.close()
        await tracing.flush()  # what this worker traced reaches the collector before it exits


def create_app(settings: Settings, role: str) -> DocflowApp:
    """The app of one role, with that role's topics, agents, table and views: its one place of assembly."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    tracing.setup(settings, role)  # before the app: the web role's request spans go into its constructor
    workers_dir = settings.home / "workers"
    workers_dir.mkdir(parents=True, exist_ok=True)
    app = DocflowApp(
        f"docflow-{role}",
        broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=broker_security.faust_credentials(settings),  # TLS/SASL (docs/operations.md)
        store="rocksdb://",
        # One directory per process: RocksDB locks its files, and two web workers may share a host.
        datadir=str(workers_dir / f"{role}-{settings.web_port}"),
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        canonical_url=settings.web_canonical_url or f"http://{settings.web_host}:{settings.web_port}",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        # exactly_once has open duplicate/fencing bugs (faust#323, #517): at-least-once with idempotent consumers.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        # An upload waits for its event to be acknowledged: fail within seconds, not Faust's 20 minutes.
        producer_request_timeout=settings.produce_timeout_seconds,
        # Chunks and embeddings go out by the hundred: batches of Kafka's default 16 KB held three
        # embeddings each and a short linger was not waited for, so the broker saw a request per
        # few messages. An upload's answer waits for its event, so the web role does not linger.
        producer_linger=0.0 if role == "web" else settings.producer_linger_ms / 1000,
        producer_max_batch_size=settings.producer_batch_bytes,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.consumer_session_timeout_seconds,
        table_standby_replicas=settings.table_standby_replicas,
        web_cors_options=_cors_options(settings) if role == "web" else None,
        web_application_options={"middlewares": tracing.http_middlewares()} if role == "web" else None,
        web_in_thread=False,
        Topic=DeadLetteringTopic,
    )
    app.settings = settings
    app.role = role
    app.storage = open_storage(settings)

    def topic(spec: topics.TopicSpec, value_type) -> faust.TopicT:
        return app.topic(spec.name, key_type=str, value_type=value_type, compacting=spec.compacted or None)

    app.raw_topic = topic(topics.DOCUMENTS_RAW, records.DocumentUploaded)
    app.chunks_topic = topic(topics.CHUNKS_PROCESSED, records.Chunk)
    app.embeddings_topic = topic(topics.EMBEDDINGS_READY, records.ChunkEmbedding)
    app.status_topic = topic(topics.DOCUMENTS_STATUS, records.StatusEvent)
    app.dlq_topic = topic(topics.DOCUMENTS_DLQ, records.DeadLetter)
    app.lifecycle_topic = topic(topics.DOCUMENTS_LIFECYCLE, records.LifecycleCommand)
    app.lifecycle = LifecycleView()

    @app.task
    async def follow_lifecycle() -> None:
        await keep_following(topics.DOCUMENTS_LIFECYCLE.name, lambda: app.lifecycle.follow(settings))

    setup_prometheus_sensors(app, name_prefix=sensor_prefix(role))
    if settings.metrics_port:
        # Seed 000's per-service metrics port (chunker :8001, embedder :8002), besides the web port's /metrics.
        app.add_dependency(MetricsPort(settings.metrics_host, settings.metrics_port))

    from web import views

    views.register_common(app)
    if role == "web":
        from agents import status
        from web import api, auth, docs, lifecycle, live

        # Keys are the document id's raw bytes, as on documents.status: table_route hashes the
        # serialized key to find the owning worker, so it must be the bytes the events were
        # partitioned by (a str key would be serialized as a JSON string, quotes included).
        app.status_table = app.Table(
            STATUS_TABLE, key_type=bytes, value_type=DocumentStatus, partitions=settings.topic_partitions
        )
        app.company_index = CompanyIndex()
        app.gate = auth.register(app)
        status.register(app)
        api.register(app)
        live.register(app)  # GET /ws/documents: live events from the status changelog
        docs.register(app)  # GET /docs and /docs/openapi.json; seed 001's /ingest aliases
        lifecycle.register(app)
        if settings.index != "none":
            from web import search

            search.register(app)
    elif role == "chunker":
        from agents import chunker

        chunker.register(app)
    elif role == "embedder":
        from agents import embedder

        embedder.register(app)
    else:
        from agents import indexer

        indexer.register(app)
    return app


def sensor_prefix(role: str) -> str:
    """The prefix of Faust's own Prometheus metrics in a role's process (faust_chunker_messages_received_total)."""
    return f"faust_{role}"


def _cors_options(settings: Settings) -> dict:
    from web.auth import cors_options

    return cors_options(settings)


def active_roles(settings: Settings) -> tuple[str, ...]:
    """The roles a whole pipeline runs: without a vector index there is nothing to index."""
    return tuple(role for role in ROLES if role != "indexer" or settings.index != "none")
