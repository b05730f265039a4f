"""The read-only web UI at ``/ui/``: server-rendered HTML, a little CSS, no JavaScript.

- ``markup.py``: HTML escaping. Everything that comes from the registry (names, tags, media
  types, annotations) passes through ``escape``; only ``Markup`` values are inserted as-is.
- ``templates.py``: the page layout and the style sheet, as Python string templates.
- ``session.py``: who is looking: the login form's HttpOnly, SameSite=Strict cookie holds a
  refresh token of the registry's own token service (revoked by a password change).
- ``pages.py``: the handlers: repositories (hosted and cached apart), a repository's tags, a
  manifest, the upstreams. Each page reads the metadata store with a bounded number of
  queries and never contacts an upstream.
"""
