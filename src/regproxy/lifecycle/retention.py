"""Retention rules for hosted repositories: which tags GC removes.

``[[retention.rules]]`` names repositories by the auth rules' globs. In a repository that a
rule names, a tag survives if any clause of the rule keeps it:

- ``keep_last``: it is one of the N most recently pushed tags;
- ``keep_pulled_within``: it was pushed, or its manifest pulled (by tag or by digest), within
  that many seconds;
- ``keep_tags``: its name matches one of these globs.

With several rules for one repository, a tag survives if any rule keeps it. Repositories
that no rule names, and pull-through repositories, are never touched. Removing a tag also
removes its manifest when no other tag or index of the repository points at it (with an
index's children), so GC then frees the blobs nothing else uses.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from regproxy.auth.rules import compile_glob
from regproxy.config import Config, RetentionRule
from regproxy.meta.base import MetadataStore, TagRow
from regproxy.oci import Digest

# Repositories listed per catalog query.
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class RemovedTag:
    repo: str
    tag: str
    digest: Digest


@dataclass(frozen=True)
class _CompiledRule:
    repos: tuple[re.Pattern[str], ...]
    keep_last: int
    keep_pulled_within: float
    keep_tags: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, rule: RetentionRule) -> _CompiledRule:
        return cls(
            tuple(compile_glob(pattern) for pattern in rule.repos),
            rule.keep_last,
            rule.keep_pulled_within,
            # Tag globs: "*" and "?" as in shell patterns (a tag has no "/").
            tuple(re.compile(fnmatch.translate(pattern)) for pattern in rule.keep_tags),
        )

    def names(self, repo: str) -> bool:
        return any(pattern.fullmatch(repo) for pattern in self.repos)

    def keeps_name(self, tag: str) -> bool:
        return any(pattern.fullmatch(tag) for pattern in self.keep_tags)


async def apply_retention(
    meta: MetadataStore, config: Config, now: float, dry_run: bool
) -> list[RemovedTag]:
    """Remove (or, in a dry run, list) the tags that no retention rule keeps."""
    rules = [_CompiledRule.of(rule) for rule in config.retention.rules]
    if not rules:
        return []
    cached = tuple(f"{name}/" for name in config.upstreams)
    removed: list[RemovedTag] = []
    last = ""
    while True:
        repos = await meta.list_repositories(last, _PAGE)
        for repo in repos:
            if repo.startswith(cached):
                continue  # the pull-through cache has its own budget (eviction)
            matching = [rule for rule in rules if rule.names(repo)]
            if matching:
                removed += await _apply(meta, repo, matching, now, dry_run)
        if len(repos) < _PAGE:
            return removed
        last = repos[-1]


async def _apply(
    meta: MetadataStore, repo: str, rules: list[_CompiledRule], now: float, dry_run: bool
) -> list[RemovedTag]:
    # A tag goes only if every rule naming the repository would remove it.
    doomed: dict[str, TagRow] | None = None
    for rule in rules:
        pulled_before = now - rule.keep_pulled_within if rule.keep_pulled_within else None
        candidates = await meta.expendable_tags(repo, rule.keep_last, pulled_before)
        found = {row.tag: row for row in candidates if not rule.keeps_name(row.tag)}
        doomed = found if doomed is None else {t: r for t, r in doomed.items() if t in found}
    rows = list((doomed or {}).values())
    if rows and not dry_run:
        rows = await meta.delete_tags(repo, rows)  # a tag pushed again meanwhile stays
    return [RemovedTag(repo, row.tag, row.digest) for row in rows]
