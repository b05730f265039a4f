"""create_app(config): the one place that names concrete classes and wires them together."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from regproxy.api.keys import CONFIG, REGISTRY
from regproxy.api.middleware import add_common_headers, errors_middleware
from regproxy.api.routes import add_routes
from regproxy.config import Config
from regproxy.meta.sqlite import SqliteMetadataStore
from regproxy.registry.hosted import HostedRegistry
from regproxy.storage.filesystem import FilesystemBlobStore
from regproxy.tasks import HOSTED, background_tasks


async def _stores(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.data_path.mkdir(parents=True, exist_ok=True)
    meta = await SqliteMetadataStore.open(config.data_path / "metadata.sqlite")
    storage = FilesystemBlobStore(config.storage_path, fsync=config.storage.fsync)
    hosted = HostedRegistry(meta, storage)
    app[HOSTED] = hosted
    app[REGISTRY] = hosted
    try:
        yield
    finally:
        await storage.close()
        await meta.close()


def create_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app[CONFIG] = config
    app.cleanup_ctx.append(_stores)
    app.cleanup_ctx.append(background_tasks)
    app.on_response_prepare.append(add_common_headers)
    add_routes(app)
    return app
