"""Fixtures of the lifecycle tests: the scripted upstream of the pull-through tests, and
S3 buckets on moto."""

from __future__ import annotations

from tests.proxy.conftest import upstream
from tests.s3fixtures import s3, shared_moto

__all__ = ["s3", "shared_moto", "upstream"]
