"""The metadata store interface and the rows it deals in."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from regproxy.oci import Digest


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: Digest
    size: int
    storage_key: str
    # When the blob was last linked into the repository it was read from (get_repo_blob).
    linked: float | None = field(default=None, compare=False)


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
class GarbageManifest:
    repo: str
    digest: Digest
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


@dataclass(frozen=True, slots=True)
class GarbageBatch:
    """What one garbage-collection transaction deleted (or, in a dry run, would delete)."""

    manifests: list[GarbageManifest]
    links: int
    blobs: list[BlobRow]


@dataclass(frozen=True, slots=True)
class TagRow:
    """A tag as retention sees it: where it points and when it was last pushed."""

    repo: str
    tag: str
    digest: Digest
    pushed: float


@dataclass(frozen=True, slots=True)
class CachedImage:
    """A cached image: a manifest of a pull-through repository that no index there lists."""

    repo: str
    digest: Digest
    # When it (or a manifest it lists) was last pulled, or stored if never pulled since.
    last_used: float
    # Bytes of the blobs it and its child manifests reference (shared ones included).
    size: int


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """Bytes of blobs linked only from pull-through repositories."""

    total: int
    # Per upstream prefix: bytes of blobs linked only from repositories under ``<prefix>/``.
    by_prefix: dict[str, int]


class MetadataStore(Protocol):
    # blobs
    async def get_blob(self, digest: Digest) -> BlobRow | None: ...

    async def get_repo_blob(self, repo: str, digest: Digest) -> BlobRow | None: ...

    async def add_blob(self, repo: str, blob: BlobRow, *, upload_id: str | None = None) -> BlobRow:
        """Record a blob (the existing row wins if the digest is known) and link it to repo.

        With ``upload_id``, the row of the upload that produced the blob is deleted in the
        same transaction: a finished upload costs one write, and no crash leaves its row
        behind a recorded blob.
        """
        ...

    async def link_blob(self, repo: str, digest: Digest) -> bool:
        """Link a stored blob into repo (refreshing the link's time); False if it is not stored.

        The check and the insert are one write transaction: GC either deleted the blob before
        (False) or sees the fresh link and keeps the blob.
        """
        ...

    async def touch_link(self, repo: str, digest: Digest, now: float) -> bool:
        """Refresh the link's time (a HEAD or GET is about to say the blob exists in repo).

        False when the link is gone: GC collected the blob since it was read, in one
        transaction with its links, so the answer must be "unknown" after all.
        """
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
        self,
        repo: str,
        manifest: ManifestRow,
        refs: Sequence[Reference],
        tags: Sequence[str],
        *,
        check_references: bool = False,
    ) -> list[Reference]:
        """Store the manifest, its references and its tags in one transaction.

        With ``check_references``, the references missing from repo are looked up in the same
        write transaction and returned; then nothing is stored. So a manifest is accepted only
        if every blob it names exists at commit time, and GC sees the new references.
        """
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

    # garbage collection and checks (lifecycle/)
    def collect_garbage(
        self,
        before: float,
        *,
        untagged: bool,
        skip_prefixes: Sequence[str] = (),
        batch: int = 500,
        dry_run: bool = False,
    ) -> AsyncGenerator[GarbageBatch, None]:
        """Delete garbage rows, ``batch`` at a time, one write transaction each.

        Yields each batch after it committed, so its bytes can go next. In order: untagged
        manifests of repositories not under ``skip_prefixes`` (only with ``untagged``), links
        that no manifest of their repository references, then unused blobs; everything older
        than ``before``. A dry run deletes nothing and holds the write lock for the whole pass.
        """
        ...

    async def list_blobs(self, after: str, limit: int) -> list[BlobRow]:
        """Blob rows in digest order, starting after the digest ``after``."""
        ...

    async def known_blob_keys(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` that a blob row names."""
        ...

    async def known_upload_ids(self, upload_ids: Sequence[str]) -> set[str]:
        """Those of ``upload_ids`` that an upload row has."""
        ...

    async def blob_repositories(self, digest: Digest) -> list[str]:
        """Repositories that link the blob or have a manifest referencing it."""
        ...

    async def forget_cached_blob(self, digest: Digest, prefixes: Sequence[str]) -> BlobRow | None:
        """Delete the row and links of a broken blob of cached content; the next pull fetches it.

        Only when every repository that links or references it is under one of ``prefixes``;
        returns the deleted row (its bytes go next), None otherwise. Cached manifests stay: a
        pull reads them, finds no blob row and fills the blob from upstream again.
        """
        ...

    # retention and cache eviction (lifecycle/)
    async def record_pulls(self, pulls: Sequence[tuple[str, Digest, float]]) -> None:
        """Record (repository, manifest digest, time) pulls, all in one write transaction."""
        ...

    async def expendable_tags(
        self, repo: str, keep_last: int, pulled_before: float | None
    ) -> list[TagRow]:
        """Tags of repo past its ``keep_last`` most recently pushed, least recent first.

        With ``pulled_before``, only tags whose manifest was not pulled since then.
        """
        ...

    async def delete_tags(self, repo: str, tags: Sequence[TagRow]) -> list[TagRow]:
        """Delete the tags that still point where they did (a re-push wins); returns those.

        In the same transaction, the manifests they pointed at go too when no tag and no index
        of repo points at them any more, and so do an index's children, so GC frees the blobs.
        """
        ...

    async def cache_usage(
        self, prefixes: Sequence[str], *, per_prefix: Sequence[str] = ()
    ) -> CacheUsage:
        """Bytes stored for the pull-through repositories under ``<prefix>/`` together, and
        for those under each of ``per_prefix`` alone (a query each: only budgeted ones)."""
        ...

    async def cached_images(self, prefix: str, used_before: float, limit: int) -> list[CachedImage]:
        """Images of the repositories under ``<prefix>/`` last used before ``used_before``,
        least recently used first."""
        ...

    async def evict_image(self, image: CachedImage) -> list[Digest] | None:
        """Delete a cached image (tags, manifest, index children) unless used since it was
        listed (None). Returns the blobs it referenced, for ``collect_cached_blobs``."""
        ...

    async def collect_cached_blobs(
        self,
        prefixes: Sequence[str],
        before: float,
        exclude: Collection[Digest],
        limit: int,
        *,
        dry_run: bool = False,
        candidates: Collection[Digest] | None = None,
    ) -> list[BlobRow]:
        """Delete the rows (and links) of unused blobs linked only under ``<prefix>/``
        (only among ``candidates``, when given: at most ``limit`` of them).

        Unused: as GC's rule, with ``before`` as the (short) cache grace; a blob that any other
        repository links is kept, and so is every digest in ``exclude`` (fills in flight).
        """
        ...

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

    async def cache_totals(self, prefix: str) -> tuple[int, int]:
        """(blobs, bytes) stored for repositories under ``prefix/``: each blob once, plus the
        manifests' bytes."""
        ...

    async def count_uploads(self) -> int: ...

    async def cached_tags(self, prefix: str) -> list[ImageSummary]:
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
