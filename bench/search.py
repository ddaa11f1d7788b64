"""Search latency on the web worker, idle and while ingesting, and the indexer's throughput against
an in-process upsert loop, at growing index sizes on the local Milvus (milvus-lite server).

    .venv/bin/python bench/search.py                                  # 10k and 100k chunks
    .venv/bin/python bench/search.py --sizes 2000,5000 --queries 20   # a quick check

Starts a local broker, Milvus, one web and one indexer worker (no chunker, no embedder): the
benchmark produces ChunkEmbedding records of generated ~800-character texts (hashing vectors,
10 companies, 50-chunk documents) straight to embeddings.ready. For each size in turn it fills
the index up to it, through the indexer and, in the same run, through MilvusIndex.upsert in
this process (the baseline, its own collection), then times `--queries` sequential
POST /api/v1/search: idle, while ingesting, once Milvus is quiet, and after an explicit flush
(the table's notes say what each means). Writes bench/results/search.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.cpu import CpuMeter, tree_cpu_seconds
from bench.local_stack import LocalStack
from bench.report import RESULTS_DIR, save
from pipeline.broker_security import client_options
from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.ids import chunk_id
from pipeline.index.milvus import MilvusIndex, collection_name
from pipeline.local.documents import lorem_pages
from pipeline.records import ChunkEmbedding, now_ms
from pipeline.settings import Settings
from pipeline.topics import DOCUMENTS_STATUS, EMBEDDINGS_READY

MODEL, BASELINE_MODEL, DIMS = "hashing-v1", "hashing-v1-baseline", 384
COMPANIES, DOC_CHUNKS, TEXT_CHARS, BLOCK = 10, 50, 800, 1000
BASELINE_BATCH = 256


def _block(seed: int) -> tuple[list[str], np.ndarray]:
    """BLOCK texts and their hashing vectors (run in a process pool)."""
    from pipeline.embedding.hashing import HashingBackend

    texts = [page[:TEXT_CHARS] for page in lorem_pages(BLOCK, 140, seed=seed)]
    backend = HashingBackend(dims=DIMS, model=MODEL)
    return texts, np.array([backend.vector(text) for text in texts])


def make_corpus(chunks: int) -> tuple[list[str], np.ndarray]:
    """Texts and their vectors (float64: the backend's own floats, a third of the memory of lists)."""
    texts: list[str] = []
    vectors: list[np.ndarray] = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for block_texts, block_vectors in pool.map(_block, range(-(-chunks // BLOCK))):
            texts += block_texts
            vectors.append(block_vectors)
    return texts[:chunks], np.concatenate(vectors)[:chunks]


def document_of(i: int) -> str:
    return f"bench-doc-{i // DOC_CHUNKS:05d}"


def company_of(i: int) -> str:
    return f"bench-co-{(i // DOC_CHUNKS) % COMPANIES}"


def embedding(corpus, i: int, model: str = MODEL) -> ChunkEmbedding:
    texts, vectors = corpus
    doc = i // DOC_CHUNKS
    return ChunkEmbedding(
        chunk_id=chunk_id(document_of(i), i % DOC_CHUNKS), document_id=document_of(i), company_id=company_of(i),
        index=i % DOC_CHUNKS, vector=vectors[i].tolist(), model=model, dims=DIMS, created_ms=now_ms(), text=texts[i],
        page=(i % DOC_CHUNKS) // 5 + 1, filename=f"report-{doc}.pdf", title=f"Quarterly report {doc}",
        tags=["bench", f"group-{doc % 3}"],
    )  # fmt: skip


def messages(corpus, start: int, end: int) -> list[tuple[bytes, bytes]]:
    return [(document_of(i).encode(), embedding(corpus, i).dumps()) for i in range(start, end)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Indexed:
    """Chunks the indexer reports indexed (documents.status, chunks_indexed) for some documents, from now on."""

    def __init__(self, settings: Settings, documents: set[str]) -> None:
        self.documents, self.count = documents, 0
        self.consumer = AIOKafkaConsumer(
            DOCUMENTS_STATUS.name,
            bootstrap_servers=settings.bootstrap_servers,
            group_id=None,
            auto_offset_reset="latest",
            **client_options(settings),
        )

    async def __aenter__(self) -> Indexed:
        await self.consumer.start()
        await self.consumer.getmany(timeout_ms=500)
        for partition in self.consumer.assignment():
            await self.consumer.position(partition)  # at the topic's end before anything is produced
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.consumer.stop()

    async def read(self, timeout_ms: int) -> int:
        for records in (await self.consumer.getmany(timeout_ms=timeout_ms)).values():
            for record in records:
                event = json.loads(record.value)
                if event["document_id"] in self.documents:
                    self.count += event.get("chunks_indexed") or 0
        return self.count


async def fill(settings: Settings, index, corpus, start: int, end: int, meter: CpuMeter) -> dict:
    """Produce rows [start, end) to embeddings.ready; seconds until the indexer reports them all indexed."""
    batch = messages(corpus, start, end)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5, **client_options(settings))
    await producer.start()
    try:
        async with Indexed(settings, {key.decode() for key, _ in batch}) as indexed:
            meter.start()
            started = time.perf_counter()
            for key, value in batch:
                await producer.send(EMBEDDINGS_READY.name, value, key=key)
            await producer.flush()
            produced = time.perf_counter() - started
            progress = (0, time.perf_counter())
            while await indexed.read(200) < len(batch):
                if indexed.count > progress[0]:
                    progress = (indexed.count, time.perf_counter())
                elif time.perf_counter() - progress[1] > 180:
                    raise RuntimeError(f"the indexer is stuck at {indexed.count} of {len(batch)} chunks")
            seconds = time.perf_counter() - started
            cpu = meter.stop()
    finally:
        await producer.stop()
    count = await index.count(MODEL, DIMS)
    if count != end:
        raise RuntimeError(f"the index counts {count} chunks, expected {end}")
    return {"chunks": len(batch), "produced_s": produced, "seconds": seconds, "chunks_per_s": len(batch) / seconds,
            "cpu_s": cpu}  # fmt: skip


async def baseline(index, corpus, start: int, end: int, meter: CpuMeter) -> dict:
    """MilvusIndex.upsert in batches of 256 in this process; rows are built outside the clock."""
    seconds = 0.0
    meter.start()
    for first in range(start, end, BASELINE_BATCH):
        rows = [embedding(corpus, i, BASELINE_MODEL) for i in range(first, min(first + BASELINE_BATCH, end))]
        started = time.perf_counter()
        await index.upsert(rows)
        seconds += time.perf_counter() - started
    cpu = meter.stop()
    if (count := await index.count(BASELINE_MODEL, DIMS)) != end:
        raise RuntimeError(f"the baseline collection counts {count} chunks, expected {end}")
    return {"chunks": end - start, "seconds": seconds, "chunks_per_s": (end - start) / seconds, "cpu_s": cpu}


async def search_latency(url: str, corpus, indexed: int, queries: int, budget_s: float, seed: int) -> dict:
    """``queries`` sequential searches (after 5 untimed ones), or as many as fit in ``budget_s``.
    A search the web worker answers with an error (503: Milvus did not answer within the index's
    timeout) is counted, not timed."""
    rng = random.Random(seed)
    client_ms, server_ms, found, errors = [], [], 0, []
    async with DocflowClient(url, timeout=120) as client:
        deadline = time.perf_counter() + budget_s
        for n in range(queries + 5):
            i = rng.randrange(indexed)
            words = corpus[0][i].split()
            length = rng.randint(3, 8)
            first = rng.randrange(max(1, len(words) - length))
            client.company_id = company_of(i)
            started = time.perf_counter()
            try:
                answer = await client.search(" ".join(words[first : first + length]), top_k=5)
            except ApiError as exc:
                errors.append(f"{exc.status} {exc.code}")
                continue
            if n >= 5:
                client_ms.append((time.perf_counter() - started) * 1000)
                server_ms.append(answer["took_ms"])
                source = chunk_id(document_of(i), i % DOC_CHUNKS)
                found += any(hit["chunk_id"] == source for hit in answer["results"])
            if time.perf_counter() > deadline:
                break
    ok = len(client_ms) or float("nan")
    return {"queries": len(client_ms), "errors": len(errors), "first_error": errors[0] if errors else None,
            "p50_ms": percentile(client_ms, 50), "p95_ms": percentile(client_ms, 95),
            "server_p50_ms": percentile(server_ms, 50), "source_found": found / ok}  # fmt: skip


def ingest_process(settings: Settings, path: str, stop, results, backlog: int) -> None:
    """Another process: send the pickled records over and over, at most ``backlog`` ahead of the indexer."""
    results.put(asyncio.run(_ingest(settings, pickle.loads(Path(path).read_bytes()), stop, backlog)))


async def _ingest(settings: Settings, batch: list[tuple[bytes, bytes]], stop, backlog: int) -> dict:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5, **client_options(settings))
    await producer.start()
    produced = 0
    try:
        async with Indexed(settings, {key.decode() for key, _ in batch}) as indexed:
            started = time.perf_counter()
            while not stop.is_set():
                if produced - indexed.count < backlog:
                    for key, value in batch[produced % len(batch) :][:BASELINE_BATCH]:
                        await producer.send(EMBEDDINGS_READY.name, value, key=key)
                        produced += 1
                await indexed.read(0 if produced - indexed.count < backlog else 50)
            seconds, during = time.perf_counter() - started, indexed.count
            await producer.flush()
            while indexed.count < produced and time.perf_counter() - started < seconds + 300:
                await indexed.read(200)
            return {"produced": produced, "indexed": during, "seconds": seconds, "indexed_per_s": during / seconds,
                    "caught_up_s": time.perf_counter() - started - seconds}  # fmt: skip
    finally:
        await producer.stop()


def flushed_rows(data_dir: Path) -> int | None:
    """Rows in the collection's flushed files, superseded versions included, from milvus-lite's manifest
    (its gRPC server does not list segments); None when the layout is not milvus-lite 3's."""
    import pyarrow.parquet

    folder = data_dir / "collections" / collection_name(MODEL, DIMS)
    for _ in range(3):  # a compaction may replace files while they are read
        try:
            partitions = json.loads((folder / "manifest.json").read_text())["partitions"]
            return sum(
                pyarrow.parquet.read_metadata(folder / "partitions" / name / file).num_rows
                for name, files in partitions.items()
                for file in files["data_files"]
            )
        except FileNotFoundError:
            time.sleep(0.5)
        except (OSError, KeyError, ValueError):
            return None
    return None


async def wait_quiet(pid: int, limit_s: float = 300) -> float:
    """Seconds until the Milvus server spends under 5% of a core (2 s windows): its background
    compaction and index builds done; at most ``limit_s``."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        before = tree_cpu_seconds({"milvus": pid})["milvus"]
        await asyncio.sleep(2)
        if tree_cpu_seconds({"milvus": pid})["milvus"] - before < 0.1:
            break
    return time.perf_counter() - started


async def flush(index: MilvusIndex) -> float:
    """An explicit flush of both collections (the indexer flushes only once idle); seconds for the searched one.

    Through the index's own async client: a new pymilvus MilvusClient reuses this process's cached
    channel to the server, which the server may have closed (GOAWAY "too_many_pings") while it idled."""
    started = time.perf_counter()
    await index.client.flush(collection_name(MODEL, DIMS), timeout=600)
    seconds = time.perf_counter() - started
    await index.client.flush(collection_name(BASELINE_MODEL, DIMS), timeout=600)
    return seconds


async def measure_size(stack: LocalStack, index, corpus, start: int, size: int, args, seed: int) -> dict:
    """Fill from ``start`` to ``size`` chunks (the baseline, then the indexer), then the four search rows."""
    url = stack.web_url
    meter = CpuMeter({**stack.processes(), "milvus": stack.milvus.pid(), "benchmark": os.getpid()})
    result = {"size": size, "baseline": await baseline(index, corpus, start, size, meter)}
    result["indexer"] = await fill(stack.settings, index, corpus, start, size, meter)
    result["ratio"] = result["indexer"]["chunks_per_s"] / result["baseline"]["chunks_per_s"]
    indexer, base = result["indexer"], result["baseline"]
    print(f"{size:,}: indexer {indexer['chunks_per_s']:.0f} chunks/s in {indexer['seconds']:.0f} s, "
          f"baseline {base['chunks_per_s']:.0f} chunks/s in {base['seconds']:.0f} s", flush=True)  # fmt: skip
    runs = result["search"] = {}

    async def searches(label: str, seed: int, quiet: bool = False) -> dict:
        waited = await wait_quiet(stack.milvus.pid()) if quiet else 0.0
        server = CpuMeter({"milvus": stack.milvus.pid()})
        server.start()
        started = time.perf_counter()
        run = await search_latency(url, corpus, size, args.queries, args.budget_s, seed)
        run.update(seconds=time.perf_counter() - started, waited_s=waited)
        run.update(
            milvus_cores=server.stop()["milvus"] / run["seconds"], flushed_rows=flushed_rows(stack.milvus.data_dir)
        )
        print(f"{size:,} {label}: p50 {run['p50_ms']:.1f} ms, p95 {run['p95_ms']:.1f} ms, {run['queries']} queries, "
              f"{run['errors']} errors, {run['seconds']:.0f} s, after waiting {waited:.0f} s", flush=True)  # fmt: skip
        runs[label] = run
        return run

    await searches("idle", seed)
    with tempfile.NamedTemporaryFile(suffix=".pickle") as handle:
        handle.write(pickle.dumps(messages(corpus, max(0, size - args.ingest_pool), size)))
        handle.flush()
        context = multiprocessing.get_context("spawn")
        stop, results = context.Event(), context.Queue()
        process = context.Process(
            target=ingest_process, args=(stack.settings, handle.name, stop, results, args.backlog)
        )
        process.start()
        try:
            await asyncio.sleep(5)  # the process's start and the indexer's first batches
            run = await searches("while ingesting", seed + 1)
            stop.set()
            run["ingest"] = await asyncio.to_thread(results.get, True, 600)
        finally:
            stop.set()
            process.join(30)
            if process.is_alive():
                process.kill()
    await searches("idle, Milvus quiet", seed + 2, quiet=True)
    if args.flush:
        result["flush_s"] = await flush(index)
        await searches("explicit flush, quiet", seed + 3, quiet=True)
    return result


def run(args, corpus) -> list[dict]:
    with LocalStack(backend="hashing", batch_size=32, index="milvus") as stack:
        stack.workers.launch({"web": 1, "indexer": 1})
        return asyncio.run(measure_all(stack, args, corpus))


async def measure_all(stack: LocalStack, args, corpus) -> list[dict]:
    results = []
    index = MilvusIndex(stack.settings.milvus_address, timeout=120)
    try:
        # Warm-up: both collections created and loaded, the indexer's first batches, out of the figures.
        indexed, meter = min(args.warmup, args.sizes[0]), CpuMeter({})
        await baseline(index, corpus, 0, indexed, meter)
        await fill(stack.settings, index, corpus, 0, indexed, meter)
        for n, size in enumerate(args.sizes):
            results.append(await measure_size(stack, index, corpus, indexed, size, args, seed=10 * n))
            indexed = size
    finally:
        await index.close()
    return results


def markdown(results: list[dict], args) -> str:
    lines = [
        f"Generated {TEXT_CHARS}-character chunks, hashing vectors ({DIMS} dims), {COMPANIES} companies; "
        f"1 web + 1 indexer worker, local Milvus (milvus-lite server); top 5 of one company, {args.queries} "
        f"sequential queries a row (at most {args.budget_s:g} s), latency at the client.",
        "",
        "| chunks | search | waited s | queries | errors | p50 ms | p95 ms | server p50 ms | Milvus CPU (cores) "
        "| source chunk in top 5 | rows flushed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for label, run in result["search"].items():
            flushed = "?" if run["flushed_rows"] is None else f"{run['flushed_rows']:,}"
            lines.append(
                f"| {result['size']:,} | {label} | {run['waited_s']:.0f} | {run['queries']} | {run['errors']} "
                f"| {run['p50_ms']:.1f} "
                f"| {run['p95_ms']:.1f} | {run['server_p50_ms']:.1f} | {run['milvus_cores']:.2f} "
                f"| {run['source_found']:.0%} | {flushed} |"
            )
    lines += [
        "",
        "| chunks | chunks added | indexer chunks/s | baseline chunks/s | indexer / baseline "
        "| indexer chunks/s while searched | flush s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        ingest = result["search"]["while ingesting"]["ingest"]
        lines.append(
            f"| {result['size']:,} | {result['indexer']['chunks']:,} | {result['indexer']['chunks_per_s']:,.0f} "
            f"| {result['baseline']['chunks_per_s']:,.0f} | {result['ratio']:.2f} | {ingest['indexed_per_s']:,.0f} "
            f"| {result.get('flush_s', float('nan')):.1f} |"
        )
    names = list(results[0]["indexer"]["cpu_s"])
    lines += ["", "| CPU seconds while filling | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for result in results:
        for run in ("baseline", "indexer"):
            cpu = result[run]["cpu_s"]
            lines.append(f"| {run}, to {result['size']:,} | " + " | ".join(f"{cpu[n]:.1f}" for n in names) + " |")
    lines += [
        "",
        f"While ingesting: another process re-sends the newest {args.ingest_pool:,} chunks to embeddings.ready in a "
        f"loop, at most {args.backlog:,} records ahead of the indexer: the indexer upserts at its full speed and the "
        "count stays put. Idle: right after the fill. Milvus quiet: once the indexer has caught up and the server "
        "spends under 5% of a core (its background compaction and index builds done; waited s). Explicit flush: "
        "pymilvus flush() of the collections at once (the indexer flushes after DOCFLOW_INDEX_SEAL_IDLE_SECONDS "
        "of quiet). Milvus CPU: the server's CPU seconds per "
        "second during the row. Rows flushed: rows in the collection's flushed files (superseded versions included), "
        "the rest being in milvus-lite's MemTable. The baseline upserts the same rows, in batches of "
        f"{BASELINE_BATCH}, into its own collection on the same server; the indexer's time runs from the first record "
        "produced until its status events report every chunk indexed.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="index sizes in chunks, ascending (10000,100000)")
    parser.add_argument("--queries", type=int, default=100, help="timed searches per row (100)")
    parser.add_argument("--budget-s", type=float, default=120, help="stop a row's searches after this long (120)")
    parser.add_argument("--ingest-pool", type=int, default=5000, help="newest chunks re-sent while ingesting (5000)")
    parser.add_argument("--backlog", type=int, default=1024, help="records the ingester keeps ahead (1024)")
    parser.add_argument("--warmup", type=int, default=512, help="chunks indexed before measuring (512)")
    parser.add_argument("--no-flush", dest="flush", action="store_false", help="skip the explicit-flush rows")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "search.json")
    args = parser.parse_args()
    args.sizes = sorted(int(size) for size in args.sizes.split(","))

    started = time.perf_counter()
    corpus = make_corpus(args.sizes[-1])
    print(f"corpus of {args.sizes[-1]:,} chunks in {time.perf_counter() - started:.0f} s", flush=True)
    results = run(args, corpus)
    table = markdown(results, args)
    print(table)
    settings = {name: getattr(args, name) for name in ("sizes", "queries", "budget_s", "ingest_pool", "backlog")}
    save(args.output, {"settings": settings, "results": results, "seconds": time.perf_counter() - started}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
