"""HTML escaping for the UI's pages: a ``Markup`` string is safe HTML, anything else is text."""

from __future__ import annotations

import html
import string
import urllib.parse
from collections.abc import Iterable


class Markup(str):
    """A string that is already HTML: inserted as it is, never escaped again."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text (quotes included, so it is safe inside attributes too)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def render(template: str, **values: object) -> Markup:
    """``template`` (``string.Template`` syntax: ``$name``) with every value escaped."""
    return Markup(string.Template(template).substitute({k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[object], separator: str = "") -> Markup:
    return Markup(escape(separator).join(escape(part) for part in parts))


def url(path: str, **query: str) -> str:
    """A same-origin URL: ``path`` percent-encoded (``/`` kept), the non-empty ``query``."""
    encoded = urllib.parse.quote(path, safe="/:@")
    params = {k: v for k, v in query.items() if v}
    return f"{encoded}?{urllib.parse.urlencode(params)}" if params else encoded


def link(href: str, text: object, **attributes: str) -> Markup:
    extra = "".join(f' {name}="{escape(value)}"' for name, value in attributes.items())
    return render('<a href="$href"$extra>$text</a>', href=href, extra=Markup(extra), text=text)
