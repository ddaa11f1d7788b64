"""OCR of PDF pages without a text layer (pipeline/text/ocr.py): the local engine, a vision model's
chat API (the loopback fake in pipeline/local/openai_server.py), and what the chunker makes of both.

The scanned PDFs are made here: text drawn into an image with Pillow, the image the only content
of its page. The local engine (``pip install 'docflow[ocr]'``, which ``make setup`` installs) is
never skipped: without it these tests fail with the install hint.
"""

from __future__ import annotations

import base64
import io
import math
import re
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from agents.chunker import ExtractionPool
from pipeline.errors import ExtractionError
from pipeline.local.documents import make_pdf
from pipeline.local.openai_server import ThreadedEmbeddingServer
from pipeline.records import DocumentUploaded
from pipeline.settings import Settings
from pipeline.text import ocr as ocr_module
from pipeline.text.chunking import ChunkedDocument, chunk_document
from pipeline.text.ocr import OcrOptions, OcrUnavailable, check_ocr, local_model_paths, ocr_pages, render_scale
from tests.scans import DPI, recall, scan, scanned_pdf, words
from tests.stack import document_uploaded

PDF = "application/pdf"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PAGE_TEXTS = [
    [
        "Quarterly report of the northern warehouse",
        "Shipments rose by twelve percent in March",
        "The loading dock opens at seven every morning",
        "Invoice 4711 was paid on the third of April",
    ],
    [
        "Safety inspection found two blocked exits",
        "Replace the forklift battery before winter",
        "Contact Maria Lopez for the new schedule",
        "Every pallet must carry a printed label",
    ],
]


def local_options(**changes) -> OcrOptions:
    return OcrOptions(**{"mode": "local", "dpi": DPI, "timeout_seconds": 120.0, **changes})


def page_text(chunked: ChunkedDocument, page: int) -> str:
    return "\n".join(chunk.text for chunk in chunked.chunks if chunk.page == page)


# --- the local engine -----------------------------------------------------------------------------


def test_the_local_engine_and_its_models_ship_in_the_wheel(monkeypatch):
    # Fails, naming the extra, where it is not installed: an OCR test is never skipped quietly.
    paths = local_model_paths()
    assert sorted(paths) == ["Cls.model_path", "Det.model_path", "Rec.model_path"]
    for path in paths.values():
        assert path.endswith(".onnx") and Path(path).is_file(), path
    # Loading and running it downloads nothing (RapidOCR would, for a model it does not find).
    from rapidocr.utils.download_file import DownloadFile

    def no_download(cls, params):
        raise AssertionError(f"the OCR engine tried to download {params.file_url}")

    monkeypatch.setattr(DownloadFile, "run", classmethod(no_download))
    monkeypatch.setattr(ocr_module, "_engine", None)
    chunked = chunk_document(scanned_pdf([scan(PAGE_TEXTS[0][:2])]), PDF, 500, 50, ocr=local_options())
    assert chunked.pages_ocred == 1


def test_local_ocr_reads_a_scanned_pdf():
    local_model_paths()  # the install hint, if the engine is missing
    data = scanned_pdf([scan(lines) for lines in PAGE_TEXTS])
    started = time.monotonic()
    chunked = chunk_document(data, PDF, 500, 50, ocr=local_options())
    elapsed = time.monotonic() - started
    assert (chunked.pages, chunked.pages_ocred, chunked.pages_unreadable) == (2, 2, 0)
    for page, lines in enumerate(PAGE_TEXTS, start=1):
        score = recall("\n".join(lines), page_text(chunked, page))
        assert score >= 0.9, (score, page_text(chunked, page))
    # Lines come out as lines, in reading order.
    assert words(page_text(chunked, 1).splitlines()[0]) == words(PAGE_TEXTS[0][0])
    assert elapsed < 30


def test_without_ocr_a_scanned_pdf_has_no_extractable_text():
    data = scanned_pdf([scan(lines) for lines in PAGE_TEXTS])
    with pytest.raises(ExtractionError, match="no extractable text"):
        chunk_document(data, PDF, 500, 50)
    with pytest.raises(ExtractionError, match="no extractable text"):
        chunk_document(data, PDF, 500, 50, ocr=OcrOptions(mode="off"))


def test_a_blank_page_counts_as_unreadable_and_the_rest_is_read():
    local_model_paths()
    data = scanned_pdf([scan(PAGE_TEXTS[0]), scan([])])
    chunked = chunk_document(data, PDF, 500, 50, ocr=local_options())
    assert (chunked.pages, chunked.pages_ocred, chunked.pages_unreadable) == (2, 1, 1)
    assert {chunk.page for chunk in chunked.chunks} == {1}


def test_local_ocr_of_only_blank_pages_fails_with_the_counts():
    local_model_paths()
    with pytest.raises(ExtractionError, match=r"^document has no extractable text; 0 pages OCRed, 2 unreadable$"):
        chunk_document(scanned_pdf([scan([]), scan([])]), PDF, 500, 50, ocr=local_options())


def test_a_missing_engine_fails_with_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # import rapidocr now raises ImportError
    monkeypatch.setattr(ocr_module, "_engine", None)
    with pytest.raises(OcrUnavailable, match=re.escape("pip install 'docflow[ocr]'")):
        check_ocr(OcrOptions(mode="local"))
    with pytest.raises(OcrUnavailable, match=re.escape("docflow[ocr]")):
        chunk_document(scanned_pdf([scan(PAGE_TEXTS[0])]), PDF, 500, 50, ocr=local_options())


async def test_the_extraction_pool_ocrs_in_its_processes_under_the_memory_limit():
    local_model_paths()
    settings = Settings()
    options = local_options()
    pool = ExtractionPool(
        1,
        max_pages=settings.max_pages,
        timeout_seconds=settings.extraction_timeout_seconds,
        memory_mb=settings.extraction_memory_mb,
        ocr=options,
    )
    try:
        assert pool.timeout_seconds == settings.extraction_timeout_seconds + options.timeout_seconds
        [chunked] = await pool.chunk_all([(event(), scanned_pdf([scan(PAGE_TEXTS[1])]))], "pdfium")
        assert isinstance(chunked, ChunkedDocument), chunked
        assert (chunked.pages_ocred, chunked.pages_unreadable) == (1, 0)
        assert recall("\n".join(PAGE_TEXTS[1]), page_text(chunked, 1)) >= 0.9
    finally:
        pool.close()
    # OCR off: the pool's limits are as they were.
    assert ExtractionPool(1, timeout_seconds=30.0, ocr=OcrOptions()).timeout_seconds == 30.0


def event() -> DocumentUploaded:
    return document_uploaded("ocr", filename="scan.pdf", content_type=PDF, chunk_size=500, chunk_overlap=50)


# --- a vision model behind the chat API (the loopback fake) ---------------------------------------

# Pages of different widths: the fake tells the pages apart by the width of the PNG it is sent.
WIDTHS = [600, 660, 720, 780]


def sized_pdf(widths: list[int] = WIDTHS) -> bytes:
    return scanned_pdf([scan([f"page {n}"], width=width, height=200) for n, width in enumerate(widths, 1)])


def png_of(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    data = base64.b64decode(url[len(prefix) :])
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def page_of(width: int) -> int:
    """Which page of sized_pdf an image of ``width`` pixels shows."""
    [page] = [n for n, expected in enumerate(WIDTHS, 1) if abs(width - expected) <= 1]
    return page


def reply_with_the_page(body: dict) -> str | None:
    image_part = next(part for part in body["messages"][0]["content"] if part["type"] == "image_url")
    return f"Text the model read on page {page_of(png_of(image_part['image_url']['url']).width)}."


@pytest.fixture(scope="module")
def vision_server():
    with ThreadedEmbeddingServer() as server:
        yield server


@pytest.fixture
def vision(vision_server):
    vision_server.reset()
    vision_server.reply_to_chat(reply_with_the_page)
    yield vision_server
    vision_server.reset()


def openai_options(server: ThreadedEmbeddingServer, **changes) -> OcrOptions:
    base = {
        "mode": "openai",
        "dpi": DPI,
        "openai_base_url": server.url,
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "timeout_seconds": 30.0,
        "max_retries": 2,
    }
    return OcrOptions(**{**base, **changes})


def test_each_page_goes_to_the_vision_model_as_a_png_and_its_answer_is_the_page_text(vision):
    vision.configure(delay_ms=150)
    options = openai_options(vision, concurrency=2, prompt="Read this page.")
    chunked = chunk_document(sized_pdf(), PDF, 500, 50, ocr=options)
    assert (chunked.pages, chunked.pages_ocred, chunked.pages_unreadable) == (4, 4, 0)
    for page in range(1, 5):
        assert page_text(chunked, page) == f"Text the model read on page {page}."
    requests = vision.chat_requests
    assert len(requests) == 4
    assert sorted(page_of(png_of(request.image_urls[0]).width) for request in requests) == [1, 2, 3, 4]
    for request in requests:
        assert request.status == 200
        assert request.model == "Qwen/Qwen2.5-VL-7B-Instruct"
        assert request.texts == ["Read this page."]
        assert len(request.image_urls) == 1
        image = png_of(request.image_urls[0])
        assert image.mode == "L" and image.height in (200, 201)
    assert vision.max_in_flight == 2  # ocr_concurrency
    assert vision.requests == []  # no embedding request on the way


def test_pages_with_a_text_layer_are_not_sent(vision):
    text_page = make_pdf(["A page with a real text layer, long enough to keep."])
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for part in (text_page, sized_pdf(WIDTHS[1:2])):
        for page in PdfReader(io.BytesIO(part)).pages:
            writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    chunked = chunk_document(out.getvalue(), PDF, 500, 50, ocr=openai_options(vision))
    assert (chunked.pages_ocred, chunked.pages_unreadable) == (1, 0)
    assert "real text layer" in page_text(chunked, 1)
    assert page_text(chunked, 2) == "Text the model read on page 2."
    assert len(vision.chat_requests) == 1


def test_at_most_ocr_max_pages_are_ocred_and_the_rest_count_as_unreadable(vision):
    chunked = chunk_document(sized_pdf(), PDF, 500, 50, ocr=openai_options(vision, max_pages=2, concurrency=1))
    assert (chunked.pages, chunked.pages_ocred, chunked.pages_unreadable) == (4, 2, 2)
    assert {chunk.page for chunk in chunked.chunks} == {1, 2}
    assert [page_of(png_of(request.image_urls[0]).width) for request in vision.chat_requests] == [1, 2]


def test_a_page_the_model_cannot_read_counts_as_unreadable(vision):
    def fail_page_3(body: dict) -> str | None:
        answer = reply_with_the_page(body)
        return None if answer.endswith("page 3.") else answer  # None: the fake answers 500

    vision.reply_to_chat(fail_page_3)
    chunked = chunk_document(sized_pdf(), PDF, 500, 50, ocr=openai_options(vision, max_retries=1))
    assert (chunked.pages_ocred, chunked.pages_unreadable) == (3, 1)
    assert {chunk.page for chunk in chunked.chunks} == {1, 2, 4}
    # The client retried page 3 once, on its own.
    statuses = sorted(request.status for request in vision.chat_requests)
    assert statuses == [200, 200, 200, 500, 500]


def test_an_empty_answer_counts_as_unreadable(vision):
    vision.reply_to_chat(lambda body: "" if reply_with_the_page(body).endswith("page 1.") else "```\nfenced\x00\r\n```")
    chunked = chunk_document(sized_pdf(WIDTHS[:2]), PDF, 500, 50, ocr=openai_options(vision))
    assert (chunked.pages_ocred, chunked.pages_unreadable) == (1, 1)
    assert page_text(chunked, 2) == "fenced"


def test_429_and_5xx_are_retried_by_the_client(vision):
    vision.configure(fail_next=2, fail_next_status=429)  # max_retries is 2: the third try of page 1 succeeds
    chunked = chunk_document(sized_pdf(WIDTHS[:2]), PDF, 500, 50, ocr=openai_options(vision, concurrency=1))
    assert (chunked.pages_ocred, chunked.pages_unreadable) == (2, 0)
    assert sorted(request.status for request in vision.chat_requests) == [200, 200, 429, 429]


def test_a_document_the_model_reads_nothing_of_fails_with_the_counts(vision):
    vision.configure(unauthorized=True)  # 401: never retried
    with pytest.raises(ExtractionError, match=r"^document has no extractable text; 0 pages OCRed, 4 unreadable$"):
        chunk_document(sized_pdf(), PDF, 500, 50, ocr=openai_options(vision))
    assert len(vision.chat_requests) == 4


def test_pages_render_within_ocr_max_pixels(vision):
    vision.reply_to_chat(None)  # the page is smaller than reply_with_the_page knows: answer chat_text
    options = openai_options(vision, dpi=300, max_pixels=100_000)
    chunked = chunk_document(sized_pdf(WIDTHS[:1]), PDF, 500, 50, ocr=options)
    assert chunked.pages_ocred == 1
    image = png_of(vision.chat_requests[0].image_urls[0])
    assert image.width * image.height <= 100_000
    assert image.width * image.height > 90_000  # scaled down to the limit, not far below it


def test_render_scale():
    assert render_scale(612, 792, 144, 25_000_000) == 2.0
    scale = render_scale(612, 792, 600, 1_000_000)
    assert math.ceil(612 * scale) * math.ceil(792 * scale) <= 1_000_000
    with pytest.raises(ValueError):
        render_scale(0, 792, 200, 1_000_000)


def test_ocr_pages_leaves_pages_with_text_and_reads_nothing_when_off(vision):
    pages = ["x" * 30, "short"]
    untouched = ocr_pages(b"not even a pdf", pages, OcrOptions(mode="off"))
    assert (list(untouched.pages), untouched.pages_ocred, untouched.pages_unreadable) == (pages, 0, 0)
    # A PDF pdfium cannot open (pypdf read its text layer) has nothing to render: its pages count as unreadable.
    broken = ocr_pages(b"not even a pdf", pages, openai_options(vision))
    assert (list(broken.pages), broken.pages_ocred, broken.pages_unreadable) == (pages, 0, 1)
    assert vision.chat_requests == []


def test_options_from_settings_and_the_checks_at_start(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = Settings(ocr="openai", ocr_openai_base_url="http://127.0.0.1:9/v1", openai_api_key="sk-embed")
    options = OcrOptions.from_settings(settings)
    assert (options.mode, options.openai_api_key, options.max_pages, options.dpi) == ("openai", "sk-embed", 200, 200)
    assert "sk-embed" not in repr(options)
    own_key = Settings(ocr_openai_api_key="sk-ocr", openai_api_key="x")
    assert OcrOptions.from_settings(own_key).openai_api_key == "sk-ocr"
    check_ocr(options)  # loopback, with a key: ready
    check_ocr(OcrOptions(mode="openai", openai_base_url="http://localhost:9/v1"))  # loopback needs no key
    with pytest.raises(OcrUnavailable, match="DOCFLOW_OCR_OPENAI_BASE_URL"):
        check_ocr(OcrOptions(mode="openai"))
    with pytest.raises(OcrUnavailable, match="no API key"):
        check_ocr(OcrOptions(mode="openai", openai_base_url="https://vision.example.com/v1"))
    with pytest.raises(ValueError):
        OcrOptions(mode="tesseract")


# Last of the vision tests: requests it leaves behind cannot show up in another test's records.
def test_the_whole_ocr_stops_at_its_time_limit(vision):
    vision.configure(delay_ms=2500)
    started = time.monotonic()
    with pytest.raises(ExtractionError, match="0 pages OCRed, 4 unreadable"):
        chunk_document(sized_pdf(), PDF, 500, 50, ocr=openai_options(vision, timeout_seconds=1.0, concurrency=2))
    assert time.monotonic() - started < 3
    # The pages after the deadline were never sent (a request that timed out may have been retried).
    assert {page_of(png_of(request.image_urls[0]).width) for request in vision.chat_requests} <= {1, 2}
