"""A BlobStore wrapper that times every storage action (``registry_storage_action_seconds``).

Reads are timed to their first chunk: that is the storage's latency; the rest of a read goes
at the pace of whoever consumes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from regproxy.metrics import Metrics, timed_stream
from regproxy.oci import Digest
from regproxy.storage.base import BlobStore, BlobWriter, StoredObject


class _TimedWriter:
    def __init__(self, inner: BlobWriter, metrics: Metrics, driver: str) -> None:
        self._inner = inner
        self._metrics = metrics
        self._driver = driver

    @property
    def size(self) -> int:
        return self._inner.size

    async def write(self, chunk: bytes) -> None:
        await self._metrics.timed(self._driver, "write", self._inner.write(chunk))

    async def suspend(self) -> str:
        return await self._metrics.timed(self._driver, "suspend", self._inner.suspend())

    async def commit(self, digest: Digest) -> str:
        return await self._metrics.timed(self._driver, "commit", self._inner.commit(digest))

    async def release(self) -> None:
        await self._metrics.timed(self._driver, "release", self._inner.release())

    async def abort(self) -> None:
        await self._metrics.timed(self._driver, "abort", self._inner.abort())


class InstrumentedBlobStore:
    def __init__(self, inner: BlobStore, metrics: Metrics, driver: str) -> None:
        self.inner = inner
        self._metrics = metrics
        self._driver = driver

    async def open_writer(self, upload_id: str, state: str | None, offset: int) -> BlobWriter:
        writer = await self._metrics.timed(
            self._driver, "open_writer", self.inner.open_writer(upload_id, state, offset)
        )
        return _TimedWriter(writer, self._metrics, self._driver)

    def read_upload(self, upload_id: str, state: str, length: int) -> AsyncIterator[bytes]:
        stream = self.inner.read_upload(upload_id, state, length)
        return timed_stream(self._metrics, self._driver, "read_upload", stream)

    async def delete_upload(self, upload_id: str, state: str) -> None:
        await self._metrics.timed(
            self._driver, "delete_upload", self.inner.delete_upload(upload_id, state)
        )

    async def upload_stored(self, upload_id: str, state: str, offset: int) -> bool:
        return await self._metrics.timed(
            self._driver, "upload_stored", self.inner.upload_stored(upload_id, state, offset)
        )

    async def published(self, upload_id: str, digest: Digest) -> tuple[str, int] | None:
        return await self._metrics.timed(
            self._driver, "published", self.inner.published(upload_id, digest)
        )

    def read(self, key: str, start: int, length: int) -> AsyncIterator[bytes]:
        stream = self.inner.read(key, start, length)
        return timed_stream(self._metrics, self._driver, "read", stream)

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)

    async def redirect_url(self, key: str) -> str | None:
        return await self._metrics.timed(self._driver, "redirect_url", self.inner.redirect_url(key))

    async def exists(self, key: str) -> bool:
        return await self._metrics.timed(self._driver, "exists", self.inner.exists(key))

    async def delete(self, key: str) -> None:
        await self._metrics.timed(self._driver, "delete", self.inner.delete(key))

    async def stat(self, key: str) -> int | None:
        return await self._metrics.timed(self._driver, "stat", self.inner.stat(key))

    def list_blobs(self) -> AsyncIterator[StoredObject]:
        return self.inner.list_blobs()  # a sweep's listing: its pace is the sweep's

    def list_upload_objects(self) -> AsyncIterator[StoredObject]:
        return self.inner.list_upload_objects()

    async def delete_upload_object(self, obj: StoredObject) -> None:
        await self._metrics.timed(
            self._driver, "delete_upload_object", self.inner.delete_upload_object(obj)
        )

    async def close(self) -> None:
        await self.inner.close()
