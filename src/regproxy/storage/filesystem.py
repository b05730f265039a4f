"""Blobs as files: ``blobs/<algorithm>/<hex[:2]>/<hex>``, uploads as ``uploads/<upload_id>``.

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
from regproxy.storage.base import UploadLost

READ_SIZE = 1 << 20


class ShortFile(OSError):
    """A file holds fewer bytes than it should."""


class FilesystemBlobWriter:
    def __init__(self, store: FilesystemBlobStore, path: Path, f: BinaryIO, size: int) -> None:
        self._store = store
        self._path = path
        self._file: BinaryIO | None = f
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def write(self, chunk: bytes) -> None:
        assert self._file is not None, "writer is closed"
        await asyncio.to_thread(self._file.write, chunk)
        self._size += len(chunk)

    async def suspend(self) -> str:
        await self._close()
        return ""

    async def commit(self, digest: Digest) -> str:
        key = self._store.blob_key(digest)
        target = self._store.root / "blobs" / key
        fsync = self._store.fsync

        def publish(f: BinaryIO) -> None:
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            f.close()
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
    def blob_key(digest: Digest) -> str:
        return f"{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

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
        return FilesystemBlobWriter(self, path, f, offset if state is not None else 0)

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
        key = self.blob_key(digest)
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

    async def close(self) -> None:
        return None


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


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
