"""Embedding backends: stable hashing vectors, the real model on ONNX Runtime, and an event loop that keeps running."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from pipeline.embedding import create_backend, local
from pipeline.embedding.hashing import HashingBackend
from pipeline.embedding.local import LocalBackend
from pipeline.errors import EmbeddingError
from pipeline.settings import REPO_ROOT, Settings

TEXT = "Kafka partitions are replicated across brokers, and consumers in one group share them."


def dot(left: list[float], right: list[float]) -> float:
    return sum(a * b for a, b in zip(left, right, strict=True))


def norm(vector: list[float]) -> float:
    return math.sqrt(dot(vector, vector))


@pytest.fixture(scope="module")
async def local_backend():
    """The real all-MiniLM-L6-v2, loaded once for this module."""
    backend = LocalBackend()
    await backend.load()
    yield backend
    await backend.close()


async def test_hashing_vectors_are_deterministic_and_normalised():
    backend = HashingBackend()
    first, again, other, empty = await backend.embed([TEXT, TEXT, "Something else entirely.", ""])

    assert len(first) == backend.dims == 384
    assert first == again
    assert first != other
    assert norm(first) == pytest.approx(1.0)
    assert norm(other) == pytest.approx(1.0)
    # A text without words gets the documented uniform unit vector, not zeros.
    assert empty == [1 / math.sqrt(384)] * 384

    # PYTHONHASHSEED=random stops an environment that pins the seed from hiding a use of hash().
    script = (
        "import asyncio, json, sys\n"
        "from pipeline.embedding.hashing import HashingBackend\n"
        "print(json.dumps(asyncio.run(HashingBackend().embed([sys.argv[1]]))[0]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, TEXT],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONHASHSEED": "random"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == first


async def test_hashing_similar_texts_are_closer_than_unrelated():
    backend = HashingBackend(dims=256)
    text, similar, unrelated = await backend.embed(
        [
            "The invoice for March was paid late by the customer.",
            "The customer paid the March invoice late.",
            "Photosynthesis turns sunlight into chemical energy in leaves.",
        ]
    )
    assert len(text) == 256
    assert dot(text, similar) > 0.4
    assert dot(text, similar) > dot(text, unrelated) + 0.3

    # Word bigrams make word order count: the same words in another order are close, not equal.
    dog_bites_man, man_bites_dog = await backend.embed(["dog bites man", "man bites dog"])
    assert 0.3 < dot(dog_bites_man, man_bites_dog) < 0.9


async def test_local_model_returns_384_dim_normalised_vectors(local_backend):
    texts = [TEXT, "A second, unrelated sentence about gardening.", "Ein deutscher Satz."]
    batch = await local_backend.embed(texts)

    assert local_backend.dims == 384
    assert len(batch) == len(texts)
    for vector in batch:
        assert len(vector) == 384
        assert all(type(value) is float for value in vector)
        assert norm(vector) == pytest.approx(1.0, abs=1e-5)
    # One vector per text, in the order given: each matches the text embedded alone.
    for text, vector in zip(texts, batch):
        (alone,) = await local_backend.embed([text])
        assert dot(alone, vector) == pytest.approx(1.0, abs=1e-4)
    assert await local_backend.embed([]) == []


async def test_local_model_ranks_paraphrase_above_unrelated_text(local_backend):
    query, paraphrase, unrelated = await local_backend.embed(
        [
            "How do I reset my account password?",
            "What are the steps to change the password I log in with?",
            "The recipe needs two cups of flour and a pinch of salt.",
        ]
    )
    assert dot(query, paraphrase) > 0.6
    assert dot(query, paraphrase) > dot(query, unrelated) + 0.4


@pytest.fixture(scope="module")
async def int8_backend(tmp_path_factory):
    """The bundled model with int8 matrix products, built into a fresh cache for this module."""
    backend = LocalBackend(precision="int8", cache_dir=tmp_path_factory.mktemp("models"))
    await backend.load()
    yield backend
    await backend.close()


def reference_cosines(vectors: list[list[float]], items: list[dict]) -> list[float]:
    return [dot(vector, item["vector"]) / norm(item["vector"]) for vector, item in zip(vectors, items, strict=True)]


REFERENCE = json.loads((REPO_ROOT / "tests" / "fixtures" / "minilm_reference.json").read_text())["items"]


async def test_local_model_agrees_with_the_sentence_transformers_reference(local_backend):
    # Texts and vectors computed once with sentence-transformers (PyTorch, fp32 weights): the
    # ONNX backend must land on the same points, or the index would mix two vector spaces.
    cosines = reference_cosines(await local_backend.embed([item["text"] for item in REFERENCE]), REFERENCE)
    assert len(cosines) == 24
    assert min(cosines) >= 0.99
    assert sum(cosines) / len(cosines) >= 0.999


async def test_int8_local_model_stays_within_0_99_cosine_of_the_reference(int8_backend):
    cosines = reference_cosines(await int8_backend.embed([item["text"] for item in REFERENCE]), REFERENCE)
    assert min(cosines) >= 0.99
    assert sum(cosines) / len(cosines) >= 0.995
    assert int8_backend.vector_space != LocalBackend().vector_space  # cached fp32 vectors are not reused


async def test_int8_vector_of_a_text_does_not_depend_on_the_texts_embedded_with_it(int8_backend):
    texts = [item["text"] for item in REFERENCE[:8]]
    together = await int8_backend.embed(texts)
    for text, vector in zip(texts, together, strict=True):
        (alone,) = await int8_backend.embed([text])
        assert dot(alone, vector) == pytest.approx(1.0, abs=1e-5)


def test_int8_model_is_built_once_per_cache(tmp_path):
    from pipeline.embedding.quantize import int8_model_path

    built = int8_model_path(local.bundled_model_path(), tmp_path)
    stamp = built.stat().st_mtime_ns
    assert int8_model_path(local.bundled_model_path(), tmp_path) == built
    assert built.stat().st_mtime_ns == stamp
    assert [path.name for path in tmp_path.iterdir()] == [built.name]  # no work files left behind


def test_session_runs_hold_at_most_the_token_budget_and_every_text_once():
    lengths = [8] * 100 + [200] * 9 + [256]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    runs = list(local.MiniLM._session_batches(SimpleNamespace(batch_size=32), order, lengths))
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    assert all(len(run) <= 32 and len(run) * max(lengths[i] for i in run) <= local.MAX_RUN_TOKENS for run in runs)
    assert len(runs[0]) == 32  # short texts, queries among them, still share a run


async def test_local_model_counts_every_text_it_had_to_cut(local_backend):
    from prometheus_client import REGISTRY

    def truncated() -> float:
        return REGISTRY.get_sample_value("embedding_truncated_texts_total", {"model_name": "all-MiniLM-L6-v2"}) or 0.0

    before = truncated()
    await local_backend.embed([TEXT, " ".join([TEXT] * 30), " ".join([TEXT] * 40)])
    assert truncated() - before == 2


async def test_local_model_is_loaded_once_per_process(local_backend, monkeypatch):
    real_constructor = local.MiniLM
    constructed: list[tuple] = []

    def counting_constructor(*args, **kwargs):
        constructed.append(args)
        return real_constructor(*args, **kwargs)

    # A cold process: an empty cache, and four backends whose worker threads race to load.
    monkeypatch.setattr(local, "_loaded_models", {})
    monkeypatch.setattr(local, "MiniLM", counting_constructor)
    backends = [LocalBackend() for _ in range(4)]
    try:
        vectors = await asyncio.gather(*(backend.embed([TEXT]) for backend in backends))
        late = LocalBackend()
        backends.append(late)
        vectors.append(await late.embed([TEXT]))
    finally:
        for backend in backends:
            await backend.close()

    assert len(constructed) == 1
    assert all(vector == vectors[0] for vector in vectors)


async def test_local_inference_does_not_block_the_event_loop(local_backend):
    texts = [f"{i:03d} {TEXT} Consumers commit offsets after processing each batch." for i in range(200)]
    ticks: list[float] = []
    running = True

    async def tick() -> None:
        while running:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    vectors = await local_backend.embed(texts)
    finished = time.perf_counter()
    running = False
    await ticker

    assert len(vectors) == 200
    # Embedding on the loop would stall the ticker for the whole batch, so the batch must be
    # long enough to tell. The bounds are relative to it because other processes on a small
    # machine slow both down; 0.5 s is still far inside aiokafka's heartbeat interval (3 s).
    batch_seconds = finished - started
    assert batch_seconds > 0.15
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert max(gaps) < min(0.5, batch_seconds / 3)
    ticks_during_batch = [t for t in ticks if started <= t <= finished]
    assert len(ticks_during_batch) >= batch_seconds / 0.01 / 4


async def test_create_backend_follows_settings(tmp_path):
    def settings(**values) -> Settings:
        return Settings(home=tmp_path, **values)

    hashing = create_backend(settings(embedding_backend="hashing", embedding_model=""))
    assert isinstance(hashing, HashingBackend)
    assert (hashing.name, hashing.model, hashing.dims) == ("hashing", "hashing-v1", 384)
    assert create_backend(settings(embedding_backend="hashing", embedding_model="hashing-v9")).model == "hashing-v9"

    local = create_backend(settings(embedding_backend="local", embedding_model="", embedding_batch_size=8))
    try:
        assert isinstance(local, LocalBackend)
        assert (local.name, local.model, local.batch_size) == ("local", "all-MiniLM-L6-v2", 8)
    finally:
        await local.close()

    # The local backend runs offline: a model it does not have is a permanent failure, found up front.
    with pytest.raises(EmbeddingError) as unknown:
        create_backend(settings(embedding_backend="local", embedding_model="no-such-model"))
    assert unknown.value.permanent
