"""Who may do what: actions, principals, repository globs and the access policy.

A rule grants ``actions`` on the repositories matching any of its ``repos`` globs to the
principals in ``who``. Grants add up; nothing is allowed that no rule grants. Principals:

- ``anonymous``: every client, signed in or not;
- ``*``: every signed-in user;
- ``group:NAME``: the members of ``[auth.groups] NAME``;
- any other word: the user of that name.

Globs: ``*`` matches within one path component, ``**`` across components, ``?`` one
character other than ``/``. Repositories under a pull-through prefix are pull-only for
everyone, whatever the rules say.

This module imports nothing from regproxy (config.py uses it to validate the rules).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

PULL: Final = "pull"
PUSH: Final = "push"
DELETE: Final = "delete"
ACTIONS: Final = frozenset({PULL, PUSH, DELETE})
# In a rule's actions and in a token request's scope: every action.
ALL_ACTIONS: Final = "*"

ANONYMOUS: Final = "anonymous"
SIGNED_IN: Final = "*"
GROUP_PREFIX: Final = "group:"

# User and group names: what an htpasswd line and a rule can hold unambiguously.
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GLOB_RE: Final = re.compile(r"[a-z0-9._/*?-]+")
RESERVED_NAMES: Final = frozenset({ANONYMOUS})

PullOnly = Callable[[str], bool]


def valid_user_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None and name not in RESERVED_NAMES


def valid_glob(pattern: str) -> bool:
    return _GLOB_RE.fullmatch(pattern) is not None


def principal_problem(who: str, groups: Collection[str]) -> str | None:
    """Why ``who`` is not a valid principal, or None."""
    if who in (ANONYMOUS, SIGNED_IN):
        return None
    if who.startswith(GROUP_PREFIX):
        group = who[len(GROUP_PREFIX) :]
        return None if group in groups else f"group {group!r} is not defined in auth.groups"
    if not valid_user_name(who):
        return f"{who!r} is not a user name, 'anonymous', '*' or 'group:NAME'"
    return None


def compile_glob(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    regex = "".join(
        ".*" if p == "**" else "[^/]*" if p == "*" else "[^/]" if p == "?" else re.escape(p)
        for p in parts
    )
    return re.compile(regex)


def expand_actions(actions: Iterable[str]) -> frozenset[str]:
    wanted = set(actions)
    if ALL_ACTIONS in wanted:
        return ACTIONS
    return frozenset(wanted & ACTIONS)


def upstream_prefixes(prefixes: Iterable[str]) -> PullOnly:
    """``is_pull_only(repo)`` for repositories under any of ``prefixes`` (``<prefix>/...``)."""
    frozen = frozenset(prefixes)

    def is_pull_only(repo: str) -> bool:
        prefix, slash, _ = repo.partition("/")
        return bool(slash) and prefix in frozen

    return is_pull_only


@dataclass(frozen=True)
class Rule:
    who: frozenset[str]
    repos: tuple[re.Pattern[str], ...]
    actions: frozenset[str]

    @classmethod
    def of(cls, who: Iterable[str], repos: Iterable[str], actions: Iterable[str]) -> Rule:
        return cls(frozenset(who), tuple(compile_glob(r) for r in repos), expand_actions(actions))

    def matches(self, repo: str) -> bool:
        return any(pattern.fullmatch(repo) for pattern in self.repos)


# With users but no rules, every signed-in user may do anything.
DEFAULT_RULES: Final = (Rule.of([SIGNED_IN], ["**"], [ALL_ACTIONS]),)


class AccessPolicy:
    """The actions each caller may take on each repository.

    ``open_access``: no users and no rules (loopback only): everyone may do everything.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        groups: Mapping[str, Collection[str]],
        *,
        open_access: bool,
        pull_only: PullOnly,
    ) -> None:
        self.rules = tuple(rules)
        self.open_access = open_access
        self.pull_only = pull_only
        self._groups_of: dict[str, frozenset[str]] = {}
        for group, members in groups.items():
            for member in members:
                self._groups_of[member] = self._groups_of.get(member, frozenset()) | {
                    GROUP_PREFIX + group
                }
        self.anonymous_rules = any(ANONYMOUS in rule.who for rule in self.rules)

    def principals(self, user: str | None) -> frozenset[str]:
        if user is None:
            return frozenset({ANONYMOUS})
        return frozenset({ANONYMOUS, SIGNED_IN, user}) | self._groups_of.get(user, frozenset())

    def granted(self, user: str | None, repo: str) -> frozenset[str]:
        """Every action ``user`` (None: anonymous) may take on ``repo``."""
        if self.open_access:
            granted = ACTIONS
        else:
            principals = self.principals(user)
            granted = frozenset().union(
                *(r.actions for r in self.rules if r.who & principals and r.matches(repo))
            )
        if granted - {PULL} and self.pull_only(repo):
            granted &= {PULL}
        return granted

    def allows(self, user: str | None, repo: str, action: str) -> bool:
        return action in self.granted(user, repo)
