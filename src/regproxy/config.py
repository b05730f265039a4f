"""Configuration: frozen dataclasses read from one TOML file and ``REGPROXY_*`` variables.

Precedence, lowest first: defaults, the TOML file, the environment, command-line flags.
Every key ``section.key`` has the environment form ``REGPROXY_SECTION_KEY``. Anything wrong
(an unknown key, a value of the wrong type, an invalid value) raises ``ConfigError`` with a
message naming the key. Nothing else in the program reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yarl

ENV_PREFIX = "REGPROXY_"
ENV_CONFIG_FILE = "REGPROXY_CONFIG"
# An upstream's name is the first path component of the repositories it serves.
_UPSTREAM_NAME_RE = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*(?::[0-9]+)?$")


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "filesystem"
    # Filesystem backend: where blobs and in-progress uploads live; default <data_dir>/blobs.
    path: str = ""
    # fsync a blob before it becomes visible (durability across power loss).
    fsync: bool = True


@dataclass(frozen=True)
class UploadsConfig:
    # An upload nobody touched for this many seconds is purged with its bytes.
    max_age: float = 24 * 3600.0
    # How often the purge runs, in seconds.
    purge_interval: float = 600.0


@dataclass(frozen=True)
class LimitsConfig:
    manifest_max_bytes: int = 4 * 1024 * 1024
    # Largest page of tags, catalog entries or referrers one request may ask for.
    page_max: int = 10000


@dataclass(frozen=True)
class UpstreamConfig:
    """A registry cached under the path prefix ``<name>/`` (``[upstreams."<name>"]``)."""

    url: str = ""
    username: str = ""
    password: str = ""
    # PEM bundle of CAs to trust for this upstream, on top of nothing else; default: system.
    ca_bundle: str = ""
    # Seconds a cached tag is served before it is revalidated upstream with a HEAD.
    tag_ttl: float = 300.0
    # Seconds to wait for the upstream to connect or to send the next bytes.
    timeout: float = 30.0
    # Most connections open to this upstream at once.
    max_connections: int = 32
    # Map one-part names to library/ (Docker Hub's official images); default: Docker Hub only.
    official_library: bool | None = None


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:5000"
    data_dir: str = "./data"
    log_level: str = "info"
    # Seconds SIGTERM waits for in-flight requests before the process exits.
    shutdown_timeout: float = 30.0
    storage: StorageConfig = field(default_factory=StorageConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    # Serve pulls of names not hosted here from this upstream (Docker's registry-mirrors).
    default_upstream: str = ""

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def storage_path(self) -> Path:
        return Path(self.storage.path) if self.storage.path else self.data_path / "blobs"


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration; ``overrides`` maps dotted keys to values (CLI flags)."""
    env = env or {}
    path = path or env.get(ENV_CONFIG_FILE)
    values: dict[str, Any] = {}
    if path:
        values = _read_toml(path)
    for key, raw in _env_values(env).items():
        _set(values, key, _coerce_text(key, raw))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(values, key, value)
    config: Config = _build(Config, values, "")
    _validate(config)
    return config


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _keys(cls: type, prefix: str = "") -> dict[str, type]:
    """Every leaf key of the dataclass tree, dotted, with its type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_keys(typing.cast(type, kind), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


_LEAVES = _keys(Config)


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    by_name = {_env_name(key): key for key in _LEAVES}
    found: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        if name not in by_name:
            raise ConfigError(f"unknown config key in environment: {name}")
        found[by_name[name]] = raw
    return found


def _coerce_text(key: str, raw: str) -> Any:
    kind = _LEAVES[key]
    if typing.get_origin(kind) in (dict, list, tuple):
        try:
            return json.loads(raw)  # tables and arrays are given as JSON in the environment
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{_env_name(key)}: expected JSON, {exc}") from exc
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{_env_name(key)}: expected {kind.__name__}, got {raw!r}") from exc
    return raw


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    for depth, section in enumerate(sections, 1):
        values = values.setdefault(section, {})
        if not isinstance(values, dict):  # the file set a table's name to a plain value
            raise ConfigError(f"config key {'.'.join(sections[:depth])} must be a table")
    values[leaf] = value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.')} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in names:
            raise ConfigError(f"unknown config key {prefix}{name}")
    kwargs = {name: _convert(f"{prefix}{name}", hints[name], v) for name, v in values.items()}
    return cls(**kwargs)


def _convert(key: str, kind: Any, value: Any) -> Any:
    """Check and convert one value: a table, a table of tables, an array, or a scalar."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return _build(typing.cast(type, kind), value, f"{key}.")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key} must be a table")
        item = typing.get_args(kind)[1]
        return {str(name): _convert(f"{key}.{name}", item, v) for name, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key} must be an array")
        item = typing.get_args(kind)[0]
        items = [_convert(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _check_type(key, kind, value)


def _check_type(key: str, kind: Any, value: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = kind if not isinstance(kind, types.UnionType) else typing.get_args(kind)
    name = getattr(kind, "__name__", kind)
    if isinstance(value, bool) and bool not in typing.get_args(kind) and kind is not bool:
        raise ConfigError(f"config key {key}: expected {name}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"config key {key}: expected {name}, got {value!r}")
    return value


def _validate(config: Config) -> None:
    host, sep, port = config.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"config key listen: expected HOST:PORT, got {config.listen!r}")
    if config.storage.backend not in ("filesystem",):
        raise ConfigError(
            f"config key storage.backend: unknown backend {config.storage.backend!r}"
            " (expected 'filesystem')"
        )
    _validate_upstreams(config)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config key log_level: unknown level {config.log_level!r}")
    positive = {
        "uploads.max_age": config.uploads.max_age,
        "uploads.purge_interval": config.uploads.purge_interval,
        "limits.manifest_max_bytes": config.limits.manifest_max_bytes,
        "limits.page_max": config.limits.page_max,
        "shutdown_timeout": config.shutdown_timeout,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key}: must be greater than zero, got {value}")


def _validate_upstreams(config: Config) -> None:
    for name, upstream in config.upstreams.items():
        key = f"upstreams.{name}"
        if not _UPSTREAM_NAME_RE.fullmatch(name):  # match() and "$" allow a trailing "\n"
            raise ConfigError(f"config key {key}: an upstream name is a host name like docker.io")
        url = yarl.URL(upstream.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(
                f"config key {key}.url: expected an http(s) URL, got {upstream.url!r}"
            )
        if upstream.ca_bundle and not Path(upstream.ca_bundle).is_file():
            raise ConfigError(f"config key {key}.ca_bundle: no such file {upstream.ca_bundle}")
        if upstream.tag_ttl < 0 or upstream.timeout <= 0 or upstream.max_connections <= 0:
            raise ConfigError(f"config key {key}: tag_ttl, timeout, max_connections must be > 0")
    if config.default_upstream and config.default_upstream not in config.upstreams:
        raise ConfigError(
            f"config key default_upstream: {config.default_upstream!r} is not a configured upstream"
        )
