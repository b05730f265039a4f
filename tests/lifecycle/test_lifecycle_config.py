"""The [retention] and [cache] keys: defaults, TOML, environment and wrong values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from regproxy.config import CacheConfig, ConfigError, RetentionRule, load_config


def test_defaults_turn_both_off() -> None:
    config = load_config(None, env={})
    assert config.retention.rules == ()
    assert config.cache == CacheConfig(0, 0.0, 0, 60.0, 60.0)


def test_toml(tmp_path: Path) -> None:
    path = tmp_path / "regproxy.toml"
    path.write_text(
        """
[[retention.rules]]
repos = ["ci/**"]
keep_last = 20
keep_pulled_within = 2592000
keep_tags = ["latest", "v*"]

[cache]
max_bytes = 1000
max_idle = 60
min_free_bytes = 5

[upstreams."docker.io"]
url = "https://registry-1.docker.io"
max_bytes = 100
max_idle = 30.0
"""
    )
    config = load_config(str(path), env={})
    assert config.retention.rules == (RetentionRule(("ci/**",), 20, 2592000.0, ("latest", "v*")),)
    assert (config.cache.max_bytes, config.cache.max_idle, config.cache.min_free_bytes) == (
        1000,
        60.0,
        5,
    )
    upstream = config.upstreams["docker.io"]
    assert (upstream.max_bytes, upstream.max_idle) == (100, 30.0)


def test_environment() -> None:
    env = {
        "REGPROXY_CACHE_MAX_BYTES": "4096",
        "REGPROXY_RETENTION_RULES": '[{"repos": ["a/*"], "keep_last": 3}]',
    }
    config = load_config(None, env=env)
    assert config.cache.max_bytes == 4096
    assert config.retention.rules == (RetentionRule(("a/*",), 3),)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"retention.rules": [{"repos": ["a"]}]}, "retention.rules[0]"),  # no clause
        ({"retention.rules": [{"keep_last": 1}]}, "retention.rules[0].repos"),
        ({"retention.rules": [{"repos": ["A/B"], "keep_last": 1}]}, "retention.rules[0].repos"),
        ({"retention.rules": [{"repos": ["a"], "keep_tags": ["a/b"]}]}, "keep_tags"),
        ({"retention.rules": [{"repos": ["a"], "keep_last": -1}]}, "retention.rules[0]"),
        ({"retention.rules": [{"repos": ["a"], "keep_all": True}]}, "keep_all"),
        ({"cache.max_bytes": -1}, "cache.max_bytes"),
        ({"cache.max_idle": -1.0}, "cache.max_idle"),
        ({"cache.grace": -1.0}, "cache.grace"),
        ({"cache.pull_flush_interval": 0.0}, "cache.pull_flush_interval"),
        ({"upstreams": {"fake": {"url": "http://x", "max_bytes": -5}}}, "upstreams.fake.max_bytes"),
    ],
)
def test_wrong_values_name_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, env={}, overrides=values)
