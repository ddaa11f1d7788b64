"""What every role knows of the lifecycle: which documents are cancelled, deleted or superseded.

Each worker of every role follows the whole of documents.lifecycle (a compacted topic: one
command per document) from its beginning into a :class:`LifecycleView`, and its agents
wait until it has caught up before they take their first message. So a command is known
before the document's remaining messages are worked on, in whatever order they arrive,
also after a restart. A command produced while a batch is already being worked on is
seen by the next batch (a batch is the unit that may still finish), and the indexer
checks again after each write (docs/architecture.md, "Lifecycle").
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pipeline.follow import follow_topic
from pipeline.records import COMMAND_STATES, STOP_RANK, LifecycleCommand, LifecycleCommandKind, now_ms
from pipeline.settings import Settings
from pipeline.topics import DOCUMENTS_LIFECYCLE

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)


def strength(command: LifecycleCommand) -> int:
    return STOP_RANK[COMMAND_STATES[command.command]]


class LifecycleView:
    """The strongest command of each document (delete over cancel over supersede), whatever their order."""

    def __init__(self) -> None:
        self._commands: dict[str, LifecycleCommand] = {}
        self.caught_up = asyncio.Event()

    def apply(self, command: LifecycleCommand) -> None:
        known = self._commands.get(command.document_id)
        if known is None or strength(command) > strength(known):
            self._commands[command.document_id] = command

    def stopped(self, document_id: str) -> LifecycleCommand | None:
        """The command that ended a document (no more work on it, nothing of it searchable), or None."""
        return self._commands.get(document_id)

    def __len__(self) -> int:
        return len(self._commands)

    async def follow(self, settings: Settings) -> None:
        await follow_topic(
            settings,
            DOCUMENTS_LIFECYCLE.name,
            lambda message: self.apply(LifecycleCommand.loads(message.value, serializer="json")),
            self.caught_up,
        )


async def end_document(
    app: DocflowApp, company_id: str, document_id: str, command: LifecycleCommandKind, by: str, successor_id: str = ""
) -> None:
    """Send a lifecycle command and the state it causes; returns once the broker has both."""
    at_ms = now_ms()
    lifecycle = LifecycleCommand(
        document_id=document_id, company_id=company_id, command=command, at_ms=at_ms, by=by, successor_id=successor_id
    )
    app.lifecycle.apply(lifecycle)  # this worker's searches leave it out at once
    sent = [
        await app.lifecycle_topic.send(key=document_id, value=lifecycle),
        await app.send_status(
            document_id, company_id, COMMAND_STATES[command], by=by, successor_id=successor_id or None
        ),
    ]
    await asyncio.gather(*sent)
