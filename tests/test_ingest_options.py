"""Chunking options of an upload: sizes in the model's tokens by default, characters on request."""

from __future__ import annotations

import pytest

from pipeline.errors import RequestError
from pipeline.settings import Settings
from web.ingest import options_from


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path)


def test_sizes_default_to_the_settings_in_the_models_tokens(settings):
    options = options_from({}, settings)
    assert (options.chunk_size_unit, options.chunk_size, options.chunk_overlap) == ("tokens", 250, 30)


def test_a_request_in_characters_gets_the_character_defaults(settings):
    options = options_from({"chunk_size_unit": "chars"}, settings)
    assert (options.chunk_size_unit, options.chunk_size, options.chunk_overlap) == ("chars", 1000, 200)
    assert options_from({"chunk_size_unit": "chars", "chunk_size": "400"}, settings).chunk_size == 400


@pytest.mark.parametrize(
    "fields",
    [
        {"chunk_size_unit": "lines"},
        {"chunk_size": "8193"},
        {"chunk_size": "15"},
        {"chunk_size_unit": "chars", "chunk_size": "49"},
        {"chunk_size": "64", "chunk_overlap": "64"},
        {"tags": ["x" * 101]},
    ],
)
def test_sizes_out_of_their_units_range_are_refused(settings, fields):
    with pytest.raises(RequestError) as refused:
        options_from(fields, settings)
    assert (refused.value.status, refused.value.code) == (422, "invalid_parameter")
