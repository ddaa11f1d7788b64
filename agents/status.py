"""The status agent (web role): folds documents.status into the RocksDB status table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tables.document_status import fold

if TYPE_CHECKING:
    from pipeline.app import DocflowApp


def register(app: DocflowApp) -> None:
    table = app.status_table
    # With a vector index, completed means searchable: every chunk indexed, not only embedded.
    require_indexed = app.settings.index != "none"

    # documents.status is keyed by document_id like the table, so each event lands on the
    # partition whose table shard this worker owns.
    @app.agent(app.status_topic, name="status")
    async def track_status(events):
        async for event in events:
            key = event.document_id.encode()
            table[key] = fold(table.get(key), event, require_indexed)
