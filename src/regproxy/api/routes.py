"""Every route of the service, on one screen."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from regproxy.api import base, blobs, catalog, manifests, ops, referrers, tags, uploads
from regproxy.api.keys import CONFIG
from regproxy.auth import handlers as token
from regproxy.cluster import peer
from regproxy.web import pages as ui

NAME = "{name:.+?}"

# What each route needs, enforced by auth/middleware.py before the handler runs: OPEN needs
# nothing; LOGIN any identity (a token, Basic credentials; anonymous only in open mode);
# pull/push/delete are actions on the route's {name}; MOUNT_SOURCE adds pull on the ?from=
# of a cross-repository mount. A HEAD needs what its GET needs. Keys: (method, route path).
OPEN: Final = "open"
LOGIN: Final = "login"
MOUNT_SOURCE: Final = "pull:from"
_N = "/v2/{name}"
ROUTE_ACCESS: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("GET", "/healthz"): (OPEN,),
    ("GET", "/readyz"): (OPEN,),
    # On the main listener /metrics needs a login, like /v2/ (open mode: anyone on loopback);
    # metrics.listen serves it on a separate address without auth instead.
    ("GET", "/metrics"): (LOGIN,),
    ("GET", "/token"): (OPEN,),
    ("POST", "/token"): (OPEN,),
    ("GET", "/v2/"): (LOGIN,),
    ("GET", "/v2"): (LOGIN,),
    ("GET", "/v2/_catalog"): (LOGIN,),  # lists only what the caller may pull
    ("GET", f"{_N}/tags/list"): ("pull",),
    ("GET", f"{_N}/referrers/{{digest}}"): ("pull",),
    ("GET", f"{_N}/manifests/{{reference}}"): ("pull",),
    ("PUT", f"{_N}/manifests/{{reference}}"): ("push",),
    ("DELETE", f"{_N}/manifests/{{reference}}"): ("delete",),
    ("POST", f"{_N}/blobs/uploads/"): ("push", MOUNT_SOURCE),
    ("POST", f"{_N}/blobs/uploads"): ("push", MOUNT_SOURCE),
    ("GET", f"{_N}/blobs/uploads/{{upload_id}}"): ("push",),
    ("PATCH", f"{_N}/blobs/uploads/{{upload_id}}"): ("push",),
    ("PUT", f"{_N}/blobs/uploads/{{upload_id}}"): ("push",),
    ("DELETE", f"{_N}/blobs/uploads/{{upload_id}}"): ("push",),
    ("GET", f"{_N}/blobs/{{digest}}"): ("pull",),
    ("DELETE", f"{_N}/blobs/{{digest}}"): ("delete",),
    # Only with cluster.secret; the handler checks the request's HMAC itself.
    ("GET", peer.FILLS_PATH): (OPEN,),
    # The web UI signs its users in with its own cookie (web/session.py) and checks pull
    # rights per repository itself: each page shows only what its user may pull.
    ("GET", "/ui"): (OPEN,),
    ("GET", "/ui/"): (OPEN,),
    ("GET", "/ui/style.css"): (OPEN,),
    ("GET", "/ui/login"): (OPEN,),
    ("POST", "/ui/login"): (OPEN,),
    ("POST", "/ui/logout"): (OPEN,),
    ("GET", "/ui/upstreams"): (OPEN,),
    ("GET", "/ui/repo/{name}"): (OPEN,),
    ("GET", "/ui/manifest/{name}/-/{reference}"): (OPEN,),
}

# The ``handler`` label of the HTTP metrics, per route path: distribution's names where it has
# the route. Routes not listed are labelled with their aiohttp name, else their path template.
HANDLER_NAMES: Final[dict[str, str]] = {
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/token": "token",
    "/v2/": "base",
    "/v2": "base",
    "/v2/_catalog": "catalog",
    f"{_N}/tags/list": "tags",
    f"{_N}/referrers/{{digest}}": "referrers",
    f"{_N}/manifests/{{reference}}": "manifest",
    f"{_N}/blobs/uploads/": "blob_upload",
    f"{_N}/blobs/uploads": "blob_upload",
    f"{_N}/blobs/uploads/{{upload_id}}": "blob_upload_chunk",
    f"{_N}/blobs/{{digest}}": "blob",
}


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", base.get_health)
    r.add_get("/readyz", ops.get_ready)
    r.add_get("/metrics", ops.get_metrics)
    r.add_get("/token", token.get_token)
    r.add_post("/token", token.post_token)
    r.add_get("/v2/", base.get_base)
    r.add_get("/v2", base.get_base)
    r.add_get("/v2/_catalog", catalog.list_catalog)

    # aiohttp tries the /v2/{name}/... routes in this order (their paths end differently, so
    # the order changes no match): manifests first, as every pull and cache probe starts there.
    manifest = f"/v2/{NAME}/manifests/{{reference}}"
    r.add_get(manifest, manifests.get_manifest, allow_head=False)
    r.add_head(manifest, manifests.head_manifest)
    r.add_put(manifest, manifests.put_manifest)
    r.add_delete(manifest, manifests.delete_manifest)

    r.add_get(f"/v2/{NAME}/tags/list", tags.list_tags)
    r.add_get(f"/v2/{NAME}/referrers/{{digest}}", referrers.list_referrers)

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

    if app[CONFIG].cluster.secret:  # other replicas follow this one's fills
        r.add_get(peer.FILLS_PATH, peer.get_fill, allow_head=False)
    # The web UI (read-only). "/-/" cannot occur in a repository name, so it ends one.
    r.add_get("/ui", ui.redirect_to_ui, name="ui_root")
    r.add_get("/ui/", ui.list_repositories, name="ui_repositories")
    r.add_get("/ui/style.css", ui.get_style, name="ui_style")
    r.add_get("/ui/login", ui.get_login, name="ui_login")
    r.add_post("/ui/login", ui.post_login, name="ui_login_post")
    r.add_post("/ui/logout", ui.post_logout, name="ui_logout")
    r.add_get("/ui/upstreams", ui.list_upstreams, name="ui_upstreams")
    r.add_get("/ui/repo/{name:.+}", ui.get_repository, name="ui_repository")
    r.add_get("/ui/manifest/{name:.+?}/-/{reference}", ui.get_manifest, name="ui_manifest")
