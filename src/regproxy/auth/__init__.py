"""Client authentication and access control.

- ``rules.py``: the vocabulary (actions, principals, repository globs) and ``AccessPolicy``,
  which answers "which actions may this caller take on this repository".
- ``users.py``: bcrypt password hashes from an htpasswd file and the config; verification.
- ``tokens.py``: the signing key and the short-lived JWTs of the registry token flow.
- ``ratelimit.py``: failed logins, counted per client address and user.
- ``service.py``: ``Authenticator``, which puts them together for one request.
- ``handlers.py``: the ``/token`` endpoint (GET with Basic, OAuth2 POST forms).
- ``middleware.py``: checks every request against the route table's access needs.

This package's ``__init__`` imports nothing: config.py uses ``rules`` for validation.
"""
