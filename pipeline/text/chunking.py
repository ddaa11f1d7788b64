"""Pages of text → chunks of at most ``chunk_size`` characters or tokens, each on one page.

Runs in the chunker's process pool (docs/architecture.md): top-level functions and frozen
dataclasses only, so everything crosses the process boundary by pickling.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

from pipeline.errors import ExtractionError, ModelFilesMissing
from pipeline.text.extract import extract_pages
from pipeline.text.tokens import count_tokens, load_tokenizer


@dataclass(frozen=True)
class ChunkText:
    index: int  # 0-based across the whole document
    page: int  # 1-based
    text: str


@dataclass(frozen=True)
class ChunkedDocument:
    pages: int
    chunks: tuple[ChunkText, ...]


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
) -> ChunkedDocument:
    """The whole CPU side of the chunker for one original: extract, then split."""
    # Sizes are checked before extracting: a bad request should not cost a PDF parse.
    _checked_sizes(chunk_size, chunk_overlap)
    _splitter(chunk_size, chunk_overlap, unit, tokenizer_path)
    pages = extract_pages(data, content_type, pdf_extractor)
    chunks = split_pages(pages, chunk_size, chunk_overlap, unit, tokenizer_path)
    if not chunks:
        raise ExtractionError("document has no text to chunk")
    return ChunkedDocument(pages=len(pages), chunks=chunks)


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
