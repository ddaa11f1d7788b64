"""Giving up on a message: a failed status for its document and the message on documents.dlq."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pipeline.records import DeadLetter, now_ms

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)


async def give_up(
    app: DocflowApp,
    *,
    document_id: str,
    company_id: str,
    topic: str,
    stage: str,
    error: str,
    original: dict,
    attempts: int = 1,
) -> list:
    """Send the failure on its way; returns the delivery futures for the caller to await."""
    log.warning("%s gave up on document %s: %s", stage, document_id, error)
    dead = DeadLetter(
        document_id=document_id,
        company_id=company_id,
        topic=topic,
        stage=stage,
        error=error,
        attempts=attempts,
        failed_ms=now_ms(),
        original=original,
    )
    return [
        await app.dlq_topic.send(key=document_id, value=dead),
        await app.send_status(document_id, company_id, "failed", error=error),
    ]


async def give_up_on_batch(
    app: DocflowApp, batch: list, *, topic: str, stage: str, error: str, attempts: int = 1
) -> None:
    """Give up on every message of a batch (each names its document) and wait until that is on the broker."""
    deliveries = []
    for message in batch:
        deliveries += await give_up(
            app,
            document_id=message.document_id,
            company_id=message.company_id,
            topic=topic,
            stage=stage,
            error=error,
            original=message.asdict(),
            attempts=attempts,
        )
    await asyncio.gather(*deliveries)
