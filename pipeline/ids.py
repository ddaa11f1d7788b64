"""Identifiers docflow derives or accepts: company and document ids, safe filenames, object
keys and chunk ids. Everything that turns untrusted input into a name goes through here.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from urllib.parse import unquote

MAX_FILENAME_BYTES = 200

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNSAFE_FILENAME_CHARS = re.compile(r"[^\w.\- ()+,=@]", re.UNICODE)

# Fixed forever: chunk ids derive from it, and a redelivered document must get the same
# ids so that downstream upserts replace chunks instead of duplicating them.
CHUNK_ID_NAMESPACE = uuid.UUID("5b0a3c0e-6f8d-4b8e-9a51-2f4c1d7e9b63")


def valid_id(value: str) -> bool:
    """Company and document ids are short, printable and cannot climb out of a prefix."""
    return bool(_ID_PATTERN.fullmatch(value)) and ".." not in value


def new_document_id() -> str:
    return str(uuid.uuid4())


def sanitize_filename(filename: str) -> str:
    """A filename safe as the last key segment: no directories, no control characters, bounded."""
    # Percent-decoded first: some clients quote '/' in multipart filenames as %2F.
    name = unicodedata.normalize("NFC", unquote(filename)).replace("\\", "/")
    name = name.rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _UNSAFE_FILENAME_CHARS.sub("_", name).strip(" .")
    if not name:
        return "document"
    stem, dot, ext = name.rpartition(".")
    if not dot or len(ext.encode()) > 16:
        stem, ext = name, ""
    suffix = f".{ext}" if ext else ""
    budget = MAX_FILENAME_BYTES - len(suffix.encode())
    stem = stem.encode()[:budget].decode(errors="ignore").rstrip(" .") or "document"
    return stem + suffix


def object_key(company_id: str, document_id: str, filename: str) -> str:
    """``{company_id}/{document_id}/{filename}``, refusing ids that could climb out of their prefix."""
    for label, value in (("company id", company_id), ("document id", document_id)):
        if not valid_id(value):
            raise ValueError(f"invalid {label}: {value!r}")
    return f"{company_id}/{document_id}/{sanitize_filename(filename)}"


def chunk_id(document_id: str, index: int) -> str:
    return str(uuid.uuid5(CHUNK_ID_NAMESPACE, f"{document_id}:{index}"))
