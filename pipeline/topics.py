"""The docflow topics (docs/architecture.md, "Topics and records"), declared once, and their creation on a broker."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from pipeline.broker_security import client_options
from pipeline.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    description: str
    # Compacted topics keep the newest value of every key for ever: state, not a stream.
    compacted: bool = False


DOCUMENTS_RAW = TopicSpec("documents.raw", "document_id", "DocumentUploaded: an original stored and ready to chunk")
CHUNKS_PROCESSED = TopicSpec("chunks.processed", "document_id", "Chunk: one piece of a document's text")
EMBEDDINGS_READY = TopicSpec("embeddings.ready", "document_id", "ChunkEmbedding: a chunk's vector")
DOCUMENTS_STATUS = TopicSpec("documents.status", "document_id", "StatusEvent: a document's progress")
ANALYTICS_FLINK = TopicSpec("analytics.flink", "company_id", "CompanyWindowCount: chunks per company and minute")
DOCUMENTS_DLQ = TopicSpec("documents.dlq", "document_id", "A message a stage gave up on, with error and attempts")
DOCUMENTS_LIFECYCLE = TopicSpec(
    "documents.lifecycle", "document_id", "LifecycleCommand: cancel, delete or supersede a document", compacted=True
)
AUTH_KEYS = TopicSpec("auth.keys", "key_id", "ApiKey: a company's hashed API key, or its revocation", compacted=True)

TOPICS: tuple[TopicSpec, ...] = (
    DOCUMENTS_RAW,
    CHUNKS_PROCESSED,
    EMBEDDINGS_READY,
    DOCUMENTS_STATUS,
    ANALYTICS_FLINK,
    DOCUMENTS_DLQ,
    DOCUMENTS_LIFECYCLE,
)
# Not a document topic: the archive and the analytics never read it.
CONTROL_TOPICS: tuple[TopicSpec, ...] = (AUTH_KEYS,)


async def create_topics(settings: Settings) -> list[str]:
    """Create every docflow topic that is missing; returns the names created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, client_id="docflow-admin", **client_options(settings)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                spec.name,
                settings.topic_partitions,
                settings.topic_replication_factor,
                topic_configs={"cleanup.policy": "compact"} if spec.compacted else None,
            )
            for spec in TOPICS + CONTROL_TOPICS
            if spec.name not in existing
        ]
        if not missing:
            return []
        response = await admin.create_topics(missing)
        created = []
        for name, code, *message in response.topic_errors:
            if code == 0:
                created.append(name)
            elif for_code(code) is not TopicAlreadyExistsError:  # already there: another process created it
                raise for_code(code)(f"cannot create topic {name}: {message[-1] if message else code}")
        return created
    finally:
        await admin.close()
