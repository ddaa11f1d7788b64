"""OCR of PDF pages without a text layer (``DOCFLOW_OCR``: off, local, openai).

A page whose text layer has fewer than ``min_text_chars`` characters (whitespace not
counted) is rendered with pypdfium2 at ``dpi``, smaller when the image would have more
than ``max_pixels`` pixels, in grayscale, and read:

- ``local``: by RapidOCR (PP-OCR models on ONNX Runtime, shipped in the ``rapidocr`` wheel:
  ``pip install 'docflow[ocr]'``), in the calling process, which in the chunker is a
  process of its extraction pool. The engine is loaded on the first page it reads and
  kept for the life of the process; it is always given the model files of the wheel,
  so it never downloads anything.
- ``openai``: by a vision model behind an OpenAI-compatible chat API (a Qwen VL model on
  vLLM, say): each page goes as a PNG data URL in an ``image_url`` part beside the
  prompt, at most ``concurrency`` requests in flight, retried on 429 and 5xx by the
  ``openai`` client itself. Rendering stays on the calling thread (pdfium is not thread
  safe); only the requests run in threads.

At most ``max_pages`` pages of a document are OCRed, all of them within
``timeout_seconds``. A page the OCR cannot read (the engine fails, reads nothing, the
API still fails after its retries, the page is past ``max_pages`` or the time is up)
is counted as unreadable and keeps its text layer, whatever it was; it never fails
the document by itself. :func:`ocr_pages` returns the pages' text and both counts.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.errors import ExtractionError

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

OCR_MODES = ("off", "local", "openai")
# Control characters other than tab and newline (NULs break databases downstream), as in extract.py.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
INSTALL_HINT = "pip install 'docflow[ocr]'"
# The models of rapidocr 3.10.0 (the version the ``ocr`` extra pins), in its wheel under rapidocr/models/.
LOCAL_MODEL_FILES = {
    "Det.model_path": "PP-OCRv6_det_small.onnx",
    "Cls.model_path": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    "Rec.model_path": "PP-OCRv6_rec_small.onnx",
}


class OcrUnavailable(ExtractionError):
    """OCR is configured but cannot run here: the engine is not installed, or the API is not set up."""


@dataclass(frozen=True)
class OcrOptions:
    """The OCR settings a pool process needs (picklable); ``from_settings`` reads them from Settings."""

    mode: str = "off"
    max_pages: int = 200
    timeout_seconds: float = 600.0
    dpi: int = 200
    max_pixels: int = 25_000_000
    min_text_chars: int = 20
    openai_base_url: str = ""
    openai_api_key: str = field(default="", repr=False)
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    prompt: str = "Transcribe all text on this page exactly, in reading order. Output only the text."
    concurrency: int = 4
    max_retries: int = 5
    # ONNX Runtime threads of the local engine: the chunker already runs one pool process per CPU.
    local_threads: int = 1

    def __post_init__(self) -> None:
        if self.mode not in OCR_MODES:
            raise ValueError(f"ocr must be one of {OCR_MODES}, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @classmethod
    def from_settings(cls, settings: Settings) -> OcrOptions:
        return cls(
            mode=settings.ocr,
            max_pages=settings.ocr_max_pages,
            timeout_seconds=settings.ocr_timeout_seconds,
            dpi=settings.ocr_dpi,
            max_pixels=settings.ocr_max_pixels,
            min_text_chars=settings.ocr_min_text_chars,
            openai_base_url=settings.ocr_openai_base_url,
            openai_api_key=(
                settings.ocr_openai_api_key or settings.openai_api_key or os.environ.get("OPENAI_API_KEY", "")
            ),
            model=settings.ocr_model,
            prompt=settings.ocr_prompt,
            concurrency=settings.ocr_concurrency,
            max_retries=settings.openai_max_retries,
        )


@dataclass(frozen=True)
class OcrResult:
    pages: tuple[str, ...]  # every page's text, OCRed or not
    pages_ocred: int  # pages whose text the OCR read
    pages_unreadable: int  # pages that needed OCR and got no text from it


def check_ocr(options: OcrOptions) -> None:
    """Fail now, with what to do, when the configured OCR cannot run (called when a chunker starts)."""
    if options.mode == "local":
        local_model_paths()
    elif options.mode == "openai":
        _require_pillow()
        if not options.openai_base_url:
            raise OcrUnavailable("DOCFLOW_OCR=openai needs DOCFLOW_OCR_OPENAI_BASE_URL (an OpenAI-compatible chat API)")
        _api_key(options)


def needs_ocr(text: str, min_text_chars: int) -> bool:
    return len("".join(text.split())) < min_text_chars


def ocr_pages(data: bytes, pages: list[str], options: OcrOptions) -> OcrResult:
    """``pages`` (the PDF's text layer, page by page) with the pages that have too little text OCRed."""
    wanted = [index for index, text in enumerate(pages) if needs_ocr(text, options.min_text_chars)]
    if not options.enabled or not wanted:
        return OcrResult(tuple(pages), 0, 0)
    chosen = wanted[: options.max_pages]
    deadline = time.monotonic() + options.timeout_seconds
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)
    except MemoryError:
        raise
    except Exception as exc:
        # The text layer came from pypdf after pdfium refused the file: nothing to render.
        log.warning("OCR could not open the PDF: %s", exc)
        return OcrResult(tuple(pages), 0, len(wanted))
    try:
        if options.mode == "local":
            read = _read_locally(document, chosen, options, deadline)
        else:
            read = _read_with_openai(document, chosen, options, deadline)
    finally:
        document.close()
    result = list(pages)
    for index, text in read.items():
        # As extract.py cleans a text layer: a model's answer is no more trusted than a PDF's.
        result[index] = _CONTROL_CHARACTERS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(wanted) > len(chosen):
        log.info(
            "OCR tried %d of the %d pages without text: ocr_max_pages is %d",
            len(chosen),
            len(wanted),
            options.max_pages,
        )
    return OcrResult(tuple(result), len(read), len(wanted) - len(read))


# --- rendering ------------------------------------------------------------------------------


def render_scale(width: float, height: float, dpi: int, max_pixels: int) -> float:
    """The scale (pixels per PDF point) for ``dpi``, reduced until the image has at most ``max_pixels`` pixels."""
    if not (width > 0 and height > 0):
        raise ValueError(f"page has no area ({width:g} x {height:g} points)")
    scale = min(dpi / 72, math.sqrt(max_pixels / (width * height)))
    # pdfium rounds each side up: shrink until the rounded image fits.
    while math.ceil(width * scale) * math.ceil(height * scale) > max_pixels:
        scale *= 0.995
    return scale


def _render(document: Any, index: int, options: OcrOptions, to: str) -> Any:
    """Page ``index`` in grayscale: a numpy array (``to="array"``) or PNG bytes (``to="png"``)."""
    page = document[index]
    try:
        scale = render_scale(page.get_width(), page.get_height(), options.dpi, options.max_pixels)
        bitmap = page.render(scale=scale, grayscale=True)
        try:
            if to == "array":
                return bitmap.to_numpy().copy()  # the view dies with the bitmap
            out = io.BytesIO()
            bitmap.to_pil().save(out, format="PNG")
            return out.getvalue()
        finally:
            bitmap.close()
    finally:
        page.close()


# --- the local engine -----------------------------------------------------------------------

_engine: Any = None
_engine_lock = threading.Lock()


def local_model_paths() -> dict[str, str]:
    """The engine's model files in the installed wheel; OcrUnavailable, saying what to install, without them."""
    try:
        import rapidocr
    except ImportError as exc:
        raise OcrUnavailable(
            f"DOCFLOW_OCR=local needs the local OCR engine (RapidOCR), which is not installed: {INSTALL_HINT} ({exc})"
        ) from None
    models = Path(rapidocr.__file__).parent / "models"
    paths = {key: models / name for key, name in LOCAL_MODEL_FILES.items()}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise OcrUnavailable(
            f"the local OCR engine's model files {missing} are not in {models}: "
            f"reinstall the version the extra pins ({INSTALL_HINT})"
        )
    return {key: str(path) for key, path in paths.items()}


def local_engine() -> Any:
    """This process's RapidOCR, loaded on first use (about a second) and kept."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                paths = local_model_paths()
                from rapidocr import RapidOCR

                threads = {
                    "EngineConfig.onnxruntime.intra_op_num_threads": 1,
                    "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                }
                _engine = RapidOCR(params={"Global.log_level": "error", **paths, **threads})
    return _engine


def _read_locally(document: Any, indexes: list[int], options: OcrOptions, deadline: float) -> dict[int, str]:
    engine = local_engine()
    read: dict[int, str] = {}
    for index in indexes:
        if time.monotonic() >= deadline:
            log.warning("OCR stopped after %g s, before page %d", options.timeout_seconds, index + 1)
            break
        try:
            output = engine(_render(document, index, options, "array"))
            text = lines_of(output.boxes, output.txts)
        except MemoryError:
            raise
        except Exception as exc:
            log.warning("OCR could not read page %d: %s", index + 1, exc)
            continue
        if text.strip():
            read[index] = text
        else:
            log.info("OCR found no text on page %d", index + 1)
    return read


def lines_of(boxes: Any, texts: Any) -> str:
    """The engine's text boxes as lines: boxes whose middles lie within one another's height share a line."""
    if boxes is None or texts is None:
        return ""
    items = []
    for box, text in zip(boxes, texts):
        ys = [float(point[1]) for point in box]
        items.append((min(ys), max(ys), min(float(point[0]) for point in box), str(text)))
    items.sort(key=lambda item: (item[0] + item[1]) / 2)
    lines: list[list[tuple[float, float, float, str]]] = []
    for item in items:
        middle = (item[0] + item[1]) / 2
        if lines and lines[-1][0][0] <= middle <= lines[-1][0][1]:
            lines[-1].append(item)
        else:
            lines.append([item])
    return "\n".join(" ".join(text for *_, text in sorted(line, key=lambda item: item[2])) for line in lines)


# --- a vision model behind an OpenAI-compatible chat API ------------------------------------

_FENCE = re.compile(r"^```[\w-]*\n(.*?)\n?```$", re.DOTALL)


def _require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise OcrUnavailable(
            f"DOCFLOW_OCR=openai sends pages as PNG images, written with Pillow, which is not installed: {INSTALL_HINT}"
        ) from None


def _api_key(options: OcrOptions) -> str:
    if options.openai_api_key:
        return options.openai_api_key
    host = urlparse(options.openai_base_url).hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return "unused"  # a local server needs none, but the client insists on one
    raise OcrUnavailable(
        f"DOCFLOW_OCR=openai has no API key for {options.openai_base_url}: "
        "set DOCFLOW_OCR_OPENAI_API_KEY, DOCFLOW_OPENAI_API_KEY or OPENAI_API_KEY"
    )


def _client(options: OcrOptions) -> Any:
    """A synchronous client for one document: closed at its deadline, so no retry outlives the document's OCR."""
    import openai

    return openai.OpenAI(
        base_url=options.openai_base_url,
        api_key=_api_key(options),
        max_retries=options.max_retries,
        timeout=options.timeout_seconds,
    )


def _read_with_openai(document: Any, indexes: list[int], options: OcrOptions, deadline: float) -> dict[int, str]:
    _require_pillow()
    client = _client(options)
    slots = threading.BoundedSemaphore(options.concurrency)
    futures = {}
    # Not a `with` block: at the deadline the requests still running are left behind, not waited for.
    pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="docflow-ocr")
    try:
        for index in indexes:
            # A slot first, then the rendering: at most `concurrency` page images are held at once.
            if not slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
                break
            try:
                png = _render(document, index, options, "png")
            except MemoryError:
                slots.release()
                raise
            except Exception as exc:
                slots.release()
                log.warning("OCR could not render page %d: %s", index + 1, exc)
                continue
            future = pool.submit(_ask, client, png, options, deadline)
            future.add_done_callback(lambda _: slots.release())
            futures[index] = future
        wait(list(futures.values()), timeout=max(deadline - time.monotonic(), 0))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()
    read: dict[int, str] = {}
    for index, future in futures.items():
        if not future.done():
            log.warning("OCR of page %d did not finish within %g s", index + 1, options.timeout_seconds)
            continue
        if future.cancelled():
            continue
        error = future.exception()
        if error is not None:
            log.warning("the OCR model could not read page %d: %s", index + 1, error)
            continue
        text = future.result()
        if text.strip():
            read[index] = text
        else:
            log.info("the OCR model found no text on page %d", index + 1)
    return read


def _ask(client: Any, png: bytes, options: OcrOptions, deadline: float) -> str:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("no time left for the request")
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    response = client.with_options(timeout=remaining).chat.completions.create(
        model=options.model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": options.prompt}],
            }
        ],
        temperature=0,
    )
    if not response.choices:
        return ""
    text = (response.choices[0].message.content or "").strip()
    # Vision models like to wrap a transcription in a code fence.
    fenced = _FENCE.match(text)
    return fenced.group(1) if fenced else text
