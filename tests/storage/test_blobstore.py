"""One BlobStore test suite, run over every backend: the filesystem, and S3 (a moto server).

Each test drives the store as the hosted registry does: one writer per request, opened from
the state and offset recorded by the last request that succeeded, then suspended (the next
state to record), released (the request failed), committed or aborted. A second store on the
same storage stands for another process continuing an upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from regproxy.oci import Digest
from regproxy.storage.base import BlobStore
from regproxy.storage.filesystem import FilesystemBlobStore
from regproxy.storage.s3 import S3BlobStore
from tests.s3fixtures import S3

MiB = 1 << 20


class Backend:
    """Opens stores of one backend on the same storage; says what an upload left behind."""

    def __init__(self, name: str, root: Path, s3: S3 | None) -> None:
        self.name = name
        self.root = root
        self.s3 = s3

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[BlobStore]:
        if self.name == "filesystem":
            store = FilesystemBlobStore(self.root, fsync=False)
            try:
                yield store
            finally:
                await store.close()
        else:
            assert self.s3 is not None
            async with self.s3.store() as s3_store:
                yield s3_store

    async def leftovers(self, store: BlobStore) -> list[str]:
        """Whatever storage holds besides committed blobs: upload files, tails, unfinished
        multipart uploads."""
        if isinstance(store, S3BlobStore):
            assert self.s3 is not None
            await store.wait_cleanups()
            keys = [key for key in await self.s3.keys() if not key.startswith("blobs/")]
            return keys + [f"multipart:{key}" for key in await self.s3.multipart_uploads()]
        return sorted(str(p.relative_to(self.root)) for p in (self.root / "uploads").iterdir())

    async def blob_keys(self) -> list[str]:
        if self.name == "filesystem":
            return sorted(str(p) for p in (self.root / "blobs").rglob("*") if p.is_file())
        assert self.s3 is not None
        return [key for key in await self.s3.keys() if key.startswith("blobs/")]


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return Backend(request.param, tmp_path / "blobs", s3)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[BlobStore]:
    async with backend.open() as opened:
        yield opened


class Upload:
    """An upload as the hosted registry records it: id, state and offset."""

    def __init__(self) -> None:
        self.id = str(uuid.uuid4())
        self.state: str | None = None
        self.offset = 0
        self.data = bytearray()

    async def request(self, store: BlobStore, chunks: Sequence[bytes]) -> None:
        """One request that appends ``chunks`` and succeeds (its progress is recorded)."""
        writer = await store.open_writer(self.id, self.state, self.offset)
        for chunk in chunks:
            await writer.write(chunk)
        assert writer.size == self.offset + sum(map(len, chunks))
        self.state = await writer.suspend()
        self.offset = writer.size
        for chunk in chunks:
            self.data += chunk

    async def commit(self, store: BlobStore, chunks: Sequence[bytes] = ()) -> str:
        writer = await store.open_writer(self.id, self.state, self.offset)
        for chunk in chunks:
            await writer.write(chunk)
            self.data += chunk
        return await writer.commit(Digest.of(bytes(self.data)))

    async def stored(self, store: BlobStore) -> bytes:
        """The bytes read_upload gives back, as a process without the running hash reads them."""
        assert self.state is not None
        out = bytearray()
        async for chunk in store.read_upload(self.id, self.state, self.offset):
            out += chunk
        return bytes(out)


async def read_all(store: BlobStore, key: str, start: int, length: int) -> bytes:
    out = bytearray()
    async for chunk in store.read(key, start, length):
        out += chunk
    return bytes(out)


def pieces(*sizes: int) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


async def test_blob_in_one_request(store: BlobStore, backend: Backend) -> None:
    upload = Upload()
    await upload.request(store, [])  # POST: the upload exists, nothing stored yet
    key = await upload.commit(store, [b"hello, ", b"world"])
    assert await read_all(store, key, 0, 12) == b"hello, world"
    assert await read_all(store, key, 7, 5) == b"world"
    assert await store.exists(key)
    assert (store.local_path(key) is not None) == (backend.name == "filesystem")
    assert await store.redirect_url(key) is None  # not configured
    assert await backend.leftovers(store) == []
    await store.delete(key)
    assert not await store.exists(key)
    assert await backend.blob_keys() == []


async def test_empty_blob(store: BlobStore, backend: Backend) -> None:
    upload = Upload()
    await upload.request(store, [])
    key = await upload.commit(store)
    assert await store.exists(key)
    assert await read_all(store, key, 0, 0) == b""
    assert await backend.leftovers(store) == []


CHUNKINGS = {
    # one request per inner list; sizes straddle S3's 5 MiB parts and the 5 MiB tail limit
    "bytes": [[1], [1], [2], [1]],
    "across_parts": [[1], [3 * MiB], [2 * MiB + 1], [1, 1, 1], [6 * MiB], [], [4 * MiB - 3]],
    "part_multiples": [[5 * MiB], [5 * MiB], [10 * MiB]],
    "one_big_request": [[MiB] * 17 + [12345]],
    "tail_near_limit": [[5 * MiB - 1], [1], [5 * MiB - 1], [2]],
}


@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
async def test_chunked_upload(
    store: BlobStore, backend: Backend, chunking: list[list[int]]
) -> None:
    upload = Upload()
    await upload.request(store, [])
    for sizes in chunking:
        await upload.request(store, pieces(*sizes))
    assert upload.offset == len(upload.data)
    key = await upload.commit(store, [b"last"])
    total = len(upload.data)
    assert await read_all(store, key, 0, total) == upload.data
    assert await read_all(store, key, total - 7, 7) == upload.data[-7:]
    assert await backend.leftovers(store) == []


async def test_suspend_without_writes_keeps_the_state(store: BlobStore) -> None:
    upload = Upload()
    await upload.request(store, pieces(6 * MiB + 5))
    state = upload.state
    await upload.request(store, [])
    assert upload.state == state and upload.offset == 6 * MiB + 5


@pytest.mark.parametrize("sizes", [[3], [2 * MiB], [6 * MiB, 1], [5 * MiB, 5 * MiB, 3 * MiB]])
async def test_another_process_continues(
    store: BlobStore, backend: Backend, sizes: list[int]
) -> None:
    """Another process continues the upload: it re-hashes the stored prefix once, then
    appends with the writer it opened before reading, as the hosted registry does."""
    upload = Upload()
    await upload.request(store, [])
    for size in sizes:
        await upload.request(store, pieces(size))
    async with backend.open() as other:
        writer = await other.open_writer(upload.id, upload.state, upload.offset)
        assert await upload.stored(other) == upload.data
        more = pieces(MiB, 5 * MiB + 7)
        for chunk in more:
            await writer.write(chunk)
            upload.data += chunk
        upload.state, upload.offset = await writer.suspend(), writer.size
        assert await upload.stored(other) == upload.data  # and once more
        await upload.request(other, pieces(3))
        key = await upload.commit(other)
        assert await read_all(other, key, 0, len(upload.data)) == upload.data
        assert await backend.leftovers(other) == []
    assert await read_all(store, key, 0, len(upload.data)) == upload.data


async def test_another_process_finishes_without_new_bytes(
    store: BlobStore, backend: Backend
) -> None:
    upload = Upload()
    await upload.request(store, pieces(5 * MiB, 5 * MiB))
    async with backend.open() as other:
        writer = await other.open_writer(upload.id, upload.state, upload.offset)
        assert (
            hashlib.sha256(await upload.stored(other)).digest()
            == hashlib.sha256(upload.data).digest()
        )
        key = await writer.commit(Digest.of(bytes(upload.data)))
        assert await read_all(other, key, 0, len(upload.data)) == upload.data
        assert await backend.leftovers(other) == []


async def test_takeover_in_a_request_that_failed(store: BlobStore, backend: Backend) -> None:
    """A process re-hashes the prefix, appends, and fails: the recorded state still works,
    in a third process that never saw the takeover."""
    upload = Upload()
    await upload.request(store, pieces(5 * MiB, 2 * MiB))
    async with backend.open() as second:
        writer = await second.open_writer(upload.id, upload.state, upload.offset)
        assert await upload.stored(second) == upload.data
        for chunk in pieces(6 * MiB):
            await writer.write(chunk)
        await writer.release()
    async with backend.open() as third:
        await upload.request(third, pieces(4 * MiB))
        key = await upload.commit(third, pieces(5))
        assert await read_all(third, key, 0, len(upload.data)) == upload.data
        assert await backend.leftovers(third) == []


@pytest.mark.parametrize("failed", [[1], [2 * MiB], [6 * MiB], [5 * MiB, 5 * MiB, 1]])
async def test_release_keeps_the_recorded_upload(
    store: BlobStore, backend: Backend, failed: list[int]
) -> None:
    upload = Upload()
    await upload.request(store, pieces(3 * MiB))
    await upload.request(store, pieces(5 * MiB + 1))
    writer = await store.open_writer(upload.id, upload.state, upload.offset)
    for chunk in pieces(*failed):  # a request that fails: none of this is recorded
        await writer.write(chunk)
    await writer.release()
    await upload.request(store, pieces(2 * MiB))
    key = await upload.commit(store)
    assert await read_all(store, key, 0, len(upload.data)) == upload.data
    assert await backend.leftovers(store) == []


async def test_abort_leaves_nothing(store: BlobStore, backend: Backend) -> None:
    upload = Upload()
    await upload.request(store, pieces(6 * MiB, 2 * MiB))
    writer = await store.open_writer(upload.id, upload.state, upload.offset)
    await writer.write(os.urandom(MiB))
    await writer.abort()
    await store.delete_upload(upload.id, upload.state or "")
    assert await backend.leftovers(store) == []
    assert await backend.blob_keys() == []


@pytest.mark.parametrize("takeover", [False, True])
async def test_delete_upload_leaves_nothing(
    store: BlobStore, backend: Backend, takeover: bool
) -> None:
    upload = Upload()
    await upload.request(store, pieces(5 * MiB, MiB))
    await upload.request(store, pieces(3 * MiB))
    if takeover:
        assert await upload.stored(store) == upload.data
        await upload.request(store, pieces(MiB))
    assert upload.state is not None
    await store.delete_upload(upload.id, upload.state)
    assert await backend.leftovers(store) == []
    assert await backend.blob_keys() == []


async def test_uploads_are_independent(store: BlobStore, backend: Backend) -> None:
    a, b = Upload(), Upload()
    for _ in range(2):
        await a.request(store, pieces(3 * MiB))
        await b.request(store, pieces(4 * MiB))
    key_a = await a.commit(store)
    key_b = await b.commit(store)
    assert key_a != key_b
    assert await read_all(store, key_a, 0, len(a.data)) == a.data
    assert await read_all(store, key_b, 0, len(b.data)) == b.data
    assert await backend.leftovers(store) == []


async def test_listing_for_the_orphan_sweep(store: BlobStore, backend: Backend) -> None:
    """Committed blobs and the objects of uploads in progress are listed with their upload."""
    done = Upload()
    await done.request(store, [])
    key = await done.commit(store, [b"a committed blob"])
    pending = Upload()
    await pending.request(store, pieces(100))
    started = time.time()

    blobs = [obj async for obj in store.list_blobs()]
    assert [(obj.key, obj.size, obj.upload_id) for obj in blobs] == [(key, 16, done.id)]
    assert abs(blobs[0].mtime - started) < 120
    assert await store.stat(key) == 16
    objects = [obj async for obj in store.list_upload_objects()]
    assert objects and {obj.upload_id for obj in objects} == {pending.id}

    for obj in objects:
        await store.delete_upload_object(obj)
    assert [obj async for obj in store.list_upload_objects()] == []
    assert await backend.leftovers(store) == []
    await store.delete(key)
    assert await store.stat(key) is None
    assert [obj async for obj in store.list_blobs()] == []


async def test_listing_shows_unfinished_multipart_uploads(
    store: BlobStore, backend: Backend
) -> None:
    upload = Upload()
    await upload.request(store, pieces(6 * MiB))  # a part, so a multipart upload exists
    objects = [obj async for obj in store.list_upload_objects()]
    assert {obj.upload_id for obj in objects} == {upload.id}
    if backend.name == "s3":
        assert any(obj.multipart is not None for obj in objects)
    for obj in objects:
        await store.delete_upload_object(obj)
    assert await backend.leftovers(store) == []
