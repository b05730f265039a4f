"""Users and rules with real clients: skopeo with --creds, docker login + push + pull.

regproxy runs with three users and rules: anonymous clients may pull public/**; bob (group
devs) may pull and push team/** and public/**; alice may do anything; carol only signs in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import (
    OciImage,
    layout_ref_digest,
    make_docker_archive,
    make_oci_layout,
    read_layout_blobs,
)
from tests.e2e.procs import (
    DOCKERD_BIN,
    SKOPEO_BIN,
    RegproxyProcess,
    dockerd,
    regproxy,
    skopeo,
    write_htpasswd,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}

CONFIG = """
[auth]
users_file = "{htpasswd}"
groups = {{ devs = ["bob"] }}

[[auth.rules]]
who = ["anonymous"]
repos = ["public/**"]
actions = ["pull"]

[[auth.rules]]
who = ["group:devs"]
repos = ["team/**", "public/**"]
actions = ["pull", "push"]

[[auth.rules]]
who = ["alice"]
repos = ["**"]
actions = ["*"]
"""


def require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} missing: apt-get install -y skopeo docker.io")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RegproxyProcess]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", PASSWORDS)
    async with regproxy(tmp_path / "regproxy", config=CONFIG.format(htpasswd=htpasswd)) as proc:
        yield proc


def assert_no_secrets_logged(server: RegproxyProcess) -> None:
    log = server.log_path.read_text()
    assert '"path":"/token"' in log, "the token endpoint was never used"
    for password in PASSWORDS.values():
        assert password not in log
    assert "eyJ" not in log, "a JWT (or part of one) was logged"


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


async def skopeo_fails(*args: str) -> str:
    rc, _, err = await skopeo(*args)
    assert rc != 0, f"skopeo {' '.join(args)} should have failed"
    return err


def creds(user: str, password: str | None = None) -> str:
    return f"{user}:{PASSWORDS[user] if password is None else password}"


def assert_same_layout(image: OciImage, copy_dir: Path) -> None:
    assert read_layout_blobs(copy_dir) == image.all_blobs
    assert layout_ref_digest(copy_dir, image.tag) == image.digest


async def test_skopeo_with_creds(server: RegproxyProcess, tmp_path: Path) -> None:
    require(SKOPEO_BIN)
    image = make_oci_layout(tmp_path / "src", [300_000, 40_000])
    team = f"docker://{server.host}/team/app:v1"
    public = f"docker://{server.host}/public/app:v1"
    push = ("copy", "--dest-tls-verify=false")
    pull = ("copy", "--src-tls-verify=false")

    err = await skopeo_fails(*push, image.ref(), team)  # anonymous
    assert "401" in err or "unauthorized" in err.lower(), err
    err = await skopeo_fails(*push, f"--dest-creds={creds('carol')}", image.ref(), team)
    assert "403" in err or "denied" in err.lower(), err
    err = await skopeo_fails(*push, f"--dest-creds={creds('bob', 'wrong')}", image.ref(), team)
    assert "401" in err or "unauthorized" in err.lower(), err

    await skopeo_ok(*push, f"--dest-creds={creds('bob')}", image.ref(), team)
    raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", f"--creds={creds('bob')}", team)
    assert json.loads(raw) == json.loads(image.read_blob(image.digest))

    # pulls of team/** need devs (or alice); anonymous and carol are refused
    await skopeo_fails(*pull, team, f"oci:{tmp_path / 'anon'}:latest")
    await skopeo_fails(*pull, f"--src-creds={creds('carol')}", team, f"oci:{tmp_path / 'c'}:latest")
    back = tmp_path / "bob-back"
    await skopeo_ok(*pull, f"--src-creds={creds('bob')}", team, f"oci:{back}:latest")
    assert_same_layout(image, back)

    # public/**: alice pushes, anyone pulls without credentials
    await skopeo_ok(*push, f"--dest-creds={creds('alice')}", image.ref(), public)
    anon_back = tmp_path / "anon-back"
    await skopeo_ok(*pull, public, f"oci:{anon_back}:latest")
    assert_same_layout(image, anon_back)
    await skopeo_fails(*push, image.ref(), f"docker://{server.host}/public/other:v1")

    # the catalog shows each caller what it may pull
    async with aiohttp.ClientSession() as session:
        for auth, expected in (
            (aiohttp.encode_basic_auth("bob", PASSWORDS["bob"]), ["public/app", "team/app"]),
            (aiohttp.encode_basic_auth("carol", PASSWORDS["carol"]), ["public/app"]),
        ):
            headers = {"Authorization": auth}
            async with session.get(f"{server.url}/v2/_catalog", headers=headers) as resp:
                assert resp.status == 200
                assert (await resp.json())["repositories"] == expected
    assert_no_secrets_logged(server)


async def test_docker_login_push_pull(server: RegproxyProcess, tmp_path: Path) -> None:
    require(DOCKERD_BIN)
    archive = make_docker_archive(
        tmp_path / "image.tar", [1 << 20, 50_000], "e2e/auth:v1", seed="auth"
    )
    host = server.host
    target = f"{host}/team/app:v1"
    async with dockerd(tmp_path / "dockerd", insecure_registries=[host]) as docker:

        async def login(user: str, password: str | None = None) -> tuple[int, str]:
            secret = PASSWORDS[user] if password is None else password
            rc, out, err = await docker.run(
                "login", "-u", user, "--password-stdin", host, input=secret.encode()
            )
            return rc, out + err

        await docker.check("load", "-i", str(archive.path))
        await docker.check("tag", archive.repo_tag, target)

        rc, out, err = await docker.run("push", target)
        assert rc != 0, "anonymous push must fail"
        assert "unauthorized" in (out + err).lower() or "denied" in (out + err).lower()

        rc, out = await login("bob", "wrong-password")
        assert rc != 0, out

        rc, out = await login("carol")
        assert rc == 0 and "Login Succeeded" in out, out
        rc, out, err = await docker.run("push", target)
        assert rc != 0 and "denied" in (out + err).lower(), out + err

        rc, out = await login("bob")
        assert rc == 0 and "Login Succeeded" in out, out
        # docker keeps the refresh token as its identity token, not the password
        stored = (docker.config_dir / "config.json").read_text()
        assert "identitytoken" in stored
        assert PASSWORDS["bob"] not in stored
        await docker.check("push", target)

        await docker.check("rmi", target, archive.repo_tag)
        await docker.check("pull", target)
        inspected = json.loads(await docker.check("image", "inspect", target))[0]
        assert inspected["Id"] == archive.image_id
        assert inspected["RootFS"]["Layers"] == list(archive.diff_ids)

        public = f"{host}/public/app:v1"
        await docker.check("tag", target, public)
        await docker.check("push", public)

        await docker.check("logout", host)
        await docker.check("rmi", target, public)
        rc, out, err = await docker.run("pull", target)
        assert rc != 0, "anonymous pull of team/** must fail"
        await docker.check("pull", public)  # anonymous pull of public/** works
        inspected = json.loads(await docker.check("image", "inspect", public))[0]
        assert inspected["Id"] == archive.image_id
    # the pushes exchanged the identity token in the OAuth2 form (grant_type=refresh_token)
    assert '"method":"POST","path":"/token","status":200' in server.log_path.read_text()
    assert_no_secrets_logged(server)
