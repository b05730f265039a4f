"""``regproxy gc`` and ``regproxy check``: the lifecycle passes run once, from the command line.

Both work on the data directory (or database and bucket) of a running ``regproxy serve``, in
another process: every decision is taken again inside the write transaction that acts on it.
"""

from __future__ import annotations

import asyncio
import sys

from regproxy.app import open_stores
from regproxy.config import Config
from regproxy.lifecycle.check import check_blobs
from regproxy.lifecycle.gc import run_pass


def _say(line: str) -> None:
    print(line, flush=True)


def gc_command(config: Config, *, dry_run: bool) -> int:
    async def run() -> int:
        async with open_stores(config) as (meta, storage):
            report = await run_pass(meta, storage, config, dry_run=dry_run, out=_say)
        _say(report.summary())
        return 0

    return asyncio.run(run())


def check_command(config: Config, *, deep: bool, repair: bool) -> int:
    async def run() -> int:
        async with open_stores(config) as (meta, storage):
            report = await check_blobs(meta, storage, config, deep=deep, repair=repair, out=_say)
        hosted = len([b for b in report.broken if not b.cached])
        _say(
            f"check: {report.checked} blob(s) checked{' (re-hashed)' if deep else ''},"
            f" {len(report.broken)} broken ({hosted} hosted), {len(report.repaired)} repaired"
        )
        return 1 if report.broken else 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        print("check: interrupted", file=sys.stderr)
        return 130
