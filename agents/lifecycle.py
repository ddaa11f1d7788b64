"""What every working role does with the lifecycle: skip the work of ended documents, and undo
what stays of them (the chunker removes a deleted document's original, the indexer every
ended document's vectors). pipeline/lifecycle.py says how commands reach every worker.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, wait_exponential

from pipeline import metrics
from pipeline.errors import StorageError, VectorIndexError

if TYPE_CHECKING:
    from pipeline.app import DocflowApp
    from pipeline.index import VectorIndex

log = logging.getLogger(__name__)


async def live_messages(app: DocflowApp, batch: list, stage: str) -> list:
    """The messages of a batch whose documents have not ended; the others are skipped, and said so."""
    await app.lifecycle.caught_up.wait()  # every command so far is known before any work
    skipped: Counter[str] = Counter()
    live = []
    for message in batch:
        if app.lifecycle.stopped(message.document_id) is None:
            live.append(message)
        else:
            skipped[message.document_id] += 1
    for document_id, count in skipped.items():
        command = app.lifecycle.stopped(document_id)
        log.info("%s skipped %d messages of document %s: %s", stage, count, document_id, command.command)
        metrics.lifecycle_skipped_messages_total.labels(stage).inc(count)
    return live


def _retrying(error: type[Exception]) -> AsyncRetrying:
    # Storage or the index being down is no reason to forget a command: wait for them.
    return AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, error) and not getattr(exc, "permanent", False)),
        wait=wait_exponential(multiplier=0.5, max=30),
        before_sleep=before_sleep_log(log, logging.WARNING),
    )


def register_original_removal(app: DocflowApp) -> None:
    """The chunker's part: a deleted document's original leaves storage."""

    @app.agent(app.lifecycle_topic, name="chunker-lifecycle")
    async def remove_originals(commands):
        async for command in commands:
            if command.command == "delete":
                await _retrying(StorageError)(remove_original, app, command.company_id, command.document_id)


async def remove_original(app: DocflowApp, company_id: str, document_id: str) -> None:
    prefix = f"{company_id}/{document_id}/"
    keys = [entry.key async for entry in app.storage.listing(prefix)]
    for key in keys:
        await app.storage.delete(key)
    log.info("removed the original of deleted document %s (%d objects)", document_id, len(keys))


def register_vector_removal(app: DocflowApp, index: VectorIndex) -> None:
    """The indexer's part: an ended document's chunks leave the index."""

    @app.agent(app.lifecycle_topic, name="indexer-lifecycle")
    async def remove_vectors(commands):
        async for command in commands:
            app.lifecycle.apply(command)  # before the next batch of embeddings, whatever the follower's lag
            try:
                await _retrying(VectorIndexError)(index.delete_documents, command.company_id, [command.document_id])
            except VectorIndexError as exc:  # refused, not unavailable: say so, and go on
                log.error("the index refused removing document %s: %s", command.document_id, exc)
                continue
            log.info("removed the chunks of %s document %s from the index", command.command, command.document_id)
