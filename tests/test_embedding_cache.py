"""The embedding cache: RocksDB-backed, exact, persistent, and in front of any backend."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from pipeline.embedding.cache import CachedBackend, EmbeddingCache, cache_path
from pipeline.embedding.hashing import HashingBackend
from pipeline.embedding.openai import OpenAIBackend
from pipeline.local.openai_server import EmbeddingServer, vector_for


class CountingBackend(HashingBackend):
    """Hashing vectors, remembering every batch it was asked to embed."""

    def __init__(self, model: str) -> None:
        super().__init__(dims=16, model=model)
        self.calls: list[list[str]] = []
        self.closed = False

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return await super().embed(texts)

    async def close(self) -> None:
        self.closed = True


def sample(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": model}) or 0.0


@pytest.fixture
def cache(tmp_path):
    opened = EmbeddingCache(cache_path(tmp_path, "embedder-6067"))
    yield opened
    opened.close()


async def test_cached_texts_never_reach_the_backend(cache):
    backend = CountingBackend(model="cache-hits")
    cached = CachedBackend(backend, cache)
    hashing = HashingBackend(dims=16, model="cache-hits")

    first = await cached.embed(["alpha", "beta"])
    second = await cached.embed(["beta", "gamma", "alpha"])

    assert backend.calls == [["alpha", "beta"], ["gamma"]]
    assert first == await hashing.embed(["alpha", "beta"])
    assert second == await hashing.embed(["beta", "gamma", "alpha"])
    assert sample("embedding_cache_hits_total", "cache-hits") == 2
    assert sample("embedding_cache_misses_total", "cache-hits") == 3

    assert await cached.embed(["alpha", "beta", "gamma"]) == await hashing.embed(["alpha", "beta", "gamma"])
    assert len(backend.calls) == 2


async def test_a_text_repeated_in_one_batch_is_embedded_once(cache):
    backend = CountingBackend(model="cache-duplicates")
    cached = CachedBackend(backend, cache)

    vectors = await cached.embed(["same", "other", "same", "same"])

    assert backend.calls == [["same", "other"]]
    same, other = await HashingBackend(dims=16).embed(["same", "other"])
    assert vectors == [same, other, same, same]
    # Every text counts once: the repeats were not in the cache when the batch arrived.
    assert sample("embedding_cache_misses_total", "cache-duplicates") == 4
    assert sample("embedding_cache_hits_total", "cache-duplicates") == 0


def test_vectors_come_back_exactly_as_stored(cache):
    rng = random.Random(3)
    awkward = [0.1, 1 / 3, -0.0, 5e-324, 1.7976931348623157e308, -2.5e-17]
    vectors = [awkward, [rng.uniform(-1, 1) for _ in range(384)], vector_for("server text", 1536)]
    texts = ["awkward", "random", "server text"]

    cache.put_many("space", texts, vectors)

    assert cache.get_many("space", texts + ["never stored"]) == vectors + [None]
    assert cache.get_many("space", []) == []


async def test_cached_vectors_equal_the_servers_exactly(tmp_path):
    texts = [f"chunk {number} of a long report" for number in range(20)]
    async with EmbeddingServer(dims=64) as server:
        cached = CachedBackend(
            OpenAIBackend(base_url=server.url, api_key="test-key", max_batch_inputs=8),
            EmbeddingCache(tmp_path / "cache"),
        )
        try:
            from_server = await cached.embed(texts)
            requests_after_first = len(server.requests)
            from_cache = await cached.embed(texts)
        finally:
            await cached.close()

    assert requests_after_first == 3
    assert len(server.requests) == 3
    assert from_cache == from_server == [vector_for(text, 64) for text in texts]


async def test_the_cache_survives_close_and_reopen(tmp_path):
    path = cache_path(tmp_path, "embedder-6068")
    first = CachedBackend(CountingBackend(model="cache-reopen"), EmbeddingCache(path))
    stored = await first.embed(["kept across restarts"])
    await first.close()

    backend = CountingBackend(model="cache-reopen")
    second = CachedBackend(backend, EmbeddingCache(path))
    try:
        assert await second.embed(["kept across restarts"]) == stored
        assert backend.calls == []
    finally:
        await second.close()


async def test_vector_spaces_do_not_share_entries(cache):
    small = CountingBackend(model="cache-space-a")
    await CachedBackend(small, cache).embed(["shared text"])
    other_model = CountingBackend(model="cache-space-b")
    await CachedBackend(other_model, cache).embed(["shared text"])

    assert other_model.calls == [["shared text"]]
    assert EmbeddingCache.key("ab", "c") != EmbeddingCache.key("a", "bc")
    assert EmbeddingCache.key("m", "t") == EmbeddingCache.key("m", "t")
    assert (
        OpenAIBackend(base_url="http://127.0.0.1:1/v1", dimensions=256).vector_space
        != OpenAIBackend(base_url="http://127.0.0.1:1/v1", dimensions=512).vector_space
    )


async def test_the_wrapper_speaks_for_its_backend_and_closes_both(tmp_path):
    backend = CountingBackend(model="cache-delegates")
    cached = CachedBackend(backend, EmbeddingCache(tmp_path / "cache"))

    assert (cached.name, cached.model, cached.dims) == ("hashing", "cache-delegates", 16)
    await cached.close()

    assert backend.closed
    with pytest.raises(RuntimeError, match="closed"):
        cached.cache.get_many("space", ["anything"])
