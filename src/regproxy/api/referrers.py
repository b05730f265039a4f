"""The referrers API: manifests whose ``subject`` is a given digest, as an OCI index."""

from __future__ import annotations

import json

from aiohttp import web

from regproxy import oci
from regproxy.api.request import path_digest, registry, repo_name


async def list_referrers(request: web.Request) -> web.Response:
    repo = repo_name(request)
    subject = path_digest(request)
    artifact_type = request.query.get("artifactType") or None
    manifests = await registry(request).referrers(repo, subject, artifact_type)
    # Exactly the index media type: json_response would append "; charset=utf-8".
    headers = {"Content-Type": oci.OCI_INDEX}
    if artifact_type is not None:
        headers[oci.OCI_FILTERS_APPLIED] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
    return web.Response(body=json.dumps(index).encode(), headers=headers)
