"""The [auth] configuration, and the refusal to listen beyond loopback unprotected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from regproxy.auth.rules import upstream_prefixes
from regproxy.auth.service import build_authenticator, is_loopback
from regproxy.auth.users import set_user
from regproxy.config import AuthRule, ConfigError, load_config
from tests.auth.conftest import HASHES
from tests.helpers import make_config

SRC = Path(__file__).resolve().parents[2] / "src"

TOML_TEMPLATE = """
[auth]
users_file = "/etc/regproxy/htpasswd"
realm = "https://registry.example/token"
service = "registry.example"
token_ttl = 120
groups = { devs = ["bob", "carol"] }

[auth.users]
alice = "HASH"

[[auth.rules]]
who = ["anonymous"]
repos = ["public/**"]
actions = ["pull"]

[[auth.rules]]
who = ["group:devs", "alice"]
repos = ["team/**"]
actions = ["pull", "push", "delete"]
"""
TOML = TOML_TEMPLATE.replace("HASH", HASHES["alice"])


def test_auth_section_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "regproxy.toml"
    path.write_text(TOML)
    auth = load_config(str(path), env={}).auth
    assert auth.users_file == "/etc/regproxy/htpasswd"
    assert auth.realm == "https://registry.example/token"
    assert auth.service == "registry.example"
    assert auth.token_ttl == 120.0
    assert auth.groups == {"devs": ("bob", "carol")}
    assert auth.users == {"alice": HASHES["alice"]}
    assert auth.rules == (
        AuthRule(("anonymous",), ("public/**",), ("pull",)),
        AuthRule(("group:devs", "alice"), ("team/**",), ("pull", "push", "delete")),
    )


def test_rules_and_users_from_the_environment_as_json() -> None:
    env = {
        "REGPROXY_AUTH_RULES": json.dumps([{"who": ["*"], "repos": ["**"], "actions": ["pull"]}]),
        "REGPROXY_AUTH_USERS": json.dumps({"bob": HASHES["bob"]}),
        "REGPROXY_AUTH_GROUPS": '{"ops": ["bob"]}',
        "REGPROXY_AUTH_TOKEN_TTL": "30",
    }
    auth = load_config(None, env=env).auth
    assert auth.rules == (AuthRule(("*",), ("**",), ("pull",)),)
    assert auth.users == {"bob": HASHES["bob"]}
    assert auth.groups == {"ops": ("bob",)}
    assert auth.token_ttl == 30.0
    with pytest.raises(ConfigError, match="REGPROXY_AUTH_RULES: expected JSON"):
        load_config(None, env={"REGPROXY_AUTH_RULES": "who=anonymous"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"auth.rules": [{"who": ["x"], "repos": ["a"], "actions": ["write"]}]},
            r"auth.rules\[0\].actions",
        ),
        (
            {"auth.rules": [{"who": ["x"], "repos": ["A/B"], "actions": ["pull"]}]},
            r"auth.rules\[0\].repos",
        ),
        (
            {"auth.rules": [{"who": [], "repos": ["a"], "actions": ["pull"]}]},
            r"auth.rules\[0\].who",
        ),
        (
            {"auth.rules": [{"who": ["group:nope"], "repos": ["a"], "actions": ["pull"]}]},
            "not defined",
        ),
        (
            {"auth.rules": [{"who": "anonymous", "repos": ["a"], "actions": ["pull"]}]},
            "must be an array",
        ),
        (
            {"auth.rules": [{"who": ["a"], "repo": ["a"], "actions": ["pull"]}]},
            r"auth.rules\[0\].repo",
        ),
        ({"auth.users": {"alice": "plaintext"}}, "auth.users.alice: expected a bcrypt hash"),
        ({"auth.users": {"anonymous": HASHES["alice"]}}, "auth.users.anonymous"),
        ({"auth.groups": {"devs": ["bad name"]}}, "auth.groups.devs"),
        ({"auth.realm": "registry.example/token"}, "auth.realm"),
        ({"auth.service": 'a"b'}, "auth.service"),
        ({"auth.token_ttl": 0}, "auth.token_ttl"),
    ],
)
def test_invalid_auth_config_names_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, env={}, overrides=overrides)


def test_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "10.0.0.1", "registry.example", ""):
        assert not is_loopback(host)


NO_UPSTREAMS = upstream_prefixes(())


def test_refuses_non_loopback_without_users_or_anonymous_rule(tmp_path: Path) -> None:
    config = make_config(tmp_path, listen="0.0.0.0:5000")
    with pytest.raises(ConfigError) as info:
        build_authenticator(config, NO_UPSTREAMS)
    message = str(info.value)
    for key in ("listen", "auth.users", "auth.users_file", "[[auth.rules]]", "anonymous"):
        assert key in message
    # rules that name no anonymous clients do not count, nor does an empty htpasswd file
    rules = [{"who": ["bob"], "repos": ["**"], "actions": ["pull"]}]
    with pytest.raises(ConfigError):
        build_authenticator(
            make_config(tmp_path, listen="0.0.0.0:5000", auth__rules=rules), NO_UPSTREAMS
        )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "htpasswd").write_text("")
    with pytest.raises(ConfigError):
        build_authenticator(config, NO_UPSTREAMS)


def test_non_loopback_starts_with_users_or_an_anonymous_rule(tmp_path: Path) -> None:
    users = make_config(tmp_path / "a", listen="0.0.0.0:5000", auth__users={"bob": HASHES["bob"]})
    assert not build_authenticator(users, NO_UPSTREAMS).policy.open_access
    anonymous = [{"who": ["anonymous"], "repos": ["public/**"], "actions": ["pull"]}]
    rules = make_config(tmp_path / "b", listen="[::]:5000", auth__rules=anonymous)
    policy = build_authenticator(rules, NO_UPSTREAMS).policy
    assert policy.granted(None, "public/x") == {"pull"}
    assert policy.granted(None, "team/x") == set()
    htpasswd = make_config(tmp_path / "c", listen="0.0.0.0:5000")
    set_user(htpasswd.data_path / "htpasswd", "bob", "pw", rounds=4)  # the default file
    assert build_authenticator(htpasswd, NO_UPSTREAMS).users.names() == ["bob"]


def test_loopback_without_users_is_open(tmp_path: Path) -> None:
    auth = build_authenticator(make_config(tmp_path), NO_UPSTREAMS)
    assert auth.policy.open_access
    assert not (tmp_path / "data" / "auth").exists()  # no key kept: tokens add nothing


def test_bad_users_file_or_key_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth.users_file: no such file"):
        build_authenticator(
            make_config(tmp_path, auth__users_file=str(tmp_path / "nope")), NO_UPSTREAMS
        )
    broken = tmp_path / "htpasswd"
    broken.write_text("alice:plaintext\n")
    with pytest.raises(ConfigError, match=r"auth.users_file"):
        build_authenticator(make_config(tmp_path, auth__users_file=str(broken)), NO_UPSTREAMS)
    users = {"bob": HASHES["bob"]}
    with pytest.raises(ConfigError, match=r"auth.key_path"):
        build_authenticator(
            make_config(tmp_path, auth__users=users, auth__key_path=str(tmp_path / "missing.pem")),
            NO_UPSTREAMS,
        )
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match=r"auth.key_path"):
        build_authenticator(
            make_config(tmp_path, auth__users=users, auth__key_path=str(tmp_path / "junk.pem")),
            NO_UPSTREAMS,
        )


def test_serve_exits_non_zero_naming_the_keys(tmp_path: Path) -> None:
    """The real command: refuses before it listens anywhere.

    192.0.2.1 (TEST-NET-1) is not on this machine, so even a regression could not listen
    beyond loopback: binding would fail, with another message.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    env["PYTHONPATH"] = str(SRC)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "regproxy",
            "serve",
            "--listen",
            "192.0.2.1:5999",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    for key in ("auth.users", "auth.users_file", "[[auth.rules]]", "anonymous"):
        assert key in result.stderr
