"""``file://`` storage: objects as files under a root directory (the embedded default).

``put`` streams to a temporary file beside the target and renames it into place, so a
reader never sees half an object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.errors import ObjectNotFound
from pipeline.storage.base import READ_CHUNK_BYTES, Body, ObjectStorage, StoredObject, iterate


class FileStorage(ObjectStorage):
    """Objects as files under a root directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @classmethod
    def from_url(cls, url: str, **options: str) -> FileStorage:
        parsed = urlparse(url)
        return cls(Path(unquote(parsed.netloc + parsed.path)))

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"key escapes the storage root: {key!r}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValueError(f"not a file:// URI: {uri!r}")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{uri!r} is outside {self.root}")
        return path.relative_to(self.root).as_posix()

    async def put(self, key: str, body: Body, content_type: str = "application/octet-stream") -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as tmp:
                async for piece in iterate(body):
                    tmp.write(piece)
                    digest.update(piece)
                    size += len(piece)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return StoredObject(key, path.as_uri(), size, digest.hexdigest())

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        try:
            handle = open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        with handle:
            while piece := handle.read(READ_CHUNK_BYTES):
                yield piece

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
