"""Embedding throughput: the openai backend batched and concurrent against one request at a
time, and the raw local model.

    .venv/bin/python bench/embed.py
    .venv/bin/python bench/embed.py --latency-ms 250 --texts 4000 --local-texts 0

The openai backend talks to the test server of pipeline/local/openai_server.py, on its own loop in
a thread, which waits ``--latency-ms`` per request: what batching and concurrency buy
against a remote API's round trip, not any real service's speed. The local backend embeds
``--local-texts`` texts of 1000 characters with all-MiniLM-L6-v2 on the CPU, after loading
the model and one warm-up batch, then the same texts through a real embedder worker
process and the broker (bench/embedder_agent.py). Prints a Markdown table and writes the same numbers to
bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.embedder_agent import measure_agent
from bench.report import RESULTS_DIR, save
from pipeline.embedding import EmbeddingBackend
from pipeline.embedding.local import LocalBackend
from pipeline.embedding.openai import OpenAIBackend
from pipeline.errors import EmbeddingError
from pipeline.local.documents import lorem_pages
from pipeline.local.openai_server import ThreadedEmbeddingServer

RESULTS_PATH = RESULTS_DIR / "embed.json"
TEXT_CHARS = 1000


def sample_texts(count: int, seed: int) -> list[str]:
    """Distinct English-like texts of about TEXT_CHARS characters, the chunker's default size."""
    return [page[:TEXT_CHARS] for page in lorem_pages(count, 250, seed=seed)]


async def time_embedding(backend: EmbeddingBackend, texts: list[str], batch_size: int) -> float:
    """Seconds to embed ``texts`` in calls of ``batch_size``, one call after another, as the agent does."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        await backend.embed(texts[start : start + batch_size])
    return time.perf_counter() - started


async def measure_openai(
    server: ThreadedEmbeddingServer, texts: list[str], batch: int, concurrency: int, latency_ms: float
) -> dict:
    server.reset()
    server.configure(delay_ms=latency_ms)
    backend = OpenAIBackend(base_url=server.url, max_batch_inputs=batch, concurrency=concurrency)
    try:
        await backend.load()
        # One embed() call for all texts: the backend itself splits and overlaps the requests.
        seconds = await time_embedding(backend, texts, batch_size=len(texts))
    finally:
        await backend.close()
    return {
        "texts": len(texts),
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(server.requests),
        "max_in_flight": server.max_in_flight,
        "seconds": round(seconds, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
    }


async def measure_local(texts: list[str], batch_size: int) -> dict:
    backend = LocalBackend(batch_size=batch_size)
    try:
        await backend.load()
        await backend.embed(texts[:batch_size])  # warm-up: first-call allocations
        seconds = await time_embedding(backend, texts, batch_size)
    finally:
        await backend.close()
    return {
        "texts": len(texts),
        "batch": batch_size,
        "model": backend.model,
        "seconds": round(seconds, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
    }


def markdown_table(results: dict[str, dict], latency_ms: float, ratio: float) -> str:
    lines = [
        "| run | texts | batch | concurrency | requests | seconds | texts/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        if result is None:
            lines.append(f"| {name} | n/a | | | | | |")
            continue
        lines.append(
            f"| {name} | {result['texts']} | {result['batch']} | {result.get('concurrency', '')} "
            f"| {result.get('requests', '')} | {result['seconds']:.3f} | {result['texts_per_s']:,.1f} |"
        )
    lines.append(f"\nopenai batched+concurrent / one at a time, {latency_ms:g} ms per request: {ratio:,.1f}x texts/s")
    if results.get("local embedder agent") and results.get("local raw backend"):
        agent_ratio = results["local embedder agent"]["texts_per_s"] / results["local raw backend"]["texts_per_s"]
        lines.append(f"local embedder agent / raw local backend: {agent_ratio:.2f}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict:
    results: dict[str, dict | None] = {}
    with ThreadedEmbeddingServer(dims=args.dims) as server:
        results["openai batched"] = await measure_openai(
            server, sample_texts(args.texts, seed=1), args.batch, args.concurrency, args.latency_ms
        )
        results["openai one at a time"] = await measure_openai(
            server, sample_texts(args.serial_texts, seed=2), batch=1, concurrency=1, latency_ms=args.latency_ms
        )
    if args.local_texts:
        texts = sample_texts(args.local_texts, seed=3)
        try:
            results["local raw backend"] = await measure_local(texts, args.local_batch)
        except EmbeddingError as exc:
            print(f"local backend not measured: {exc}", file=sys.stderr)
            results["local raw backend"] = None
        else:
            # The agent in its own process; this loop only waits for it.
            results["local embedder agent"] = await asyncio.to_thread(measure_agent, "local", texts, args.local_batch)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=100.0, help="test server delay per request (100)")
    parser.add_argument("--texts", type=int, default=2000, help="texts for the batched openai run (2000)")
    parser.add_argument("--batch", type=int, default=64, help="texts per request in the batched run (64)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight in the batched run (4)")
    parser.add_argument("--serial-texts", type=int, default=30, help="texts for the one-at-a-time run (30)")
    parser.add_argument("--dims", type=int, default=64, help="dimensions of the test server's vectors (64)")
    parser.add_argument("--local-texts", type=int, default=256, help="texts for the local model, 0 skips (256)")
    parser.add_argument("--local-batch", type=int, default=32, help="texts per local embed() call (32)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help=f"JSON results (default {RESULTS_PATH})")
    args = parser.parse_args(argv)

    results = asyncio.run(run(args))
    ratio = results["openai batched"]["texts_per_s"] / results["openai one at a time"]["texts_per_s"]
    table = markdown_table(results, args.latency_ms, ratio)
    print(table)

    save(
        args.output,
        {
            "server_latency_ms": args.latency_ms,
            "server_dims": args.dims,
            "text_chars": TEXT_CHARS,
            "results": results,
            "openai_batched_over_one_at_a_time": round(ratio, 1),
        },
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
