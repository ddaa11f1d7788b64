"""Text per page from an original: PDF (pypdfium2, pypdf as fallback), plain text, Markdown, HTML.

Pure functions with no shared state, so the chunker can run them in a process pool.
Every failure a document can cause comes out as :class:`ExtractionError`, whose message
is the reason shown to users; parser exceptions never leak, because a
parser's own exception may not even survive the trip back from a pool process.
"""

from __future__ import annotations

import io
import logging
import re

from pipeline.errors import EncryptedPDFError, ExtractionError
from pipeline.text.content_types import UTF16_BOMS

PDF_EXTRACTORS = ("pdfium", "pypdf")

_ENCRYPTED = "PDF is encrypted (it needs a password to open)"
_MAX_DETAIL_CHARS = 160

log = logging.getLogger(__name__)


def extract_pages(data: bytes, content_type: str, pdf_extractor: str = "pdfium") -> list[str]:
    """The text of each page, in order; a text, Markdown or HTML file is one page.

    Pages without text stay in the list as empty strings so page numbers stay right.
    """
    if not data:
        raise ExtractionError("file is empty")
    if content_type == "application/pdf":
        pages = extract_pdf_pages(data, pdf_extractor)
    elif content_type in ("text/plain", "text/markdown"):
        pages = [_clean(decode_text(data))]
    elif content_type == "text/html":
        pages = [html_to_text(data)]
    else:
        raise ExtractionError(f"unsupported content type {content_type!r}")
    if not any(page.strip() for page in pages):
        if content_type == "application/pdf":
            raise ExtractionError("document has no extractable text (image-only PDF?)")
        raise ExtractionError("document has no text")
    return pages


def extract_pdf_pages(data: bytes, pdf_extractor: str = "pdfium") -> list[str]:
    """PDF pages via the chosen extractor; pdfium hands a file it rejects to pypdf."""
    if pdf_extractor == "pypdf":
        return extract_pdf_with_pypdf(data)
    if pdf_extractor != "pdfium":
        raise ValueError(f"unknown PDF extractor {pdf_extractor!r}; expected one of {PDF_EXTRACTORS}")
    try:
        return extract_pdf_with_pdfium(data)
    except EncryptedPDFError:
        raise
    except ExtractionError as rejected:
        try:
            pages = extract_pdf_with_pypdf(data)
        except EncryptedPDFError:
            # "needs a password" tells the user more than pdfium's "data format error"
            raise
        except ExtractionError as also_rejected:
            log.info("pypdf also rejected a PDF pdfium rejected (%s): %s", rejected, also_rejected)
            raise rejected from None
        if not any(page.strip() for page in pages):
            # pypdf opening a broken file and finding nothing does not make it a PDF without text
            raise rejected
        log.info("pdfium rejected a PDF (%s); pypdf read %d pages", rejected, len(pages))
        return pages


def extract_pdf_with_pdfium(data: bytes) -> list[str]:
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == pdfium.raw.FPDF_ERR_PASSWORD:
            raise EncryptedPDFError(_ENCRYPTED) from None
        if code == pdfium.raw.FPDF_ERR_SECURITY:
            raise EncryptedPDFError("PDF is encrypted with an unsupported security handler") from None
        raise ExtractionError(f"file is not a valid PDF: {_pdfium_reason(exc)}") from None
    except Exception as exc:
        raise ExtractionError(f"file is not a valid PDF: {_detail(exc)}") from None
    try:
        return [_clean(_pdfium_page_text(document, index)) for index in range(len(document))]
    except Exception as exc:
        raise ExtractionError(f"file is not a valid PDF: {_detail(exc)}") from None
    finally:
        # pdfium objects own native memory; a pool process reads thousands of documents.
        document.close()


def _pdfium_page_text(document, index: int) -> str:
    page = document[index]
    try:
        textpage = page.get_textpage()
        try:
            return textpage.get_text_range()
        finally:
            textpage.close()
    finally:
        page.close()


def extract_pdf_with_pypdf(data: bytes) -> list[str]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            _decrypt_without_password(reader)
        return [_clean(page.extract_text() or "") for page in reader.pages]
    except ExtractionError:
        raise
    except Exception as exc:
        # pypdf raises its own errors, but also KeyError, ValueError, RecursionError... on broken files
        raise ExtractionError(f"file is not a valid PDF: {_detail(exc)}") from None


def _decrypt_without_password(reader) -> None:
    """Owner-only protection (no copying, no printing) opens with the empty user password."""
    from pypdf import PasswordType

    try:
        opened = reader.decrypt("") != PasswordType.NOT_DECRYPTED
    except Exception as exc:  # e.g. AES without a crypto package installed
        raise EncryptedPDFError(f"PDF is encrypted and could not be decrypted: {_detail(exc)}") from None
    if not opened:
        raise EncryptedPDFError(_ENCRYPTED)


def decode_text(data: bytes) -> str:
    """UTF-8 (BOM or not) or UTF-16 with a BOM; other bytes are read as cp1252, then latin-1."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith(UTF16_BOMS):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        # Windows text is far more common than ISO-8859-1, and latin-1 would turn its
        # quotes and dashes into control characters.
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_DROPPED_TAGS = ("head", "script", "style", "noscript", "template", "iframe", "object", "embed", "svg", "canvas")
# Elements a browser renders as their own block; their text never runs into a neighbour's.
_BLOCK_TAGS = frozenset(
    (
        "address article aside blockquote details dialog dd div dl dt fieldset figcaption figure footer form "
        "h1 h2 h3 h4 h5 h6 header hgroup hr li main nav ol p pre section summary table tbody thead tfoot tr ul "
        "caption option legend body html"
    ).split()
)
_PARAGRAPH_TAGS = frozenset("p h1 h2 h3 h4 h5 h6 blockquote pre table ul ol dl section article header footer".split())
_CELL_TAGS = frozenset(("td", "th"))
_PREFORMATTED_TAGS = frozenset(("pre", "textarea", "listing", "plaintext"))


def html_to_text(data: bytes) -> str:
    """Visible text of an HTML page, one line per block, a blank line between paragraphs."""
    from selectolax.lexbor import LexborHTMLParser

    try:
        text = _strict_utf8(data)
        # Not UTF-8: lexbor follows the HTML Standard (BOM, then <meta charset>) to find the encoding.
        tree = LexborHTMLParser(text) if text is not None else LexborHTMLParser(data, encoding=True)
        tree.strip_tags(list(_DROPPED_TAGS), recursive=True)
        root = tree.root
    except Exception as exc:
        raise ExtractionError(f"HTML could not be parsed: {_detail(exc)}") from None
    if root is None:
        return ""
    return _clean(_collapse_blank_lines(_render(root)))


def _render(root) -> str:
    """Walks the tree with an explicit stack: deeply nested markup must not hit the recursion limit.

    Block boundaries ask for at least one (or two, around paragraphs) line breaks rather
    than adding them, so nested blocks and the whitespace between tags do not pile up
    blank lines.
    """
    out: list[str] = []
    pending_breaks = 0

    def emit(text: str) -> None:
        nonlocal pending_breaks
        if pending_breaks and out:
            out.append("\n" * pending_breaks)
        pending_breaks = 0
        out.append(text)

    def at_line_start() -> bool:
        return not out or pending_breaks > 0 or out[-1].endswith("\n")

    stack = [(root, iter(root.iter(include_text=True)), False)]
    while stack:
        node, children, preformatted = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            pending_breaks = max(pending_breaks, _breaks_around(node.tag))
            continue
        if child.is_text_node:
            content = child.text_content or ""
            if not preformatted:
                # HTML collapses whitespace, and it is insignificant at the start of a line
                content = re.sub(r"\s+", " ", content)
                if at_line_start():
                    content = content.lstrip(" ")
            if content:
                emit(content)
        elif child.is_element_node:
            tag = child.tag or ""
            if tag == "br":
                emit("\n")
                continue
            if tag in _CELL_TAGS and not at_line_start():
                out[-1] = out[-1].rstrip(" ")
                emit("\t")
            pending_breaks = max(pending_breaks, _breaks_around(tag))
            stack.append((child, iter(child.iter(include_text=True)), preformatted or tag in _PREFORMATTED_TAGS))
        # comments and other node kinds carry no visible text
    return "".join(out)


def _breaks_around(tag: str | None) -> int:
    if tag in _PARAGRAPH_TAGS:
        return 2
    return 1 if tag in _BLOCK_TAGS else 0


def _collapse_blank_lines(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# Control characters other than tab and newline: NULs break databases downstream.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _clean(text: str) -> str:
    # pdfium ends lines with CRLF and reports a hyphen that ends a line as U+0002.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x02", "-")
    return _CONTROL_CHARACTERS.sub("", text)


def _strict_utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _pdfium_reason(exc: Exception) -> str:
    import pypdfium2.internal as pdfium_i

    reason = pdfium_i.ErrorToStr.get(getattr(exc, "err_code", None))
    return reason.lower() if reason else _detail(exc)


def _detail(exc: BaseException) -> str:
    detail = str(exc).strip() or type(exc).__name__
    detail = " ".join(detail.split())
    return detail if len(detail) <= _MAX_DETAIL_CHARS else detail[: _MAX_DETAIL_CHARS - 1] + "…"
