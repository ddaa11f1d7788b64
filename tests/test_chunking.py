"""Extraction and chunking as the chunker agent uses them: bytes in, page-numbered chunks out."""

from __future__ import annotations

import multiprocessing
import pickle
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from pipeline.errors import EncryptedPDFError, ExtractionError, ExtractionLimitExceeded
from pipeline.ids import chunk_id
from pipeline.local.documents import (
    corrupt_pdf,
    lorem_pages,
    make_encrypted_pdf,
    make_html,
    make_image_only_pdf,
    make_markdown,
    make_pdf,
)
from pipeline.text.chunking import ChunkedDocument, ChunkText, chunk_document, split_pages
from pipeline.text.content_types import DOCX, PPTX, SUPPORTED_CONTENT_TYPES, detect_content_type
from pipeline.text.extract import extract_pages, extract_pdf_with_pdfium, extract_pdf_with_pypdf

PDF = "application/pdf"


def words(text: str) -> list[str]:
    return text.split()


# --- PDF extraction -----------------------------------------------------------------------


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_generated_pdf_gives_back_every_word_page_by_page(extractor):
    pages = lorem_pages(3, 250, seed=1)

    extracted = extract_pages(make_pdf(pages), PDF, pdf_extractor=extractor)

    assert [words(page) for page in extracted] == [words(page) for page in pages]


def test_pdfium_and_pypdf_extract_the_same_words():
    data = make_pdf(lorem_pages(4, 300, seed=2) + ["Parens (like this) and back\\slashes survive."])

    assert [words(p) for p in extract_pages(data, PDF, "pdfium")] == [
        words(p) for p in extract_pages(data, PDF, "pypdf")
    ]


def test_multi_page_pdf_chunks_carry_their_page_numbers():
    pages = [f"Page {n} marker{n} " + text for n, text in enumerate(lorem_pages(3, 200, seed=3), start=1)]

    chunked = chunk_document(make_pdf(pages), PDF, chunk_size=300, chunk_overlap=50)

    assert chunked.pages == 3
    assert [chunk.index for chunk in chunked.chunks] == list(range(len(chunked.chunks)))
    assert {chunk.page for chunk in chunked.chunks} == {1, 2, 3}
    for chunk in chunked.chunks:
        assert all(word in words(pages[chunk.page - 1]) for word in words(chunk.text))
    first_of_page = {chunk.page: chunk for chunk in reversed(chunked.chunks)}
    assert all(first_of_page[n].text.startswith(f"Page {n} marker{n}") for n in (1, 2, 3))


def test_page_without_text_keeps_later_page_numbers_right():
    chunked = chunk_document(make_pdf(["First page.", "", "Third page."]), PDF, chunk_size=100, chunk_overlap=0)

    assert chunked.pages == 3
    assert [(chunk.page, chunk.text) for chunk in chunked.chunks] == [(1, "First page."), (3, "Third page.")]


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_encrypted_pdf_fails_with_readable_reason(extractor):
    with pytest.raises(EncryptedPDFError, match="^PDF is encrypted"):
        extract_pages(make_encrypted_pdf(), PDF, pdf_extractor=extractor)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_pdf_protected_only_by_an_owner_password_opens(extractor):
    data = make_encrypted_pdf(["Readable without a password."], user_password="")

    assert extract_pages(data, PDF, pdf_extractor=extractor) == ["Readable without a password."]


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_corrupt_pdf_fails_with_readable_reason(extractor):
    with pytest.raises(ExtractionError, match="^file is not a valid PDF: .+"):
        extract_pages(corrupt_pdf(), PDF, pdf_extractor=extractor)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
@pytest.mark.parametrize(
    "data", [b"PK\x03\x04" + bytes(200), b"just some words", b"%PDF-"], ids=["zip", "text", "magic-only"]
)
def test_bytes_that_are_no_pdf_fail_as_invalid_pdf(extractor, data):
    with pytest.raises(ExtractionError, match="^file is not a valid PDF"):
        extract_pages(data, PDF, pdf_extractor=extractor)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_truncated_pdfs_never_leak_parser_exceptions(extractor):
    data = make_pdf(lorem_pages(4, 200, seed=4))

    for cut in range(0, len(data), max(1, len(data) // 40)):
        try:
            pages = extract_pages(data[:cut], PDF, pdf_extractor=extractor)
        except ExtractionError as exc:
            assert str(exc)
        else:
            assert any(page.strip() for page in pages)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_damaged_pdfs_never_leak_parser_exceptions(extractor):
    data = make_pdf(lorem_pages(3, 150, seed=8))
    rng = random.Random(99)

    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            extract_pages(bytes(damaged), PDF, pdf_extractor=extractor)
        except ExtractionError as exc:
            assert str(exc)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_image_only_pdf_fails_with_no_text_reason(extractor):
    with pytest.raises(ExtractionError, match="no extractable text"):
        extract_pages(make_image_only_pdf(), PDF, pdf_extractor=extractor)


def test_pdf_rejected_by_pdfium_falls_back_to_pypdf():
    # A PDF behind a 2 KiB preamble (a mail or HTTP envelope saved with it): pdfium looks
    # for the header in the first 1024 bytes only, pypdf searches the whole file.
    data = b"X-Envelope: saved with its transport headers\n" * 50 + make_pdf(["Found by the fallback."])
    with pytest.raises(ExtractionError):
        extract_pdf_with_pdfium(data)

    assert extract_pages(data, PDF, pdf_extractor="pdfium") == ["Found by the fallback."]


def _pypdf_rejects(data: bytes, max_pages: int | None = None) -> list[str]:
    raise ExtractionError("file is not a valid PDF: pypdf's reason")


def _pypdf_finds_nothing(data: bytes, max_pages: int | None = None) -> list[str]:
    return [""]


@pytest.mark.parametrize("pypdf_outcome", [_pypdf_rejects, _pypdf_finds_nothing], ids=["rejects", "finds-nothing"])
def test_pdf_pdfium_rejects_and_pypdf_cannot_read_reports_pdfiums_reason(monkeypatch, pypdf_outcome):
    import pipeline.text.extract as extract

    monkeypatch.setattr(extract, "extract_pdf_with_pypdf", pypdf_outcome)

    with pytest.raises(ExtractionError, match="^file is not a valid PDF: data format error$"):
        extract_pages(corrupt_pdf(), PDF, pdf_extractor="pdfium")


def test_encrypted_pdf_is_not_handed_to_the_fallback(monkeypatch):
    import pipeline.text.extract as extract

    def must_not_run(data: bytes, max_pages: int | None = None) -> list[str]:
        raise AssertionError("pypdf ran for a PDF pdfium found encrypted")

    monkeypatch.setattr(extract, "extract_pdf_with_pypdf", must_not_run)

    with pytest.raises(EncryptedPDFError):
        extract_pages(make_encrypted_pdf(), PDF, pdf_extractor="pdfium")


def test_pypdf_extractor_does_not_touch_pdfium(monkeypatch):
    import pipeline.text.extract as extract

    def must_not_run(data: bytes, max_pages: int | None = None) -> list[str]:
        raise AssertionError("pdfium ran although pypdf was selected")

    monkeypatch.setattr(extract, "extract_pdf_with_pdfium", must_not_run)

    assert extract_pages(make_pdf(["Only pypdf."]), PDF, pdf_extractor="pypdf") == ["Only pypdf."]


def test_pdfium_documents_are_closed_even_when_a_page_fails(monkeypatch):
    import pypdfium2

    closed = []
    original_close = pypdfium2.PdfDocument.close

    def counting_close(self):
        closed.append(self)
        return original_close(self)

    monkeypatch.setattr(pypdfium2.PdfDocument, "close", counting_close)
    extract_pdf_with_pdfium(make_pdf(["one", "two", "three"]))
    assert len(closed) == 1

    def broken_textpage(self):
        raise pypdfium2.PdfiumError("Failed to load text page.")

    monkeypatch.setattr(pypdfium2.PdfPage, "get_textpage", broken_textpage)
    with pytest.raises(ExtractionError, match="^file is not a valid PDF: Failed to load text page.$"):
        extract_pdf_with_pdfium(make_pdf(["one"]))
    assert len(closed) == 2


def test_unknown_pdf_extractor_is_refused():
    with pytest.raises(ValueError, match="unknown PDF extractor"):
        extract_pages(make_pdf(["x"]), PDF, pdf_extractor="tesseract")


def test_both_extractors_are_reachable_directly():
    data = make_pdf(["Direct."])

    assert extract_pdf_with_pdfium(data) == extract_pdf_with_pypdf(data) == ["Direct."]


# --- text, Markdown, HTML -----------------------------------------------------------------


def test_html_drops_scripts_and_keeps_text():
    data = make_html("Quarterly <Report>", ["Revenue grew & costs fell.", "Outlook: stable."])

    [text] = extract_pages(data, "text/html")

    # trafilatura's text: a block a line, no blank line between paragraphs
    assert text == "Quarterly <Report>\nRevenue grew & costs fell.\nOutlook: stable."
    for hidden in ("SCRIPT-TEXT", "STYLE-TEXT", "NOSCRIPT-TEXT", "trackingId"):
        assert hidden not in text


def test_html_keeps_block_structure_and_inline_flow():
    data = (
        b"<body><div>Hello <b>bold</b> <i>world</i>!<br>next line</div>\n\n\n"
        b"<ul>\n  <li>one</li>\n  <li>two</li>\n</ul><!-- a comment -->"
        b"<table><tr><td>a</td> <td>b</td></tr></table><pre>  keep\n    indent</pre></body>"
    )

    [text] = extract_pages(data, "text/html")

    # trafilatura's text: list items marked "- ", table rows between "|", a block a line
    assert text == "Hello bold world!\nnext line\n- one\n- two\n| a | b |\n  keep\n    indent"


def test_html_honours_a_declared_charset():
    data = '<meta charset="windows-1251"><p>Привет, мир</p>'.encode("windows-1251")

    assert extract_pages(data, "text/html") == ["Привет, мир"]


def test_deeply_nested_html_does_not_hit_the_recursion_limit():
    data = b"<div>" * 2000 + b"deep text" + b"</div>" * 2000

    assert extract_pages(data, "text/html") == ["deep text"]


def test_html_nested_deeper_than_libxml2_reads_fails_as_a_limit():
    # libxml2 (under lxml and trafilatura) stops at 2048 levels; the page fails rather than losing text
    data = b"<div>" * 5000 + b"deep text" + b"</div>" * 5000

    with pytest.raises(ExtractionLimitExceeded, match="^HTML is nested too deeply to read"):
        extract_pages(data, "text/html")


def test_html_with_only_markup_has_no_text():
    with pytest.raises(ExtractionError, match="no text"):
        extract_pages(b"<html><head><title>t</title></head><body><script>x()</script> </body></html>", "text/html")


@pytest.mark.parametrize(
    "data, expected",
    [
        ("\ufeffcafé with a BOM".encode("utf-8"), "café with a BOM"),
        ("utf-16 café".encode("utf-16"), "utf-16 café"),
        ("“Windows” quotes – café".encode("cp1252"), "“Windows” quotes – café"),
        (b"line one\r\nline two\x00", "line one\nline two"),
    ],
    ids=["utf8-bom", "utf16", "cp1252", "crlf-and-nul"],
)
def test_text_is_decoded_whatever_its_encoding(data, expected):
    assert extract_pages(data, "text/plain") == [expected]


def test_markdown_is_one_page_of_its_text():
    data = make_markdown("Title", ["First paragraph.", "Second paragraph."])

    assert extract_pages(data, "text/markdown") == ["# Title\n\nFirst paragraph.\n\nSecond paragraph.\n"]


def test_empty_file_fails_as_empty():
    with pytest.raises(ExtractionError, match="^file is empty$"):
        extract_pages(b"", "text/plain")


def test_whitespace_only_text_has_no_text():
    with pytest.raises(ExtractionError, match="^document has no text$"):
        chunk_document(b" \n\t\r\n ", "text/markdown", chunk_size=100, chunk_overlap=0)


# --- content type detection ---------------------------------------------------------------


@pytest.mark.parametrize(
    "filename, declared, head, expected",
    [
        ("report.pdf", "application/pdf", b"%PDF-1.7", PDF),
        ("report.PDF", "application/octet-stream", b"%PDF-1.4", PDF),
        ("report", "application/pdf; name=report", b"%PDF-1.4", PDF),
        ("upload.bin", None, b"%PDF-1.4", PDF),
        ("broken.pdf", None, b"not a pdf at all", PDF),
        ("notes.txt", None, b"hello", "text/plain"),
        ("notes", "text/plain; charset=utf-8", b"hello", "text/plain"),
        ("README.md", "text/plain", b"# Title", "text/markdown"),
        ("notes.markdown", "", b"# Title", "text/markdown"),
        ("page.htm", "application/octet-stream", b"<html>", "text/html"),
        ("page", "application/xhtml+xml", b"<html>", "text/html"),
        # a ZIP whose head does not show what it holds goes by its name or declared type
        ("letter.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", b"PK\x03\x04", DOCX),
        ("letter.docx", "text/plain", b"PK\x03\x04\x14\x00\x06\x00", DOCX),
        ("deck.pptx", "application/octet-stream", b"PK\x03\x04\x14\x00\x06\x00", PPTX),
    ],
)
def test_supported_type_is_detected(filename, declared, head, expected):
    assert detect_content_type(filename, declared, head) == expected
    assert expected in SUPPORTED_CONTENT_TYPES


@pytest.mark.parametrize(
    "filename, declared, head",
    [
        ("scan.png", "image/png", b"\x89PNG\r\n\x1a\n"),
        ("archive.zip", "application/zip", b"PK\x03\x04"),
        ("book.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", b"PK\x03\x04"),
        ("letter.doc", "application/msword", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),
        ("blob", "application/octet-stream", b"\x00\x01\x02"),
        ("blob", None, b"some text"),
    ],
)
def test_unsupported_type_is_detected(filename, declared, head):
    assert detect_content_type(filename, declared, head) is None


# --- splitting ----------------------------------------------------------------------------


def test_chunk_ids_are_deterministic():
    assert chunk_id("doc-1", 0) == chunk_id("doc-1", 0)
    assert len({chunk_id("doc-1", 0), chunk_id("doc-1", 1), chunk_id("doc-2", 0)}) == 3
    # Pinned: a changed namespace would give redelivered documents new ids and duplicate their chunks.
    assert chunk_id("doc-1", 0) == "2188bae5-23f2-5ec2-8bd1-00fe3221a10d"


@pytest.mark.parametrize("chunk_size, chunk_overlap", [(200, 50), (1000, 200), (120, 40), (300, 0), (40, 39)])
def test_chunks_respect_size_and_overlap(chunk_size, chunk_overlap):
    # One paragraph per page, so the splitter works at word level where overlap applies.
    pages = [page.replace("\n\n", " ") for page in lorem_pages(3, 400, seed=5)]

    chunks = split_pages(pages, chunk_size, chunk_overlap)

    assert all(0 < len(chunk.text) <= chunk_size for chunk in chunks)
    for page_number, page in enumerate(pages, start=1):
        on_page = [chunk.text for chunk in chunks if chunk.page == page_number]
        # Every chunk is a piece of its page; consecutive pieces overlap by at most
        # chunk_overlap, and nothing but whitespace falls between them.
        previous_end = 0
        start = -1
        for text in on_page:
            start = page.find(text, start + 1)
            assert start >= 0
            assert previous_end - start <= chunk_overlap
            assert page[previous_end:start].strip() == ""
            if chunk_overlap and previous_end:
                assert start < previous_end, "consecutive chunks of one paragraph should overlap"
            previous_end = start + len(text)
        assert page[previous_end:].strip() == ""


def test_chunks_never_cross_pages_and_indexes_run_on():
    pages = ["alpha " * 30, "   ", "beta " * 30]

    chunks = split_pages(pages, chunk_size=50, chunk_overlap=10)

    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert {chunk.page for chunk in chunks} == {1, 3}
    assert all(set(words(chunk.text)) == ({"alpha"} if chunk.page == 1 else {"beta"}) for chunk in chunks)


@pytest.mark.parametrize("chunk_size, chunk_overlap", [(0, 0), (-5, 0), (100, 100), (100, 150), (100, -1)])
def test_invalid_sizes_are_refused_with_a_clear_message(chunk_size, chunk_overlap):
    with pytest.raises(ValueError, match="chunk_size|chunk_overlap"):
        split_pages(["text"], chunk_size, chunk_overlap)
    with pytest.raises(ValueError, match="chunk_size|chunk_overlap"):
        chunk_document(b"text", "text/plain", chunk_size, chunk_overlap)


def test_chunk_document_returns_picklable_frozen_results():
    chunked = chunk_document(make_markdown("T", ["one two three"]), "text/markdown", chunk_size=100, chunk_overlap=0)

    assert chunked == ChunkedDocument(pages=1, chunks=(ChunkText(index=0, page=1, text="# T\n\none two three"),))
    assert pickle.loads(pickle.dumps(chunked)) == chunked
    with pytest.raises(AttributeError):
        chunked.chunks[0].text = "changed"  # type: ignore[misc]


def test_chunk_document_runs_in_a_process_pool():
    pdf = make_pdf(lorem_pages(2, 300, seed=6))
    local = chunk_document(pdf, PDF, 500, 100)

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        in_pool = pool.submit(chunk_document, pdf, PDF, 500, 100).result(timeout=120)
        failure = pool.submit(chunk_document, make_encrypted_pdf(), PDF, 500, 100).exception(timeout=120)

    assert in_pool == local
    assert in_pool.pages == 2 and len(in_pool.chunks) > 2
    # the reason comes back across the process boundary as the exception the agent catches
    assert isinstance(failure, EncryptedPDFError)
    assert str(failure).startswith("PDF is encrypted")


def test_chunks_sized_in_tokens_fit_the_local_model_whole():
    from pipeline.text.tokens import MAX_TOKENS, load_tokenizer

    def read_by_model(text: str) -> int:  # [CLS] and [SEP] included, as the model reads it
        return len(load_tokenizer("", None).encode(text).ids)

    pages = lorem_pages(n_pages=3, words_per_page=900, seed=11)
    chunks = split_pages(pages, 250, 30, unit="tokens")
    assert len(chunks) > 6
    assert max(read_by_model(chunk.text) for chunk in chunks) <= MAX_TOKENS
    # Counted in characters, the same text makes chunks the model would cut.
    assert max(read_by_model(chunk.text) for chunk in split_pages(pages, 1500, 200)) > MAX_TOKENS


def test_chunk_document_takes_its_unit_through_the_process_pool():
    data = make_pdf(lorem_pages(n_pages=2, words_per_page=400, seed=5))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        chunked = pool.submit(chunk_document, data, "application/pdf", 128, 16, "pdfium", "tokens").result()
    assert chunked == chunk_document(data, "application/pdf", 128, 16, "pdfium", "tokens")
    assert chunked.chunks and all(chunk.page in (1, 2) for chunk in chunked.chunks)


def test_an_unknown_size_unit_is_refused_before_extracting():
    with pytest.raises(ValueError, match="tokens or chars"):
        chunk_document(b"not even parsed", "application/pdf", 100, 10, "pdfium", "lines")


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_a_pdf_with_more_pages_than_allowed_fails_before_any_page_is_read(monkeypatch, extractor):
    import pypdf

    from pipeline.text import extract

    def never(*args, **kwargs):
        raise AssertionError("a page was read")

    monkeypatch.setattr(extract, "_pdfium_page_text", never)
    monkeypatch.setattr(pypdf.PageObject, "extract_text", never)
    pdf = make_pdf(lorem_pages(3, 20, seed=21))

    with pytest.raises(ExtractionLimitExceeded, match="PDF has 3 pages, more than the 2 a document may have"):
        extract_pages(pdf, PDF, extractor, max_pages=2)
    with pytest.raises(ExtractionLimitExceeded, match="3 pages"):
        chunk_document(pdf, PDF, 500, 50, extractor, max_pages=2)


@pytest.mark.parametrize("extractor", ["pdfium", "pypdf"])
def test_a_pdf_at_the_page_limit_is_read_whole(extractor):
    pages = lorem_pages(3, 20, seed=22)
    assert [words(page) for page in extract_pages(make_pdf(pages), PDF, extractor, max_pages=3)] == [
        words(page) for page in pages
    ]


def test_the_page_limit_is_not_handed_to_the_fallback_extractor(monkeypatch):
    from pipeline.text import extract

    def fallback(data, max_pages=None):
        raise AssertionError("pypdf was tried after the page limit")

    monkeypatch.setattr(extract, "extract_pdf_with_pypdf", fallback)
    with pytest.raises(ExtractionLimitExceeded):
        extract_pages(make_pdf(lorem_pages(3, 20, seed=23)), PDF, "pdfium", max_pages=1)


def test_the_page_limit_leaves_text_documents_alone():
    assert extract_pages(b"one page of words", "text/plain", max_pages=1) == ["one page of words"]


def test_running_out_of_memory_fails_the_document_with_the_limit(monkeypatch):
    from pipeline.text import chunking

    def greedy(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(chunking, "extract_pages", greedy)
    monkeypatch.setattr(chunking, "_memory_limit_mb", 640)
    with pytest.raises(ExtractionLimitExceeded, match="^document needs more than 640 MB of memory to extract$"):
        chunk_document(b"text", "text/plain", 100, 10)


def test_memory_errors_are_not_reported_as_invalid_pdfs(monkeypatch):
    import pypdf

    from pipeline.text import extract

    def greedy(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(pypdf.PageObject, "extract_text", greedy)
    monkeypatch.setattr(extract, "_pdfium_page_text", greedy)
    for extractor in ("pdfium", "pypdf"):
        with pytest.raises(MemoryError):
            extract_pages(make_pdf(["words"]), PDF, extractor)
