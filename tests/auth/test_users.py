"""htpasswd files, password checks, and `regproxy user add|remove`."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from regproxy.auth import users as users_module
from regproxy.auth.admin import user_command
from regproxy.auth.users import (
    HtpasswdError,
    UserStore,
    fingerprint,
    read_htpasswd,
    remove_user,
    set_user,
)
from tests.helpers import make_config

SRC = Path(__file__).resolve().parents[2] / "src"


def test_set_and_remove_user(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "htpasswd"
    assert set_user(path, "alice", "pw-1", rounds=4) is True
    assert set_user(path, "bob", "pw-2", rounds=4) is True
    assert set_user(path, "alice", "pw-3", rounds=4) is False
    users = read_htpasswd(path)
    assert sorted(users) == ["alice", "bob"]
    assert bcrypt.checkpw(b"pw-3", users["alice"].encode())
    assert "pw-" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert remove_user(path, "bob") is True
    assert remove_user(path, "bob") is False
    assert list(read_htpasswd(path)) == ["alice"]
    with pytest.raises(ValueError):
        set_user(path, "no:colons", "x", rounds=4)
    with pytest.raises(ValueError):
        set_user(path, "carol", "x" * 73, rounds=4)
    with pytest.raises(ValueError):
        set_user(path, "carol", "", rounds=4)


@pytest.mark.parametrize(
    "line", ["alice", "alice:plaintext", "alice:{SHA}abc=", "bad name:$2b$04$" + "a" * 53]
)
def test_htpasswd_refuses_what_it_cannot_check(tmp_path: Path, line: str) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(HtpasswdError, match=":3:"):
        read_htpasswd(path)


def test_verify(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    set_user(path, "alice", "file-pw", rounds=4)
    config_hash = bcrypt.hashpw(b"config-pw", bcrypt.gensalt(4)).decode()
    store = UserStore({"alice": config_hash, "bob": config_hash}, path)
    assert store.verify("alice", "file-pw")  # the file wins
    assert not store.verify("alice", "config-pw")
    assert store.verify("bob", "config-pw")
    assert not store.verify("bob", "config-pw\n")
    assert not store.verify("bob", "")
    assert not store.verify("nobody", "config-pw")
    assert not store.verify("bob", "x" * 100)


def test_file_changes_are_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    store = UserStore({}, path)
    assert store.count() == 0
    set_user(path, "alice", "pw", rounds=4)
    assert store.names() == ["alice"]
    assert store.verify("alice", "pw")
    set_user(path, "alice", "new-pw", rounds=4)
    assert not store.verify("alice", "pw")  # the remembered success is tied to the old hash
    assert store.verify("alice", "new-pw")
    path.write_text("broken line\n")
    assert store.names() == ["alice"]  # a broken file keeps the users read before
    path.unlink()
    assert store.names() == []


def test_unknown_users_cost_a_bcrypt_check_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    store = UserStore({"alice": hashed}, None)
    calls: list[bytes] = []
    checkpw = bcrypt.checkpw

    def spy(password: bytes, target: bytes) -> bool:
        calls.append(target)
        return checkpw(password, target)

    monkeypatch.setattr(users_module.bcrypt, "checkpw", spy)
    assert not store.verify("nobody", "pw")
    assert not store.verify("alice", "y" * 80)
    assert not store.verify("alice", "wrong")
    assert len(calls) == 3
    assert calls[0].startswith(b"$2b$04$")  # the dummy has the users' cost
    assert store.verify("alice", "pw")
    assert store.verify("alice", "pw")  # remembered: no second bcrypt check
    assert len(calls) == 4


def test_fingerprint_changes_with_the_hash() -> None:
    a = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    b = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(a)


def test_user_command(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    out = io.StringIO()
    rc = user_command(config, "add", "alice", stdin=io.StringIO("s3cret pw\n"), rounds=4, out=out)
    assert rc == 0, out.getvalue()
    path = config.data_path / "htpasswd"
    assert bcrypt.checkpw(b"s3cret pw", read_htpasswd(path)["alice"].encode())
    assert "s3cret" not in out.getvalue()
    for name, stdin in (("anonymous", "pw\n"), ("bad:name", "pw\n"), ("bob", "\n")):
        out = io.StringIO()
        assert user_command(config, "add", name, stdin=io.StringIO(stdin), out=out) == 1
        assert "regproxy:" in out.getvalue()
    assert user_command(config, "remove", "alice", out=io.StringIO()) == 0
    assert user_command(config, "remove", "alice", out=io.StringIO()) == 1


def test_cli_user_add_reads_the_password_from_stdin(tmp_path: Path) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    env["PYTHONPATH"] = str(SRC)
    htpasswd = tmp_path / "users"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "regproxy",
            "user",
            "add",
            "dave",
            "--file",
            str(htpasswd),
            "--rounds",
            "4",
        ],
        input="dave's password\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "dave's password" not in result.stdout + result.stderr
    assert bcrypt.checkpw(b"dave's password", read_htpasswd(htpasswd)["dave"].encode())
