"""Automatic content discovery under auth: ``POST .../blobs/uploads/?mount=<digest>`` without
``from`` links the blob when it is stored in any repository the caller may pull (201), and
otherwise starts an upload (202) without revealing that the blob exists anywhere."""

from __future__ import annotations

import pytest

from tests.auth.conftest import AsUser
from tests.auth.test_access import bearer, token_for
from tests.helpers import Client, assert_error, push_blob

UPLOADS = "/v2/team/app/blobs/uploads/"


async def _mount(client: Client, digest: str, **headers: str) -> int:
    resp = await client.post(UPLOADS, params={"mount": digest}, headers=headers)
    if resp.status == 201:
        assert resp.headers["Location"] == f"/v2/team/app/blobs/{digest}"
        assert resp.headers["Docker-Content-Digest"] == digest
    else:
        assert resp.status == 202, await resp.text()
        assert resp.headers["Location"].startswith(UPLOADS)
        assert resp.headers["Range"] == "0-0"
    return resp.status


async def test_mount_without_from_links_a_blob_the_caller_may_pull(
    anon: Client, admin: Client, as_user: AsUser
) -> None:
    digest = await push_blob(admin, "shared/base", b"base layer")  # every user may pull it
    bob = await as_user(anon, "bob")
    assert await _mount(bob, digest) == 201
    resp = await bob.get(f"/v2/team/app/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == b"base layer"
    # and it is linked for good: the repository holds it now, the source is irrelevant
    resp = await bob.head(f"/v2/team/app/blobs/{digest}")
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(b"base layer"))


async def test_mount_without_from_of_a_blob_only_in_private_repositories(
    anon: Client, admin: Client, as_user: AsUser
) -> None:
    digest = await push_blob(admin, "zeta/secret", b"secret layer")
    await push_blob(admin, "omega/secret", b"secret layer")
    bob = await as_user(anon, "bob")
    assert await _mount(bob, digest) == 202  # exactly as for a blob stored nowhere
    await assert_error(await bob.get(f"/v2/team/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert await _mount(bob, "sha256:" + "0" * 64) == 202


async def test_one_pullable_repository_is_enough(
    anon: Client, admin: Client, as_user: AsUser
) -> None:
    digest = await push_blob(admin, "zeta/secret", b"shared bytes")
    await push_blob(admin, "public/base", b"shared bytes")  # bob may pull public/**
    bob = await as_user(anon, "bob")
    assert await _mount(bob, digest) == 201
    resp = await bob.get(f"/v2/team/app/blobs/{digest}")
    assert await resp.read() == b"shared bytes"


@pytest.mark.parametrize(("source", "expected"), [("shared/base", 201), ("zeta/secret", 202)])
async def test_with_a_bearer_token(anon: Client, admin: Client, source: str, expected: int) -> None:
    digest = await push_blob(admin, source, b"layer in " + source.encode())
    token = await token_for(anon, "bob", "repository:team/app:pull,push")
    assert await _mount(anon, digest, **bearer(token)) == expected
    resp = await anon.get(f"/v2/team/app/blobs/{digest}", headers=bearer(token))
    assert resp.status == (200 if expected == 201 else 404)


async def test_a_user_who_may_pull_everything(anon: Client, admin: Client) -> None:
    digest = await push_blob(admin, "zeta/secret", b"secret layer")
    assert await _mount(admin, digest) == 201
