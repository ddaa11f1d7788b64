"""What every embedding backend is: texts in, one vector of ``dims`` floats per text out.

The embedder runs inside Faust's event loop, next to aiokafka's heartbeat task, so a
backend never computes on that loop: the local model runs in a worker thread, the
OpenAI-compatible backend is network I/O only.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from pipeline.errors import EmbeddingError

if TYPE_CHECKING:
    from pipeline.settings import Settings


class EmbeddingBackend(abc.ABC):
    """Turns texts into vectors: one vector of ``dims`` floats per text, in the order given."""

    name: ClassVar[str]
    model: str

    @property
    @abc.abstractmethod
    def dims(self) -> int: ...

    @abc.abstractmethod
    async def embed(self, texts: list[str]) -> list[list[float]]: ...

    @property
    def vector_space(self) -> str:
        """Backends with the same vector space give the same vector for the same text (a cache key)."""
        return f"{self.name}/{self.model}"

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingBackend:
        """The backend as ``settings`` configure it (``embedding_model`` when set, else its default).

        Every backend in the registry (``pipeline.embedding.BACKENDS``) implements it.
        """
        raise NotImplementedError(f"{cls.__name__} cannot be created from settings")

    async def load(self) -> None:
        """Get ready before the first batch (a no-op where there is nothing to load)."""

    async def close(self) -> None:
        """Release what the backend holds; it embeds nothing afterwards."""


def require_strings(texts: list[str]) -> None:
    if not all(isinstance(text, str) for text in texts):
        raise EmbeddingError("texts to embed must all be str", permanent=True)
