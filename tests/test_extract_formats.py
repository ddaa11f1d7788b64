"""Word and PowerPoint files, text in any encoding and HTML main text, as the chunker reads them."""

from __future__ import annotations

import io
import multiprocessing
import random
import socket
import zipfile
from concurrent.futures import ProcessPoolExecutor

import pytest

from pipeline.errors import ExtractionError, ExtractionLimitExceeded
from pipeline.local.documents import lorem_pages, make_docx, make_html, make_pptx
from pipeline.text.chunking import chunk_document
from pipeline.text.content_types import (
    DOCX,
    OLE_MAGIC,
    PPTX,
    SNIFF_BYTES,
    SUPPORTED_CONTENT_TYPES,
    detect_content_type,
    sniff_office,
)
from pipeline.text.extract import decode_text, extract_pages, html_to_text

REPORT_BLOCKS = [
    (0, "Annual Report"),
    "Prepared by the finance team.",
    (1, "Revenue"),
    "Revenue grew by twelve percent, driven by sensors sold in Europe.",
    [["Region", "Revenue", "Growth"], ["Europe", "12.4", "14%"], ["Asia", "8.1", "9%"]],
    (2, "Costs"),
    "Operating costs fell because the new warehouse shortened shipping routes.",
]

DECK = [
    {
        "title": "Kickoff",
        "text": ["Goals for the year", "Hire two engineers"],
        "boxes": ["A loose text box"],
        "table": [["Quarter", "Target"], ["Q1", "10"], ["Q2", "20"]],
        "notes": "Speak slowly.\nThank the sponsors.",
    },
    {"title": "Nothing but a title"},
    {},  # a slide without any text keeps its number
    {"title": "Wrap-up", "text": ["Questions welcome"], "notes": "End on time."},
]


# --- Word --------------------------------------------------------------------------------


def test_docx_reads_in_order_with_headings_and_table_rows():
    [text] = extract_pages(make_docx(REPORT_BLOCKS, header="HEADER-WORDS", footer="FOOTER-WORDS"), DOCX)

    assert text == (
        "# Annual Report\n\n"
        "Prepared by the finance team.\n\n"
        "# Revenue\n\n"
        "Revenue grew by twelve percent, driven by sensors sold in Europe.\n\n"
        "Region | Revenue | Growth\nEurope | 12.4 | 14%\nAsia | 8.1 | 9%\n\n"
        "## Costs\n\n"
        "Operating costs fell because the new warehouse shortened shipping routes."
    )
    assert "HEADER-WORDS" not in text and "FOOTER-WORDS" not in text


def test_docx_chunks_are_one_page_and_keep_headings_with_their_sections():
    chunked = chunk_document(make_docx(REPORT_BLOCKS), DOCX, chunk_size=160, chunk_overlap=0)

    assert chunked.pages == 1
    assert {chunk.page for chunk in chunked.chunks} == {1}
    texts = [chunk.text for chunk in chunked.chunks]
    assert len(texts) > 1
    assert any("## Costs\n\nOperating costs fell because the new warehouse" in text for text in texts)
    assert any("Region | Revenue | Growth\nEurope | 12.4 | 14%" in text for text in texts)
    # no chunk ends with a heading cut off from its section
    assert not any(text.splitlines()[-1].startswith("#") for text in texts)


def test_docx_merged_and_nested_table_cells_are_read_once():
    import docx

    document = docx.Document()
    table = document.add_table(rows=2, cols=3)
    merged = table.cell(0, 0).merge(table.cell(0, 1))
    merged.text = "Spanning two columns"
    table.cell(0, 2).text = "Third"
    table.cell(1, 0).text = "Left"
    table.cell(1, 1).add_table(rows=1, cols=2).rows[0].cells[0].text = "Nested cell"
    out = io.BytesIO()
    document.save(out)

    assert extract_pages(out.getvalue(), DOCX) == ["Spanning two columns | Third\nLeft | Nested cell"]


def test_docx_reads_content_controls():
    import docx
    from docx.oxml import parse_xml
    from docx.oxml.ns import nsdecls

    document = docx.Document()
    document.add_paragraph("Before the control.")
    document.element.body.insert(
        1,
        parse_xml(
            f"<w:sdt {nsdecls('w')}><w:sdtContent><w:p><w:r><w:t>Inside a content control.</w:t></w:r></w:p>"
            "</w:sdtContent></w:sdt>"
        ),
    )
    out = io.BytesIO()
    document.save(out)

    assert extract_pages(out.getvalue(), DOCX) == ["Before the control.\n\nInside a content control."]


# --- PowerPoint --------------------------------------------------------------------------


def test_pptx_gives_one_page_per_slide_title_first_notes_last():
    pages = extract_pages(make_pptx(DECK), PPTX)

    assert pages == [
        "# Kickoff\n\n"
        "Goals for the year\nHire two engineers\n\n"
        "A loose text box\n\n"
        "Quarter | Target\nQ1 | 10\nQ2 | 20\n\n"
        "Notes: Speak slowly.\nThank the sponsors.",
        "# Nothing but a title",
        "",
        "# Wrap-up\n\nQuestions welcome\n\nNotes: End on time.",
    ]


def test_pptx_chunks_carry_their_slide_numbers():
    deck = [
        {"title": f"Slide {n}", "text": [page], "notes": f"notes{n}"}
        for n, page in enumerate(lorem_pages(3, 60, seed=31), start=1)
    ]

    chunked = chunk_document(make_pptx(deck), PPTX, chunk_size=200, chunk_overlap=20)

    assert chunked.pages == 3
    assert {chunk.page for chunk in chunked.chunks} == {1, 2, 3}
    first_of_page = {chunk.page: chunk for chunk in reversed(chunked.chunks)}
    last_of_page = {chunk.page: chunk for chunk in chunked.chunks}
    for n in (1, 2, 3):
        assert first_of_page[n].text.startswith(f"# Slide {n}\n\n")
        assert last_of_page[n].text.endswith(f"Notes: notes{n}")


def test_pptx_with_more_slides_than_allowed_fails_as_a_limit():
    with pytest.raises(ExtractionLimitExceeded, match="^presentation has 4 slides, more than the 3 pages"):
        extract_pages(make_pptx(DECK), PPTX, max_pages=3)
    assert len(extract_pages(make_pptx(DECK), PPTX, max_pages=4)) == 4


def test_office_files_are_extracted_in_the_process_pool():
    docx_data, pptx_data = make_docx(REPORT_BLOCKS), make_pptx(DECK)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        from_docx = pool.submit(chunk_document, docx_data, DOCX, 500, 50).result(timeout=120)
        from_pptx = pool.submit(chunk_document, pptx_data, PPTX, 500, 50).result(timeout=120)
        failure = pool.submit(chunk_document, docx_data[:2000], DOCX, 500, 50).exception(timeout=120)

    assert from_docx == chunk_document(docx_data, DOCX, 500, 50)
    assert from_pptx == chunk_document(pptx_data, PPTX, 500, 50)
    assert isinstance(failure, ExtractionError) and str(failure).startswith("file is not a valid Word document")


# --- broken, encrypted and legacy Office files ---------------------------------------------


def _compound_file(*stream_names: str) -> bytes:
    """The first bytes of a Compound File Binary with a directory naming these streams, as Office writes it."""
    directory = b"".join(name.encode("utf-16-le").ljust(64, b"\x00") + bytes(64) for name in stream_names)
    return OLE_MAGIC + bytes(504) + directory


@pytest.mark.parametrize(
    "content_type, data, reason",
    [
        (DOCX, lambda: make_docx(["Some words."])[:1500], "^file is not a valid Word document \\(.docx\\): .+"),
        (PPTX, lambda: make_pptx(DECK)[:1500], "^file is not a valid PowerPoint presentation \\(.pptx\\): .+"),
        (DOCX, lambda: b"PK\x03\x04" + bytes(300), "^file is not a valid Word document"),
        (DOCX, lambda: b"just some words in a file named .docx", "^file is not a valid Word document"),
        (DOCX, lambda: make_pptx(DECK), "^file is not a valid Word document \\(.docx\\): .*not a Word file"),
        (PPTX, lambda: make_docx(["Some words."]), "^file is not a valid PowerPoint presentation"),
        (
            DOCX,
            lambda: _compound_file("Root Entry", "EncryptionInfo", "EncryptedPackage"),
            "^Word document is encrypted \\(it needs a password to open\\)$",
        ),
        (
            PPTX,
            lambda: _compound_file("Root Entry", "EncryptionInfo", "EncryptedPackage"),
            "^PowerPoint presentation is encrypted \\(it needs a password to open\\)$",
        ),
        (DOCX, lambda: _compound_file("Root Entry", "WordDocument"), "^file is a Word 97-2003 document \\(.doc\\)"),
        (PPTX, lambda: _compound_file("Root Entry", "PowerPoint Document"), "^file is a PowerPoint 97-2003"),
    ],
    ids=[
        "truncated-docx",
        "truncated-pptx",
        "empty-zip",
        "text-named-docx",
        "pptx-as-docx",
        "docx-as-pptx",
        "encrypted-docx",
        "encrypted-pptx",
        "legacy-doc",
        "legacy-ppt",
    ],
)
def test_broken_office_files_fail_with_a_readable_reason(content_type, data, reason):
    with pytest.raises(ExtractionError, match=reason):
        extract_pages(data(), content_type)


def test_office_file_without_text_has_no_text():
    with pytest.raises(ExtractionError, match="^document has no text$"):
        extract_pages(make_pptx([{}, {}]), PPTX)


# --- content type detection ----------------------------------------------------------------


def _head(data: bytes) -> bytes:
    # what the web role sees of an upload
    return data[:SNIFF_BYTES]


def _streamed_zip(entries: dict[str, bytes]) -> bytes:
    """A ZIP written to a stream that cannot seek: sizes come after each entry (bit 3), not in its header."""

    class Unseekable(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += b
            return len(b)

    out = Unseekable()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, body in entries.items():
            archive.writestr(name, body)
    return bytes(out.data)


@pytest.mark.parametrize("make, expected", [(lambda: make_docx(REPORT_BLOCKS), DOCX), (lambda: make_pptx(DECK), PPTX)])
@pytest.mark.parametrize(
    "filename, declared",
    [
        ("report", None),
        ("upload.bin", "application/octet-stream"),
        ("notes.txt", "text/plain"),  # the content says otherwise, and wins
        ("archive.zip", "application/zip"),
    ],
)
def test_office_files_are_sniffed_from_the_head_whatever_their_name(make, expected, filename, declared):
    assert detect_content_type(filename, declared, _head(make())) == expected


@pytest.mark.parametrize(
    "filename, declared, expected",
    [
        ("letter.docx", None, DOCX),
        ("deck.PPTX", "application/octet-stream", PPTX),
        ("blob", DOCX, DOCX),
        ("blob", PPTX, PPTX),
        ("blob", None, None),
        ("book.xlsx", None, None),
        ("a.txt", "text/plain", None),
    ],
)
def test_a_zip_whose_head_does_not_tell_goes_by_name_and_declared_type(filename, declared, expected):
    # A first entry too large for the head: its name is all the head shows, and it is neither word/ nor ppt/.
    data = _streamed_zip({"customXml/item1.xml": random.Random(5).randbytes(20_000), "docProps/app.xml": b""})
    assert sniff_office(_head(data)) is None

    assert detect_content_type(filename, declared, _head(data)) == expected


def test_sniffing_reads_entry_names_of_streamed_zips_and_a_partial_content_types_list():
    streamed = _streamed_zip({"[Content_Types].xml": b"<Types/>", "_rels/.rels": b"", "ppt/presentation.xml": b""})
    assert sniff_office(streamed) == PPTX
    # Only [Content_Types].xml's start fits: the main part's type listed in it is enough.
    docx_data, pptx_data = make_docx(["x"]), make_pptx([{}])
    assert b"word/" not in docx_data[:400] and b"ppt/" not in pptx_data[:400]
    assert sniff_office(docx_data[:400]) == DOCX
    assert sniff_office(pptx_data[:400]) == PPTX
    assert sniff_office(b"PK\x03\x04") is None
    assert sniff_office(b"%PDF-1.7 PK\x03\x04") is None


def test_office_types_are_supported_and_named():
    assert {DOCX, PPTX} <= set(SUPPORTED_CONTENT_TYPES)
    assert detect_content_type("old.doc", "application/msword", OLE_MAGIC) is None


# --- text encodings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("Façade, café, résumé and naïve: à la carte, El niño está aquí, Größe.", "latin-1"),
        ("Déjà vu", "latin-1"),
        ("The “smart” quotes — and the euro sign €100 — are Windows-1252’s own.", "cp1252"),
        ("“Windows” quotes – café", "cp1252"),
        ("UTF-16 with its byte order mark: café, 日本", "utf-16"),
        ("UTF-16 big-endian: café", "utf-16-be-bom"),
        ("日本語のテキストです。これはシフトJISで書かれた文書で、文字コードの判定を確かめます。", "shift_jis"),
        ("Plain UTF-8 — naïve ✓ 日本語", "utf-8"),
        ("UTF-8 with a BOM: café", "utf-8-sig"),
        ("Příliš žluťoučký kůň úpěl ďábelské ódy. Čeština používá háčky a čárky.", "cp1250"),
        ("Привет, мир. Это текст в кодировке windows-1251, проверяем определение.", "cp1251"),
    ],
    ids=[
        "latin-1",
        "latin-1-short",
        "cp1252",
        "cp1252-short",
        "utf-16",
        "utf-16-be",
        "shift-jis",
        "utf-8",
        "utf-8-bom",
        "cp1250",
        "cp1251",
    ],
)
def test_text_in_common_encodings_decodes_right(text, encoding):
    data = b"\xfe\xff" + text.encode("utf-16-be") if encoding == "utf-16-be-bom" else text.encode(encoding)

    assert extract_pages(data, "text/plain") == [text]


def test_latin_1_with_stray_bytes_still_decodes():
    # what tests/test_trust_boundary.py uploads as "invalid UTF-8 in a text file"
    data = "Façade café résumé naïve ".encode("latin-1") * 40 + b"\xff\xfe\xfd"

    assert decode_text(data).startswith("Façade café résumé naïve Façade")


@pytest.mark.parametrize("data", [bytes(range(256)) * 8, b"\x00\x01\x02\x03" * 1000 + "é".encode("latin-1")])
def test_binary_bytes_are_refused_as_not_text(data):
    with pytest.raises(ExtractionError, match="^file is not text"):
        extract_pages(data, "text/plain")


# --- HTML main text --------------------------------------------------------------------------

ARTICLE_SENTENCES = [
    "Revenue grew by twelve percent in the third quarter, driven by strong demand for industrial sensors.",
    "Operating costs fell slightly because the new warehouse in Rotterdam reduced shipping distances.",
    "The board expects the outlook to remain stable for the rest of the financial year.",
]
BOILERPLATE_PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Acme news</title></head>
<body>
<div id="cookie-banner" class="cookie-consent">We use cookies. Accept all cookies or manage preferences.</div>
<header><a href="/">Acmelogo</a><nav><ul><li><a href="/products">Productsmenu</a></li>
<li><a href="/about">Aboutmenu</a></li><li><a href="https://tracker.example/pixel">Trackermenu</a></li></ul></nav></header>
<aside class="sidebar"><h3>Relatedposts</h3><ul><li><a href="/a">Sidebarlink alpha</a></li></ul></aside>
<main><article>
<h1>Quarterly report</h1>
<p>{ARTICLE_SENTENCES[0]}</p>
<h2>Costs</h2>
<p>{ARTICLE_SENTENCES[1]} {ARTICLE_SENTENCES[2]}</p>
</article></main>
<footer><p>Copyright Footercorp. All rights reserved.</p><a href="/privacy">Privacyfooter</a></footer>
</body></html>""".encode()


def test_html_keeps_the_article_and_drops_navigation_footer_sidebar_and_banner():
    [text] = extract_pages(BOILERPLATE_PAGE, "text/html")

    for sentence in ARTICLE_SENTENCES:
        assert sentence in text
    assert text.splitlines()[:3] == ["Quarterly report", ARTICLE_SENTENCES[0], "Costs"]
    for boilerplate in (
        "Acmelogo",
        "Productsmenu",
        "Aboutmenu",
        "Trackermenu",
        "Relatedposts",
        "Sidebarlink",
        "Footercorp",
        "Privacyfooter",
        "cookies",
        "Acme news",
    ):
        assert boilerplate not in text


def test_html_extraction_never_touches_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("HTML extraction tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)

    assert ARTICLE_SENTENCES[0] in html_to_text(BOILERPLATE_PAGE)


def test_html_document_without_main_element_keeps_headings_lists_and_tables():
    body = "".join(
        f"<h2>Part {n}</h2><p>{page}</p><ul><li>item {n} alpha</li><li>item {n} beta</li></ul>"
        f"<table><tr><td>cell {n}</td><td>value {n}</td></tr></table>"
        for n, page in enumerate(lorem_pages(4, 80, seed=41))
    )
    [text] = extract_pages(f"<html><body><h1>Exported handbook</h1>{body}</body></html>".encode(), "text/html")

    lines = text.splitlines()
    assert lines[0] == "Exported handbook"
    for n in range(4):
        assert f"Part {n}" in lines
        assert f"- item {n} alpha" in lines
        assert f"| cell {n} | value {n} |" in lines


def test_html_falls_back_to_the_whole_visible_text_when_no_main_text_is_found(monkeypatch):
    import trafilatura

    monkeypatch.setattr(trafilatura, "extract", lambda *args, **kwargs: None)

    assert extract_pages(make_html("Small page", ["Only this."]), "text/html") == ["Small page Only this."]


def test_html_in_a_legacy_encoding_without_a_declaration_decodes():
    page = "<html><body><p>日本語のテキストです。これはシフトJISで書かれたページです。</p></body></html>"

    assert extract_pages(page.encode("shift_jis"), "text/html") == [
        "日本語のテキストです。これはシフトJISで書かれたページです。"
    ]
