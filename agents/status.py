"""The status agent (web role): folds documents.status into the RocksDB status table."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pipeline import metrics
from pipeline.lifecycle import end_document
from tables.document_status import fold

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)


def register(app: DocflowApp) -> None:
    table = app.status_table
    index = app.company_index
    # With a vector index, completed means searchable: every chunk indexed, not only embedded.
    require_indexed = app.settings.index != "none"

    # documents.status is keyed by document_id like the table, so each event lands on the
    # partition whose table shard this worker owns.
    @app.agent(app.status_topic, name="status")
    async def track_status(events):
        async for event in events:
            key = event.document_id.encode()
            current = table.get(key)
            if current is not None and current.company_id != event.company_id:
                # A forged or misrouted event: a document never changes company.
                log.warning(
                    "ignoring a status of document %s naming company %r; it belongs to %r",
                    event.document_id, event.company_id, current.company_id,
                )  # fmt: skip
                continue
            status = fold(current, event, require_indexed)
            if status.replaces and status.state == "completed" and (current is None or current.state != "completed"):
                # Before the table write: a crash in between folds the event again, and sends again.
                await end_document(
                    app, status.company_id, status.replaces, "supersede", by="docflow", successor_id=status.document_id
                )
            table[key] = status
            if current is None or current.state != status.state:
                # After the write: a redelivered event finds the state already in the table and counts nothing.
                metrics.documents_state_transitions_total.labels(status.state).inc()
            index.add(status.company_id, status.document_id, status.created_ms, status.document_key)

    @table.on_recover
    async def rebuild_company_index() -> None:
        # A rebalance changed which partitions this worker holds: read them again, off the loop.
        index.start_rebuild()
        rows = await asyncio.to_thread(
            lambda: [
                (status.company_id, status.document_id, status.created_ms, status.document_key)
                for status in table.values()
            ]
        )
        index.finish_rebuild(rows)
