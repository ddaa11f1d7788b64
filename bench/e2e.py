"""End-to-end throughput and latency of the pipeline against an in-process baseline.

    .venv/bin/python bench/e2e.py [CORPUS_DIR] [--docs 50] [--backend hashing|local] [--scaling]
    .venv/bin/python bench/e2e.py --profile bench/results/profile-hashing    # py-spy on every worker
    .venv/bin/python bench/e2e.py --url http://127.0.0.1:6066                 # a stack already running

Starts a local broker and worker processes (1 web, N chunker, M embedder), uploads the
corpus (default: generated 10-page documents, two PDFs in three, the rest text files)
after a warm-up pass, and measures documents/s, pages/s, chunks/s and the latency from
upload to `completed` (from the status table's own timestamps). In the same run it
extracts, splits and embeds the same corpus in this one process, and prints
pipeline/baseline. It also uploads one 10-page PDF at a time on the idle stack (the
latency a single user sees) and reports the CPU seconds each process spent during the
measured run: what the broker, each role and the benchmark's own client cost next to
the work itself. `--scaling` repeats the run with 1 and 2 processes of the chunker and of
the embedder. Writes bench/results/e2e-<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.cpu import CpuMeter
from bench.local_stack import LocalStack
from bench.report import RESULTS_DIR, save
from bench.worker_profiles import markdown as profile_markdown
from bench.worker_profiles import profiled, summarise
from pipeline.client import DocflowClient
from pipeline.embedding import create_backend
from pipeline.local import documents
from pipeline.settings import Settings
from pipeline.text.chunking import chunk_document
from pipeline.text.content_types import detect_content_type

CORPUS_SUFFIXES = (".pdf", ".txt", ".md", ".html")
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


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
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in CORPUS_SUFFIXES)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def baseline(paths: list[Path], backend_name: str, batch_size: int, precision: str) -> dict:
    """The same extractor, splitter and embedder, one document after another, in this process."""
    settings = Settings(
        embedding_backend=backend_name, embedding_batch_size=batch_size, local_model_precision=precision
    )
    backend = create_backend(settings)
    await backend.load()
    await backend.embed(["warm-up"])
    pages = chunks = 0
    started, started_cpu = time.perf_counter(), time.process_time()
    for path in paths:
        data = path.read_bytes()
        content_type = detect_content_type(path.name, None, data[:512])
        chunked = chunk_document(
            data, content_type, settings.chunk_size, settings.chunk_overlap, settings.pdf_extractor,
            settings.chunk_size_unit,
        )  # fmt: skip
        texts = [piece.text for piece in chunked.chunks]
        for start in range(0, len(texts), batch_size):
            await backend.embed(texts[start : start + batch_size])
        pages += chunked.pages
        chunks += len(texts)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    await backend.close()
    return {"seconds": elapsed, "cpu_seconds": cpu, "docs": len(paths), "pages": pages, "chunks": chunks}


async def run_pipeline(web_url: str, paths: list[Path], concurrency: int = 8) -> dict:
    """Upload every file (``concurrency`` at a time) and wait until all are completed."""
    company = f"bench-{time.time_ns()}"
    limit = asyncio.Semaphore(concurrency)

    async with DocflowClient(web_url, company, timeout=300) as client:

        async def upload(path: Path) -> str:
            async with limit:
                return (await client.upload(path))["document_id"]

        started_ms = time.time() * 1000
        document_ids = await asyncio.gather(*(upload(path) for path in paths))
        uploaded_ms = time.time() * 1000
        # One list request per round for all documents: polling each one would load the web
        # worker being measured with the benchmark's own requests.
        statuses = list((await client.wait_all(document_ids, timeout=1800, interval=0.1)).values())
    failed = [status for status in statuses if status["state"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} documents did not complete: {failed[0]}")
    finished_ms = max(status["completed_ms"] for status in statuses)
    latencies = [(status["completed_ms"] - status["uploaded_ms"]) / 1000 for status in statuses]
    return {
        "seconds": (finished_ms - started_ms) / 1000,
        # When each stage was done with the last document, from the start of the uploads.
        "phases_s": {
            "uploaded": (uploaded_ms - started_ms) / 1000,
            "extracting": (max(status["extracting_ms"] for status in statuses) - started_ms) / 1000,
            "chunked": (max(status["chunked_ms"] for status in statuses) - started_ms) / 1000,
            "completed": (finished_ms - started_ms) / 1000,
        },
        "docs": len(statuses),
        "pages": sum(status["pages"] for status in statuses),
        "chunks": sum(status["chunks_total"] for status in statuses),
        **latency_figures(latencies),
    }


def latency_figures(latencies: list[float]) -> dict:
    return {
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_p99_s": percentile(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies),
    }


async def single_document_latency(web_url: str, path: Path, runs: int) -> dict:
    """Upload one document at a time and wait for it: the latency of a single user on an idle stack."""
    latencies = []
    async with DocflowClient(web_url, f"latency-{time.time_ns()}", timeout=300) as client:
        for _ in range(runs):
            document_id = (await client.upload(path))["document_id"]
            status = await client.wait(document_id, timeout=300, interval=0.05)
            if status["state"] != "completed":
                raise RuntimeError(f"{path.name} did not complete: {status}")
            latencies.append((status["completed_ms"] - status["uploaded_ms"]) / 1000)
    return {"document": path.name, "pages": status["pages"], "runs": runs, **latency_figures(latencies)}


def rates(run: dict) -> dict:
    return {f"{unit}_per_s": run[unit] / run["seconds"] for unit in ("docs", "pages", "chunks")}


def measure(
    paths: list[Path],
    args: argparse.Namespace,
    chunkers: int,
    embedders: int,
    latency_document: Path | None,
    profile_dir: Path | None,
) -> dict:
    with LocalStack(args.backend, args.batch_size, precision=args.precision) as stack:
        stack.workers.launch({"web": 1, "chunker": chunkers, "embedder": embedders})
        # Warm-up: model loads, group joins, the extraction pool's start and the broker's JIT
        # stay out of the figures, as on a stack that has been running for a while.
        asyncio.run(run_pipeline(stack.web_url, paths[: args.warmup_docs]))
        processes = stack.processes()
        meter = CpuMeter({**processes, "benchmark client": os.getpid()})
        meter.start()
        if profile_dir:
            with profiled({name: pid for name, pid in processes.items() if name != "broker"}, profile_dir):
                run = asyncio.run(run_pipeline(stack.web_url, paths))
        else:
            run = asyncio.run(run_pipeline(stack.web_url, paths))
        run["cpu_seconds"] = meter.stop()
        if latency_document is not None:
            run["single_document"] = asyncio.run(
                single_document_latency(stack.web_url, latency_document, args.latency_runs)
            )
    return run


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
    first = results["pipeline"][0]
    if "single_document" in first:
        single = first["single_document"]
        lines += [
            "",
            f"One {single['pages']}-page PDF at a time on the idle stack ({single['runs']} uploads), upload to "
            f"completed: p50 {single['latency_p50_s']:.2f} s, p95 {single['latency_p95_s']:.2f} s.",
        ]
    lines += ["", cpu_markdown(results)]
    return "\n".join(lines) + "\n"


def cpu_markdown(results: dict) -> str:
    """CPU seconds by process during each measured run, when each stage finished, and the baseline's time."""
    runs = results["pipeline"]
    names = list(dict.fromkeys(name for run in runs for name in run["cpu_seconds"]))
    header = "| seconds | " + " | ".join(f"{r['chunkers']}c/{r['embedders']}e" for r in runs) + " |"
    lines = [header, "|---|" + "---:|" * len(runs)]
    for name in names:
        lines.append(f"| CPU: {name} | " + " | ".join(f"{r['cpu_seconds'].get(name, 0):.2f}" for r in runs) + " |")
    if names:
        lines.append(
            "| CPU: all processes | " + " | ".join(f"{sum(r['cpu_seconds'].values()):.2f}" for r in runs) + " |"
        )
    for phase, label in (
        ("uploaded", "wall: every upload answered"),
        ("chunked", "wall: last document chunked"),
        ("completed", "wall: last document completed"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{r['phases_s'][phase]:.2f}" for r in runs) + " |")
    base = results["baseline"]
    lines.append(f"| baseline: CPU, wall | {base['cpu_seconds']:.2f}, {base['seconds']:.2f} |" + " |" * (len(runs) - 1))
    first = runs[0]
    if first["cpu_seconds"]:
        spent = sum(first["cpu_seconds"].values())
        cpus = os.cpu_count() or 1
        lines += [
            "",
            f"Where the time went: the {first['chunkers']} chunker / {first['embedders']} embedder pipeline "
            f"spent {spent:.2f} CPU seconds on what the baseline did in {base['seconds']:.2f} s "
            f"({base['cpu_seconds']:.2f} CPU seconds); with {cpus} CPUs it cannot do better than "
            f"{cpus * base['seconds'] / spent:.2f} of the baseline's throughput (it reached {first['ratio']:.2f}).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="?", type=Path, help="folder of PDF, text, Markdown, HTML files")
    parser.add_argument("--docs", type=int, default=50, help="documents to generate without a corpus (50)")
    parser.add_argument("--pages", type=int, default=10, help="pages per generated document (10)")
    parser.add_argument("--backend", default="hashing", choices=["hashing", "local"])
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "int8"], help="DOCFLOW_LOCAL_MODEL_PRECISION of the runs"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Settings.model_fields["embedding_batch_size"].default,
        help="chunks per embedding batch, in the pipeline and the baseline alike",
    )
    parser.add_argument("--warmup-docs", type=int, default=20, help="documents uploaded before measuring (20)")
    parser.add_argument(
        "--latency-runs", type=int, default=20, help="single 10-page PDF uploads for the idle latency, 0 skips (20)"
    )
    parser.add_argument("--scaling", action="store_true", help="also run 2 chunkers and 2 embedders")
    parser.add_argument("--profile", type=Path, help="folder for py-spy profiles of every worker of the first run")
    parser.add_argument("--url", help="measure a stack already running at this web URL (no CPU figures, no scaling)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="docflow-corpus-") as folder:
        latency_document = Path(folder) / "ten-pages.pdf"
        latency_document.write_bytes(documents.make_pdf(documents.lorem_pages(10, 350, seed=10_000)))
        if args.corpus:
            paths, corpus = corpus_files(args.corpus), str(args.corpus)
        else:
            paths = generated_corpus(Path(folder), args.docs, args.pages)
            corpus = f"generated: {args.docs} docs x {args.pages} pages (2/3 PDF, 1/3 text)"
        base = asyncio.run(baseline(paths, args.backend, args.batch_size, args.precision))
        base.update(rates(base))
        runs = []
        if args.url:
            asyncio.run(run_pipeline(args.url, paths[: args.warmup_docs]))
            run = asyncio.run(run_pipeline(args.url, paths))
            run.update(chunkers="?", embedders="?", cpu_seconds={})
            if args.latency_runs:
                run["single_document"] = asyncio.run(
                    single_document_latency(args.url, latency_document, args.latency_runs)
                )
            runs.append(run)
        else:
            for n, (chunkers, embedders) in enumerate(LAYOUTS if args.scaling else LAYOUTS[:1]):
                # The idle latency and the profile are of the first layout only.
                run = measure(
                    paths,
                    args,
                    chunkers,
                    embedders,
                    latency_document if n == 0 and args.latency_runs else None,
                    args.profile if n == 0 else None,
                )
                run.update(chunkers=chunkers, embedders=embedders)
                runs.append(run)
        for run in runs:
            run.update(rates(run))
            run["ratio"] = run["chunks_per_s"] / base["chunks_per_s"]
    name = f"{args.backend}-int8" if args.backend == "local" and args.precision == "int8" else args.backend
    results = {"corpus": corpus, "backend": name, "batch_size": args.batch_size, "baseline": base, "pipeline": runs}
    table = markdown(results)
    print(table)
    save(RESULTS_DIR / f"e2e-{name}.json", results, table)
    if args.profile and not args.url:
        summaries = {path.stem: summarise(path) for path in sorted(args.profile.glob("*.folded"))}
        text = profile_markdown(summaries)
        (args.profile / "summary.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
