"""Embedding backends, chosen by ``DOCFLOW_EMBEDDING_BACKEND``.

One backend per module behind a small registry, as ``faust/stores/__init__.py`` does: a
name maps to ``module:Class``, imported only when chosen, so a worker on the ``hashing``
backend never imports a model runtime. Every backend class builds itself from settings
(``from_settings``). ``cache`` puts any backend behind a RocksDB cache of its vectors.
"""

from __future__ import annotations

import importlib

from pipeline.embedding.base import EmbeddingBackend
from pipeline.errors import EmbeddingError
from pipeline.settings import Settings

__all__ = ["BACKENDS", "EmbeddingBackend", "EmbeddingError", "backend_class", "create_backend"]

BACKENDS = {
    "hashing": "pipeline.embedding.hashing:HashingBackend",
    "local": "pipeline.embedding.local:LocalBackend",
    "openai": "pipeline.embedding.openai:OpenAIBackend",
}


def backend_class(name: str) -> type[EmbeddingBackend]:
    target = BACKENDS.get(name)
    if target is None:
        raise EmbeddingError(f"unknown embedding backend {name!r}", permanent=True)
    module, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module), class_name)


def create_backend(settings: Settings) -> EmbeddingBackend:
    """The backend ``settings.embedding_backend`` names, with ``settings.embedding_model`` when set."""
    return backend_class(settings.embedding_backend).from_settings(settings)
