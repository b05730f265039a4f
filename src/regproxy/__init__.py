"""regproxy: a container registry and pull-through cache in one aiohttp service."""

__version__ = "0.1.0"
