"""Text per page from an original: PDF (pypdfium2, pypdf as fallback), plain text, Markdown,
HTML (trafilatura), Word .docx (python-docx) and PowerPoint .pptx (python-pptx, a page per slide).

Pure functions with no shared state, so the chunker can run them in a process pool.
Every failure a document can cause comes out as :class:`ExtractionError`, whose message
is the reason shown to users; parser exceptions never leak, because a
parser's own exception may not even survive the trip back from a pool process.
``MemoryError`` is the one exception let through: the caller knows the memory limit the
process runs under and says so (:func:`pipeline.text.chunking.chunk_document`).

A PDF declaring more than ``max_pages`` pages fails before any page is read, with
:class:`ExtractionLimitExceeded`, which no fallback extractor is tried after.
"""

from __future__ import annotations

import io
import logging
import re

from pipeline.errors import EncryptedPDFError, ExtractionError, ExtractionLimitExceeded
from pipeline.text.content_types import DOCX, OLE_MAGIC, PPTX, looks_binary

PDF_EXTRACTORS = ("pdfium", "pypdf")

_ENCRYPTED = "PDF is encrypted (it needs a password to open)"
_MAX_DETAIL_CHARS = 160

log = logging.getLogger(__name__)


def extract_pages(
    data: bytes, content_type: str, pdf_extractor: str = "pdfium", max_pages: int | None = None
) -> list[str]:
    """The text of each page, in order; a text, Markdown, HTML or Word file is one page, a slide is one.

    Pages without text stay in the list as empty strings so page numbers stay right.
    ``max_pages`` (None: no limit) refuses a PDF declaring more pages before reading any.
    """
    if not data:
        raise ExtractionError("file is empty")
    if content_type == "application/pdf":
        pages = extract_pdf_pages(data, pdf_extractor, max_pages)
    elif content_type in ("text/plain", "text/markdown"):
        pages = [_clean(decode_text(data))]
    elif content_type == "text/html":
        pages = [html_to_text(data)]
    elif content_type == DOCX:
        pages = [extract_docx_text(data)]
    elif content_type == PPTX:
        pages = extract_pptx_slides(data, max_pages)
    else:
        raise ExtractionError(f"unsupported content type {content_type!r}")
    if not any(page.strip() for page in pages):
        if content_type == "application/pdf":
            raise ExtractionError("document has no extractable text (image-only PDF?)")
        raise ExtractionError("document has no text")
    return pages


def extract_pdf_pages(data: bytes, pdf_extractor: str = "pdfium", max_pages: int | None = None) -> list[str]:
    """PDF pages via the chosen extractor; pdfium hands a file it rejects to pypdf."""
    if pdf_extractor == "pypdf":
        return extract_pdf_with_pypdf(data, max_pages)
    if pdf_extractor != "pdfium":
        raise ValueError(f"unknown PDF extractor {pdf_extractor!r}; expected one of {PDF_EXTRACTORS}")
    try:
        return extract_pdf_with_pdfium(data, max_pages)
    except (EncryptedPDFError, ExtractionLimitExceeded):
        raise
    except ExtractionError as rejected:
        try:
            pages = extract_pdf_with_pypdf(data, max_pages)
        except (EncryptedPDFError, ExtractionLimitExceeded):
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


def extract_pdf_with_pdfium(data: bytes, max_pages: int | None = None) -> list[str]:
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(data)
    except MemoryError:
        raise
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
        # pdfium's page count is the one the page tree declares (/Count), read without loading a page.
        count = len(document)
        check_page_count(count, max_pages)
        return [_clean(_pdfium_page_text(document, index)) for index in range(count)]
    except (ExtractionError, MemoryError):
        raise
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


def extract_pdf_with_pypdf(data: bytes, max_pages: int | None = None) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            _decrypt_without_password(reader)
        # What the page tree declares first, then the pages pypdf finds: a lie either way fails unread.
        check_page_count(_declared_page_count(reader), max_pages)
        check_page_count(len(reader.pages), max_pages)
        return [_clean(page.extract_text() or "") for page in reader.pages]
    except (ExtractionError, MemoryError):
        raise
    except LimitReachedError as exc:
        # pypdf's own bounds on what a stream may inflate to (decompression bombs)
        raise ExtractionLimitExceeded(f"PDF is too large to extract: {_detail(exc)}") from None
    except Exception as exc:
        # pypdf raises its own errors, but also KeyError, ValueError, RecursionError... on broken files
        raise ExtractionError(f"file is not a valid PDF: {_detail(exc)}") from None


def check_page_count(count: int, max_pages: int | None) -> None:
    """Refuse a PDF with more pages than allowed (None: no limit), before any of them is read."""
    if max_pages is not None and count > max_pages:
        raise ExtractionLimitExceeded(f"PDF has {count} pages, more than the {max_pages} a document may have")


def _declared_page_count(reader) -> int:
    """The /Count of the root page tree; 0 when it is missing or no number (the pages found then count)."""
    try:
        count = reader.root_object["/Pages"].get_object().get("/Count", 0)
        return int(count)
    except Exception:
        return 0


def _decrypt_without_password(reader) -> None:
    """Owner-only protection (no copying, no printing) opens with the empty user password."""
    from pypdf import PasswordType

    try:
        opened = reader.decrypt("") != PasswordType.NOT_DECRYPTED
    except MemoryError:
        raise
    except Exception as exc:  # e.g. AES without a crypto package installed
        raise EncryptedPDFError(f"PDF is encrypted and could not be decrypted: {_detail(exc)}") from None
    if not opened:
        raise EncryptedPDFError(_ENCRYPTED)


# charset-normalizer ranks single-byte code pages by how clean (chaos) and how much like a
# language (coherence) their decoding reads. On Western European text several tie and it
# often picks Central European cp1250 ("naïve" read as "naďve"); typographic quotes and
# dashes alone even make it prefer Mac Roman. Windows-1252 wins when it reads within this
# margin of its pick on both counts: it is by far the most common legacy encoding (the one
# browsers default to, and Latin-1's letters are its own). Measured on sentences in 24
# languages and 15 encodings: French, Portuguese, Italian, Swedish, Danish and English with
# smart quotes become right, Hungarian (a tie with cp1250) becomes wrong; Czech, Polish,
# Turkish, Baltic, Cyrillic, Greek and the CJK encodings stay right (Romanian cp1250 and
# Hebrew cp1255 come out wrong with or without the preference).
_CP1252_MARGIN = 0.05


def decode_text(data: bytes) -> str:
    """Text in its own encoding: UTF-8 (BOM or not) when it is valid UTF-8, else charset-normalizer's.

    charset-normalizer reads byte order marks (UTF-16, UTF-32) and a declared charset (an
    HTML meta, an XML declaration) before it guesses from the bytes. Bytes with NULs and
    no byte order mark are binary, refused as at upload (content_types.looks_binary).
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if looks_binary(data):
        raise ExtractionError("file is not text: it holds NUL bytes and is in no text encoding")
    from charset_normalizer import from_bytes

    matches = from_bytes(data)
    best = matches.best()
    if best is None:
        raise ExtractionError("file is not text: it is in no character encoding docflow reads")
    for match in matches:
        if (
            "cp1252" in match.could_be_from_charset
            and match.chaos <= best.chaos + _CP1252_MARGIN
            and match.coherence >= best.coherence - _CP1252_MARGIN
        ):
            try:
                return data.decode("cp1252")
            except UnicodeDecodeError:
                break
    try:
        return str(best)
    except UnicodeDecodeError:
        # charset-normalizer judges large files by samples; a byte it did not see may not fit
        return data.decode(best.encoding, errors="replace")


# Elements whose text is never shown; trafilatura drops them too, except in its last-resort
# tiers on pages with little main text (a noscript's "enable JavaScript" would be the text).
_HIDDEN_HTML = ("script", "style", "noscript", "template")


def html_to_text(data: bytes) -> str:
    """The main text of an HTML page, by trafilatura: navigation, headers, footers, sidebars,
    cookie banners and comments go; headings, paragraphs, lists and tables (a row a line,
    cells between ``|``) stay, each block on a line of its own.

    A page where trafilatura's extractors all come back empty gives the whole visible
    text of its body (trafilatura's html2txt), so a small page is never empty.
    Only the bytes given are read: nothing is fetched, no metadata is extracted. On a page
    with less than about 250 characters of main text trafilatura's own fallbacks may keep
    navigation words (its balanced default, kept here).
    """
    import lxml.etree
    import lxml.html
    import trafilatura

    text = decode_text(data)
    # libxml2 with its own defaults stops at 256 levels of nesting and drops the rest of the
    # page; huge_tree allows 2048 (deeper fails below rather than losing text silently).
    parser = lxml.html.HTMLParser(
        encoding="utf-8", remove_comments=True, remove_pis=True, huge_tree=True, collect_ids=False
    )
    try:
        try:
            # The text is decoded already: UTF-8 for the parser, whatever a meta tag says.
            tree = lxml.html.document_fromstring(text.encode("utf-8"), parser=parser)
        except lxml.etree.ParserError:  # "Document is empty"
            return ""
        for error in parser.error_log:
            if error.type_name == "ERR_RESOURCE_LIMIT":
                log.info("libxml2 stopped reading an HTML page: %s", error.message.strip())
                raise ExtractionLimitExceeded("HTML is nested too deeply to read (more than 2048 elements deep)")
        lxml.etree.strip_elements(tree, *_HIDDEN_HTML, with_tail=False)
        _mark_body_as_main(tree)
        main = trafilatura.extract(
            tree,
            output_format="txt",
            include_comments=False,
            include_tables=True,
            include_images=False,
            include_links=False,
            with_metadata=False,
            deduplicate=False,
        )
        if not main:
            main = trafilatura.html2txt(tree)
    except (ExtractionError, MemoryError):
        raise
    except Exception as exc:
        raise ExtractionError(f"HTML could not be parsed: {_detail(exc)}") from None
    return "\n".join(line.rstrip() for line in _clean(main or "").strip().split("\n"))


def _mark_body_as_main(tree) -> None:
    """Wraps the body of a page that has no main or article element in a ``<main>``.

    trafilatura looks for the text in such an element (or a div named like one); on a
    page without any (a document exported as HTML, a fragment) it keeps paragraphs and
    tables but loses headings and lists, and its fallback puts every inline element on a
    line of its own. Inside the ``<main>`` it still removes navigation, headers, footers,
    sidebars and banners.
    """
    import lxml.html

    body = tree.find("body")
    if body is None or tree.xpath("//main | //article | //*[@role='main']"):
        return
    main = lxml.html.Element("main")
    main.text, body.text = body.text, None
    main.extend(list(body))
    body.append(main)


def extract_docx_text(data: bytes) -> str:
    """A Word document's body in reading order, as one page (a .docx has no reliable pages).

    Paragraphs are separated by a blank line; a heading (paragraph style "Heading N", or
    "Title") is a line of its own with N ``#`` before it, so the splitter keeps it with
    its section; a table is one line per row, its cells joined by `` | ``. Content
    controls are read through; headers and footers are left out (they repeat on every
    page), and so are text boxes, footnotes and comments.
    """
    _refuse_legacy_office(data, "Word document", "Word 97-2003 document (.doc)")
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
        blocks = list(_docx_blocks(document, document.element.body))
    except (ExtractionError, MemoryError):
        raise
    except Exception as exc:
        # zipfile.BadZipFile, KeyError for a missing part, ValueError for another Office type, lxml's errors...
        raise ExtractionError(f"file is not a valid Word document (.docx): {_detail(exc)}") from None
    return _clean("\n\n".join(block for block in blocks if block.strip()))


def _docx_blocks(parent, element):
    from docx.oxml.ns import qn
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    for child in element.iterchildren():
        if child.tag == qn("w:p"):
            yield _docx_paragraph(Paragraph(child, parent))
        elif child.tag == qn("w:tbl"):
            yield "\n".join(_table_rows(_docx_row_cells(row) for row in Table(child, parent).rows))
        elif child.tag == qn("w:sdt"):
            # a content control (cover page, table of contents, form field) around body blocks
            for content in child.iterchildren(qn("w:sdtContent")):
                yield from _docx_blocks(parent, content)


_HEADING_STYLE = re.compile(r"Heading ([1-9])")


def _docx_paragraph(paragraph) -> str:
    text = paragraph.text
    if not text.strip():
        return ""
    style = paragraph.style.name if paragraph.style is not None else ""
    heading = _HEADING_STYLE.fullmatch(style or "")
    if heading:
        return "#" * int(heading.group(1)) + " " + " ".join(text.split())
    if style == "Title":
        return "# " + " ".join(text.split())
    return text


def _docx_row_cells(row) -> list[str]:
    """One text per cell; a cell spanning columns (python-docx gives the same cell again) counts once."""
    cells, previous = [], None
    for cell in row.cells:
        if cell is previous:
            continue
        previous = cell
        parts = []
        for item in cell.iter_inner_content():
            if hasattr(item, "rows"):  # a table in the cell
                parts.extend(_table_rows(_docx_row_cells(inner) for inner in item.rows))
            else:
                parts.append(item.text)
        cells.append(" ".join(" ".join(parts).split()))
    return cells


def _table_rows(rows) -> list[str]:
    """A line per row with any text, its cells joined by `` | ``, empty cells at its end left out."""
    return [" | ".join(cells).rstrip(" |") for cells in rows if any(cell for cell in cells)]


def extract_pptx_slides(data: bytes, max_pages: int | None = None) -> list[str]:
    """The text of each slide, a page per slide (page N is slide N, hidden slides included).

    A slide's title comes first (``# Title``), then its other shapes' text in the order
    they lie on the slide (groups read through), a table one line per row with its cells
    joined by `` | ``, and last the speaker notes (``Notes: ...``). A deck with more slides
    than ``max_pages`` (None: no limit) fails with :class:`ExtractionLimitExceeded`.
    """
    _refuse_legacy_office(data, "PowerPoint presentation", "PowerPoint 97-2003 presentation (.ppt)")
    from pptx import Presentation

    try:
        slides = Presentation(io.BytesIO(data)).slides
        count = len(slides)
        if max_pages is not None and count > max_pages:
            raise ExtractionLimitExceeded(
                f"presentation has {count} slides, more than the {max_pages} pages a document may have"
            )
        return [_clean(_slide_text(slide)) for slide in slides]
    except (ExtractionError, MemoryError):
        raise
    except Exception as exc:
        raise ExtractionError(f"file is not a valid PowerPoint presentation (.pptx): {_detail(exc)}") from None


def _slide_text(slide) -> str:
    parts = []
    title = slide.shapes.title
    title_id = title.shape_id if title is not None else None
    if title is not None and title.has_text_frame and title.text_frame.text.strip():
        parts.append("# " + " ".join(title.text_frame.text.split()))
    for shape in _pptx_shapes(slide.shapes):
        if shape.shape_id == title_id:
            continue
        if shape.has_text_frame:
            parts.append(_pptx_text(shape.text_frame.text))
        elif shape.has_table:
            rows = (
                [" ".join(cell.text.split()) for cell in row.cells if not cell.is_spanned] for row in shape.table.rows
            )
            parts.append("\n".join(_table_rows(rows)))
    if slide.has_notes_slide:
        notes = slide.notes_slide.notes_text_frame
        if notes is not None and notes.text.strip():
            parts.append("Notes: " + _pptx_text(notes.text).strip())
    return "\n\n".join(part for part in parts if part.strip())


def _pptx_shapes(shapes):
    """Shapes in the order they lie on the slide, the shapes of a group in its place."""
    from pptx.shapes.group import GroupShape

    for shape in shapes:
        if isinstance(shape, GroupShape):
            yield from _pptx_shapes(shape.shapes)
        else:
            yield shape


def _pptx_text(text: str) -> str:
    # python-pptx gives a line break inside a paragraph as a vertical tab
    return text.replace("\v", "\n")


_OLE_ENCRYPTION_STREAM = "EncryptionInfo".encode("utf-16-le")


def _refuse_legacy_office(data: bytes, kind: str, legacy: str) -> None:
    """An Office file that is no ZIP but a compound file: encrypted with a password, or the old binary format."""
    if not data.startswith(OLE_MAGIC):
        return
    # Office encrypts a .docx/.pptx into a compound file whose streams are EncryptionInfo and
    # EncryptedPackage; the directory entry names the stream in UTF-16.
    if _OLE_ENCRYPTION_STREAM in data:
        raise ExtractionError(f"{kind} is encrypted (it needs a password to open)")
    raise ExtractionError(f"file is a {legacy}, not the format docflow reads; save it in the current format")


# Control characters other than tab and newline: NULs break databases downstream.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _clean(text: str) -> str:
    # pdfium ends lines with CRLF and reports a hyphen that ends a line as U+0002.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x02", "-")
    return _CONTROL_CHARACTERS.sub("", text)


def _pdfium_reason(exc: Exception) -> str:
    import pypdfium2.internal as pdfium_i

    reason = pdfium_i.ErrorToStr.get(getattr(exc, "err_code", None))
    return reason.lower() if reason else _detail(exc)


def _detail(exc: BaseException) -> str:
    detail = str(exc).strip() or type(exc).__name__
    detail = " ".join(detail.split())
    return detail if len(detail) <= _MAX_DETAIL_CHARS else detail[: _MAX_DETAIL_CHARS - 1] + "…"
