"""The openai backend through the real ``openai`` client against an OpenAI-compatible test server."""

from __future__ import annotations

import time

import aiohttp
import pytest
from prometheus_client import REGISTRY

from pipeline.embedding import create_backend
from pipeline.embedding.openai import OpenAIBackend, estimate_tokens
from pipeline.errors import EmbeddingError
from pipeline.local.openai_server import EmbeddingServer, ThreadedEmbeddingServer, vector_for
from pipeline.settings import Settings


@pytest.fixture(scope="module")
async def server():
    async with EmbeddingServer() as running:
        yield running


@pytest.fixture(autouse=True)
def clean_environment(server, monkeypatch):
    # The client falls back to these; a developer's own must not leak into the tests.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    server.reset()


@pytest.fixture
async def make_backend(server):
    """OpenAIBackend against the test server; every backend made is closed after the test."""
    made = []

    def make(**options) -> OpenAIBackend:
        backend = OpenAIBackend(**{"base_url": server.url, "api_key": "test-key", "model": "test-embed", **options})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def texts(count: int, prefix: str = "chunk") -> list[str]:
    return [f"{prefix} {number}: Kafka keeps partitions ordered." for number in range(count)]


async def test_vectors_come_back_in_input_order_as_the_server_computed_them(server, make_backend):
    backend = make_backend(max_batch_inputs=7, concurrency=3)
    inputs = texts(50)

    vectors = await backend.embed(inputs)

    # Exact equality: floats travel as JSON, not the client's default float32 base64.
    assert vectors == [vector_for(text) for text in inputs]
    assert backend.dims == 8
    requests = server.requests
    assert len(requests) == 8  # ceil(50 / 7)
    assert sorted(text for request in requests for text in request.inputs) == sorted(inputs)
    for request in requests:
        assert request.model == "test-embed"
        assert request.body["encoding_format"] == "float"
        assert request.headers["Authorization"] == "Bearer test-key"
    assert await backend.embed([]) == []
    assert len(server.requests) == 8


async def test_requests_hold_at_most_max_batch_inputs_texts(server, make_backend):
    backend = make_backend(max_batch_inputs=4, concurrency=1)
    inputs = texts(10)

    await backend.embed(inputs)

    assert [request.inputs for request in server.requests] == [inputs[0:4], inputs[4:8], inputs[8:10]]


async def test_requests_hold_at_most_max_batch_tokens_estimated_tokens(server, make_backend):
    backend = make_backend(max_batch_inputs=100, max_batch_tokens=40, max_input_tokens=20, concurrency=1)
    # 29, 59, 14 and 2 bytes: 10, 20, 5 and 1 estimated tokens.
    inputs = ["a" * 29, "b" * 59, "c" * 14, "d" * 29, "e" * 29, "f" * 29, "g" * 2, "h" * 59, "i" * 59, "j" * 59]

    await backend.embed(inputs)

    sent = [request.inputs for request in server.requests]
    assert sent == [inputs[0:3], inputs[3:7], inputs[7:9], inputs[9:10]]
    for request_texts in sent:
        assert sum(estimate_tokens(text) for text in request_texts) <= 40
    # Greedy: each request is full, the next one's first text would not have fitted.
    for request_texts, following in zip(sent, sent[1:]):
        assert sum(estimate_tokens(text) for text in request_texts + following[:1]) > 40


async def test_requests_in_flight_never_exceed_concurrency(server, make_backend):
    server.configure(delay_ms=100)
    backend = make_backend(max_batch_inputs=1, concurrency=3)
    inputs = texts(12)

    started = time.perf_counter()
    vectors = await backend.embed(inputs)
    elapsed = time.perf_counter() - started

    assert vectors == [vector_for(text) for text in inputs]
    assert server.max_in_flight == 3
    assert elapsed >= 4 * 0.1  # 12 requests, 3 at a time, 100 ms each


async def test_the_client_retries_429_and_500_until_every_vector_arrives(server, make_backend):
    server.configure(failure_rate=0.3, failure_statuses=[429, 500], seed=7, retry_after="0.01")
    backend = make_backend(max_batch_inputs=10, max_retries=5)
    inputs = texts(200)

    vectors = await backend.embed(inputs)

    assert vectors == [vector_for(text) for text in inputs]
    statuses = [request.status for request in server.requests]
    assert statuses.count(200) == 20
    assert statuses.count(429) > 0 and statuses.count(500) > 0
    assert len(statuses) > 200 / 10


async def test_retry_after_from_the_server_sets_the_wait(server, make_backend):
    server.configure(fail_next=1, fail_next_status=429, retry_after="1")
    backend = make_backend()

    started = time.perf_counter()
    vectors = await backend.embed(["wait for me"])
    elapsed = time.perf_counter() - started

    assert vectors == [vector_for("wait for me")]
    assert [request.status for request in server.requests] == [429, 200]
    # The client's own first backoff is at most 0.5 s; only the header explains a full second.
    assert elapsed >= 1.0


async def test_retries_are_the_clients_own_and_end_in_a_transient_error(server, make_backend):
    server.configure(failure_rate=1.0, failure_statuses=[500], retry_after="0.01")
    backend = make_backend(model="test-embed-500", max_retries=2)
    errors_before = sample(
        "embedding_openai_api_errors_total", model_name="test-embed-500", error_type="InternalServerError"
    )

    with pytest.raises(EmbeddingError, match="retries exhausted.*500") as failed:
        await backend.embed(["always fails"])

    assert not failed.value.permanent
    assert len(server.requests) == 3  # max_retries=2: exactly what the client was told, nothing more
    assert (
        sample("embedding_openai_api_errors_total", model_name="test-embed-500", error_type="InternalServerError")
        == errors_before + 1
    )

    server.reset()
    server.configure(fail_next=1)
    with pytest.raises(EmbeddingError, match="429"):
        await make_backend(max_retries=0).embed(["no retries"])
    assert len(server.requests) == 1


async def test_a_refused_api_key_is_permanent_with_a_readable_message(server, make_backend):
    server.configure(unauthorized=True)
    backend = make_backend(model="test-embed-401")

    with pytest.raises(EmbeddingError) as refused:
        await backend.embed(["secret"])

    assert refused.value.permanent
    message = str(refused.value)
    assert f"server at {server.url} refused the API key (401)" in message
    assert "Incorrect API key provided." in message
    assert len(server.requests) == 1  # a 401 is not retried
    assert (
        sample("embedding_openai_api_errors_total", model_name="test-embed-401", error_type="AuthenticationError") == 1
    )

    server.configure(unauthorized=False)
    assert await backend.embed(["secret"]) == [vector_for("secret")]


@pytest.mark.parametrize("kind", ["json", "missing_vector", "not_floats"])
async def test_a_malformed_answer_is_a_transient_error(server, make_backend, kind):
    server.configure(malformed=kind)
    backend = make_backend(max_batch_inputs=2)

    with pytest.raises(EmbeddingError, match="malformed response") as malformed:
        await backend.embed(texts(3))

    assert not malformed.value.permanent


async def test_a_server_that_does_not_answer_in_time_is_a_transient_error(server, make_backend):
    server.configure(delay_ms=400)
    backend = make_backend(timeout=0.1, max_retries=1)

    with pytest.raises(EmbeddingError, match="did not answer within 0.1 s") as slow:
        await backend.embed(["too slow"])

    assert not slow.value.permanent
    assert len(server.requests) == 2


async def test_over_long_inputs_are_truncated_before_sending(server, make_backend):
    backend = make_backend(max_input_tokens=10, max_batch_tokens=100)
    long_text = "é" * 100  # 200 bytes: 67 estimated tokens
    short_text = "short"

    vectors = await backend.embed([long_text, short_text])

    ((sent_long, sent_short),) = [request.inputs for request in server.requests]
    assert sent_short == short_text
    assert long_text.startswith(sent_long) and 0 < len(sent_long) < len(long_text)
    assert estimate_tokens(sent_long) <= 10
    assert vectors == [vector_for(sent_long), vector_for(short_text)]


async def test_dims_are_learned_from_the_server_or_fixed_by_dimensions(server, make_backend):
    learned = make_backend()
    with pytest.raises(RuntimeError):
        _ = learned.dims
    await learned.embed(["one"])
    assert learned.dims == 8

    fixed = make_backend(dimensions=4)
    assert fixed.dims == 4
    vectors = await fixed.embed(["one", "two"])
    assert vectors == [vector_for("one", 4), vector_for("two", 4)]
    assert server.requests[-1].body["dimensions"] == 4


async def test_every_request_is_timed(server, make_backend):
    count_before = sample("embedding_openai_api_duration_seconds_count")
    server.configure(delay_ms=50)

    await make_backend(max_batch_inputs=5).embed(texts(12))

    assert sample("embedding_openai_api_duration_seconds_count") == count_before + 3
    assert sample("embedding_openai_api_duration_seconds_sum") > 0


async def test_a_closed_backend_embeds_nothing(make_backend):
    backend = make_backend()
    await backend.embed(["before"])
    await backend.close()

    with pytest.raises(EmbeddingError, match="closed") as closed:
        await backend.embed(["after"])
    assert not closed.value.permanent


async def test_create_backend_builds_the_openai_backend_from_settings(server, tmp_path, monkeypatch):
    def settings(**values) -> Settings:
        return Settings(home=tmp_path, embedding_backend="openai", **values)

    # A loopback server usually wants no key: the backend sends a placeholder.
    local = create_backend(settings(openai_base_url=server.url))
    try:
        assert (local.name, local.model, local.base_url) == ("openai", "text-embedding-3-small", server.url)
        assert await local.embed(["hello"]) == [vector_for("hello")]
        assert server.requests[-1].headers["Authorization"] == "Bearer unused"
        assert server.requests[-1].model == "text-embedding-3-small"
    finally:
        await local.close()

    keyed = create_backend(
        settings(
            openai_base_url=server.url,
            openai_api_key="sk-docflow",
            embedding_model="nomic-embed-text",
            openai_dimensions=4,
            openai_concurrency=2,
            openai_max_retries=1,
            openai_timeout_seconds=7.5,
        )
    )
    try:
        assert (keyed.dims, keyed.concurrency, keyed.max_retries, keyed.timeout) == (4, 2, 1, 7.5)
        assert await keyed.embed(["hello"]) == [vector_for("hello", 4)]
        assert server.requests[-1].headers["Authorization"] == "Bearer sk-docflow"
        assert server.requests[-1].model == "nomic-embed-text"
    finally:
        await keyed.close()

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(EmbeddingError, match="no API key.*DOCFLOW_OPENAI_API_KEY or OPENAI_API_KEY") as no_key:
        create_backend(settings())
    assert no_key.value.permanent

    # The client's own environment variables are the fallback.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    from_env = create_backend(settings())
    try:
        await from_env.embed(["hello"])
        assert server.requests[-1].headers["Authorization"] == "Bearer sk-from-env"
    finally:
        await from_env.close()


async def test_a_threaded_server_is_steered_over_http():
    with ThreadedEmbeddingServer(dims=16) as threaded:
        backend = OpenAIBackend(base_url=threaded.url, max_retries=0)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(threaded.control_url, json={"unauthorized": True}) as answer:
                    assert (await answer.json())["behaviour"]["unauthorized"] is True
                with pytest.raises(EmbeddingError, match="401"):
                    await backend.embed(["steered"])

                async with http.post(threaded.control_url, json={"reset": True}) as answer:
                    assert (await answer.json())["requests"] == 0
                assert await backend.embed(["steered"]) == [vector_for("steered", 16)]

                async with http.post(threaded.control_url, json={"no_such_knob": 1}) as answer:
                    assert answer.status == 400
        finally:
            await backend.close()
