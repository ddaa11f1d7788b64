"""Hostile documents, built in memory in a blink: what an attacker or a broken client uploads."""

from __future__ import annotations

import functools
import io
import zlib

from pipeline.local import documents

BOMB_MB = 1100  # what the bomb's content stream inflates to, in MiB

_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
_PAGE = (
    b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents 5 0 R >>"
)


def write_pdf(pages_object: bytes, content: bytes, content_dict: bytes = b"") -> bytes:
    """Catalog, page tree, font, one page and its content stream, with a correct xref table."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        pages_object,
        _FONT,
        _PAGE,
        b"<< /Length %d %s>>\nstream\n" % (len(content), content_dict) + content + b"\nendstream",
    ]
    return documents.pdf_of_objects(objects)


def one_page_pdf(content: bytes, content_dict: bytes = b"", declared_pages: int = 1) -> bytes:
    return write_pdf(b"<< /Type /Pages /Kids [4 0 R] /Count %d >>" % declared_pages, content, content_dict)


def page_count_bomb(declared_pages: int = 100_000) -> bytes:
    """One real page under a page tree that declares ``declared_pages``."""
    return one_page_pdf(b"BT /F1 10 Tf 72 700 Td (one real page) Tj ET\n", declared_pages=declared_pages)


def inflating_stream(prefix: bytes, megabytes: int) -> bytes:
    """A zlib stream of ``prefix`` and then ``megabytes`` MiB of spaces, built in a blink.

    After a full flush the compressor starts afresh, so every MiB of spaces compresses to
    the same bytes: they are repeated instead of compressing a gigabyte, and the Adler-32
    checksum is computed piece by piece. Nothing of that size is ever held in memory.
    """
    compressor = zlib.compressobj(9)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    piece = b" " * (1 << 20)
    block = compressor.compress(piece) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = zlib.adler32(prefix)
    for _ in range(megabytes):
        checksum = zlib.adler32(piece, checksum)
    # an empty final block with fixed codes (BFINAL=1, BTYPE=01, end of block), then the checksum
    return head + block * megabytes + b"\x03\x00" + checksum.to_bytes(4, "big")


@functools.lru_cache(maxsize=4)
def flate_bomb(megabytes: int = BOMB_MB, double: bool = False) -> bytes:
    """A one-page PDF whose /FlateDecode content stream inflates to ``megabytes`` MiB (of whitespace).

    ``double`` deflates it once more, under [/FlateDecode /FlateDecode]: a few KB on disk.
    """
    stream = inflating_stream(b"BT /F1 10 Tf 72 700 Td (bomb) Tj ET\n", megabytes)
    if double:
        return one_page_pdf(zlib.compress(stream, 9), b"/Filter [/FlateDecode /FlateDecode] ")
    return one_page_pdf(stream, b"/Filter /FlateDecode ")


def slow_pdf(operators: int = 3_000_000) -> bytes:
    """A page of millions of tiny text operators: ~50 KB on disk, minutes of pypdf's time."""
    return one_page_pdf(
        zlib.compress(b"BT /F1 10 Tf 72 700 Td " + b"(ab) Tj " * operators + b"ET\n", 9), b"/Filter /FlateDecode "
    )


def aes_encrypted_pdf() -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(documents.make_pdf(["Top secret."]))))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
