"""``file://`` storage: objects as files under a root directory (the embedded default).

``put`` streams to a temporary file beside the target and renames it into place, so a
reader never sees half an object. Every disk operation runs in the storage's own small
thread pool, never on the event loop: a slow disk (or NFS) must not stall the loop that
also heartbeats to Kafka (docs/architecture.md, "Roles").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import unquote, urlparse

from pipeline.errors import ObjectNotFound
from pipeline.storage.base import READ_CHUNK_BYTES, Body, ListedObject, ObjectStorage, StoredObject, iterate

# Threads of one storage's pool: each operation is short, they only need to overlap a little.
DISK_THREADS = 8
DISK_THREAD_PREFIX = "docflow-file-storage"
TEMP_PREFIX = ".upload-"
LIST_BATCH = 1000

T = TypeVar("T")


class _Upload:
    """One ``put`` in progress: its state lives here so that the cleanup knows what exists."""

    def __init__(self, storage: FileStorage, key: str) -> None:
        self.storage, self.key = storage, key
        self.path: Path | None = None
        self.tmp_name: str | None = None
        self.handle: IO[bytes] | None = None
        self.digest, self.size = hashlib.sha256(), 0
        self.committed = False

    def open(self) -> None:
        self.path = self.storage._path(self.key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp_name = tempfile.mkstemp(dir=self.path.parent, prefix=TEMP_PREFIX)
        self.handle = os.fdopen(fd, "wb")

    def write(self, piece: bytes) -> None:
        self.handle.write(piece)
        self.digest.update(piece)  # hashing a megabyte is CPU work too: off the loop with the write
        self.size += len(piece)

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp_name, self.path)
        self.committed = True

    def abandon(self) -> None:
        """Remove whatever this put left: the temporary file, and the object if the rename already happened."""
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
        for name in (self.tmp_name, self.path if self.committed else None):
            if name is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)


class FileStorage(ObjectStorage):
    """Objects as files under a root directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_url(cls, url: str, **options: str) -> FileStorage:
        parsed = urlparse(url)
        return cls(Path(unquote(parsed.netloc + parsed.path)))

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _in_thread(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in the storage's threads.

        Cancelling the caller cannot stop a thread: the caller is cancelled only once ``fn``
        has returned, so that no disk operation is still running when its cleanup starts
        (a rename finishing after the cleanup would leave an object behind).
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix=DISK_THREAD_PREFIX)
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # the caller is cancelled: its error is no longer anyone's to report
            raise

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"key escapes the storage root: {key!r}")
        return path

    # uri and key_of are synchronous by the interface; they only resolve a path (no file is opened).
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
        upload = _Upload(self, key)
        try:
            await self._in_thread(upload.open)
            async for piece in iterate(body):
                await self._in_thread(upload.write, piece)
            await self._in_thread(upload.commit)
        except BaseException:
            await self._in_thread(upload.abandon)
            raise
        return StoredObject(key, upload.path.as_uri(), upload.size, upload.digest.hexdigest())

    def _open_for_reading(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        opened: list[IO[bytes]] = []

        def open_it() -> None:
            opened.append(self._open_for_reading(key))

        try:
            await self._in_thread(open_it)
            while piece := await self._in_thread(opened[0].read, READ_CHUNK_BYTES):
                yield piece
        finally:
            if opened:
                await self._in_thread(opened[0].close)

    async def exists(self, key: str) -> bool:
        return await self._in_thread(lambda: self._path(key).is_file())

    def _delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # The document's directory goes with its last file (no other document writes there).
        if path.parent != self.root:
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    async def delete(self, key: str) -> None:
        await self._in_thread(self._delete, key)

    async def listing(self, prefix: str = "") -> AsyncIterator[ListedObject]:
        """Every file under the root whose key starts with prefix, walked in the storage's threads.

        ``.upload-*`` temporary files are listed too: a live put rewrites its temporary file
        with every piece, so only one left by a crashed process grows old, and nothing but
        the sweeper would ever remove it.
        """
        walker = self._walk(prefix)
        try:
            while batch := await self._in_thread(_take, walker, LIST_BATCH):
                for listed in batch:
                    yield listed
        finally:
            await self._in_thread(walker.close)

    def _walk(self, prefix: str) -> Iterator[ListedObject]:
        directory = prefix.rpartition("/")[0]
        start = self._path(directory) if directory else self.root
        pending = [start]
        while pending:
            current = pending.pop()
            try:
                with os.scandir(current) as scan:
                    entries = list(scan)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed, or never there
            for entry in entries:
                key = Path(entry.path).relative_to(self.root).as_posix()
                if entry.is_dir(follow_symlinks=False):
                    if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                        pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the directory was read
                    yield ListedObject(key, stat.st_size, stat.st_mtime_ns // 1_000_000)


def _take(iterator: Iterator[T], count: int) -> list[T]:
    return [item for _, item in zip(range(count), iterator)]
