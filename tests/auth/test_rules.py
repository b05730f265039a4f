"""The rule vocabulary and the access policy."""

from __future__ import annotations

import pytest

from regproxy.auth.rules import (
    ACTIONS,
    DEFAULT_RULES,
    AccessPolicy,
    Rule,
    compile_glob,
    principal_problem,
    upstream_prefixes,
    valid_user_name,
)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("public/*", ["public/a", "public/a-b.c"], ["public", "public/a/b", "publicx/a"]),
        ("public/**", ["public/a", "public/a/b/c"], ["public", "other/public/a"]),
        ("**", ["a", "a/b/c"], []),
        ("team/ap?", ["team/app"], ["team/ap", "team/ap/p"]),
        ("*/base", ["x/base"], ["base", "x/y/base"]),
        ("a.b/c", ["a.b/c"], ["axb/c"]),  # dots are literal
    ],
)
def test_globs(pattern: str, matches: list[str], misses: list[str]) -> None:
    regex = compile_glob(pattern)
    assert all(regex.fullmatch(m) for m in matches)
    assert not any(regex.fullmatch(m) for m in misses)


def test_principals() -> None:
    assert principal_problem("anonymous", []) is None
    assert principal_problem("*", []) is None
    assert principal_problem("alice", []) is None
    assert principal_problem("group:devs", ["devs"]) is None
    assert "not defined" in (principal_problem("group:ops", ["devs"]) or "")
    assert principal_problem("bad name", []) is not None
    assert not valid_user_name("anonymous")
    assert not valid_user_name("a:b")


def policy(
    *rules: Rule, open_access: bool = False, pull_only: tuple[str, ...] = ()
) -> AccessPolicy:
    return AccessPolicy(
        rules,
        {"devs": ["bob", "carol"], "ops": ["carol"]},
        open_access=open_access,
        pull_only=upstream_prefixes(pull_only),
    )


def test_grants_add_up_and_nothing_else_is_allowed() -> None:
    p = policy(
        Rule.of(["anonymous"], ["public/**"], ["pull"]),
        Rule.of(["group:devs"], ["team/**"], ["pull", "push"]),
        Rule.of(["group:ops"], ["team/**"], ["delete"]),
        Rule.of(["*"], ["shared/*"], ["pull"]),
        Rule.of(["alice"], ["**"], ["*"]),
    )
    assert p.granted(None, "public/a") == {"pull"}
    assert p.granted(None, "team/a") == set()
    assert p.granted(None, "shared/a") == set()
    assert p.granted("bob", "public/a") == {"pull"}  # signed in: never less than anonymous
    assert p.granted("bob", "team/a/b") == {"pull", "push"}
    assert p.granted("carol", "team/a") == ACTIONS
    assert p.granted("bob", "shared/a") == {"pull"}
    assert p.granted("bob", "other") == set()
    assert p.granted("alice", "other/x") == ACTIONS
    assert p.anonymous_rules


def test_pull_only_prefixes_beat_every_rule() -> None:
    p = policy(Rule.of(["alice"], ["**"], ["*"]), pull_only=("docker.io",))
    assert p.granted("alice", "docker.io/library/alpine") == {"pull"}
    assert p.granted("alice", "docker.io") == ACTIONS  # a name, not under the prefix
    assert p.granted("alice", "docker.iox/a") == ACTIONS
    open_policy = policy(open_access=True, pull_only=("docker.io",))
    assert open_policy.granted(None, "docker.io/a") == {"pull"}
    assert open_policy.granted(None, "mine/a") == ACTIONS
    assert not policy(Rule.of(["*"], ["**"], ["pull"]), pull_only=()).granted(
        "x", "docker.io/a"
    ) - {"pull"}


def test_default_rules_give_signed_in_users_everything() -> None:
    p = policy(*DEFAULT_RULES)
    assert p.granted("anyone", "a/b") == ACTIONS
    assert p.granted(None, "a/b") == set()
    assert not p.anonymous_rules
