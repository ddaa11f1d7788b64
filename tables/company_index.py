"""Which documents of the status table belong to which company, newest first, in memory.

The status table is keyed by document id, so a company's list would otherwise scan every
company's rows on every request. This index is kept by the status agent as it folds
events, and rebuilt off the event loop from the table whenever a rebalance has recovered
it (standbys and recovered partitions never pass through the agent).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

# A page position: (-created_ms, document_id), so ascending order is newest first.
SortKey = tuple[int, str]


def parse_cursor(cursor: str) -> SortKey:
    """A cursor ``CREATED_MS:DOCUMENT_ID`` as a sort key; ValueError when malformed."""
    created, _, document_id = cursor.partition(":")
    if not document_id:
        raise ValueError(cursor)
    return (-int(created), document_id)


def cursor_of(created_ms: int, document_id: str) -> str:
    return f"{created_ms}:{document_id}"


# (company_id, document_id, created_ms, document_key or None)
Row = tuple[str, str, int, "str | None"]


class CompanyIndex:
    def __init__(self) -> None:
        self._companies: dict[str, dict[str, int]] = {}
        self._keys: dict[tuple[str, str], set[str]] = {}  # (company, document_key) → its versions' ids
        self._rebuilding = False
        self._during_rebuild: list[Row] = []

    def add(self, company_id: str, document_id: str, created_ms: int, document_key: str | None = None) -> None:
        self._add(self._companies, self._keys, (company_id, document_id, created_ms, document_key))
        if self._rebuilding:
            self._during_rebuild.append((company_id, document_id, created_ms, document_key))

    @staticmethod
    def _add(companies: dict, keys: dict, row: Row) -> None:
        company_id, document_id, created_ms, document_key = row
        companies.setdefault(company_id, {})[document_id] = created_ms
        if document_key:
            keys.setdefault((company_id, document_key), set()).add(document_id)

    def start_rebuild(self) -> None:
        self._rebuilding, self._during_rebuild = True, []

    def finish_rebuild(self, rows: Iterable[Row]) -> None:
        """Replace the index with ``rows`` (read while it was rebuilding) plus what was added meanwhile."""
        companies: dict[str, dict[str, int]] = {}
        keys: dict[tuple[str, str], set[str]] = {}
        for row in [*rows, *self._during_rebuild]:
            self._add(companies, keys, row)
        self._companies, self._keys, self._rebuilding, self._during_rebuild = companies, keys, False, []

    def versions(self, company_id: str, document_key: str) -> set[str]:
        """The ids of the company's documents uploaded with this key (on this worker's partitions)."""
        return set(self._keys.get((company_id, document_key), ()))

    def documents(self, company_id: str) -> list[str]:
        return list(self._companies.get(company_id, {}))

    def page(self, company_id: str, limit: int, after: SortKey | None = None) -> list[SortKey]:
        """Up to ``limit`` of the company's documents after ``after``, newest first."""
        documents = self._companies.get(company_id, {})
        keys = ((-created_ms, document_id) for document_id, created_ms in documents.items())
        if after is not None:
            keys = (key for key in keys if key > after)
        return heapq.nsmallest(limit, keys)

    def __len__(self) -> int:
        return sum(len(documents) for documents in self._companies.values())
