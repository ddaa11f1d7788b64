"""End-to-end throughput and latency of the pipeline against an in-process baseline.

    .venv/bin/python bench/e2e.py [CORPUS_DIR] [--docs 50] [--backend hashing] [--chunkers 1 --embedders 1]

Starts a local broker and worker processes (1 web, N chunker, M embedder), uploads the
corpus (default: generated multi-page PDFs and text files), and measures documents/s,
pages/s, chunks/s and the latency from upload to `completed` (from the status table's own
timestamps). In the same run it extracts, splits and embeds the same corpus in this one
process, and prints pipeline/baseline. Writes bench/results/e2e-<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.report import RESULTS_DIR, save  # noqa: E402
from pipeline.broker import LocalBroker  # noqa: E402
from pipeline.chunking import chunk_document  # noqa: E402
from pipeline.client import DocflowClient  # noqa: E402
from pipeline.embedding import create_backend  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from tests import documents  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.stack import WorkerStack, worker_env  # noqa: E402

CONTENT_TYPES = {".pdf": "application/pdf", ".txt": "text/plain", ".md": "text/markdown", ".html": "text/html"}


def generated_corpus(folder: Path, docs: int, pages: int) -> list[Path]:
    """Multi-page PDFs, two in three, and text files."""
    paths = []
    for n in range(docs):
        text_pages = documents.lorem_pages(pages, 350, seed=n)
        if n % 3 == 2:
            path = folder / f"notes-{n}.txt"
            path.write_text("\n\n".join(text_pages))
        else:
            path = folder / f"report-{n}.pdf"
            path.write_bytes(documents.make_pdf(text_pages))
        paths.append(path)
    return paths


def corpus_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in CONTENT_TYPES)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def baseline(paths: list[Path], backend_name: str, batch_size: int) -> dict:
    """The same extractor, splitter and embedder, one document after another, in this process."""
    backend = create_backend(Settings(embedding_backend=backend_name, embedding_batch_size=batch_size))
    await backend.embed(["warm-up"])
    pages = chunks = 0
    started = time.perf_counter()
    for path in paths:
        chunked = chunk_document(path.read_bytes(), CONTENT_TYPES[path.suffix.lower()], 1000, 200)
        texts = [piece.text for piece in chunked.chunks]
        for start in range(0, len(texts), batch_size):
            await backend.embed(texts[start:start + batch_size])
        pages += chunked.pages
        chunks += len(texts)
    elapsed = time.perf_counter() - started
    await backend.close()
    return {"seconds": elapsed, "docs": len(paths), "pages": pages, "chunks": chunks}


async def run_pipeline(stack: WorkerStack, paths: list[Path], concurrency: int = 8) -> dict:
    web = stack.of_role("web")[0].url
    company = f"bench-{int(time.time())}"
    limit = asyncio.Semaphore(concurrency)

    async with DocflowClient(web, company, timeout=300) as client:
        async def upload(path: Path) -> str:
            async with limit:
                return (await client.upload(path))["document_id"]

        started_ms = time.time() * 1000
        document_ids = await asyncio.gather(*(upload(path) for path in paths))
        statuses = await asyncio.gather(*(client.wait(doc, timeout=1800, interval=0.2) for doc in document_ids))
    failed = [status for status in statuses if status["state"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} documents did not complete: {failed[0]}")
    finished_ms = max(status["completed_ms"] for status in statuses)
    latencies = [(status["completed_ms"] - status["uploaded_ms"]) / 1000 for status in statuses]
    return {
        "seconds": (finished_ms - started_ms) / 1000,
        "docs": len(statuses),
        "pages": sum(status["pages"] for status in statuses),
        "chunks": sum(status["chunks_total"] for status in statuses),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_p99_s": percentile(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies),
    }


def rates(run: dict) -> dict:
    return {f"{unit}_per_s": run[unit] / run["seconds"] for unit in ("docs", "pages", "chunks")}


def measure(paths: list[Path], backend: str, chunkers: int, embedders: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="docflow-e2e-") as home:
        settings = Settings(home=Path(home), kafka_port=free_port(), kafka_controller_port=free_port())
        broker = LocalBroker(settings)
        broker.start()
        logs = Path(home) / "logs"
        logs.mkdir()
        stack = WorkerStack(settings, worker_env(
            settings, DOCFLOW_EMBEDDING_BACKEND=backend, DOCFLOW_EMBEDDING_BATCH_SIZE=str(batch_size),
            DOCFLOW_EMBEDDING_CACHE="false", DOCFLOW_CHUNKER_PROCESSES="0",
        ), logs)
        try:
            stack.launch({"web": 1, "chunker": chunkers, "embedder": embedders})
            # Warm-up: model loads, first-batch costs and group joins stay out of the figures.
            asyncio.run(run_pipeline(stack, paths[:2]))
            return asyncio.run(run_pipeline(stack, paths))
        finally:
            stack.stop_all()
            broker.stop()


def markdown(results: dict) -> str:
    base = results["baseline"]
    lines = [
        f"corpus: {results['corpus']}; backend: {results['backend']}",
        "",
        "| run | docs/s | pages/s | chunks/s | p50 s | p95 s | p99 s | chunks/s vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| baseline (one process) | {base['docs_per_s']:.2f} | {base['pages_per_s']:.1f} | "
        f"{base['chunks_per_s']:.1f} | | | | 1.00 |",
    ]
    for run in results["pipeline"]:
        lines.append(
            f"| pipeline {run['chunkers']} chunker / {run['embedders']} embedder | {run['docs_per_s']:.2f} | "
            f"{run['pages_per_s']:.1f} | {run['chunks_per_s']:.1f} | {run['latency_p50_s']:.2f} | "
            f"{run['latency_p95_s']:.2f} | {run['latency_p99_s']:.2f} | {run['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="?", type=Path, help="folder of PDF, text, Markdown, HTML files")
    parser.add_argument("--docs", type=int, default=50, help="documents to generate without a corpus")
    parser.add_argument("--pages", type=int, default=10, help="pages per generated document")
    parser.add_argument("--backend", default="hashing", choices=["hashing", "local"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scaling", action="store_true", help="also run 2 chunkers and 2 embedders")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="docflow-corpus-") as folder:
        if args.corpus:
            paths, corpus = corpus_files(args.corpus), str(args.corpus)
        else:
            paths = generated_corpus(Path(folder), args.docs, args.pages)
            corpus = f"generated: {args.docs} docs x {args.pages} pages (2/3 PDF, 1/3 text)"
        base = asyncio.run(baseline(paths, args.backend, args.batch_size))
        base.update(rates(base))
        layouts = [(1, 1), (2, 1), (1, 2), (2, 2)] if args.scaling else [(1, 1)]
        runs = []
        for chunkers, embedders in layouts:
            run = measure(paths, args.backend, chunkers, embedders, args.batch_size)
            run.update(rates(run), chunkers=chunkers, embedders=embedders)
            run["ratio"] = run["chunks_per_s"] / base["chunks_per_s"]
            runs.append(run)
    results = {"corpus": corpus, "backend": args.backend, "baseline": base, "pipeline": runs}
    table = markdown(results)
    print(table)
    save(RESULTS_DIR / f"e2e-{args.backend}.json", results)
    (RESULTS_DIR / f"e2e-{args.backend}.md").write_text(table)


if __name__ == "__main__":
    main()
