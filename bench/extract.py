"""PDF text extraction speed: pypdfium2 against pypdf on the same files.

    .venv/bin/python bench/extract.py                  # 20 generated PDFs of 10 pages
    .venv/bin/python bench/extract.py --docs 50 --pages 30
    .venv/bin/python bench/extract.py path/to/pdfs     # every *.pdf under a folder

Prints a Markdown table (pages/s, characters extracted, pdfium/pypdf ratio) and writes
the same numbers to bench/results/extract.json. Generated PDFs are simple (one font,
plain text lines), so real-world corpora are the better guide to the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import RESULTS_DIR, save
from pipeline.errors import ExtractionError
from pipeline.local.documents import lorem_pages, make_pdf
from pipeline.text.extract import extract_pdf_with_pdfium, extract_pdf_with_pypdf

EXTRACTORS = {"pdfium": extract_pdf_with_pdfium, "pypdf": extract_pdf_with_pypdf}
RESULTS_PATH = RESULTS_DIR / "extract.json"


def generate_corpus(folder: Path, docs: int, pages: int, words_per_page: int) -> list[Path]:
    paths = []
    for number in range(docs):
        path = folder / f"generated-{number:03d}.pdf"
        path.write_bytes(make_pdf(lorem_pages(pages, words_per_page, seed=number)))
        paths.append(path)
    return paths


def readable_by_both(files: dict[Path, bytes]) -> tuple[dict[Path, bytes], dict[str, str]]:
    """Only files both extractors read are timed, so both work on exactly the same pages."""
    kept, skipped = {}, {}
    for path, data in files.items():
        try:
            for extract in EXTRACTORS.values():
                extract(data)
        except ExtractionError as exc:
            skipped[path.name] = str(exc)
        else:
            kept[path] = data
    return kept, skipped


def measure(extract, files: dict[Path, bytes], repeat: int) -> dict:
    """Best of `repeat` passes over all files: the least disturbed by the rest of the machine."""
    best = float("inf")
    pages = chars = 0
    for _ in range(repeat):
        started = time.perf_counter()
        pages = chars = 0
        for data in files.values():
            extracted = extract(data)
            pages += len(extracted)
            chars += sum(len(page) for page in extracted)
        best = min(best, time.perf_counter() - started)
    return {
        "files": len(files),
        "pages": pages,
        "chars": chars,
        "seconds": round(best, 4),
        "pages_per_s": round(pages / best, 1) if best else None,
    }


def markdown_table(results: dict[str, dict], ratio: float | None) -> str:
    lines = ["| extractor | files | pages | seconds | pages/s | chars |", "|---|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['files']} | {result['pages']} | {result['seconds']:.3f} "
            f"| {result['pages_per_s']:,.1f} | {result['chars']:,} |"
        )
    lines.append(f"\npdfium/pypdf pages/s ratio: {ratio:.1f}x" if ratio else "\npdfium/pypdf ratio: n/a")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="?", type=Path, help="folder of PDFs (default: generate a corpus)")
    parser.add_argument("--docs", type=int, default=20, help="generated documents (default 20)")
    parser.add_argument("--pages", type=int, default=10, help="pages per generated document (default 10)")
    parser.add_argument("--words", type=int, default=350, help="words per generated page (default 350)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per extractor, best kept (default 3)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help=f"JSON results (default {RESULTS_PATH})")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="docflow-bench-") as scratch:
        if args.corpus is None:
            paths = generate_corpus(Path(scratch), args.docs, args.pages, args.words)
            corpus = f"generated: {args.docs} docs x {args.pages} pages x {args.words} words"
        else:
            paths = sorted(path for path in args.corpus.rglob("*") if path.suffix.lower() == ".pdf")
            corpus = str(args.corpus)
        if not paths:
            print(f"no PDFs in {args.corpus}", file=sys.stderr)
            return 1
        files, skipped = readable_by_both({path: path.read_bytes() for path in paths})

    if not files:
        print(f"no PDF both extractors can read; skipped: {skipped}", file=sys.stderr)
        return 1
    results = {name: measure(extract, files, args.repeat) for name, extract in EXTRACTORS.items()}
    pdfium_rate, pypdf_rate = results["pdfium"]["pages_per_s"], results["pypdf"]["pages_per_s"]
    ratio = pdfium_rate / pypdf_rate if pdfium_rate and pypdf_rate else None

    print(f"corpus: {corpus} ({sum(len(data) for data in files.values()):,} bytes)")
    if skipped:
        print(f"skipped (not readable by both): {len(skipped)}")
    table = markdown_table(results, ratio)
    print(table)

    save(
        args.output,
        {
            "corpus": corpus,
            "bytes": sum(len(data) for data in files.values()),
            "skipped": skipped,
            "repeat": args.repeat,
            "results": results,
            "pdfium_over_pypdf_pages_per_s": round(ratio, 2) if ratio else None,
        },
        f"corpus: {corpus}\n\n{table}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
