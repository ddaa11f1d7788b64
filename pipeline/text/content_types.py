"""What kind of document an upload is, decided from its name, declared type and first bytes.

The web role imports this module alone from ``pipeline.text``: it decides at upload time
whether docflow can read a file, without importing any extraction library.

The web role sees only the first bytes of an upload (``SNIFF_BYTES``, 8 KB).
That is enough for a PDF's magic, and usually for an Office file too: a DOCX or PPTX is a
ZIP whose entries each start with a local header naming the entry, and the first entries
(``[Content_Types].xml``, ``_rels/.rels``, then the ``word/`` or ``ppt/`` parts, in files
written by Word, PowerPoint, LibreOffice, python-docx and python-pptx alike) are small.
:func:`sniff_office` reads those names, and inflates ``[Content_Types].xml`` when it lies in
the head, with zlib only. When the head does not tell (a large first entry), a ZIP counts as
DOCX or PPTX by its extension or declared type, and extraction fails with a readable
reason if it is something else.
"""

from __future__ import annotations

import os
import struct
import zlib

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"

SUPPORTED_CONTENT_TYPES = ("application/pdf", "text/plain", "text/markdown", "text/html", DOCX, PPTX)

PDF_MAGIC = b"%PDF-"
# How much of a file detection looks at: what the web role has read of an upload when it decides.
SNIFF_BYTES = 8192
ZIP_MAGIC = b"PK\x03\x04"
# Compound File Binary: legacy .doc/.ppt, and Office files encrypted with a password.
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

_TYPE_BY_EXTENSION = {
    ".pdf": "application/pdf",
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".htm": "text/html",
    ".html": "text/html",
    ".docx": DOCX,
    ".pptx": PPTX,
}
_TYPE_BY_DECLARED = {
    "application/pdf": "application/pdf",
    "application/x-pdf": "application/pdf",
    "text/plain": "text/plain",
    "text/markdown": "text/markdown",
    "text/x-markdown": "text/markdown",
    "text/html": "text/html",
    "application/xhtml+xml": "text/html",
    DOCX: DOCX,
    PPTX: PPTX,
}
# Types that say nothing about the content: clients send them when they do not know.
_UNKNOWN_DECLARED = {"", "application/octet-stream", "binary/octet-stream", "application/unknown"}
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def detect_content_type(filename: str, declared: str | None, head: bytes) -> str | None:
    """One of SUPPORTED_CONTENT_TYPES, or None when the file is of a type docflow does not read.

    The PDF magic wins over everything, then a ZIP whose first entries are a Word or
    PowerPoint document's; then a known extension, because browsers declare text/plain or
    octet-stream for .md and .html; then the declared type. A file named .pdf (or .docx,
    .pptx) that is not one still counts as one and fails extraction with a readable reason.
    """
    if head.startswith(PDF_MAGIC):
        return "application/pdf"
    office = sniff_office(head)
    if office is not None:
        return office
    extension = os.path.splitext(filename or "")[1].lower()
    detected = _TYPE_BY_EXTENSION.get(extension)
    if detected is None:
        mime = (declared or "").split(";", 1)[0].strip().lower()
        if mime not in _UNKNOWN_DECLARED:
            detected = _TYPE_BY_DECLARED.get(mime)
    if detected in ("text/plain", "text/markdown", "text/html") and looks_binary(head):
        # A zip or an image labelled as text would turn into chunks of mojibake.
        return None
    return detected


def looks_binary(head: bytes) -> bool:
    """NUL bytes without a UTF-16 byte order mark: no text encoding docflow reads has them."""
    return b"\x00" in head and not head.startswith(UTF16_BOMS)


# A ZIP local file header: signature, version, flags, method, time, date, CRC-32,
# compressed size, uncompressed size, name length, extra length; then the name.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_CONTENT_TYPES_PART = "[Content_Types].xml"
_MAIN_PART_TYPES = ((b"wordprocessingml.document.main+xml", DOCX), (b"presentationml.presentation.main+xml", PPTX))
_PART_PREFIXES = (("word/", DOCX), ("ppt/", PPTX))


def sniff_office(head: bytes) -> str | None:
    """DOCX or PPTX when the first bytes of a ZIP show a Word or PowerPoint package, else None.

    Every local header in ``head`` is looked at, found by its signature rather than by
    skipping sizes, since a ZIP written as a stream (bit 3) has none in its local headers.
    """
    if not head.startswith(ZIP_MAGIC):
        return None
    at = 0
    while (at := head.find(ZIP_MAGIC, at)) >= 0 and at + _LOCAL_HEADER.size <= len(head):
        _, _, flags, method, _, _, _, size, _, name_length, extra_length = _LOCAL_HEADER.unpack_from(head, at)
        name_at = at + _LOCAL_HEADER.size
        name = head[name_at : name_at + name_length].decode("cp437", errors="replace")
        at = name_at
        for prefix, content_type in _PART_PREFIXES:
            if name.startswith(prefix):
                return content_type
        if name == _CONTENT_TYPES_PART and not flags & 1:  # bit 0: the entry is encrypted
            data_at = name_at + name_length + extra_length
            listed = _inflated(head[data_at : data_at + size if size and not flags & 8 else None], method)
            for marker, content_type in _MAIN_PART_TYPES:
                if marker in listed:
                    return content_type
    return None


def _inflated(data: bytes, method: int) -> bytes:
    """As much of an entry as ``data`` holds, stored or deflated; b"" for anything else."""
    if method == 0:
        return data
    if method != 8:
        return b""
    try:
        # Bounded: the head is 8 KB, and what it inflates to is capped too.
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 256 * 1024)
    except zlib.error:
        return b""
