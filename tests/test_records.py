"""Records on the wire: plain JSON, no Faust metadata, matching the published schemas."""

from __future__ import annotations

import json

from jsonschema import Draft202012Validator

from pipeline.records import CompanyWindowCount, StatusEvent
from pipeline.settings import REPO_ROOT

SCHEMAS = REPO_ROOT / "pipeline" / "schemas"


def test_status_event_serializes_as_plain_json_without_faust_metadata():
    event = StatusEvent(document_id="d1", company_id="acme", stage="chunked", at_ms=1, chunks_total=4, pages=2)
    wire = json.loads(event.dumps())
    assert "__faust" not in wire
    assert wire["chunks_total"] == 4 and wire["stage"] == "chunked"
    assert StatusEvent.loads(event.dumps(), serializer="json") == event


def test_company_window_count_matches_the_analytics_schema():
    count = CompanyWindowCount(
        company_id="acme", window_start_ms=60_000, window_end_ms=120_000, count=7, timestamp="1970-01-01T00:01:00.000Z"
    )
    schema = json.loads((SCHEMAS / "analytics.flink.json").read_text())
    assert not list(Draft202012Validator(schema).iter_errors(json.loads(count.dumps())))


def test_unknown_stage_is_refused_by_the_status_schema():
    schema = json.loads((SCHEMAS / "documents.status.json").read_text())
    event = json.loads(StatusEvent(document_id="d", company_id="c", stage="teleported", at_ms=1).dumps())
    assert list(Draft202012Validator(schema).iter_errors(event))
