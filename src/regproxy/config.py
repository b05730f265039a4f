"""Configuration: frozen dataclasses read from one TOML file and ``REGPROXY_*`` variables.

Precedence, lowest first: defaults, the TOML file, the environment, command-line flags.
Every key ``section.key`` has the environment form ``REGPROXY_SECTION_KEY``. Anything wrong
(an unknown key, a value of the wrong type, an invalid value) raises ``ConfigError`` with a
message naming the key. Nothing else in the program reads the environment.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yarl

from regproxy.auth import rules  # the rule vocabulary; imports nothing from regproxy

ENV_PREFIX = "REGPROXY_"
ENV_CONFIG_FILE = "REGPROXY_CONFIG"
# Most worker processes `serve --workers` starts.
MAX_WORKERS = 64
# An upstream's name is the first path component of the repositories it serves.
_UPSTREAM_NAME_RE = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*(?::[0-9]+)?$")
# A tag_rules glob: tag characters plus the glob's own.
_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")
# A retention keep_tags glob: tag characters plus "*" and "?".
_KEEP_TAG_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?-]+")


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class S3Config:
    """``[storage.s3]``: blobs in an S3 (or S3-compatible) bucket, ``storage.backend = "s3"``."""

    bucket: str = ""
    # Prepended to every object key, e.g. "regproxy/".
    prefix: str = ""
    # An S3-compatible server such as http://127.0.0.1:9000; default: AWS for the region.
    endpoint_url: str = ""
    # Default: the AWS configuration's (AWS_REGION, ~/.aws/config).
    region: str = ""
    # Static credentials; all empty: the standard AWS credential chain (env, files, roles).
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    # "auto", "path" (most S3-compatible servers) or "virtual".
    addressing_style: str = "auto"
    # Bytes per multipart part (5 MiB to 5 GiB): an upload holds about two in memory, and a
    # blob has at most 10,000 parts.
    part_size: int = 16 * 1024 * 1024
    # Part uploads in flight at once, over all uploads of the process.
    max_concurrency: int = 8
    # HTTP connections to S3 kept at most (part uploads and blob downloads).
    max_connections: int = 64
    # Blob GETs answer 307 with a presigned URL instead of streaming through regproxy.
    redirect: bool = False
    # Seconds a presigned URL stays valid.
    redirect_expiry: float = 900.0
    # Tries per S3 request, the first included, with exponential backoff in between.
    max_attempts: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class StorageConfig:
    # "filesystem" or "s3".
    backend: str = "filesystem"
    # Filesystem backend: where blobs and in-progress uploads live; default <data_dir>/blobs.
    path: str = ""
    # fsync a blob before it becomes visible (durability across power loss).
    fsync: bool = True
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class UploadsConfig:
    # An upload nobody touched for this many seconds is purged with its bytes.
    max_age: float = 24 * 3600.0
    # How often the purge runs, in seconds.
    purge_interval: float = 600.0
    # An upload whose stored bytes are gone (a crash after its commit, before its row) keeps
    # its row this many idle seconds, for a retried finish to complete it; then it is dropped.
    lost_grace: float = 600.0


@dataclass(frozen=True)
class LimitsConfig:
    manifest_max_bytes: int = 4 * 1024 * 1024
    # Largest page of tags, catalog entries or referrers one request may ask for.
    page_max: int = 10000


# A tag_rules ttl: cached once, never revalidated.
FOREVER = "forever"


@dataclass(frozen=True)
class TagRule:
    """One of ``tag_rules``: tags matching the glob ``match`` are fresh for ``ttl`` seconds."""

    # A glob over the tag (``*``, ``?``, ``[...]``), e.g. "v*.*.*" or "latest".
    match: str = ""
    # Seconds, or "forever": cached once, never revalidated.
    ttl: int | float | str = 300.0

    @property
    def seconds(self) -> float | None:
        return None if self.ttl == FOREVER else float(self.ttl)


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
    # Per-tag TTL classes, first match wins, else tag_ttl: e.g.
    # [{match = "v*.*.*", ttl = "forever"}, {match = "latest", ttl = 60}].
    tag_rules: tuple[TagRule, ...] = ()
    # Seconds an upstream 404 (manifest or blob) is remembered and answered without asking
    # again; 0 turns the negative cache off.
    negative_ttl: float = 30.0
    # Serve a tag past its TTL from the cache at once and revalidate it in the background.
    stale_while_revalidate: bool = False

    def ttl_for(self, tag: str) -> float | None:
        """Seconds ``tag`` stays fresh once checked; None: forever."""
        for rule in self.tag_rules:
            if fnmatch.fnmatchcase(tag, rule.match):
                return rule.seconds
        return self.tag_ttl

    # Cache budget of this upstream's content, inside [cache]'s: bytes (0 = only the global
    # budget) and seconds an image may go unpulled before it is evicted (0 = only cache.max_idle;
    # the shorter of the two applies).
    max_bytes: int = 0
    max_idle: float = 0.0


@dataclass(frozen=True)
class AuthRule:
    """``[[auth.rules]]``: grants ``actions`` on repositories matching ``repos`` to ``who``."""

    # User names, "group:NAME", "*" (every signed-in user), "anonymous" (everyone).
    who: tuple[str, ...] = ()
    # Globs: "*" within one path component, "**" across them, e.g. "team/**".
    repos: tuple[str, ...] = ()
    # "pull", "push", "delete", or "*" for all three.
    actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: users, rules and the registry token service (see regproxy.auth)."""

    # htpasswd file of bcrypt hashes (`regproxy user add`); default <data_dir>/htpasswd.
    users_file: str = ""
    # name -> bcrypt hash, beside the file's (the file wins for a name in both).
    users: dict[str, str] = field(default_factory=dict)
    # group name -> member user names, for "group:NAME" in rules.
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # No rules: with users, every signed-in user may do anything; without, open (loopback).
    rules: tuple[AuthRule, ...] = ()
    # Token endpoint URL given to clients; default <scheme>://<Host header>/token.
    realm: str = ""
    # The token audience; clients echo it to /token.
    service: str = "regproxy"
    # Seconds an access token is valid.
    token_ttl: float = 300.0
    # Seconds a refresh token (docker's identity token) is valid.
    refresh_ttl: float = 30 * 24 * 3600.0
    # PEM private key, EC P-256 (ES256) or RSA (RS256); default <data_dir>/auth/token-key.pem,
    # generated on first start.
    key_path: str = ""
    # Failed logins per client address and user before a lockout of login_lockout seconds.
    max_login_failures: int = 5
    login_lockout: float = 60.0


@dataclass(frozen=True)
class MetadataConfig:
    """``[metadata]``: where the metadata lives: SQLite in data_dir, or a PostgreSQL database."""

    # "sqlite" (<data_dir>/metadata.sqlite) or "postgres".
    backend: str = "sqlite"
    # PostgreSQL: libpq-style URL, e.g. postgresql://regproxy@db/regproxy; the password from
    # the URL, PGPASSWORD or ~/.pgpass.
    dsn: str = ""
    # PostgreSQL connections kept at most per process.
    pool_size: int = 10
    # false behind PgBouncer in transaction mode: no statement is prepared by name.
    prepared_statements: bool = True
    # Seconds to connect to the database, and for one statement; then the request gets 503.
    connect_timeout: float = 5.0
    command_timeout: float = 15.0


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: worker processes and replicas fetch each cold blob once between them
    (see regproxy.cluster)."""

    # This replica's URL as the other replicas reach it (http://10.0.0.5:5000); "" for none:
    # then only the workers on this machine follow each other's fills.
    advertise_url: str = ""
    # Shared by every replica: authenticates the internal fill endpoint (HMAC-SHA256).
    secret: str = ""
    # Seconds a fill's lease lives unless renewed (every lease_ttl/3): how long an owner
    # that died blocks the others before one of them takes over.
    lease_ttl: float = 60.0
    # This machine's name for the leases; default machine id + boot id. Processes with the
    # same node read each other's spool files.
    node: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Prometheus metrics at ``/metrics``."""

    enabled: bool = True
    # A separate HOST:PORT (e.g. "127.0.0.1:9100") serving only /metrics, without auth; empty:
    # /metrics is on the main listener and needs a login like /v2/ (see README).
    listen: str = ""


@dataclass(frozen=True)
class RetentionRule:
    """``[[retention.rules]]``: which tags of the matching hosted repositories GC keeps.

    A tag survives if any clause keeps it (and, with several rules for a repository, if any
    rule keeps it); the other tags of the matching repositories are removed by GC.
    """

    # Globs, the auth rules' syntax: "*" within one path component, "**" across them.
    repos: tuple[str, ...] = ()
    # The most recently pushed tags kept (0: this clause keeps none).
    keep_last: int = 0
    # Seconds: tags whose manifest was pulled within this window are kept (0: clause off).
    keep_pulled_within: float = 0.0
    # Globs of tag names never removed by retention, e.g. "latest", "v*".
    keep_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionConfig:
    # No rules: retention is off and GC removes no tag.
    rules: tuple[RetentionRule, ...] = ()


@dataclass(frozen=True)
class CacheConfig:
    """``[cache]``: the byte budget of the pull-through cache (every upstream together)."""

    # Soft budget of the bytes stored for cached upstream content; 0 = unlimited.
    max_bytes: int = 0
    # Seconds: cached images not pulled for this long are evicted; 0 = never.
    max_idle: float = 0.0
    # Filesystem backend: evict before the free space of storage.path falls below this.
    min_free_bytes: int = 0
    # Seconds after its last pull (or link) during which eviction leaves a cached image and its
    # blobs alone, so a pull that another process is serving right now is not cut off.
    grace: float = 60.0
    # Seconds: "last pulled" times (hosted tags and cached images) are noted in memory and
    # written in batches, at most once per manifest per period, never once per request.
    pull_flush_interval: float = 60.0


@dataclass(frozen=True)
class GcConfig:
    """``[gc]``: online garbage collection of blobs and manifests nothing uses any more."""

    # Seconds between background passes of `regproxy serve`; 0 = no background pass.
    interval: float = 3600.0
    # Seconds a blob stays after it was last pushed, mounted or linked (a client pushes the
    # manifest that references its blobs up to this long after them), and an untagged
    # manifest after it was pushed.
    grace: float = 86400.0
    # "keep" or "delete": what GC does with hosted manifests that no tag, index or subject
    # keeps (docker push of a tag that moved leaves the old manifest untagged).
    untagged: str = "keep"


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:5000"
    data_dir: str = "./data"
    log_level: str = "info"
    # "text" (readable lines) or "json" (one JSON object per line, access and application).
    log_format: str = "text"
    # Seconds SIGTERM waits for in-flight requests before the process exits.
    shutdown_timeout: float = 30.0
    # Seconds /readyz waits for the metadata store and blob storage to answer.
    ready_timeout: float = 2.0
    storage: StorageConfig = field(default_factory=StorageConfig)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    # Serve pulls of names not hosted here from this upstream (Docker's registry-mirrors).
    default_upstream: str = ""
    auth: AuthConfig = field(default_factory=AuthConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    # Processes serving the one port (SO_REUSEPORT); `regproxy serve --workers N`.
    workers: int = 1
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    gc: GcConfig = field(default_factory=GcConfig)

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
    if config.storage.backend not in ("filesystem", "s3"):
        raise ConfigError(
            f"config key storage.backend: unknown backend {config.storage.backend!r}"
            " (expected 'filesystem' or 's3')"
        )
    if config.storage.backend == "s3":
        _validate_s3(config.storage.s3)
    _validate_upstreams(config)
    _validate_auth(config.auth)
    _validate_metadata(config.metadata)
    _validate_cluster(config.cluster)
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"config key workers: 1 to {MAX_WORKERS}, got {config.workers}")
    if config.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("config key workers: several workers need SO_REUSEPORT (Linux)")
    _validate_retention(config.retention)
    _validate_cache(config)
    _validate_gc(config.gc)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config key log_level: unknown level {config.log_level!r}")
    if config.log_format not in ("text", "json"):
        raise ConfigError(
            f"config key log_format: expected 'text' or 'json', got {config.log_format!r}"
        )
    if config.metrics.listen and not _is_host_port(config.metrics.listen):
        raise ConfigError(
            f"config key metrics.listen: expected HOST:PORT, got {config.metrics.listen!r}"
        )
    positive = {
        "uploads.max_age": config.uploads.max_age,
        "uploads.purge_interval": config.uploads.purge_interval,
        "uploads.lost_grace": config.uploads.lost_grace,
        "limits.manifest_max_bytes": config.limits.manifest_max_bytes,
        "limits.page_max": config.limits.page_max,
        "shutdown_timeout": config.shutdown_timeout,
        "ready_timeout": config.ready_timeout,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key}: must be greater than zero, got {value}")


# Shortest cluster.secret accepted: 128 bits as hex.
MIN_SECRET = 32


def _validate_cluster(cluster: ClusterConfig) -> None:
    if cluster.advertise_url:
        url = yarl.URL(cluster.advertise_url)
        if url.scheme not in ("http", "https") or not url.host or url.query_string:
            raise ConfigError(
                "config key cluster.advertise_url: expected an http(s) URL like"
                f" http://10.0.0.5:5000, got {cluster.advertise_url!r}"
            )
        if not cluster.secret:
            raise ConfigError(
                "config key cluster.secret: required when cluster.advertise_url is set"
                " (the same random value on every replica, e.g. `openssl rand -hex 32`)"
            )
    if cluster.secret and len(cluster.secret) < MIN_SECRET:
        raise ConfigError(
            f"config key cluster.secret: at least {MIN_SECRET} characters"
            " (e.g. `openssl rand -hex 32`)"
        )
    if not cluster.lease_ttl >= 3:
        raise ConfigError(
            f"config key cluster.lease_ttl: at least 3 seconds, got {cluster.lease_ttl}"
        )
    if cluster.node and not all(c.isalnum() or c in "-_." for c in cluster.node):
        raise ConfigError(
            f"config key cluster.node: letters, digits, '-', '_' and '.', got {cluster.node!r}"
        )


def _validate_metadata(metadata: MetadataConfig) -> None:
    if metadata.backend not in ("sqlite", "postgres"):
        raise ConfigError(
            f"config key metadata.backend: unknown backend {metadata.backend!r}"
            " (expected 'sqlite' or 'postgres')"
        )
    if metadata.backend == "postgres":
        if not metadata.dsn:
            raise ConfigError(
                "config key metadata.dsn: required when metadata.backend is 'postgres'"
            )
        if yarl.URL(metadata.dsn).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                "config key metadata.dsn: expected a postgresql:// URL,"
                " e.g. postgresql://regproxy@db/regproxy"
            )
    positive = {
        "pool_size": metadata.pool_size,
        "connect_timeout": metadata.connect_timeout,
        "command_timeout": metadata.command_timeout,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key metadata.{name}: must be greater than zero, got {value}")


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


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
        _validate_freshness(key, upstream)
    if config.default_upstream and config.default_upstream not in config.upstreams:
        raise ConfigError(
            f"config key default_upstream: {config.default_upstream!r} is not a configured upstream"
        )


def _validate_freshness(key: str, upstream: UpstreamConfig) -> None:
    if upstream.negative_ttl < 0:
        raise ConfigError(
            f"config key {key}.negative_ttl: seconds >= 0 (0: off), got {upstream.negative_ttl}"
        )
    for i, rule in enumerate(upstream.tag_rules):
        where = f"{key}.tag_rules[{i}]"
        if not rule.match or not _TAG_GLOB_RE.fullmatch(rule.match):
            raise ConfigError(
                f"config key {where}.match: expected a tag glob like 'v*.*.*', got {rule.match!r}"
            )
        if isinstance(rule.ttl, str):
            if rule.ttl != FOREVER:
                raise ConfigError(f"config key {where}.ttl: seconds or 'forever', got {rule.ttl!r}")
        elif rule.ttl < 0:
            raise ConfigError(f"config key {where}.ttl: seconds >= 0, got {rule.ttl}")


def _validate_s3(s3: S3Config) -> None:
    key = "storage.s3"
    if not s3.bucket:
        raise ConfigError(f"config key {key}.bucket: required when storage.backend is 's3'")
    if s3.endpoint_url:
        url = yarl.URL(s3.endpoint_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(
                f"config key {key}.endpoint_url: expected an http(s) URL, got {s3.endpoint_url!r}"
            )
    if s3.addressing_style not in ("auto", "path", "virtual"):
        raise ConfigError(
            f"config key {key}.addressing_style: expected 'auto', 'path' or 'virtual',"
            f" got {s3.addressing_style!r}"
        )
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise ConfigError(
            f"config key {key}.secret_access_key: access_key_id and secret_access_key go"
            " together (leave both empty for the AWS credential chain)"
        )
    if not 5 << 20 <= s3.part_size <= 5 << 30:
        raise ConfigError(
            f"config key {key}.part_size: S3 parts are 5 MiB to 5 GiB, got {s3.part_size}"
        )
    if not 0 < s3.redirect_expiry <= 7 * 24 * 3600:
        raise ConfigError(
            f"config key {key}.redirect_expiry: 1 second to 7 days, got {s3.redirect_expiry}"
        )
    positive = {
        "max_concurrency": s3.max_concurrency,
        "max_connections": s3.max_connections,
        "max_attempts": s3.max_attempts,
        "connect_timeout": s3.connect_timeout,
        "read_timeout": s3.read_timeout,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key}.{name}: must be greater than zero, got {value}")


def _validate_auth(auth: AuthConfig) -> None:
    for name, hashed in auth.users.items():
        if not rules.valid_user_name(name):
            raise ConfigError(f"config key auth.users.{name}: invalid user name")
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            raise ConfigError(
                f"config key auth.users.{name}: expected a bcrypt hash ($2b$...),"
                " e.g. from `regproxy user add` or `htpasswd -nB`"
            )
    for group, members in auth.groups.items():
        if not rules.NAME_RE.fullmatch(group):
            raise ConfigError(f"config key auth.groups.{group}: invalid group name")
        for member in members:
            if not rules.valid_user_name(member):
                raise ConfigError(f"config key auth.groups.{group}: invalid user {member!r}")
    for i, rule in enumerate(auth.rules):
        key = f"auth.rules[{i}]"
        for name, values in (("who", rule.who), ("repos", rule.repos), ("actions", rule.actions)):
            if not values:
                raise ConfigError(f"config key {key}.{name}: must not be empty")
        for who in rule.who:
            problem = rules.principal_problem(who, auth.groups)
            if problem:
                raise ConfigError(f"config key {key}.who: {problem}")
        for pattern in rule.repos:
            if not rules.valid_glob(pattern):
                raise ConfigError(
                    f"config key {key}.repos: {pattern!r} is not a repository glob"
                    " (lower-case name characters, '/', '*', '**', '?')"
                )
        for action in rule.actions:
            if action not in rules.ACTIONS and action != rules.ALL_ACTIONS:
                raise ConfigError(
                    f"config key {key}.actions: {action!r} is not pull, push, delete or *"
                )
    if not auth.service or any(c in auth.service for c in '"\\ ,'):
        raise ConfigError(f"config key auth.service: expected a plain word, got {auth.service!r}")
    if auth.realm:
        url = yarl.URL(auth.realm)
        if url.scheme not in ("http", "https") or not url.host or '"' in auth.realm:
            raise ConfigError(f"config key auth.realm: expected an http(s) URL, got {auth.realm!r}")
    positive = {
        "auth.token_ttl": auth.token_ttl,
        "auth.refresh_ttl": auth.refresh_ttl,
        "auth.max_login_failures": auth.max_login_failures,
        "auth.login_lockout": auth.login_lockout,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key}: must be greater than zero, got {value}")


def _validate_retention(retention: RetentionConfig) -> None:
    for i, rule in enumerate(retention.rules):
        key = f"retention.rules[{i}]"
        if not rule.repos:
            raise ConfigError(f"config key {key}.repos: must not be empty")
        for pattern in rule.repos:
            if not rules.valid_glob(pattern):
                raise ConfigError(
                    f"config key {key}.repos: {pattern!r} is not a repository glob"
                    " (lower-case name characters, '/', '*', '**', '?')"
                )
        for pattern in rule.keep_tags:
            if not pattern or not _KEEP_TAG_GLOB_RE.fullmatch(pattern):
                raise ConfigError(f"config key {key}.keep_tags: {pattern!r} is not a tag glob")
        if rule.keep_last < 0 or rule.keep_pulled_within < 0:
            raise ConfigError(f"config key {key}: keep_last and keep_pulled_within must be >= 0")
        if not (rule.keep_last or rule.keep_pulled_within or rule.keep_tags):
            # A rule without a clause would remove every tag of its repositories.
            raise ConfigError(
                f"config key {key}: give at least one of keep_last, keep_pulled_within, keep_tags"
            )


def _validate_cache(config: Config) -> None:
    cache = config.cache
    limits = {
        "cache.max_bytes": cache.max_bytes,
        "cache.max_idle": cache.max_idle,
        "cache.min_free_bytes": cache.min_free_bytes,
        "cache.grace": cache.grace,
    }
    for name, upstream in config.upstreams.items():
        limits[f"upstreams.{name}.max_bytes"] = upstream.max_bytes
        limits[f"upstreams.{name}.max_idle"] = upstream.max_idle
    for key, value in limits.items():
        if value < 0:
            raise ConfigError(f"config key {key}: must be >= 0 (0 turns it off), got {value}")
    if cache.pull_flush_interval <= 0:
        raise ConfigError(
            "config key cache.pull_flush_interval: must be greater than zero,"
            f" got {cache.pull_flush_interval}"
        )


def _validate_gc(gc: GcConfig) -> None:
    if not gc.interval >= 0:  # NaN too
        raise ConfigError(f"config key gc.interval: 0 (off) or more seconds, got {gc.interval}")
    if not gc.grace >= 0:
        raise ConfigError(f"config key gc.grace: 0 or more seconds, got {gc.grace}")
    if gc.untagged not in ("keep", "delete"):
        raise ConfigError(
            f"config key gc.untagged: expected 'keep' or 'delete', got {gc.untagged!r}"
        )
