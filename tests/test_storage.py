"""Object storage: file:// and s3:// (against a real S3-compatible server) behave the same."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import uuid

import pytest

from pipeline.errors import ObjectNotFound
from pipeline.ids import object_key, sanitize_filename
from pipeline.storage.file import FileStorage
from pipeline.storage.s3 import S3_PART_BYTES, S3Storage


@pytest.fixture
async def s3_storage(s3_endpoint):
    from aiobotocore.session import get_session

    bucket = f"docflow-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", endpoint_url=s3_endpoint, region_name="us-east-1") as client:
        await client.create_bucket(Bucket=bucket)
    async with S3Storage(bucket, "originals", endpoint_url=s3_endpoint) as storage:
        yield storage


@pytest.fixture
def file_storage(tmp_path):
    return FileStorage(tmp_path / "objects")


@pytest.fixture(params=["file", "s3"])
def storage(request):
    return request.getfixturevalue(f"{request.param}_storage")


async def _pieces(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_put_get_exists_delete_round_trip(storage):
    key = object_key("acme", str(uuid.uuid4()), "report.pdf")
    data = b"%PDF-1.7 docflow\n" * 100
    stored = await storage.put(key, data, "application/pdf")
    assert stored.size_bytes == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await storage.exists(key)
    assert await storage.get(key) == data
    assert storage.key_of(stored.uri) == key
    await storage.delete(key)
    assert not await storage.exists(key)
    with pytest.raises(ObjectNotFound):
        await storage.get(key)


async def test_large_object_is_streamed_in_and_out_in_pieces(storage):
    key = object_key("acme", str(uuid.uuid4()), "big.bin")
    data = os.urandom(2 * S3_PART_BYTES + 12345)  # S3 takes this as a three-part multipart upload
    stored = await storage.put(key, _pieces(data, 1024 * 1024))
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    pieces = [piece async for piece in storage.stream(key)]
    assert len(pieces) > 1
    assert b"".join(pieces) == data


async def test_failed_streaming_put_leaves_nothing_under_the_key(storage):
    key = object_key("acme", str(uuid.uuid4()), "broken.bin")

    async def breaks_midway():
        yield os.urandom(S3_PART_BYTES + 1)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await storage.put(key, breaks_midway())
    assert not await storage.exists(key)


async def test_path_traversal_filename_is_stored_inside_its_company_prefix(storage, tmp_path):
    document_id = str(uuid.uuid4())
    key = object_key("acme", document_id, "../../etc/passwd")
    assert key == f"acme/{document_id}/passwd"
    stored = await storage.put(key, b"root:x:0:0")
    assert stored.uri.endswith(f"acme/{document_id}/passwd")
    if isinstance(storage, FileStorage):
        assert (storage.root / "acme" / document_id / "passwd").read_bytes() == b"root:x:0:0"


@pytest.mark.parametrize(
    "filename, expected",
    [
        ("../../etc/passwd", "passwd"),
        ("..%2F..%2Fetc%2Fpasswd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("report\x00.pdf", "report.pdf"),
        ("line\nbreak\r.txt", "linebreak.txt"),
        ("..", "document"),
        ("", "document"),
        ("notas de reunión.md", "notas de reunión.md"),
        ("a;b|c$(rm -rf).txt", "a_b_c_(rm -rf).txt"),
    ],
)
def test_sanitize_filename_removes_directories_and_control_characters(filename, expected):
    assert sanitize_filename(filename) == expected


def test_sanitized_filename_is_bounded_and_keeps_its_extension():
    name = sanitize_filename("x" * 5000 + ".pdf")
    assert len(name.encode()) <= 200
    assert name.endswith(".pdf")


@pytest.mark.parametrize("company_id", ["", "../acme", "acme/other", "a" * 200, "acme\n"])
def test_object_key_refuses_unsafe_company_ids(company_id):
    with pytest.raises(ValueError):
        object_key(company_id, "doc-1", "a.txt")


def test_file_storage_refuses_keys_outside_its_root(file_storage):
    with pytest.raises(ValueError):
        file_storage.uri("../outside.txt")
    with pytest.raises(ValueError):
        file_storage.key_of("file:///etc/passwd")


# Listing, and file storage's disk I/O off the event loop


async def test_listing_gives_every_object_with_its_size_and_age_and_filters_by_prefix(storage):
    document_ids = [str(uuid.uuid4()) for _ in range(3)]
    keys = [
        object_key("acme", document_ids[0], "a.pdf"),
        object_key("acme", document_ids[1], "b.txt"),
        object_key("globex", document_ids[2], "c.md"),
    ]
    before_ms = int(time.time() * 1000) - 5000  # S3 keeps whole seconds; allow for a coarse clock
    for size, key in enumerate(keys, start=1):
        await storage.put(key, b"x" * size)
    listed = {item.key: item async for item in storage.listing()}
    assert set(listed) == set(keys)
    assert [listed[key].size_bytes for key in keys] == [1, 2, 3]
    assert all(before_ms <= item.modified_ms <= time.time() * 1000 + 5000 for item in listed.values())
    assert {item.key async for item in storage.listing("acme/")} == set(keys[:2])
    assert {item.key async for item in storage.listing(f"acme/{document_ids[1]}")} == {keys[1]}
    assert {item.key async for item in storage.listing("glo")} == {keys[2]}
    assert [item async for item in storage.listing("nobody/")] == []
    await storage.delete(keys[0])
    assert {item.key async for item in storage.listing()} == set(keys[1:])


async def test_file_listing_includes_temporary_files_a_crashed_put_left(file_storage):
    document_id = str(uuid.uuid4())
    directory = file_storage.root / "acme" / document_id
    directory.mkdir(parents=True)
    (directory / ".upload-abc123").write_bytes(b"half an upload")
    assert [(item.key, item.size_bytes) async for item in file_storage.listing()] == [
        (f"acme/{document_id}/.upload-abc123", 14)
    ]


async def test_file_delete_removes_the_documents_empty_directory(file_storage):
    document_id = str(uuid.uuid4())
    key = object_key("acme", document_id, "a.txt")
    await file_storage.put(key, b"a")
    await file_storage.delete(key)
    assert not (file_storage.root / "acme" / document_id).exists()
    assert (file_storage.root / "acme").is_dir()


async def test_cancelled_file_put_leaves_nothing_behind(file_storage):
    key = object_key("acme", str(uuid.uuid4()), "slow.bin")
    written = asyncio.Event()

    async def stalls():
        yield b"first piece"
        written.set()
        await asyncio.Event().wait()
        yield b"never"

    put = asyncio.create_task(file_storage.put(key, stalls()))
    await written.wait()
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert not await file_storage.exists(key)
    assert [item async for item in file_storage.listing()] == []


@pytest.fixture
def disk_calls(monkeypatch, file_storage):
    """Every disk operation on the file storage's root, and whether it ran on the event loop's thread.

    Syscalls are caught where pathlib and tempfile call them (the os module), reads and
    writes through the file objects the storage opens.
    """
    import pipeline.storage.file as file_module

    calls: list[tuple[str, bool]] = []
    root = str(file_storage.root)

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def record(name: str) -> None:
        calls.append((name, on_loop()))

    class RecordedFile:
        def __init__(self, handle):
            self._handle = handle

        def __getattr__(self, name):
            attribute = getattr(self._handle, name)
            if name not in ("read", "write", "close", "flush"):
                return attribute

            def recorded(*args, **kwargs):
                record(name)
                return attribute(*args, **kwargs)

            return recorded

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.close()

    def wrap(module, name, returns_file=False):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            target = args[0] if args else kwargs.get("dir", "")
            if isinstance(target, int) or str(target).startswith(root) or str(kwargs.get("dir", "")).startswith(root):
                record(name)
                result = original(*args, **kwargs)
                return RecordedFile(result) if returns_file else result
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("stat", "lstat", "mkdir", "rmdir", "unlink", "replace", "scandir"):
        wrap(os, name)
    wrap(os, "fdopen", returns_file=True)
    wrap(tempfile, "mkstemp")
    monkeypatch.setattr(file_module, "open", lambda *a, **k: RecordedFile(open(*a, **k)), raising=False)
    return calls


async def test_file_storage_does_its_disk_io_off_the_event_loop(file_storage, disk_calls):
    key = object_key("acme", str(uuid.uuid4()), "report.pdf")
    data = os.urandom(3 * 1024 * 1024 + 7)
    await file_storage.put(key, _pieces(data, 1024 * 1024))
    assert await file_storage.exists(key)
    assert b"".join([piece async for piece in file_storage.stream(key)]) == data
    assert [item.key async for item in file_storage.listing()] == [key]
    await file_storage.delete(key)
    assert not await file_storage.exists(key)
    with pytest.raises(ObjectNotFound):
        await file_storage.get(key)

    done = {name for name, _ in disk_calls}
    # The wrappers saw the work, so the check below is not vacuous.
    assert {"mkdir", "mkstemp", "fdopen", "write", "replace", "read", "close", "scandir", "unlink", "rmdir"} <= done
    assert {"stat", "lstat"} & done
    on_loop = sorted({name for name, loop in disk_calls if loop})
    assert on_loop == [], f"disk operations on the event loop: {on_loop}"
