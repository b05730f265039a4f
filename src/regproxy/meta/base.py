"""The metadata store interface and the rows it deals in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from regproxy.oci import Digest


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: Digest
    size: int
    storage_key: str


@dataclass(frozen=True, slots=True)
class ManifestRow:
    digest: Digest
    media_type: str
    content: bytes
    subject: Digest | None = None
    artifact_type: str | None = None


@dataclass(frozen=True, slots=True)
class Reference:
    """Something a manifest points at: a blob, or a child manifest of an index."""

    digest: Digest
    is_manifest: bool


@dataclass(frozen=True, slots=True)
class UploadRow:
    id: str
    repo: str
    algorithm: str
    offset: int
    state: str
    started: float
    updated: float


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """Who is doing a piece of work the whole cluster should do once (a blob fill, a tag
    revalidation), until when, and where its progress can be read (see regproxy.cluster)."""

    key: str
    owner: str  # a random id per process
    host: str  # the owner's machine: a follower on the same one reads ``spool`` directly
    url: str  # the owner's cluster.advertise_url ("" when it has none)
    spool: str  # the fill's spool file ("" until known)
    size: int | None  # the blob's size, once the upstream said it
    started: float
    expires: float


@dataclass(frozen=True, slots=True)
class ImageSummary:
    """A tagged image and the bytes it takes: its manifests and blobs, each counted once."""

    repo: str
    tag: str
    digest: Digest
    media_type: str
    checked: float  # when the tag was last pushed, fetched or confirmed upstream
    size: int


@dataclass(frozen=True, slots=True)
class RepositorySummary:
    """One line of the UI's repository list."""

    name: str
    tags: int
    manifests: int
    updated: float  # when its newest manifest was stored


@dataclass(frozen=True, slots=True)
class TagSummary:
    """One line of the UI's tag list: the tag, its manifest, and the bytes stored for it."""

    tag: str
    digest: Digest
    media_type: str | None  # None: the tag's manifest row is missing
    updated: float  # when the tag was last pushed, fetched or confirmed upstream
    size: int  # its manifests' bytes and the stored blobs' sizes, each counted once
    missing: int  # references (blobs, child manifests) not stored here (not pulled yet)
    index: bytes | None  # an index's content (for its platforms); None for other kinds


class MetadataStore(Protocol):
    # blobs
    async def get_blob(self, digest: Digest) -> BlobRow | None: ...

    async def get_repo_blob(self, repo: str, digest: Digest) -> BlobRow | None: ...

    async def add_blob(self, repo: str, blob: BlobRow) -> BlobRow:
        """Record a blob (the existing row wins if the digest is known) and link it to repo."""
        ...

    async def link_blob(self, repo: str, digest: Digest) -> None: ...

    async def blob_repositories(self, digest: Digest) -> list[str]:
        """Every repository linking the blob, by name (one indexed query, by digest)."""
        ...

    async def unlink_blob(self, repo: str, digest: Digest) -> bool: ...

    async def delete_blob_if_unused(self, digest: Digest) -> BlobRow | None:
        """Drop the blob's row when no repository links or manifest references it."""
        ...

    async def missing_references(self, repo: str, refs: Iterable[Reference]) -> list[Reference]: ...

    # manifests and tags
    async def get_manifest(self, repo: str, digest: Digest) -> ManifestRow | None: ...

    async def get_tagged_manifest(self, repo: str, tag: str) -> ManifestRow | None: ...

    async def put_manifest(
        self, repo: str, manifest: ManifestRow, refs: Sequence[Reference], tags: Sequence[str]
    ) -> None:
        """Store the manifest, its references and its tags in one transaction."""
        ...

    async def delete_manifest(self, repo: str, digest: Digest) -> bool:
        """Delete a manifest and every tag pointing at it in the repository."""
        ...

    async def delete_tag(self, repo: str, tag: str) -> bool: ...

    async def tag_checked(self, repo: str, tag: str) -> float | None:
        """When the tag was last pushed or confirmed (the pull-through cache revalidates)."""
        ...

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]: ...

    async def repository_exists(self, repo: str) -> bool: ...

    async def list_repositories(self, last: str, limit: int) -> list[str]: ...

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[ManifestRow]: ...

    # uploads
    async def create_upload(self, upload: UploadRow) -> None: ...

    async def get_upload(self, upload_id: str) -> UploadRow | None: ...

    async def update_upload(
        self, upload_id: str, offset: int, state: str, now: float, *, expected: float
    ) -> bool:
        """Record progress if the row is still as last seen (``updated == expected``).

        False when another request or process changed or deleted the upload meanwhile:
        uploads are claimed by compare-and-set, so a purge and a finish can never both win.
        """
        ...

    async def delete_upload(self, upload_id: str, *, expected: float | None = None) -> bool:
        """Delete the row (only if ``updated == expected``, when given); True if deleted."""
        ...

    async def stale_uploads(self, before: float) -> list[UploadRow]: ...

    # leases (regproxy.cluster): one owner per key at a time
    async def acquire_lease(self, lease: LeaseRow, now: float) -> LeaseRow:
        """Insert ``lease``, or take over the key's lease if it expired before ``now``
        (compare-and-set). Returns the row in place afterwards: ``lease`` when acquired."""
        ...

    async def renew_lease(
        self, key: str, owner: str, expires: float, *, spool: str = "", size: int | None = None
    ) -> bool:
        """Extend the owner's lease (and record its spool and size, when given); False when
        the lease is gone or another owner took it over."""
        ...

    async def get_lease(self, key: str) -> LeaseRow | None: ...

    async def release_lease(self, key: str, owner: str) -> bool: ...

    # failed logins, counted across replicas (auth/ratelimit.py)
    async def add_login_failure(self, key: str, now: float, window: float) -> int:
        """Count a failure for ``key`` in its window (a new one if the last ended), prune
        windows that ended; the failures in the key's window now."""
        ...

    async def login_failures(
        self, keys: Sequence[str], now: float, window: float
    ) -> dict[str, tuple[float, int]]:
        """key -> (window start, failures) for those keys whose window is still open."""
        ...

    async def clear_login_failures(self, key: str) -> None: ...

    async def close(self) -> None: ...

    # operations (metrics, readiness, `regproxy cache ls`)
    async def ping(self) -> None:
        """Answer a trivial query (readiness)."""
        ...

    async def cache_usage(self, prefix: str) -> tuple[int, int]:
        """(blobs, bytes) stored for repositories under ``prefix/``: each blob once, plus the
        manifests' bytes."""
        ...

    async def count_uploads(self) -> int: ...

    async def cached_images(self, prefix: str) -> list[ImageSummary]:
        """Every tag of the repositories under ``prefix/`` ("" for all), with its size."""
        ...

    # the web UI: each a bounded number of queries, however many rows there are
    async def list_repository_summaries(
        self, last: str, limit: int, *, prefixes: Sequence[str], cached: bool
    ) -> list[RepositorySummary]:
        """Repositories after ``last`` by name: those under any of ``prefixes/`` (the upstream
        caches) if ``cached``, else the others (hosted). One query."""
        ...

    async def list_tag_summaries(self, repo: str, last: str, limit: int) -> list[TagSummary]:
        """Tags after ``last`` by name with digests and sizes. One query."""
        ...

    async def count_tags(self, repo: str) -> int: ...

    async def tags_of_manifest(self, repo: str, digest: Digest, limit: int) -> list[str]: ...
