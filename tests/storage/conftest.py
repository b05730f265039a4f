"""Fixtures for the storage tests: the S3 fixtures (a moto server over real HTTP)."""

from tests.s3fixtures import faulty_s3, moto_server, s3, shared_moto  # noqa: F401
