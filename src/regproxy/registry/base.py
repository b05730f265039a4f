"""The Registry protocol: everything the API handlers ask of a registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from regproxy.meta.base import BlobRow, ManifestRow, UploadRow
from regproxy.oci import Digest


@dataclass(frozen=True, slots=True)
class ContentRange:
    """A PATCH's ``Content-Range``: the chunk's first and last byte offsets, inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Registry(Protocol):
    def namespace_prefix(self, ns: str) -> str | None:
        """The name prefix of the upstream serving registry host ``ns``, if one does."""
        ...

    # blobs
    async def stat_blob(self, repo: str, digest: Digest) -> BlobRow:
        """What a HEAD needs: never opens a body, here or upstream."""
        ...

    async def get_blob(self, repo: str, digest: Digest) -> BlobRow: ...

    def blob_path(self, blob: BlobRow) -> Path | None: ...

    async def blob_redirect_url(self, blob: BlobRow) -> str | None:
        """Where to send a GET of the blob instead of serving it (a presigned URL), if anywhere."""
        ...

    def read_blob(self, blob: BlobRow, start: int, length: int) -> AsyncIterator[bytes]: ...

    async def delete_blob(self, repo: str, digest: Digest) -> None: ...

    async def mount_blob(
        self,
        repo: str,
        digest: Digest,
        source: str | None,
        *,
        may_pull: Callable[[str], bool] | None = None,
    ) -> BlobRow | None:
        """Link a stored blob into ``repo`` (None if there is none to link): from ``source``;
        without one, from any repository ``may_pull`` accepts (from anywhere if None)."""
        ...

    # uploads
    async def start_upload(self, repo: str, algorithm: str) -> UploadRow: ...

    async def get_upload(self, repo: str, upload_id: str) -> UploadRow: ...

    async def append_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes],
        content_range: ContentRange | None,
    ) -> UploadRow: ...

    async def finish_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes] | None,
        digest: Digest,
        content_range: ContentRange | None = None,
    ) -> BlobRow:
        """Finish with the last chunk, if any; a ``content_range`` must start at the offset."""
        ...

    async def put_blob(self, repo: str, digest: Digest, body: AsyncIterator[bytes]) -> BlobRow: ...

    async def cancel_upload(self, repo: str, upload_id: str) -> None: ...

    # manifests, tags, discovery
    async def get_manifest(self, repo: str, reference: str) -> ManifestRow: ...

    async def put_manifest(
        self,
        repo: str,
        reference: str,
        content_type: str | None,
        content: bytes,
        tags: Sequence[str],
    ) -> ManifestRow: ...

    async def delete_manifest(self, repo: str, reference: str) -> None: ...

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]: ...

    async def list_repositories(self, last: str, limit: int) -> list[str]: ...

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]]: ...
