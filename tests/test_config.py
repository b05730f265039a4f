"""Configuration: TOML file, REGPROXY_* environment, command-line overrides, and errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from regproxy.config import Config, ConfigError, load_config

FULL_TOML = """
listen = "0.0.0.0:8080"
data_dir = "/srv/regproxy"
log_level = "debug"
shutdown_timeout = 5

[storage]
backend = "filesystem"
path = "/mnt/blobs"
fsync = false

[uploads]
max_age = 3600
purge_interval = 60.5

[limits]
manifest_max_bytes = 1048576
page_max = 100
"""


def _write(tmp_path: Path, text: str, name: str = "regproxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(tmp_path: Path, text: str = "", env: dict[str, str] | None = None) -> str:
    path = _write(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


def test_defaults() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.host == "127.0.0.1"
    assert config.port == 5000
    assert config.data_path == Path("data")
    assert config.storage_path == Path("data", "blobs")
    assert config.storage.fsync is True
    assert config.limits.manifest_max_bytes == 4 * 1024 * 1024
    assert config.uploads.max_age == 24 * 3600


def test_toml_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL_TOML), env={})
    assert config.listen == "0.0.0.0:8080"
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.data_dir == "/srv/regproxy"
    assert config.log_level == "debug"
    assert config.shutdown_timeout == 5.0 and isinstance(config.shutdown_timeout, float)
    assert config.storage.path == "/mnt/blobs"
    assert config.storage_path == Path("/mnt/blobs")
    assert config.storage.fsync is False
    assert config.uploads.max_age == 3600.0 and isinstance(config.uploads.max_age, float)
    assert config.uploads.purge_interval == 60.5
    assert config.limits.manifest_max_bytes == 1048576
    assert config.limits.page_max == 100


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = "x"  # type: ignore[misc]


def test_ipv6_listen() -> None:
    config = load_config(None, env={"REGPROXY_LISTEN": "[::1]:5001"})
    assert (config.host, config.port) == ("::1", 5001)


def test_environment(tmp_path: Path) -> None:
    env = {
        "REGPROXY_LISTEN": "127.0.0.1:6000",
        "REGPROXY_DATA_DIR": str(tmp_path),
        "REGPROXY_LOG_LEVEL": "warning",
        "REGPROXY_SHUTDOWN_TIMEOUT": "2.5",
        "REGPROXY_STORAGE_FSYNC": "no",
        "REGPROXY_STORAGE_PATH": "/blobs",
        "REGPROXY_UPLOADS_MAX_AGE": "10",
        "REGPROXY_LIMITS_PAGE_MAX": "7",
        "PATH": "/usr/bin",  # not ours: ignored
        "REGPROXYX": "1",
    }
    config = load_config(None, env=env)
    assert config.listen == "127.0.0.1:6000"
    assert config.data_dir == str(tmp_path)
    assert config.log_level == "warning"
    assert config.shutdown_timeout == 2.5
    assert config.storage.fsync is False
    assert config.storage.path == "/blobs"
    assert config.uploads.max_age == 10.0
    assert config.limits.page_max == 7


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("YES", True), (" on ", True),
     ("0", False), ("false", False), ("No", False), ("off", False)],
)  # fmt: skip
def test_environment_booleans(raw: str, value: bool) -> None:
    assert load_config(None, env={"REGPROXY_STORAGE_FSYNC": raw}).storage.fsync is value


def test_precedence(tmp_path: Path) -> None:
    path = _write(tmp_path, 'listen = "127.0.0.1:1000"\ndata_dir = "/file"\nlog_level = "error"\n')
    env = {"REGPROXY_LISTEN": "127.0.0.1:2000", "REGPROXY_DATA_DIR": "/env"}
    overrides: dict[str, Any] = {"listen": "127.0.0.1:3000", "data_dir": None}

    def chosen(config: Config) -> tuple[str, str, str]:
        return config.listen, config.data_dir, config.log_level

    assert chosen(load_config(path, env={})) == ("127.0.0.1:1000", "/file", "error")
    assert chosen(load_config(path, env=env)) == ("127.0.0.1:2000", "/env", "error")
    # A flag left unset (None) does not override.
    assert chosen(load_config(path, env=env, overrides=overrides)) == (
        "127.0.0.1:3000",
        "/env",
        "error",
    )


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "[limits]\npage_max = 42\n")
    assert load_config(None, env={"REGPROXY_CONFIG": path}).limits.page_max == 42
    other = _write(tmp_path, "[limits]\npage_max = 43\n", "other.toml")
    assert load_config(other, env={"REGPROXY_CONFIG": path}).limits.page_max == 43


def test_nested_overrides() -> None:
    config = load_config(None, env={}, overrides={"uploads.max_age": 1, "storage.fsync": False})
    assert config.uploads.max_age == 1.0
    assert config.storage.fsync is False


# -- errors name the key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[storage]\nbogus = 1\n", "storage.bogus"),
        ("[limits]\npage_max = 1\nmanifest_max = 2\n", "limits.manifest_max"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection"),
    ],
)
def test_unknown_key_in_file(tmp_path: Path, text: str, key: str) -> None:
    message = _error(tmp_path, text)
    assert "unknown config key" in message
    assert message.endswith(key)


@pytest.mark.parametrize(
    "name", ["REGPROXY_BOGUS", "REGPROXY_STORAGE_BOGUS", "REGPROXY_STORAGE", "REGPROXY_listen"]
)
def test_unknown_key_in_environment(tmp_path: Path, name: str) -> None:
    message = _error(tmp_path, env={name: "1"})
    assert "unknown config key" in message
    assert name in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("listen = 5000\n", "listen"),
        ('data_dir = ["a"]\n', "data_dir"),
        ('shutdown_timeout = "30"\n', "shutdown_timeout"),
        ("shutdown_timeout = true\n", "shutdown_timeout"),
        ('[storage]\nfsync = "yes"\n', "storage.fsync"),
        ("[storage]\nfsync = 1\n", "storage.fsync"),
        ('[uploads]\nmax_age = "1h"\n', "uploads.max_age"),
        ("[limits]\npage_max = 1.5\n", "limits.page_max"),
        ("[limits]\npage_max = true\n", "limits.page_max"),
        ("[limits]\nmanifest_max_bytes = {a = 1}\n", "limits.manifest_max_bytes"),
        ('storage = "filesystem"\n', "storage"),
        ("limits = 5\n", "limits"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, text: str, key: str) -> None:
    assert f"config key {key}" in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REGPROXY_LIMITS_PAGE_MAX", "ten"),
        ("REGPROXY_LIMITS_PAGE_MAX", "1.5"),
        ("REGPROXY_UPLOADS_MAX_AGE", "1h"),
        ("REGPROXY_STORAGE_FSYNC", "maybe"),
        ("REGPROXY_SHUTDOWN_TIMEOUT", ""),
    ],
)
def test_wrong_type_in_environment(tmp_path: Path, name: str, value: str) -> None:
    assert name in _error(tmp_path, env={name: value})


def test_environment_key_under_a_non_table_in_file(tmp_path: Path) -> None:
    message = _error(tmp_path, 'storage = "filesystem"\n', {"REGPROXY_STORAGE_FSYNC": "0"})
    assert message == "config key storage must be a table"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('listen = "5000"\n', "listen"),
        ('listen = ":5000"\n', "listen"),
        ('listen = "localhost:http"\n', "listen"),
        ('listen = "localhost:0"\n', "listen"),
        ('listen = "localhost:65536"\n', "listen"),
        ('log_level = "loud"\n', "log_level"),
        ('[storage]\nbackend = "s4"\n', "storage.backend"),
        ("[uploads]\nmax_age = 0\n", "uploads.max_age"),
        ("[uploads]\npurge_interval = -1\n", "uploads.purge_interval"),
        ("[limits]\nmanifest_max_bytes = 0\n", "limits.manifest_max_bytes"),
        ("[limits]\npage_max = -5\n", "limits.page_max"),
        ("shutdown_timeout = 0\n", "shutdown_timeout"),
        ("[gc]\ninterval = -1\n", "gc.interval"),
        ("[gc]\ninterval = nan\n", "gc.interval"),
        ("[gc]\ngrace = -0.5\n", "gc.grace"),
        ('[gc]\nuntagged = "remove"\n', "gc.untagged"),
    ],
)
def test_invalid_value(tmp_path: Path, text: str, key: str) -> None:
    assert f"config key {key}:" in _error(tmp_path, text)


@pytest.mark.parametrize("name", ["Docker.io", "docker.io/x", "docker.io\\n", "-a", "a:b"])
def test_invalid_upstream_name(tmp_path: Path, name: str) -> None:
    text = f'[upstreams."{name}"]\nurl = "https://registry.example"\n'
    assert "config key upstreams." in _error(tmp_path, text)


def test_upstream(tmp_path: Path) -> None:
    text = '[upstreams."docker.io"]\nurl = "https://registry-1.docker.io"\ntag_ttl = 60\n'
    config = load_config(_write(tmp_path, text), env={})
    assert config.upstreams["docker.io"].url == "https://registry-1.docker.io"
    assert config.upstreams["docker.io"].tag_ttl == 60.0


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing\.toml"):
        load_config(str(tmp_path / "missing.toml"), env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "listen = \n"), env={})


# -- the command line ---------------------------------------------------------------------


def _regproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "regproxy", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[storage]\nbogus = 1\n", {}, "storage.bogus"),
        ('[limits]\npage_max = "many"\n', {}, "limits.page_max"),
        ("", {"REGPROXY_UPLOADS_MAXAGE": "1"}, "REGPROXY_UPLOADS_MAXAGE"),
    ],
)
def test_serve_with_bad_config(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    path = _write(tmp_path, text, "bad.toml")
    result = _regproxy("serve", "--config", path, "--data-dir", str(tmp_path / "d"), env=env)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regproxy: configuration error:")
    assert key in lines[0]
    assert not (tmp_path / "d").exists()


def test_serve_with_bad_flag(tmp_path: Path) -> None:
    result = _regproxy("serve", "--listen", "nowhere", "--data-dir", str(tmp_path / "d"))
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "regproxy: configuration error: config key listen: expected HOST:PORT, got 'nowhere'"
    ]


def test_metadata_and_workers(tmp_path: Path) -> None:
    text = """
workers = 3

[metadata]
backend = "postgres"
dsn = "postgresql://regproxy@db/regproxy"
pool_size = 4
prepared_statements = false
"""
    config = load_config(_write(tmp_path, text), env={})
    assert config.workers == 3
    assert config.metadata.backend == "postgres"
    assert config.metadata.dsn == "postgresql://regproxy@db/regproxy"
    assert config.metadata.pool_size == 4
    assert config.metadata.prepared_statements is False
    env = {
        "REGPROXY_METADATA_BACKEND": "postgres",
        "REGPROXY_METADATA_DSN": "postgres://u:p@127.0.0.1:5433/r",
        "REGPROXY_METADATA_PREPARED_STATEMENTS": "off",
        "REGPROXY_WORKERS": "2",
    }
    config = load_config(None, env=env)
    assert config.metadata.dsn == "postgres://u:p@127.0.0.1:5433/r"
    assert config.metadata.prepared_statements is False
    assert config.workers == 2
    assert load_config(None, env={}).metadata.backend == "sqlite"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[metadata]\nbackend = "mysql"', "metadata.backend"),
        ('[metadata]\nbackend = "postgres"', "metadata.dsn"),
        ('[metadata]\nbackend = "postgres"\ndsn = "mysql://db/x"', "metadata.dsn"),
        ("[metadata]\npool_size = 0", "metadata.pool_size"),
        ("[metadata]\ncommand_timeout = -1", "metadata.command_timeout"),
        ('[metadata]\npool_size = "ten"', "metadata.pool_size"),
        ("workers = 0", "workers"),
        ("workers = 1000", "workers"),
    ],
)
def test_invalid_metadata_and_workers(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"config key {key}[:]"):
        load_config(_write(tmp_path, text), env={})


def test_gc_defaults_and_environment(tmp_path: Path) -> None:
    config = load_config(None, env={})
    assert (config.gc.interval, config.gc.grace, config.gc.untagged) == (3600.0, 86400.0, "keep")
    path = _write(tmp_path, '[gc]\ninterval = 0\nuntagged = "delete"\n')
    config = load_config(path, env={"REGPROXY_GC_GRACE": "60"})
    assert (config.gc.interval, config.gc.grace, config.gc.untagged) == (0.0, 60.0, "delete")


SECRET = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[cluster]\nadvertise_url = "10.0.0.5:5000"\n', "cluster.advertise_url"),
        ('[cluster]\nadvertise_url = "ftp://10.0.0.5"\n', "cluster.advertise_url"),
        ('[cluster]\nadvertise_url = "http://10.0.0.5:5000"\n', "cluster.secret"),
        ('[cluster]\nsecret = "short"\n', "cluster.secret"),
        ("[cluster]\nlease_ttl = 0\n", "cluster.lease_ttl"),
        ('[cluster]\nnode = "a b"\n', "cluster.node"),
    ],
)
def test_invalid_cluster_value(tmp_path: Path, text: str, key: str) -> None:
    assert f"config key {key}:" in _error(tmp_path, text)


def test_cluster(tmp_path: Path) -> None:
    text = f'[cluster]\nadvertise_url = "http://10.0.0.5:5000"\nsecret = "{SECRET}"\n'
    config = load_config(_write(tmp_path, text), env={"REGPROXY_CLUSTER_NODE": "rack1-a"})
    assert config.cluster.advertise_url == "http://10.0.0.5:5000"
    assert config.cluster.secret == SECRET
    assert config.cluster.node == "rack1-a"
    assert config.cluster.lease_ttl == 60.0
