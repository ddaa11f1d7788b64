"""The vector index where chunks become searchable, chosen by ``DOCFLOW_INDEX``.

One implementation per module behind a small registry, as ``pipeline/storage`` does;
``none`` means the pipeline ends at embeddings.ready and nothing is searchable.
"""

from __future__ import annotations

import importlib

from pipeline.index.base import SearchHit, VectorIndex
from pipeline.settings import Settings

__all__ = ["INDEXES", "SearchHit", "VectorIndex", "open_index"]

INDEXES = {"milvus": "pipeline.index.milvus:MilvusIndex"}


def open_index(settings: Settings) -> VectorIndex | None:
    """The configured index, or None with ``DOCFLOW_INDEX=none``."""
    target = INDEXES.get(settings.index)
    if target is None:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name).from_settings(settings)
