"""Pages of text → chunks of at most ``chunk_size`` characters or tokens, each on one page.

Runs in the chunker's process pool (docs/architecture.md): top-level functions and frozen
dataclasses only, so everything crosses the process boundary by pickling. The pool starts
each process with :func:`start_process`, so a document that needs more memory than
``extraction_memory_mb`` fails on its own instead of taking the worker's host down with it.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

from pipeline.errors import ExtractionError, ExtractionLimitExceeded, ModelFilesMissing
from pipeline.text.extract import extract_pages, extract_pdf_pages
from pipeline.text.ocr import OcrOptions, ocr_pages
from pipeline.text.tokens import count_tokens, load_tokenizer

# The address-space limit of this process in MB, once start_process set one (0: none).
_memory_limit_mb = 0


def start_process(memory_mb: int | None = None) -> None:
    """Initializer of an extraction pool process: cap its address space at ``memory_mb`` (None: no cap).

    Past the cap an allocation fails: Python raises MemoryError (reported as the document
    needing more than ``memory_mb`` MB), and a native parser that cannot cope (pdfium)
    aborts its process, which the pool replaces. The extraction libraries are imported
    here, under the cap, so that no document's time pays for them.
    """
    global _memory_limit_mb
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        _memory_limit_mb = limit // (1024 * 1024)
        # A parser aborting on a hostile document must not leave a core file behind.
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    import charset_normalizer  # noqa: F401
    import docx  # noqa: F401
    import pptx  # noqa: F401
    import pypdf  # noqa: F401
    import pypdfium2  # noqa: F401
    import trafilatura  # noqa: F401


def process_ready(pause: float = 0.0) -> int:
    """This process's id, after ``pause`` seconds: the pool runs it until every new process has answered,
    so that starting one is never counted in a document's time."""
    if pause:
        time.sleep(pause)
    return os.getpid()


def memory_reason(memory_mb: int | None = None) -> str:
    """What a user reads about a document that ran out of its extraction process's memory."""
    memory_mb = memory_mb or _memory_limit_mb
    if memory_mb:
        return f"document needs more than {memory_mb} MB of memory to extract"
    return "document needs more memory to extract than there is"


@dataclass(frozen=True)
class ChunkText:
    index: int  # 0-based across the whole document
    page: int  # 1-based
    text: str


@dataclass(frozen=True)
class ChunkedDocument:
    pages: int
    chunks: tuple[ChunkText, ...]
    pages_ocred: int = 0  # pages whose text the OCR read (pipeline/text/ocr.py)
    pages_unreadable: int = 0  # pages without a text layer the OCR got no text from


def split_pages(
    pages: list[str], chunk_size: int, chunk_overlap: int, unit: str = "chars", tokenizer_path: str = ""
) -> tuple[ChunkText, ...]:
    """Splits every page on its own, so no chunk spans two pages and each knows its page.

    ``unit`` says what the sizes count: characters, or the local model's word pieces
    ([CLS] and [SEP] included), so that a chunk of ``chunk_size`` tokens is read whole.
    """
    splitter = _splitter(*_checked_sizes(chunk_size, chunk_overlap), unit, tokenizer_path)
    chunks: list[ChunkText] = []
    for page_number, text in enumerate(pages, start=1):
        if not text.strip():
            continue
        for piece in splitter.split_text(text):
            if piece.strip():
                chunks.append(ChunkText(index=len(chunks), page=page_number, text=piece))
    return tuple(chunks)


def chunk_document(
    data: bytes,
    content_type: str,
    chunk_size: int,
    chunk_overlap: int,
    pdf_extractor: str = "pdfium",
    unit: str = "chars",
    tokenizer_path: str = "",
    max_pages: int | None = None,
    ocr: OcrOptions | None = None,
) -> ChunkedDocument:
    """The whole CPU side of the chunker for one original: extract, then split.

    ``max_pages`` (None: no limit) refuses a PDF declaring more pages before any is read.
    ``ocr`` (None: off) OCRs the pages of a PDF that have too little text (pipeline/text/ocr.py).
    """
    # Sizes are checked before extracting: a bad request should not cost a PDF parse.
    _checked_sizes(chunk_size, chunk_overlap)
    _splitter(chunk_size, chunk_overlap, unit, tokenizer_path)
    ocred = unreadable = 0
    try:
        if ocr is not None and ocr.enabled and content_type == "application/pdf":
            result = ocr_pages(data, extract_pdf_pages(data, pdf_extractor, max_pages), ocr)
            pages, ocred, unreadable = list(result.pages), result.pages_ocred, result.pages_unreadable
            if not any(page.strip() for page in pages):
                raise ExtractionError(f"document has no extractable text; {ocred} pages OCRed, {unreadable} unreadable")
        else:
            pages = extract_pages(data, content_type, pdf_extractor, max_pages)
        chunks = split_pages(pages, chunk_size, chunk_overlap, unit, tokenizer_path)
    except MemoryError:
        # Whatever was allocated is garbage now; the process goes on with the next document.
        raise ExtractionLimitExceeded(memory_reason()) from None
    if not chunks:
        raise ExtractionError("document has no text to chunk")
    return ChunkedDocument(pages=len(pages), chunks=chunks, pages_ocred=ocred, pages_unreadable=unreadable)


def _checked_sizes(chunk_size: int, chunk_overlap: int) -> tuple[int, int]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(
            f"chunk_overlap must be at least 0 and less than chunk_size ({chunk_size}), got {chunk_overlap}"
        )
    return chunk_size, chunk_overlap


@functools.lru_cache(maxsize=64)
def _splitter(chunk_size: int, chunk_overlap: int, unit: str, tokenizer_path: str) -> RecursiveCharacterTextSplitter:
    # Sizes are per document, but a deployment uses few distinct ones; a splitter is
    # stateless between calls, so one instance per pair serves every document.
    if unit == "chars":
        length = len
    elif unit == "tokens":
        try:
            load_tokenizer(tokenizer_path, None)
        except ModelFilesMissing as exc:
            raise ExtractionError(f"chunk sizes in tokens need the local model's tokenizer: {exc}") from None
        length = functools.partial(count_tokens, tokenizer_path=tokenizer_path)
    else:
        raise ValueError(f"chunk_size_unit must be tokens or chars, got {unit!r}")
    return RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, length_function=length)
