"""The status state machine: redelivery and reordering never break counts or states."""

from __future__ import annotations

import itertools

from pipeline.records import StatusEvent
from tables.document_status import fold


def event(stage: str, at_ms: int, **details) -> StatusEvent:
    return StatusEvent(document_id="doc-1", company_id="acme", stage=stage, at_ms=at_ms, **details)


def fold_all(events):
    status = None
    for item in events:
        status = fold(status, item)
    return status


HAPPY_PATH = [
    event("uploaded", 1, filename="a.pdf"),
    event("extracting", 2),
    event("chunked", 3, chunks_total=3, pages=2),
    event("embedding", 4, chunk_indexes=[0, 1], chunks_total=3),
    event("embedding", 5, chunk_indexes=[2], chunks_total=3),
]


def test_document_completes_when_every_chunk_is_embedded():
    status = fold_all(HAPPY_PATH)
    assert status.state == "completed"
    assert (status.chunks_total, status.chunks_embedded, status.pages) == (3, 3, 2)
    assert status.filename == "a.pdf"
    assert (status.created_ms, status.updated_ms) == (1, 5)
    assert (status.uploaded_ms, status.extracting_ms, status.chunked_ms, status.embedding_ms) == (1, 2, 3, 4)
    assert status.completed_ms == 5


def test_redelivered_embedding_events_do_not_count_twice():
    status = fold_all(HAPPY_PATH[:4] + [HAPPY_PATH[3], HAPPY_PATH[3]])
    assert status.chunks_embedded == 2
    assert status.state == "embedding"


def test_any_order_of_events_ends_in_the_same_status():
    finals = {
        (s.state, s.chunks_embedded, s.chunks_total, s.pages, s.created_ms, s.updated_ms)
        for s in (fold_all(order) for order in itertools.permutations(HAPPY_PATH))
    }
    assert finals == {("completed", 3, 3, 2, 1, 5)}


def test_embedding_progress_before_chunked_waits_for_the_total():
    status = fold_all([event("embedding", 4, chunk_indexes=[0, 1])])
    assert status.state == "embedding"
    assert status.chunks_total is None
    status = fold(status, event("chunked", 3, chunks_total=2))
    assert status.state == "completed"


def test_failure_is_terminal_and_keeps_its_reason():
    status = fold_all(HAPPY_PATH[:2] + [event("failed", 3, error="PDF is encrypted"), *HAPPY_PATH[2:]])
    assert status.state == "failed"
    assert status.error == "PDF is encrypted"
    assert status.failed_ms == 3


def test_indexes_beyond_the_total_are_not_counted():
    status = fold_all([event("chunked", 1, chunks_total=2), event("embedding", 2, chunk_indexes=[0, 5])])
    assert status.chunks_embedded == 1
    assert status.state == "embedding"


def test_public_view_hides_the_bitmap():
    assert "embedded_bitmap" not in fold_all(HAPPY_PATH).public()


def test_redelivered_events_after_completion_change_nothing():
    completed = fold_all(HAPPY_PATH)
    status = completed
    for late in [
        event("extracting", 90),
        event("chunked", 91, chunks_total=3, pages=2),
        event("embedding", 92, chunk_indexes=[1], chunks_total=3),
    ]:
        status = fold(status, late)
    assert status == completed


INDEXED = [
    event("embedding", 6, chunks_total=3, chunks_indexed=2, indexed_indexes=[0, 1]),
    event("embedding", 7, chunks_total=3, chunks_indexed=1, indexed_indexes=[2]),
]


def fold_indexed(events):
    status = None
    for item in events:
        status = fold(status, item, require_indexed=True)
    return status


def test_with_an_index_a_document_completes_only_once_every_chunk_is_searchable():
    embedded = fold_indexed(HAPPY_PATH)
    assert (embedded.state, embedded.chunks_embedded, embedded.chunks_indexed) == ("embedding", 3, 0)
    assert fold_indexed(HAPPY_PATH + INDEXED[:1]).state == "embedding"
    status = fold_indexed(HAPPY_PATH + INDEXED)
    assert (status.state, status.chunks_indexed, status.completed_ms) == ("completed", 3, 7)


def test_indexing_events_in_any_order_and_twice_end_in_the_same_status():
    events = HAPPY_PATH[2:] + INDEXED + INDEXED[:1]
    finals = {
        (s.state, s.chunks_embedded, s.chunks_indexed, s.chunks_total)
        for s in (fold_indexed(order) for order in itertools.permutations(events))
    }
    assert finals == {("completed", 3, 3, 3)}


def test_public_view_hides_the_indexed_bitmap_too():
    public = fold_indexed(HAPPY_PATH + INDEXED).public()
    assert "indexed_bitmap" not in public and public["chunks_indexed"] == 3


# The lifecycle: commands' states among the data events, in every order and each twice.
CANCELLED = event("cancelled", 6, by="key:abc")
DELETED = event("deleted", 7, by="key:abc")
SUPERSEDED = event("superseded", 8, successor_id="doc-2")
DATA = [HAPPY_PATH[2], HAPPY_PATH[3], HAPPY_PATH[4]]


def every_order_twice(events):
    for order in itertools.permutations(events):
        yield list(order) + list(order)
        yield [item for item in order for _ in range(2)]


def test_a_cancel_wins_over_data_events_in_every_order_and_redelivery():
    for events in every_order_twice([*DATA, CANCELLED]):
        status = fold_all(events)
        assert status.state == "cancelled", [e.stage for e in events]
        assert status.stopped_by == "key:abc" and status.cancelled_ms == 6


def test_a_delete_wins_over_a_cancel_and_everything_else_in_every_order():
    for events in every_order_twice([*DATA, CANCELLED, DELETED]):
        status = fold_all(events)
        assert (status.state, status.deleted_ms) == ("deleted", 7), [e.stage for e in events]


def test_a_superseded_version_stays_superseded_whatever_arrives_late():
    for events in every_order_twice([*DATA, SUPERSEDED]):
        status = fold_all(events)
        assert (status.state, status.superseded_by) == ("superseded", "doc-2"), [e.stage for e in events]
    # ...and a delete still ends it.
    for events in every_order_twice([HAPPY_PATH[2], SUPERSEDED, DELETED]):
        assert fold_all(events).state == "deleted"


def test_a_replayed_failure_runs_again_and_completes():
    failed = fold_all([HAPPY_PATH[0], event("failed", 2, error="the original is not in storage")])
    assert failed.state == "failed"
    status = fold(failed, event("uploaded", 3, replayed=True))
    assert (status.state, status.error) == ("uploaded", None)
    for item in HAPPY_PATH[1:]:
        status = fold(status, item)
    assert status.state == "completed"
    # A replay never reopens a cancelled document.
    assert fold(fold_all([HAPPY_PATH[0], CANCELLED]), event("uploaded", 9, replayed=True)).state == "cancelled"
