"""Which registry serves a repository: hosted, or the pull-through cache of an upstream.

- ``<upstream>/<path>``, where ``<upstream>`` is a configured upstream's name: pull-through.
- Any other name: hosted. With ``default_upstream`` set, reads of names that are not hosted
  here (Docker's ``registry-mirrors`` sends Docker Hub names without a prefix) go to that
  upstream's cache as ``<default_upstream>/<name>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from regproxy.meta.base import BlobRow, ManifestRow, UploadRow
from regproxy.oci import Digest
from regproxy.proxy.pullthrough import PullThroughRegistry, in_flight
from regproxy.registry.base import ContentRange, Registry
from regproxy.registry.hosted import HostedRegistry

# Told of every manifest served (GET or HEAD, by tag or digest): repository and digest.
OnPull = Callable[[str, Digest], None]


class RegistryRouter:
    def __init__(
        self,
        hosted: HostedRegistry,
        proxy: PullThroughRegistry,
        default_upstream: str = "",
        on_pull: OnPull | None = None,
    ) -> None:
        self.hosted = hosted
        self.proxy = proxy
        self.default_upstream = default_upstream
        # Pull times for retention and cache eviction, hosted and cached alike (no I/O here).
        self.on_pull = on_pull

    def namespace_prefix(self, ns: str) -> str | None:
        return self.proxy.namespace_prefix(ns)

    def _for(self, repo: str) -> Registry:
        prefix, slash, _ = repo.partition("/")
        return self.proxy if slash and prefix in self.proxy.upstreams else self.hosted

    async def _for_read(self, repo: str) -> tuple[Registry, str]:
        registry = self._for(repo)
        if (
            registry is self.hosted
            and self.default_upstream
            and not await self.hosted.meta.repository_exists(repo)
        ):
            return self.proxy, f"{self.default_upstream}/{repo}"
        return registry, repo

    # -- reads: may fall through to the default upstream ------------------------------------

    async def stat_blob(self, repo: str, digest: Digest) -> BlobRow:
        registry, repo = await self._for_read(repo)
        return await registry.stat_blob(repo, digest)

    async def get_blob(self, repo: str, digest: Digest) -> BlobRow:
        registry, repo = await self._for_read(repo)
        return await registry.get_blob(repo, digest)

    def blob_path(self, blob: BlobRow) -> Path | None:
        return self.proxy.blob_path(blob)

    async def blob_redirect_url(self, blob: BlobRow) -> str | None:
        return await self.proxy.blob_redirect_url(blob)

    def read_blob(self, blob: BlobRow, start: int, length: int) -> AsyncIterator[bytes]:
        registry: Registry = self.proxy if in_flight(blob) else self.hosted
        return registry.read_blob(blob, start, length)

    async def get_manifest(self, repo: str, reference: str) -> ManifestRow:
        registry, repo = await self._for_read(repo)
        manifest = await registry.get_manifest(repo, reference)
        if self.on_pull is not None:
            self.on_pull(repo, manifest.digest)
        return manifest

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]:
        registry, repo = await self._for_read(repo)
        return await registry.list_tags(repo, last, limit)

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]]:
        registry, repo = await self._for_read(repo)
        return await registry.referrers(repo, subject, artifact_type)

    async def list_repositories(self, last: str, limit: int) -> list[str]:
        return await self.hosted.list_repositories(last, limit)

    # -- writes: hosted names only; the cache refuses them ----------------------------------

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        await self._for(repo).delete_blob(repo, digest)

    async def mount_blob(
        self,
        repo: str,
        digest: Digest,
        source: str | None,
        *,
        may_pull: Callable[[str], bool] | None = None,
    ) -> BlobRow | None:
        return await self._for(repo).mount_blob(repo, digest, source, may_pull=may_pull)

    async def start_upload(self, repo: str, algorithm: str) -> UploadRow:
        return await self._for(repo).start_upload(repo, algorithm)

    async def get_upload(self, repo: str, upload_id: str) -> UploadRow:
        return await self._for(repo).get_upload(repo, upload_id)

    async def append_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes],
        content_range: ContentRange | None,
    ) -> UploadRow:
        return await self._for(repo).append_upload(repo, upload_id, body, content_range)

    async def finish_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes] | None,
        digest: Digest,
        content_range: ContentRange | None = None,
    ) -> BlobRow:
        return await self._for(repo).finish_upload(repo, upload_id, body, digest, content_range)

    async def put_blob(self, repo: str, digest: Digest, body: AsyncIterator[bytes]) -> BlobRow:
        return await self._for(repo).put_blob(repo, digest, body)

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        await self._for(repo).cancel_upload(repo, upload_id)

    async def put_manifest(
        self,
        repo: str,
        reference: str,
        content_type: str | None,
        content: bytes,
        tags: Sequence[str],
    ) -> ManifestRow:
        return await self._for(repo).put_manifest(repo, reference, content_type, content, tags)

    async def delete_manifest(self, repo: str, reference: str) -> None:
        await self._for(repo).delete_manifest(repo, reference)
