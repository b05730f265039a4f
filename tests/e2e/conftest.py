"""Fixtures for end-to-end tests: a regproxy server process of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.procs import RegproxyProcess, regproxy


@pytest.fixture
async def regproxy_server(tmp_path: Path) -> AsyncIterator[RegproxyProcess]:
    """``regproxy serve`` on a free 127.0.0.1 port with data in ``tmp_path/regproxy/data``.

    At teardown it must stop cleanly on SIGTERM (exit code 0) unless the test ended it.
    """
    async with regproxy(tmp_path / "regproxy") as server:
        yield server
        if server.alive():
            rc = await server.stop()
            assert rc == 0, f"regproxy exited {rc} on SIGTERM:\n{server.log_tail()}"
