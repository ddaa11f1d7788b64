"""A persistent cache of embeddings in RocksDB, and a backend wrapper that consults it first.

Redelivered chunks (at-least-once) and re-uploaded documents carry texts
that were embedded before; :class:`CachedBackend` answers those from the cache, so a paid
or slow backend embeds each distinct text once per vector space.

RocksDB calls run inline on the event loop, not in a thread. Measured on a 2-core
machine, a batch of 32 vectors of 384 dims costs about 0.2 ms to read and 0.3 ms to write
(mostly hashing keys and converting floats; writes go to the memtable and the unsynced
write-ahead log, flushes and compactions run on RocksDB's own threads): far below what
would starve aiokafka's heartbeat, and not much more than a hop to a thread. RocksDB
locks its folder, so every process needs its own path (:func:`cache_path`).
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from pipeline import metrics
from pipeline.embedding import create_backend
from pipeline.embedding.base import EmbeddingBackend, require_strings
from pipeline.settings import Settings


def cache_path(home: Path, worker: str) -> Path:
    """The cache folder of one worker process, e.g. ``cache_path(settings.home, f"embedder-{port}")``."""
    return home / "embedding-cache" / worker


class EmbeddingCache:
    """Vectors in RocksDB under sha256 of (vector space, text).

    Values are the vector's float64s in native byte order (``array('d')``): a vector comes
    back exactly equal to the one stored, at 8 bytes per dimension (3 KB for 384 dims).
    ``model`` in this API is whatever names the vector space; :class:`CachedBackend` passes
    :attr:`EmbeddingBackend.vector_space`, which tells apart models, dimensions and servers.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # raw_mode stores the bytes as given, with no pickling or type tags.
        self._db: Rdict | None = Rdict(str(self.path), options=Options(raw_mode=True))

    @staticmethod
    def key(model: str, text: str) -> bytes:
        encoded_model = model.encode()
        # The length prefix keeps ("ab", "c") and ("a", "bc") apart.
        return hashlib.sha256(len(encoded_model).to_bytes(4, "big") + encoded_model + text.encode()).digest()

    def get_many(self, model: str, texts: list[str]) -> list[list[float] | None]:
        """The cached vector of each text, None where there is none."""
        if not texts:
            return []
        values = self._open().get([self.key(model, text) for text in texts])
        return [None if value is None else array("d", value).tolist() for value in values]

    def put_many(self, model: str, texts: list[str], vectors: list[list[float]]) -> None:
        if len(texts) != len(vectors):
            raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
        batch = WriteBatch(raw_mode=True)
        for text, vector in zip(texts, vectors):
            batch.put(self.key(model, text), array("d", vector).tobytes())
        self._open().write(batch)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _open(self) -> Rdict:
        if self._db is None:
            raise RuntimeError(f"the embedding cache at {self.path} is closed")
        return self._db


class CachedBackend(EmbeddingBackend):
    """``backend`` behind an :class:`EmbeddingCache`: only texts the cache lacks reach it, once each.

    Every text of a batch counts once, as a hit or a miss; a text repeated within a batch
    counts as a miss each time but is embedded once.
    """

    def __init__(self, backend: EmbeddingBackend, cache: EmbeddingCache) -> None:
        self.backend = backend
        self.cache = cache

    @classmethod
    def from_settings(cls, settings: Settings) -> CachedBackend:
        """The configured backend behind this process's own cache folder (RocksDB locks it)."""
        cache = EmbeddingCache(cache_path(settings.home, f"embedder-{settings.web_port}"))
        return cls(create_backend(settings), cache)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.backend.name

    @property
    def model(self) -> str:  # type: ignore[override]
        return self.backend.model

    @property
    def dims(self) -> int:
        return self.backend.dims

    @property
    def vector_space(self) -> str:
        return self.backend.vector_space

    async def load(self) -> None:
        await self.backend.load()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        require_strings(texts)
        space = self.backend.vector_space
        vectors = self.cache.get_many(space, texts)
        # dict keeps first-seen order and drops repeats: each missing text is embedded once.
        missing = list(dict.fromkeys(text for text, vector in zip(texts, vectors) if vector is None))
        hits = len(texts) - sum(vector is None for vector in vectors)
        metrics.embedding_cache_hits_total.labels(model_name=self.model).inc(hits)
        metrics.embedding_cache_misses_total.labels(model_name=self.model).inc(len(texts) - hits)
        if missing:
            new_vectors = await self.backend.embed(missing)
            self.cache.put_many(space, missing, new_vectors)
            embedded = dict(zip(missing, new_vectors))
            vectors = [embedded[text] if vector is None else vector for text, vector in zip(texts, vectors)]
        return vectors  # type: ignore[return-value]  # every None was filled above

    async def close(self) -> None:
        try:
            await self.backend.close()
        finally:
            self.cache.close()
