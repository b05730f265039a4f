"""The UI's pages. Read-only, from the metadata store alone: a page never asks an upstream.

Every page makes a bounded number of queries, however many repositories or tags there are:
the repository list reads at most ``_MAX_BATCHES`` pages of names while looking for ones the
caller may pull, and the tag list is one query for a page of tags with digests and sizes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web

from regproxy import oci
from regproxy.api.keys import CONFIG
from regproxy.auth.rules import PULL
from regproxy.auth.service import Caller
from regproxy.config import UpstreamConfig
from regproxy.errors import NameInvalid, RegistryError, TagInvalid, TooManyRequests, Unauthorized
from regproxy.meta.base import MetadataStore, Reference, RepositorySummary, TagSummary
from regproxy.metrics import METRICS
from regproxy.oci import Digest
from regproxy.proxy.pullthrough import PULL_THROUGH
from regproxy.tasks import HOSTED
from regproxy.web import session, templates
from regproxy.web.markup import Markup, join, link, render, url

# Rows per page of repositories or tags.
PAGE_SIZE: Final = 100
PAGE_MAX: Final = 500
# Pages of repository names read at most while looking for ones the caller may pull.
_MAX_BATCHES: Final = 5
_TAGS_OF_MANIFEST: Final = 50
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_KINDS: Final = ("hosted", "cached")
# An image's config media types: its manifest's artifact type when it names none of its own.
_IMAGE_CONFIGS: Final = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)

Page = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


# -- plumbing ---------------------------------------------------------------------------------


def _meta(request: web.Request) -> MetadataStore:
    return request.app[HOSTED].meta


def _prefixes(request: web.Request) -> list[str]:
    return sorted(request.app[CONFIG].upstreams)


def _html(
    request: web.Request,
    caller: Caller,
    title: str,
    body: Markup,
    *,
    heading: object = None,
    crumbs: Sequence[tuple[str, str]] = (),
    status: int = 200,
) -> web.Response:
    if caller.user is not None:
        account = render(templates.SIGNED_IN, user=caller.user)
    elif session.auth_enabled(request):
        account = link(url(session.LOGIN_PATH, next=request.path_qs), "Log in")
    else:
        account = Markup('<span class="user">open access</span>')
    trail = Markup("")
    if crumbs:
        trail = render(
            '<div class="crumbs">$items</div>',
            items=join((link(href, text) for href, text in crumbs), " / "),
        )
    page = render(
        templates.PAGE,
        title=title,
        heading=title if heading is None else heading,
        account=account,
        crumbs=trail,
        body=body,
    )
    return web.Response(
        text=page, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def _problem(request: web.Request, caller: Caller, status: int, message: str) -> web.Response:
    body = render(
        '<p class="error">$message</p><p><a href="/ui/">Repositories</a></p>', message=message
    )
    return _html(
        request, caller, "Not available" if status != 404 else "Not found", body, status=status
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _to_login(request: web.Request) -> web.Response:
    return _see_other(url(session.LOGIN_PATH, next=request.path_qs))


def page(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A UI page: the caller from the cookie; an invalid name or tag is an HTML 404."""

    async def run(request: web.Request) -> web.StreamResponse:
        caller = await session.caller_of(request)
        try:
            return await handler(request, caller)
        except (NameInvalid, TagInvalid) as exc:
            return _problem(request, caller, 404, exc.message)

    return run


def _limit(request: web.Request) -> int:
    try:
        n = int(request.query.get("n", PAGE_SIZE))
    except ValueError:
        n = PAGE_SIZE
    return max(1, min(n, PAGE_MAX))


def _may_pull(caller: Caller, repo: str) -> bool:
    return caller.may(repo, PULL)


def human_size(size: float | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def size_cell(size: float | None) -> Markup:
    """A size for people, with the exact byte count on hover."""
    if size is None:
        return Markup("?")
    return render(
        '<span title="$exact bytes">$size</span>', exact=f"{int(size):,}", size=human_size(size)
    )


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


def _short(digest: Digest | str) -> Markup:
    text = str(digest)
    algorithm, _, encoded = text.partition(":")
    return render(
        '<span class="digest" title="$full">$short</span>',
        full=text,
        short=f"{algorithm}:{encoded[:12]}",
    )


def _kind_badge(media_type: str | None, artifact_type: str | None = None) -> Markup:
    if media_type is None:
        return Markup('<span class="badge missing">missing</span>')
    if media_type in oci.INDEX_TYPES:
        kind = "index"
    elif artifact_type and artifact_type not in _IMAGE_CONFIGS:
        kind = "artifact"
    else:
        kind = "image"
    return render(
        '<span class="badge $kind" title="$media_type">$kind</span>',
        kind=kind,
        media_type=media_type,
    )


def _upstream_of(request: web.Request, repo: str) -> tuple[str, UpstreamConfig] | None:
    prefix, slash, _ = repo.partition("/")
    upstreams = request.app[CONFIG].upstreams
    return (prefix, upstreams[prefix]) if slash and prefix in upstreams else None


# -- documents: what a manifest says ----------------------------------------------------------


def _document(content: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _descriptors(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key)
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


def _platform(descriptor: dict[str, Any]) -> str | None:
    """``os/architecture[/variant]`` of an index entry; None for entries without one, and for
    attestations (BuildKit's unknown/unknown entries)."""
    platform = descriptor.get("platform")
    annotations = descriptor.get("annotations")
    if isinstance(annotations, dict) and "vnd.docker.reference.type" in annotations:
        return None
    if not isinstance(platform, dict):
        return None
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    words = [str(p) for p in parts if isinstance(p, str) and p]
    return "/".join(words) if words else None


def platforms_of(index: bytes | None) -> list[str]:
    if index is None:
        return []
    found = (_platform(d) for d in _descriptors(_document(index), "manifests"))
    return list(dict.fromkeys(p for p in found if p))


def _size_of(descriptor: dict[str, Any]) -> int | None:
    size = descriptor.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _digest_of(descriptor: dict[str, Any]) -> Digest | None:
    try:
        return Digest.parse(str(descriptor.get("digest", "")))
    except RegistryError:
        return None


# -- repositories -----------------------------------------------------------------------------


@page
async def list_repositories(request: web.Request, caller: Caller) -> web.StreamResponse:
    if caller.user is None and session.anonymous_sees_nothing(request):
        return _to_login(request)
    kind = request.query.get("kind")
    kinds = [kind] if kind in _KINDS else list(_KINDS)
    last = request.query.get("last", "") if kind in _KINDS else ""
    n = _limit(request)
    sections = []
    for each in kinds:
        sections.append(await _repository_section(request, caller, each, last, n))
    return _html(request, caller, "Repositories", join(sections))


async def _repository_section(
    request: web.Request, caller: Caller, kind: str, last: str, n: int
) -> Markup:
    meta, prefixes = _meta(request), _prefixes(request)
    shown: list[RepositorySummary] = []
    scanned = last
    more = False
    for _ in range(_MAX_BATCHES):
        batch = await meta.list_repository_summaries(
            scanned, n + 1, prefixes=prefixes, cached=kind == "cached"
        )
        for summary in batch:
            if len(shown) == n:
                more = True
                break
            scanned = summary.name
            if _may_pull(caller, summary.name):
                shown.append(summary)
        if more or len(batch) <= n:
            break
    else:
        more = True  # stopped looking: the next page goes on from the last name read
    title = "Hosted" if kind == "hosted" else "Cached from upstreams"
    if not shown:
        rows = render(
            '<tr><td colspan="$span" class="empty">$text</td></tr>',
            span=5 if kind == "cached" else 4,
            text="No repositories" + (" here" if last else ""),
        )
    else:
        rows = join(
            render(
                '<tr><td>$name</td>$upstream<td class="num">$tags</td>'
                '<td class="num">$manifests</td><td>$updated</td></tr>',
                name=link(url(f"/ui/repo/{s.name}"), s.name),
                upstream=render("<td>$u</td>", u=s.name.partition("/")[0])
                if kind == "cached"
                else "",
                tags=f"{s.tags:,}",
                manifests=f"{s.manifests:,}",
                updated=when(s.updated),
            )
            for s in shown
        )
    pager = Markup("")
    if more:
        pager = render(
            '<div class="pager">$next</div>',
            next=link(
                url("/ui/", kind=kind, last=scanned, n=str(n) if n != PAGE_SIZE else ""),
                "Next page →",
            ),
        )
    elif last:
        pager = render(
            '<div class="pager">$first</div>', first=link(url("/ui/", kind=kind), "← First page")
        )
    return render(
        "<h2>$title</h2><table><thead><tr><th>Repository</th>$upstream_head"
        '<th class="num">Tags</th><th class="num">Manifests</th><th>Updated</th></tr></thead>'
        "<tbody>$rows</tbody></table>$pager",
        title=title,
        upstream_head=Markup("<th>Upstream</th>") if kind == "cached" else "",
        rows=rows,
        pager=pager,
    )


# -- one repository: its tags -----------------------------------------------------------------


def _repo_of(request: web.Request) -> str:
    return oci.parse_name(request.match_info["name"])


def _denied(request: web.Request, caller: Caller, repo: str) -> web.Response:
    """Not allowed to pull: anonymous callers may log in; others learn nothing about it."""
    if caller.user is None and session.auth_enabled(request):
        return _to_login(request)
    return _problem(request, caller, 404, f"There is no repository {repo} you may see.")


@page
async def get_repository(request: web.Request, caller: Caller) -> web.StreamResponse:
    repo = _repo_of(request)
    if not _may_pull(caller, repo):
        return _denied(request, caller, repo)
    meta = _meta(request)
    last, n = request.query.get("last", ""), _limit(request)
    count = await meta.count_tags(repo)
    tags = await meta.list_tag_summaries(repo, last, n + 1)
    more = len(tags) > n
    tags = tags[:n]
    if not tags and not last and not await meta.repository_exists(repo):
        return _problem(request, caller, 404, f"There is no repository {repo} you may see.")
    facts = [("Tags", f"{count:,}")]
    cached = _upstream_of(request, repo)
    if cached is not None:
        facts.append(("Cached from", f"{cached[0]} ({cached[1].url})"))
    else:
        facts.append(("Kind", "hosted"))
    rows = (
        join(_tag_row(repo, t) for t in tags)
        if tags
        else Markup('<tr><td colspan="6" class="empty">No tags</td></tr>')
    )
    pager_links = []
    if last:
        pager_links.append(link(url(f"/ui/repo/{repo}"), "← First page"))
    if more:
        pager_links.append(
            link(
                url(f"/ui/repo/{repo}", last=tags[-1].tag, n=str(n) if n != PAGE_SIZE else ""),
                "Next page →",
            )
        )
    body = render(
        "$facts<table><thead><tr><th>Tag</th><th>Digest</th><th>Kind</th><th>Platforms</th>"
        '<th class="num">Size</th><th>Updated</th></tr></thead><tbody>$rows</tbody></table>'
        '<div class="pager">$pager</div>',
        facts=_facts(facts),
        rows=rows,
        pager=join(pager_links),
    )
    return _html(request, caller, repo, body, crumbs=[("/ui/", "Repositories")])


def _tag_row(repo: str, tag: TagSummary) -> Markup:
    platforms = join(
        render('<span class="badge platform">$p</span>', p=p) for p in platforms_of(tag.index)
    )
    size = size_cell(tag.size)
    if tag.missing:
        size = render(
            '$size <span class="note" title="blobs or manifests not pulled into the cache yet">'
            "+$n not cached</span>",
            size=size,
            n=tag.missing,
        )
    return render(
        "<tr><td>$tag</td><td>$digest</td><td>$kind</td><td>$platforms</td>"
        '<td class="num">$size</td><td>$updated</td></tr>',
        tag=link(url(f"/ui/manifest/{repo}/-/{tag.tag}"), tag.tag),
        digest=link(url(f"/ui/manifest/{repo}/-/{tag.digest}"), _short(tag.digest)),
        kind=_kind_badge(tag.media_type),
        platforms=platforms,
        size=size,
        updated=when(tag.updated),
    )


def _facts(items: Sequence[tuple[str, object]]) -> Markup:
    return render(
        '<dl class="facts">$items</dl>',
        items=join(render("<dt>$k</dt><dd>$v</dd>", k=k, v=v) for k, v in items),
    )


# -- one manifest -----------------------------------------------------------------------------


@page
async def get_manifest(request: web.Request, caller: Caller) -> web.StreamResponse:
    repo = _repo_of(request)
    if not _may_pull(caller, repo):
        return _denied(request, caller, repo)
    reference = request.match_info["reference"]
    meta = _meta(request)
    if oci.is_digest(reference):
        try:
            digest = Digest.parse(reference)
        except RegistryError as exc:
            return _problem(request, caller, 404, exc.message)
        manifest = await meta.get_manifest(repo, digest)
        title = f"{repo}@{digest}"
    else:
        manifest = await meta.get_tagged_manifest(repo, oci.parse_tag(reference))
        title = f"{repo}:{reference}"
    if manifest is None:
        note = " (a cache shows what was pulled through it)" if _upstream_of(request, repo) else ""
        return _problem(request, caller, 404, f"{title} is not stored here{note}.")
    doc = _document(manifest.content)
    tags = await meta.tags_of_manifest(repo, manifest.digest, _TAGS_OF_MANIFEST)
    is_index = manifest.media_type in oci.INDEX_TYPES
    entries = _descriptors(doc, "manifests") if is_index else _descriptors(doc, "layers")
    config = doc.get("config") if isinstance(doc.get("config"), dict) else None
    wanted: list[Reference] = []
    for d in [*entries, *([config] if config else [])]:
        found = _digest_of(d)
        if found is not None:
            child_manifest = is_index and d.get("mediaType") in oci.MANIFEST_TYPES
            wanted.append(Reference(found, bool(child_manifest)))
    missing = {str(r.digest) for r in await meta.missing_references(repo, wanted)}
    referrers = await meta.referrers(repo, manifest.digest, None)

    facts: list[tuple[str, object]] = [
        ("Digest", render("<code>$d</code>", d=manifest.digest)),
        ("Media type", manifest.media_type),
        ("Manifest size", size_cell(len(manifest.content))),
    ]
    if manifest.artifact_type and manifest.artifact_type not in _IMAGE_CONFIGS:
        facts.append(("Artifact type", manifest.artifact_type))
    if tags:
        facts.append(
            ("Tags", join((link(url(f"/ui/manifest/{repo}/-/{t}"), t) for t in tags), ", "))
        )
    if manifest.subject is not None:
        facts.append(
            ("Subject", link(url(f"/ui/manifest/{repo}/-/{manifest.subject}"), manifest.subject))
        )
    if is_index:
        platforms = platforms_of(manifest.content)
        if platforms:
            badges = (render('<span class="badge platform">$p</span>', p=p) for p in platforms)
            facts.append(("Platforms", join(badges)))
    else:
        total = sum(_size_of(d) or 0 for d in [*entries, *([config] if config else [])])
        facts.append(("Image size", size_cell(total + len(manifest.content))))
    parts = [_facts(facts)]
    if is_index:
        parts.append(_index_table(repo, entries, missing))
    else:
        if config is not None:
            parts.append(
                render(
                    "<h2>Config</h2>$table", table=_blob_table([config], missing, numbered=False)
                )
            )
        parts.append(
            render("<h2>Layers</h2>$table", table=_blob_table(entries, missing, numbered=True))
        )
    parts.append(_annotations(doc.get("annotations")))
    if referrers:
        parts.append(
            render(
                "<h2>Referrers</h2><table><thead><tr><th>Artifact type</th><th>Digest</th></tr>"
                "</thead><tbody>$rows</tbody></table>",
                rows=join(
                    render(
                        "<tr><td>$type</td><td>$digest</td></tr>",
                        type=r.artifact_type or r.media_type,
                        digest=link(url(f"/ui/manifest/{repo}/-/{r.digest}"), _short(r.digest)),
                    )
                    for r in referrers
                ),
            )
        )
    pretty = json.dumps(doc, indent=2) if doc else manifest.content.decode("utf-8", "replace")
    parts.append(
        render("<details><summary>Manifest JSON</summary><pre>$json</pre></details>", json=pretty)
    )
    crumbs = [("/ui/", "Repositories"), (url(f"/ui/repo/{repo}"), repo)]
    heading = render(
        '$repo <span class="digest">$ref</span>',
        repo=repo,
        ref=(":" if not oci.is_digest(reference) else "@") + reference,
    )
    return _html(request, caller, title, join(parts), heading=heading, crumbs=crumbs)


def _cached_badge(digest: Digest | None, missing: set[str]) -> Markup:
    if digest is not None and str(digest) in missing:
        return Markup(
            '<span class="badge missing" title="not pulled into this repository yet">'
            "not stored</span>"
        )
    return Markup("")


def _blob_table(descriptors: list[dict[str, Any]], missing: set[str], *, numbered: bool) -> Markup:
    if not descriptors:
        return Markup('<p class="empty">None</p>')
    rows = []
    for i, d in enumerate(descriptors, 1):
        digest = _digest_of(d)
        rows.append(
            render(
                "<tr>$i<td>$type</td><td><code>$digest</code> $stored</td>"
                '<td class="num">$size</td></tr>',
                i=render('<td class="num">$i</td>', i=i) if numbered else "",
                type=d.get("mediaType", "?"),
                digest=digest if digest is not None else d.get("digest", "?"),
                stored=_cached_badge(digest, missing),
                size=size_cell(_size_of(d)),
            )
        )
    return render(
        "<table><thead><tr>$number<th>Media type</th><th>Digest</th>"
        '<th class="num">Size</th></tr></thead><tbody>$rows</tbody></table>',
        number=Markup('<th class="num">#</th>') if numbered else "",
        rows=join(rows),
    )


def _index_table(repo: str, entries: list[dict[str, Any]], missing: set[str]) -> Markup:
    rows = []
    for d in entries:
        digest = _digest_of(d)
        is_manifest = d.get("mediaType") in oci.MANIFEST_TYPES
        if digest is not None and is_manifest:
            target = link(url(f"/ui/manifest/{repo}/-/{digest}"), _short(digest))
        else:  # an entry that is a blob (BuildKit's cache index): nothing to open
            target = render(
                "<code>$d</code>", d=digest if digest is not None else d.get("digest", "?")
            )
        platform = _platform(d)
        rows.append(
            render(
                "<tr><td>$platform</td><td>$type</td><td>$target $stored</td>"
                '<td class="num">$size</td><td>$annotations</td></tr>',
                platform=render('<span class="badge platform">$p</span>', p=platform)
                if platform
                else "",
                type=d.get("mediaType", "?"),
                target=target,
                stored=_cached_badge(digest, missing),
                size=size_cell(_size_of(d)),
                annotations=_inline_annotations(d.get("annotations")),
            )
        )
    body = join(rows) if rows else Markup('<tr><td colspan="5" class="empty">No entries</td></tr>')
    return render(
        "<h2>Manifests</h2><table><thead><tr><th>Platform</th><th>Media type</th><th>Digest</th>"
        '<th class="num">Size</th><th>Annotations</th></tr></thead><tbody>$rows</tbody></table>',
        rows=body,
    )


def _inline_annotations(annotations: object) -> Markup:
    if not isinstance(annotations, dict):
        return Markup("")
    return join(
        render('<div class="note"><code>$k</code> = $v</div>', k=k, v=v)
        for k, v in annotations.items()
    )


def _annotations(annotations: object) -> Markup:
    if not isinstance(annotations, dict) or not annotations:
        return Markup("")
    return render(
        "<h2>Annotations</h2><table><thead><tr><th>Key</th><th>Value</th></tr></thead>"
        "<tbody>$rows</tbody></table>",
        rows=join(
            render("<tr><td><code>$k</code></td><td>$v</td></tr>", k=k, v=v)
            for k, v in annotations.items()
        ),
    )


# -- upstreams --------------------------------------------------------------------------------


def cache_budget(upstream: UpstreamConfig) -> int:
    """The upstream's cache budget in bytes, 0 if none (the lifecycle settings' max_bytes)."""
    budget = getattr(upstream, "max_bytes", 0)
    return budget if isinstance(budget, int) else 0


@page
async def list_upstreams(request: web.Request, caller: Caller) -> web.StreamResponse:
    if caller.user is None and session.auth_enabled(request):
        return _to_login(request)
    proxy = request.app[PULL_THROUGH]
    stats = await request.app[METRICS].upstream_stats()
    meta = _meta(request)
    now = time.time()
    rows = []
    for name, upstream in sorted(proxy.upstreams.items()):
        got = stats.get(name)
        hits = got.hits if got else 0.0
        misses = got.misses if got else 0.0
        lookups = hits + misses
        ratio = f"{hits / lookups:.0%}" if lookups else "-"
        blobs, size = await meta.cache_totals(name)
        budget = cache_budget(upstream.config)
        cache = f"{human_size(size)} in {blobs:,} blobs"
        if budget:
            cache += f" of {human_size(budget)} ({size / budget:.0%})"
        state = upstream.rate_limit
        if state.remaining is None:
            limit = "not reported"
        else:
            limit = f"{state.remaining:,}" + (
                f" of {state.limit:,}" if state.limit is not None else ""
            )
        wait = state.blocked_for(now)
        limit_note = Markup("")
        if wait > 0:
            limit_note = render(
                '<div class="badge missing">holding requests until $t</div>', t=when(state.reset_at)
            )
        fills = [
            f for f in proxy.fills_in_progress() if f.repos and f.repos[0].partition("/")[0] == name
        ]
        rows.append(
            render(
                '<tr><td><strong>$name</strong><div class="note">$url</div></td>'
                '<td class="num">$ratio<div class="note">$hits hits, $misses misses</div></td>'
                '<td class="num">$saved</td><td class="num">$pulled</td><td>$cache</td>'
                '<td class="num">$limit$limit_note</td><td class="num">$fills</td></tr>',
                name=name,
                url=upstream.config.url,
                ratio=ratio,
                hits=f"{hits:,.0f}",
                misses=f"{misses:,.0f}",
                saved=human_size(got.served_bytes if got else 0),
                pulled=human_size(got.pulled_bytes if got else 0),
                cache=cache,
                limit=limit,
                limit_note=limit_note,
                fills=len(fills),
            )
        )
    if not rows:
        table = Markup('<p class="empty">No upstreams are configured.</p>')
    else:
        table = render(
            '<table><thead><tr><th>Upstream</th><th class="num">Hit ratio</th>'
            '<th class="num">Bytes saved</th><th class="num">Pulled</th><th>Cache size</th>'
            '<th class="num">Rate limit left</th><th class="num">Fills</th></tr></thead>'
            "<tbody>$rows</tbody></table>"
            '<p class="note">Counters since this process started (all workers with --workers);'
            " bytes saved: bytes served from the cache.</p>",
            rows=join(rows),
        )
    fills = proxy.fills_in_progress()
    if fills:
        fill_rows = join(
            render(
                "<tr><td><code>$digest</code></td><td>$repos</td>"
                '<td class="num">$written of $size</td><td>$bar</td></tr>',
                digest=f.digest,
                repos=", ".join(f.repos),
                written=human_size(f.written),
                size=human_size(f.size),
                bar=render(
                    '<progress max="$max" value="$value"></progress>',
                    max=f.size or 1,
                    value=min(f.written, f.size or 0),
                ),
            )
            for f in fills
        )
        table = render(
            "$table<h2>Fills in progress</h2><table><thead><tr><th>Blob</th><th>For</th>"
            '<th class="num">Fetched</th><th></th></tr></thead><tbody>$rows</tbody></table>',
            table=table,
            rows=fill_rows,
        )
    return _html(request, caller, "Upstreams", table)


# -- login ------------------------------------------------------------------------------------


@page
async def get_login(request: web.Request, caller: Caller) -> web.StreamResponse:
    if not session.auth_enabled(request):
        return _see_other("/ui/")
    return _login_page(request, caller, session.safe_next(request.query.get("next")), "", 200)


def _login_page(
    request: web.Request, caller: Caller, target: str, message: str, status: int
) -> web.Response:
    text = render('<p class="error">$m</p>', m=message) if message else Markup("")
    body = render(templates.LOGIN_FORM, message=text, next=target)
    return _html(request, caller, "Log in", body, status=status)


@page
async def post_login(request: web.Request, caller: Caller) -> web.StreamResponse:
    if not session.same_origin(request):
        return _problem(request, caller, 403, "That form came from another site.")
    form = await request.post()
    username, password, target = (form.get(k, "") for k in ("username", "password", "next"))
    target = session.safe_next(target if isinstance(target, str) else None)
    if not isinstance(username, str) or not isinstance(password, str):
        return _login_page(request, caller, target, "Invalid user name or password.", 401)
    if not session.auth_enabled(request):
        return _see_other(target)
    try:
        token = await session.sign_in(request, username, password)
    except Unauthorized:
        return _login_page(request, caller, target, "Invalid user name or password.", 401)
    except TooManyRequests as exc:
        response = _login_page(
            request, caller, target, "Too many failed logins; try again later.", 429
        )
        response.headers.update(exc.headers)
        return response
    response = _see_other(target)
    session.set_cookie(request, response, token)
    return response


@page
async def post_logout(request: web.Request, caller: Caller) -> web.StreamResponse:
    if not session.same_origin(request):
        return _problem(request, caller, 403, "That form came from another site.")
    response = _see_other(session.LOGIN_PATH if session.auth_enabled(request) else "/ui/")
    session.clear_cookie(response)
    return response


async def get_style(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text=templates.STYLE,
        content_type="text/css",
        charset="utf-8",
        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


async def redirect_to_ui(request: web.Request) -> web.StreamResponse:
    return _see_other("/ui/")
