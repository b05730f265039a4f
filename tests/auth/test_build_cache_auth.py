"""kaniko's cache lookups under auth: with a token scoped to pull and push on the cache
repository, a miss is 404 MANIFEST_UNKNOWN, not a 401 that would make kaniko log in again
for every RUN step."""

from __future__ import annotations

import hashlib

from tests.auth.test_access import bearer, token_for
from tests.helpers import Client, assert_error

CACHE = "team/app/cache"


async def test_cache_miss_with_a_pull_push_token_is_404(anon: Client) -> None:
    token = await token_for(anon, "bob", f"repository:{CACHE}:pull,push")
    for step in ("RUN apt-get update", "RUN make", "RUN make install"):
        key = hashlib.sha256(step.encode()).hexdigest()
        path = f"/v2/{CACHE}/manifests/{key}"
        resp = await anon.get(path, headers=bearer(token))
        await assert_error(resp, 404, "MANIFEST_UNKNOWN")
        await assert_error(await anon.head(path, headers=bearer(token)), 404, "")
    # Without a token it is the usual challenge, with the cache's scope.
    resp = await anon.get(f"/v2/{CACHE}/manifests/{'0' * 64}")
    await assert_error(resp, 401, "UNAUTHORIZED")
    assert f'scope="repository:{CACHE}:pull"' in resp.headers["WWW-Authenticate"]
