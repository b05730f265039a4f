"""SQLite's migrations: each applied once, also one numbered inside a gap, and databases made
before the ``schema_version`` table (only ``PRAGMA user_version``) keep what they have."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from regproxy.meta import sqlite as sqlite_module
from regproxy.meta.sqlite import SqliteMetadataStore, _migrations


def _versions(path: Path) -> tuple[list[int], int]:
    conn = sqlite3.connect(path)
    try:
        applied = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
        (user_version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    return applied, user_version


async def test_a_new_database_gets_every_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    shipped = [version for version, _ in _migrations()]
    for _ in range(2):  # opened again: nothing more to apply
        store = await SqliteMetadataStore.open(path)
        await store.close()
        assert _versions(path) == (shipped, max(shipped))


async def test_a_migration_in_a_gap_is_applied_to_a_database_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made before ``schema_version`` existed, at user_version 10 (every
    migration then shipped applied), gets a migration numbered 5 added later: once."""
    path = tmp_path / "metadata.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for _, script in _migrations():  # what the old runner did, statement by statement
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version={max(v for v, _ in _migrations())}")
    conn.close()

    real = _migrations()
    gap = (5, "CREATE TABLE gap_test (x INTEGER)")
    monkeypatch.setattr(sqlite_module, "_migrations", lambda: sorted([*real, gap]))
    for _ in range(2):
        store = await SqliteMetadataStore.open(path)
        await store.close()
    applied, user_version = _versions(path)
    assert applied == sorted([v for v, _ in real] + [5])
    assert user_version == max(applied)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM gap_test").fetchone() == (0,)
    conn.close()
