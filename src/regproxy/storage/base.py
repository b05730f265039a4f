"""The small interface every blob storage backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from regproxy.errors import BlobUploadUnknown
from regproxy.oci import Digest


class UploadLost(BlobUploadUnknown):
    """The stored bytes of an upload are not where its recorded state says.

    A crash between a commit (which moved them) and the row that records the blob leaves
    an upload so; so does anything that removed them. The upload cannot continue.
    """

    def __init__(self, upload_id: str) -> None:
        super().__init__(
            f"the stored bytes of upload {upload_id} are gone; start the upload again",
            detail={"upload_id": upload_id},
        )


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object found in storage, for the orphan sweep and ``regproxy check``.

    ``key``: for a blob, the key a blob row records; for an upload's object, a handle for
    ``delete_upload_object``. ``upload_id``: the upload that made (or is making) it, when the
    key says. ``multipart``: an unfinished S3 multipart upload's id.
    """

    key: str
    size: int
    mtime: float
    upload_id: str | None
    multipart: str | None = None


class BlobWriter(Protocol):
    """Appends the bytes of one upload.

    ``commit`` publishes the bytes and returns the storage key to record with the blob;
    ``suspend`` keeps them for a later request (possibly in another process) and returns the
    backend state to record with the upload; ``release`` ends a request that failed: the
    upload stays as its recorded state says and nothing more is stored for it; ``abort``
    throws the upload away.
    """

    @property
    def size(self) -> int: ...

    async def write(self, chunk: bytes) -> None: ...

    async def suspend(self) -> str: ...

    async def commit(self, digest: Digest) -> str: ...

    async def release(self) -> None: ...

    async def abort(self) -> None: ...


class BlobStore(Protocol):
    async def open_writer(self, upload_id: str, state: str | None, offset: int) -> BlobWriter:
        """A writer for a new upload (``state`` is None) or one resumed at ``offset``.

        Resuming discards any bytes stored past ``offset`` (written by a request whose
        progress was never recorded, for example because the process was killed). Raises
        ``UploadLost`` (here or on a later call) when the recorded bytes are gone.
        """
        ...

    def read_upload(self, upload_id: str, state: str, length: int) -> AsyncIterator[bytes]:
        """The first ``length`` bytes of an upload in progress (to re-hash them)."""
        ...

    async def delete_upload(self, upload_id: str, state: str) -> None: ...

    async def upload_stored(self, upload_id: str, state: str, offset: int) -> bool:
        """Whether the first ``offset`` bytes of an upload are still where ``state`` says."""
        ...

    async def published(self, upload_id: str, digest: Digest) -> tuple[str, int] | None:
        """The key and size of what a commit of this upload as ``digest`` stored, if an
        object is there (to finish an upload whose commit outlived a crash). The caller
        verifies the bytes."""
        ...

    def read(self, key: str, start: int, length: int) -> AsyncIterator[bytes]:
        """``length`` bytes of a committed blob from ``start``."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A local file holding the blob, when the backend has one (for sendfile)."""
        ...

    async def redirect_url(self, key: str) -> str | None:
        """A URL that serves the blob directly (e.g. presigned), when so configured."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None: ...

    async def stat(self, key: str) -> int | None:
        """The size of a committed blob, None when it is not there."""
        ...

    def list_blobs(self) -> AsyncIterator[StoredObject]:
        """Every object where committed blobs live (some may be orphans, or in progress)."""
        ...

    def list_upload_objects(self) -> AsyncIterator[StoredObject]:
        """Every object that belongs to an upload in progress (or an abandoned one)."""
        ...

    async def delete_upload_object(self, obj: StoredObject) -> None: ...

    async def close(self) -> None: ...
