"""Configuration: frozen dataclasses read from one TOML file and ``REGPROXY_*`` variables.

Precedence, lowest first: defaults, the TOML file, the environment, command-line flags.
Every key ``section.key`` has the environment form ``REGPROXY_SECTION_KEY``. Anything wrong
(an unknown key, a value of the wrong type, an invalid value) raises ``ConfigError`` with a
message naming the key. Nothing else in the program reads the environment.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "REGPROXY_"
ENV_CONFIG_FILE = "REGPROXY_CONFIG"


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
class Config:
    listen: str = "127.0.0.1:5000"
    data_dir: str = "./data"
    log_level: str = "info"
    # Seconds SIGTERM waits for in-flight requests before the process exits.
    shutdown_timeout: float = 30.0
    storage: StorageConfig = field(default_factory=StorageConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

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
    for section in sections:
        values = values.setdefault(section, {})
    values[leaf] = value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.')} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in names:
            raise ConfigError(f"unknown config key {prefix}{name}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(typing.cast(type, kind), value, f"{key}.")
        else:
            kwargs[name] = _check_type(key, kind, value)
    return cls(**kwargs)


def _check_type(key: str, kind: Any, value: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = kind if not isinstance(kind, types.UnionType) else typing.get_args(kind)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config key {key}: expected {kind.__name__}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"config key {key}: expected {kind.__name__}, got {value!r}")
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
