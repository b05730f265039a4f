"""Every route of the service, on one screen."""

from __future__ import annotations

from aiohttp import web

from regproxy.api import base, blobs, catalog, manifests, referrers, tags, uploads

NAME = "{name:.+?}"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", base.get_health)
    r.add_get("/v2/", base.get_base)
    r.add_get("/v2", base.get_base)
    r.add_get("/v2/_catalog", catalog.list_catalog)

    r.add_get(f"/v2/{NAME}/tags/list", tags.list_tags)
    r.add_get(f"/v2/{NAME}/referrers/{{digest}}", referrers.list_referrers)

    manifest = f"/v2/{NAME}/manifests/{{reference}}"
    r.add_get(manifest, manifests.get_manifest, allow_head=False)
    r.add_head(manifest, manifests.head_manifest)
    r.add_put(manifest, manifests.put_manifest)
    r.add_delete(manifest, manifests.delete_manifest)

    r.add_post(f"/v2/{NAME}/blobs/uploads/", uploads.post_upload)
    r.add_post(f"/v2/{NAME}/blobs/uploads", uploads.post_upload)
    upload = f"/v2/{NAME}/blobs/uploads/{{upload_id}}"
    r.add_get(upload, uploads.get_upload, allow_head=False)
    r.add_patch(upload, uploads.patch_upload)
    r.add_put(upload, uploads.put_upload)
    r.add_delete(upload, uploads.delete_upload)

    blob = f"/v2/{NAME}/blobs/{{digest}}"
    r.add_get(blob, blobs.get_blob, allow_head=False)
    r.add_head(blob, blobs.head_blob)
    r.add_delete(blob, blobs.delete_blob)
