"""Typed application state shared by the handlers."""

from __future__ import annotations

from aiohttp import web

from regproxy.config import Config
from regproxy.registry.base import Registry

CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
