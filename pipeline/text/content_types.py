"""What kind of document an upload is, decided from its name, declared type and first bytes.

The web role imports this module alone from ``pipeline.text``: it decides at upload time
whether docflow can read a file, without importing any extraction library.
"""

from __future__ import annotations

import os

SUPPORTED_CONTENT_TYPES = ("application/pdf", "text/plain", "text/markdown", "text/html")

PDF_MAGIC = b"%PDF-"

_TYPE_BY_EXTENSION = {
    ".pdf": "application/pdf",
    ".txt": "text/plain",
    ".text": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".htm": "text/html",
    ".html": "text/html",
}
_TYPE_BY_DECLARED = {
    "application/pdf": "application/pdf",
    "application/x-pdf": "application/pdf",
    "text/plain": "text/plain",
    "text/markdown": "text/markdown",
    "text/x-markdown": "text/markdown",
    "text/html": "text/html",
    "application/xhtml+xml": "text/html",
}
# Types that say nothing about the content: clients send them when they do not know.
_UNKNOWN_DECLARED = {"", "application/octet-stream", "binary/octet-stream", "application/unknown"}
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def detect_content_type(filename: str, declared: str | None, head: bytes) -> str | None:
    """One of SUPPORTED_CONTENT_TYPES, or None when the file is of a type docflow does not read.

    The PDF magic wins over everything; then a known extension, because browsers declare
    text/plain or octet-stream for .md and .html; then the declared type. A file named
    .pdf that is not one still counts as a PDF and fails extraction with a readable reason.
    """
    if head.startswith(PDF_MAGIC):
        return "application/pdf"
    extension = os.path.splitext(filename or "")[1].lower()
    detected = _TYPE_BY_EXTENSION.get(extension)
    if detected is None:
        mime = (declared or "").split(";", 1)[0].strip().lower()
        if mime not in _UNKNOWN_DECLARED:
            detected = _TYPE_BY_DECLARED.get(mime)
    if detected in ("text/plain", "text/markdown", "text/html") and _looks_binary(head):
        # A zip or an image labelled as text would turn into chunks of mojibake.
        return None
    return detected


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head and not head.startswith(UTF16_BOMS)
