"""Test documents made on the spot: PDFs, HTML, Markdown and seeded English-like text.

Unit tests, integration tests and benchmarks share these so that none of them needs
fixture files or a PDF library beyond what docflow already depends on. The PDFs are
written by hand (catalog, page tree, a Helvetica font, one content stream per page),
so the bytes are small, deterministic and hold real text that pdfium and pypdf extract.
"""

from __future__ import annotations

import html
import io
import random
import textwrap

# Letter size in points; text starts one inch from the top-left corner.
PAGE_WIDTH = 612
PAGE_HEIGHT = 792
MARGIN = 72
FONT_SIZE = 10
LEADING = 14
# Helvetica averages about half an em per character, so 90 characters at 10 pt fit in
# the 468 pt between the margins.
LINE_CHARACTERS = 90

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can said who what about up "
    "out them into time only new some could these two may then do first any like now my such make over our even "
    "most after also made many before must through back years where much your way well down should because each "
    "just those people how too little state good very world still own see men work long get here between both life "
    "being under never day same another know while last might great old year off come since against go came right "
    "used take three states himself few house use during without again place around however home small found "
    "thought went say part once general high upon school every does got united left number course war until "
    "always away something fact though water less public put think almost hand enough far took head yet "
    "government system better set told nothing night end why called didn't eyes find going look asked later point "
    "knew city next program business give group toward young days let room president side social present given "
    "several order national possible rather second face per among form important often things looked early white "
    "case john become large big need four within felt along children saw best church ever least power development "
    "light thing seemed family interest want members mind country area others done turned although open god "
    "service certain kind problem began different door thus help sense means whole matter perhaps itself york "
    "times law human line above name example action company hands local show whether five history gave today "
    "either act feet across taken past quite anything seen having body experience really week half field words "
    "invoice contract clause payment delivery warranty liability report quarter revenue customer supplier policy"
).split()


def lorem_pages(n_pages: int, words_per_page: int, seed: int) -> list[str]:
    """Deterministic English-like pages: seeded sentences of 6-18 words in paragraphs of 2-6 sentences."""
    rng = random.Random(seed)
    pages = []
    for _ in range(n_pages):
        paragraphs: list[str] = []
        sentences: list[str] = []
        paragraph_length = rng.randint(2, 6)
        remaining = words_per_page
        while remaining > 0:
            length = min(remaining, rng.randint(6, 18))
            remaining -= length
            words = [rng.choice(_VOCABULARY) for _ in range(length)]
            words[0] = words[0].capitalize()
            if length > 8 and rng.random() < 0.4:
                words[rng.randrange(2, length - 2)] += ","
            sentences.append(" ".join(words) + rng.choice(".....?!"))
            if len(sentences) == paragraph_length:
                paragraphs.append(" ".join(sentences))
                sentences = []
                paragraph_length = rng.randint(2, 6)
        if sentences:
            paragraphs.append(" ".join(sentences))
        pages.append("\n\n".join(paragraphs))
    return pages


def make_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one page per string, its text drawn in Helvetica, wrapped into lines.

    A page with more lines than fit on letter paper is made taller rather than cut, so
    every word given is on its page.
    """
    streams = []
    heights = []
    for text in pages:
        lines = _wrap(text)
        height = max(PAGE_HEIGHT, 2 * MARGIN + LEADING * len(lines))
        heights.append(height)
        streams.append(_text_stream(lines, top=height - MARGIN))
    return _write_pdf(streams, heights)


def make_image_only_pdf() -> bytes:
    """A valid one-page PDF that draws a filled rectangle and no text at all, like a scan."""
    stream = b"q 0.2 0.4 0.8 rg 72 500 300 200 re f Q\n"
    return _write_pdf([stream], [PAGE_HEIGHT])


def make_encrypted_pdf(
    pages: list[str] | None = None, user_password: str = "secret", owner_password: str = "owner"
) -> bytes:
    """make_pdf's output encrypted by pypdf; with an empty user password it opens without one."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages or ["Confidential text."]))))
    # RC4 is what pypdf can both write and read without an optional crypto package.
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def corrupt_pdf() -> bytes:
    """Starts like a PDF, then seeded binary garbage: no objects, no xref, no trailer."""
    rng = random.Random(1234)
    return b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(rng.randrange(256) for _ in range(4096))


def make_html(title: str, paragraphs: list[str]) -> bytes:
    """An HTML page with head, script, style and noscript around the text, as real pages have."""
    body = "\n".join(f"    <p>{html.escape(paragraph)}</p>" for paragraph in paragraphs)
    document = f"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>{html.escape(title)}</title>
    <style>body {{ font-family: sans-serif; }} p::before {{ content: "STYLE-TEXT"; }}</style>
    <script>window.trackingId = "SCRIPT-TEXT";</script>
  </head>
  <body>
    <noscript>NOSCRIPT-TEXT</noscript>
    <h1>{html.escape(title)}</h1>
{body}
    <script>console.log("SCRIPT-TEXT");</script>
  </body>
</html>
"""
    return document.encode("utf-8")


def make_markdown(title: str, paragraphs: list[str]) -> bytes:
    return (f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n").encode("utf-8")


def make_docx(
    blocks: list[str | tuple[int, str] | list[list[str]]], header: str | None = None, footer: str | None = None
) -> bytes:
    """A Word document written by python-docx, in the order given.

    A block is a paragraph (a string), a heading (``(level, text)``: level 1-9 is the
    style "Heading N", 0 is "Title") or a table (a list of rows, each a list of cell
    texts). ``header`` and ``footer`` go into the section's header and footer.
    """
    import docx

    document = docx.Document()
    for block in blocks:
        if isinstance(block, str):
            document.add_paragraph(block)
        elif isinstance(block, tuple):
            level, text = block
            document.add_heading(text, level)
        else:
            table = document.add_table(rows=len(block), cols=max(len(row) for row in block))
            for cells, row in zip(table.rows, block):
                for cell, text in zip(cells.cells, row):
                    cell.text = text
    section = document.sections[0]
    if header is not None:
        section.header.paragraphs[0].text = header
    if footer is not None:
        section.footer.paragraphs[0].text = footer
    out = io.BytesIO()
    document.save(out)
    return _fixed_zip_times(out.getvalue())


def make_pptx(slides: list[dict]) -> bytes:
    """A PowerPoint deck written by python-pptx, one slide per dict, on the "Title and Content" layout.

    Each dict may have ``title`` (str), ``text`` (the body placeholder's paragraphs, a
    list of str), ``boxes`` (text boxes added after it, a list of str), ``table`` (rows of
    cell texts) and ``notes`` (the speaker notes, str).
    """
    from pptx import Presentation
    from pptx.util import Inches

    deck = Presentation()
    layout = deck.slide_layouts[1]
    for spec in slides:
        slide = deck.slides.add_slide(layout)
        if spec.get("title") is not None:
            slide.shapes.title.text = spec["title"]
        body = slide.placeholders[1]
        for number, text in enumerate(spec.get("text") or []):
            paragraph = body.text_frame.paragraphs[0] if number == 0 else body.text_frame.add_paragraph()
            paragraph.text = text
        for number, text in enumerate(spec.get("boxes") or []):
            box = slide.shapes.add_textbox(Inches(1), Inches(4 + 0.5 * number), Inches(8), Inches(0.5))
            box.text_frame.text = text
        rows = spec.get("table")
        if rows:
            shape = slide.shapes.add_table(
                len(rows), max(len(row) for row in rows), Inches(1), Inches(5.5), Inches(8), Inches(1)
            )
            for row_number, row in enumerate(rows):
                for column, text in enumerate(row):
                    shape.table.cell(row_number, column).text = text
        if spec.get("notes") is not None:
            slide.notes_slide.notes_text_frame.text = spec["notes"]
    out = io.BytesIO()
    deck.save(out)
    return _fixed_zip_times(out.getvalue())


def _fixed_zip_times(data: bytes) -> bytes:
    """The same ZIP with every entry dated 1980-01-01, so the same content gives the same bytes."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            fixed = zipfile.ZipInfo(entry.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(fixed, source.read(entry))
    return out.getvalue()


def _wrap(text: str) -> list[str]:
    lines: list[str] = []
    for paragraph in text.replace("\r\n", "\n").split("\n"):
        # an empty source line stays an empty line, so paragraphs keep their gap
        lines.extend(textwrap.wrap(paragraph, LINE_CHARACTERS, break_long_words=True) or [""])
    return lines


def _pdf_string(line: str) -> bytes:
    # Helvetica with WinAnsiEncoding covers cp1252; anything else becomes "?".
    raw = line.replace("\t", " ").encode("cp1252", errors="replace")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _text_stream(lines: list[str], top: int) -> bytes:
    ops = [b"BT", b"/F1 %d Tf" % FONT_SIZE, b"%d %d Td" % (MARGIN, top)]
    for number, line in enumerate(lines):
        if number:
            ops.append(b"0 -%d Td" % LEADING)
        if line.strip():
            ops.append(_pdf_string(line) + b" Tj")
    ops.append(b"ET")
    return b"\n".join(ops) + b"\n"


def _write_pdf(streams: list[bytes], heights: list[int]) -> bytes:
    """Objects 1-3 are catalog, page tree and font; then a page and its content stream per page."""
    page_ids = [4 + 2 * n for n in range(len(streams))]
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % i for i in page_ids), len(streams)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for page_id, stream, height in zip(page_ids, streams, heights):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (PAGE_WIDTH, height, page_id + 1)
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream")
    return pdf_of_objects(objects)


def pdf_of_objects(objects: list[bytes]) -> bytes:
    """A PDF of numbered objects (object 1 the catalog) with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f \n"  # every entry is exactly 20 bytes, the space before \n included
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)
