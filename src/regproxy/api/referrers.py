"""The referrers API: manifests whose ``subject`` is a given digest, as an OCI index."""

from __future__ import annotations

from aiohttp import web

from regproxy import oci
from regproxy.api.request import path_digest, registry, repo_name


async def list_referrers(request: web.Request) -> web.Response:
    repo = repo_name(request)
    subject = path_digest(request)
    artifact_type = request.query.get("artifactType") or None
    manifests = await registry(request).referrers(repo, subject, artifact_type)
    headers = {}
    if artifact_type is not None:
        headers[oci.OCI_FILTERS_APPLIED] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
    return web.json_response(index, headers=headers, content_type=oci.OCI_INDEX)
