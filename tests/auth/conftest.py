"""Fixtures for the auth tests: users with cheap bcrypt hashes, rules, and clients."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from blockbuster import BlockBuster

from regproxy.app import create_app
from regproxy.config import Config
from tests.helpers import Client, make_config

PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
# Cost 4: the tests check logic, not bcrypt's strength.
HASHES = {
    name: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode() for name, pw in PASSWORDS.items()
}
# alice: everything; bob (group devs): pull+push on team/** and public/**; carol: only what
# every signed-in user and anonymous clients get.
RULES: list[dict[str, Any]] = [
    {"who": ["anonymous"], "repos": ["public/**"], "actions": ["pull"]},
    {"who": ["group:devs"], "repos": ["team/**", "public/**"], "actions": ["pull", "push"]},
    {"who": ["alice"], "repos": ["**"], "actions": ["*"]},
    {"who": ["*"], "repos": ["shared/*"], "actions": ["pull"]},
]
GROUPS = {"devs": ["bob"]}

StartClient = Callable[..., Awaitable[Client]]


def basic(user: str, password: str | None = None) -> str:
    password = PASSWORDS[user] if password is None else password
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def auth_config(tmp_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "auth__users": dict(HASHES),
        "auth__groups": dict(GROUPS),
        "auth__rules": list(RULES),
    }
    values.update(overrides)
    return make_config(tmp_path, **values)


@pytest.fixture
def start(aiohttp_client: Any, blockbuster: BlockBuster) -> StartClient:
    """Start an app for a config; ``headers`` are sent with every request of the client."""

    async def start(config: Config, headers: dict[str, str] | None = None) -> Client:
        blockbuster.deactivate()
        try:
            app = create_app(config)
            client: Client = await aiohttp_client(app, headers=headers or {})
        finally:
            blockbuster.activate()
        return client

    return start


@pytest.fixture
def secured(tmp_path: Path) -> Config:
    return auth_config(tmp_path)


@pytest.fixture
async def anon(start: StartClient, secured: Config) -> Client:
    """A client without credentials against the secured config."""
    return await start(secured)


AsUser = Callable[[Client, str], Awaitable[Client]]


@pytest.fixture
def as_user(aiohttp_client: Any) -> AsUser:
    """Another client on the same server, sending ``user``'s Basic credentials each time."""

    async def as_user(client: Client, user: str) -> Client:
        other: Client = await aiohttp_client(client.server, headers={"Authorization": basic(user)})
        return other

    return as_user


@pytest.fixture
async def admin(anon: Client, as_user: AsUser) -> Client:
    """alice (may do anything), on the same server as ``anon``."""
    return await as_user(anon, "alice")
