"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from regproxy.config import Config
from regproxy.registry.base import Registry

CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
# Body bytes a handler that streams its response has written so far (for the access log,
# when the stream breaks off before the end).
BODY_SENT = web.RequestKey("body_sent", int)
