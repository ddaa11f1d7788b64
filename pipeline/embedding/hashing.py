"""The ``hashing`` backend: deterministic feature hashing, no model (tests and smoke runs)."""

from __future__ import annotations

import hashlib
import math
import re

from pipeline.embedding.base import EmbeddingBackend, require_strings
from pipeline.settings import Settings

DEFAULT_HASHING_MODEL = "hashing-v1"

_WORD = re.compile(r"\w+")


class HashingBackend(EmbeddingBackend):
    """Deterministic feature hashing of lowercase words and word bigrams: no model, no I/O.

    Each feature is hashed with BLAKE2b, never Python's ``hash()``, which is salted per
    process: the same text gives the same vector in every process and on every machine.
    One hash bit picks the sign, so colliding features tend to cancel rather than pile up.
    A text without any word gets the uniform unit vector rather than a zero vector, so
    every vector has norm 1 and cosine similarity is defined for all of them.
    """

    name = "hashing"

    def __init__(self, dims: int = 384, model: str = DEFAULT_HASHING_MODEL) -> None:
        if dims < 1:
            raise ValueError("dims must be at least 1")
        self.model = model
        self._dims = dims

    @classmethod
    def from_settings(cls, settings: Settings) -> HashingBackend:
        return cls(model=settings.embedding_model or DEFAULT_HASHING_MODEL)

    @property
    def dims(self) -> int:
        return self._dims

    @property
    def vector_space(self) -> str:
        return f"{self.name}/{self.model}/{self._dims}"

    async def embed(self, texts: list[str]) -> list[list[float]]:
        require_strings(texts)
        # Cheap enough to run inline: a 32-chunk batch of 1000-character chunks costs a few ms.
        return [self.vector(text) for text in texts]

    def vector(self, text: str) -> list[float]:
        words = _WORD.findall(text.lower())
        # A space never occurs inside a \w+ token, so a bigram cannot collide with a word.
        features = words + [f"{first} {second}" for first, second in zip(words, words[1:])]
        vector = [0.0] * self._dims
        for feature in features:
            bits = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
            vector[(bits >> 1) % self._dims] += 1.0 if bits & 1 else -1.0
        norm = math.sqrt(sum(value * value for value in vector))
        if norm == 0.0:
            # No words at all, or every feature cancelled out: see the class docstring.
            return [1.0 / math.sqrt(self._dims)] * self._dims
        return [value / norm for value in vector]
