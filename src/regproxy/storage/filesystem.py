"""Blob files: ``blobs/<algorithm>/<hex[:2]>/<hex>.<upload_id>``;
uploads as ``uploads/<upload_id>``.

A committed blob's file is named after the upload that made it, as S3's objects are: a second
upload of the same digest never writes over a file that GC may be deleting (the row's key is
what counts). Files named ``<hex>`` alone, from before, keep working.

Keys and paths are built only from parsed digests and server-made upload ids, so no request
can name a path outside the storage root. Every file operation runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from regproxy.oci import Digest
from regproxy.storage.base import StoredObject, UploadLost

READ_SIZE = 1 << 20
# With fsync on, the bytes of an upload are handed to the disk every this many bytes, as
# they arrive, so that the fsync before a commit has little left to wait for.
WRITEBACK_SIZE = 8 << 20


class ShortFile(OSError):
    """A file holds fewer bytes than it should."""


class FilesystemBlobWriter:
    def __init__(
        self, store: FilesystemBlobStore, upload_id: str, path: Path, f: BinaryIO, size: int
    ) -> None:
        self._store = store
        self._upload_id = upload_id
        self._path = path
        self._file: BinaryIO | None = f
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def write(self, chunk: bytes) -> None:
        assert self._file is not None, "writer is closed"
        f, start = self._file, self._size
        window = start - start % WRITEBACK_SIZE
        writeback = (
            self._store.fsync
            and hasattr(os, "posix_fadvise")  # not on macOS
            and start + len(chunk) >= window + WRITEBACK_SIZE
        )

        def write() -> None:
            f.write(chunk)
            if writeback:
                f.flush()
                # Starts writing the finished window out without waiting for it (Linux).
                os.posix_fadvise(f.fileno(), window, WRITEBACK_SIZE, os.POSIX_FADV_DONTNEED)

        await asyncio.to_thread(write)
        self._size += len(chunk)

    async def suspend(self) -> str:
        await self._close()
        return ""

    async def commit(self, digest: Digest) -> str:
        key = self._store.blob_key(digest, self._upload_id)
        target = self._store.root / "blobs" / key
        fsync = self._store.fsync

        def publish(f: BinaryIO) -> None:
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            f.close()
            os.utime(self._path)  # a fresh blob is never mistaken for an old orphan
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, target)

        assert self._file is not None, "writer is closed"
        f, self._file = self._file, None
        await asyncio.to_thread(publish, f)
        return key

    async def release(self) -> None:
        await self._close()  # the next writer truncates to the recorded offset

    async def abort(self) -> None:
        await self._close()
        await asyncio.to_thread(self._path.unlink, True)

    async def _close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            await asyncio.to_thread(f.close)


class FilesystemBlobStore:
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        for sub in ("blobs", "uploads"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def blob_key(digest: Digest, upload_id: str) -> str:
        """The key of the blob ``upload_id`` committed: one file per upload, never shared."""
        return f"{digest.algorithm}/{digest.hex[:2]}/{digest.hex}.{upload_id}"

    def _upload_path(self, upload_id: str) -> Path:
        return self.root / "uploads" / upload_id

    def _blob_path(self, key: str) -> Path:
        return self.root / "blobs" / key

    async def open_writer(
        self, upload_id: str, state: str | None, offset: int
    ) -> FilesystemBlobWriter:
        path = self._upload_path(upload_id)

        def open_file() -> BinaryIO:
            if state is None:
                return open(path, "xb")
            try:
                f = open(path, "r+b")
            except FileNotFoundError:
                raise UploadLost(upload_id) from None
            if os.fstat(f.fileno()).st_size < offset:  # truncate() would pad with zeros
                f.close()
                raise UploadLost(upload_id)
            f.truncate(offset)
            f.seek(offset)
            return f

        f = await asyncio.to_thread(open_file)
        return FilesystemBlobWriter(self, upload_id, path, f, offset if state is not None else 0)

    async def read_upload(self, upload_id: str, state: str, length: int) -> AsyncIterator[bytes]:
        try:
            async for chunk in _read_file(self._upload_path(upload_id), 0, length):
                yield chunk
        except (FileNotFoundError, ShortFile):
            raise UploadLost(upload_id) from None

    async def delete_upload(self, upload_id: str, state: str) -> None:
        await asyncio.to_thread(self._upload_path(upload_id).unlink, True)

    async def upload_stored(self, upload_id: str, state: str, offset: int) -> bool:
        size = await asyncio.to_thread(_size_of, self._upload_path(upload_id))
        return size is not None and size >= offset

    async def published(self, upload_id: str, digest: Digest) -> tuple[str, int] | None:
        key = self.blob_key(digest, upload_id)
        size = await asyncio.to_thread(_size_of, self._blob_path(key))
        return None if size is None else (key, size)

    def read(self, key: str, start: int, length: int) -> AsyncIterator[bytes]:
        return _read_file(self._blob_path(key), start, length)

    def local_path(self, key: str) -> Path | None:
        return self._blob_path(key)

    async def redirect_url(self, key: str) -> str | None:
        return None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._blob_path(key).is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._blob_path(key).unlink, True)

    async def stat(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(self._blob_path(key).stat)).st_size
        except FileNotFoundError:
            return None

    async def list_blobs(self) -> AsyncIterator[StoredObject]:
        root = self.root / "blobs"
        for algorithm in await asyncio.to_thread(_subdirs, root):
            for folder in await asyncio.to_thread(_subdirs, root / algorithm):
                base = f"{algorithm}/{folder}/"
                for name, size, mtime in await asyncio.to_thread(_files, root / base):
                    _, dot, upload_id = name.partition(".")
                    yield StoredObject(base + name, size, mtime, upload_id if dot else None)

    async def list_upload_objects(self) -> AsyncIterator[StoredObject]:
        for name, size, mtime in await asyncio.to_thread(_files, self.root / "uploads"):
            yield StoredObject(name, size, mtime, name)

    async def delete_upload_object(self, obj: StoredObject) -> None:
        await asyncio.to_thread(self._upload_path(obj.key).unlink, True)

    async def close(self) -> None:
        return None


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


def _files(path: Path) -> list[tuple[str, int, float]]:
    found = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                found.append((entry.name, st.st_size, st.st_mtime))
    return sorted(found)


async def _read_file(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(f.seek, start)
        while length > 0:
            chunk = await asyncio.to_thread(f.read, min(READ_SIZE, length))
            if not chunk:
                raise ShortFile(f"{path} ended {length} bytes early")
            length -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(f.close)
