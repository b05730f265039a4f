"""Fixtures of the lifecycle tests: the scripted upstream of the pull-through tests."""

from __future__ import annotations

from tests.proxy.conftest import upstream

__all__ = ["upstream"]
