"""One upstream fetch per blob, however many clients ask for it at once.

A ``Fill`` fetches a blob from upstream exactly once, in a task of its own, and tees the bytes
into storage (through the hosted registry, which verifies the digest before the blob becomes
visible) and into a local spool file. Every client of that blob, the first one included,
reads the spool from its own offset at its own pace, waiting for bytes still in flight. A
client that goes away does not disturb the fill; a fill that fails cuts every client off.

The last byte is held back until the digest is verified, so a corrupted or truncated fetch
never reaches a client as a complete body.

The spool of a digest has a fixed name, ``<algorithm>-<hex>.partial``, locked (``flock``)
while a fill uses it. A fill cut by an upstream failure or by a kill leaves it behind, so the
next fill of the digest continues from its bytes (see ``keep``) instead of fetching them
again; a fill that commits, or finds the bytes wrong, removes it. ``reconcile_spool`` removes,
at start-up, what no live fill owns and nothing can resume.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from regproxy.oci import Digest

log = logging.getLogger(__name__)

# What a client reads of a spool at a time. Every client of a fill holds one such piece (and
# the transport a copy of what the socket did not take yet), so it is small: 8 clients
# pulling 3 blobs each are 24 readers.
READ_SIZE = 128 << 10
# Spool reads that may be an earlier fill's (kept bytes): in a worker thread, in big pieces.
KEPT_READ_SIZE = 1 << 20
PARTIAL = ".partial"
UPLOAD_NOTE = ".upload"
# A resumable spool: ``<algorithm>-<hex>.partial``; a private one (its name taken by a fill of
# another process) adds ``.<uuid>.tmp`` and is never resumed.
_RESUMABLE_RE = re.compile(r"^[a-z0-9]+-[0-9a-f]+\.partial$")

# Given the fill, fetch from upstream, store, and return once the blob is committed.
FetchAndStore = Callable[["Fill"], Awaitable[None]]


class FillFailed(Exception):
    """The upstream fetch behind a fill broke; nothing was cached."""


class SpoolGone(Exception):
    """The fill ended before this reader opened its spool; read from storage instead."""


def spool_name(digest: Digest) -> str:
    return f"{digest.algorithm}-{digest.hex}{PARTIAL}"


def _lock(f: BinaryIO) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_spool(spool_dir: Path, digest: Digest) -> tuple[Path, BinaryIO, int]:
    """The digest's spool, locked, and how many bytes an earlier fill left in it; or, when
    a fill in another process holds it, a private spool of this fill's own."""
    path = spool_dir / spool_name(digest)
    f = open(path, "a+b", buffering=0)
    if _lock(f):
        stat = os.fstat(f.fileno())
        try:
            same = os.stat(path).st_ino == stat.st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed by the fill that held it, before our lock: open it anew
            f.close()
            return _open_spool(spool_dir, digest)
        return path, f, stat.st_size
    f.close()
    private = spool_dir / f"{spool_name(digest)}.{uuid.uuid4()}.tmp"
    return private, open(private, "xb", buffering=0), 0


def _upload_note(spool: Path) -> Path:
    """Beside a spool: the id of the upload its fill stores into (a kill leaves it behind)."""
    return spool.with_name(spool.name + UPLOAD_NOTE)


def _read_note(note: Path) -> str | None:
    try:
        return note.read_text().strip() or None
    except FileNotFoundError:
        return None


def reconcile_spool(spool_dir: Path, max_age: float) -> tuple[int, int, list[str]]:
    """Remove spool files no live fill owns (unlocked), unless they are resumable partials
    younger than ``max_age`` seconds. Returns (kept, removed, and the ids of the uploads
    the gone fills were storing into, for the caller to cancel)."""
    kept = removed = 0
    uploads: list[str] = []
    now = time.time()
    for path in sorted(spool_dir.iterdir()):
        if path.name.endswith(UPLOAD_NOTE):
            continue  # with its spool
        try:
            f = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError):
            continue
        try:
            if not _lock(f):
                continue  # a fill of another process is using it
            note = _upload_note(path)
            upload_id = _read_note(note)
            if upload_id is not None:
                uploads.append(upload_id)
            note.unlink(missing_ok=True)
            young = now - os.fstat(f.fileno()).st_mtime < max_age
            if _RESUMABLE_RE.match(path.name) and young:
                kept += 1
                continue
            path.unlink(missing_ok=True)
            removed += 1
        finally:
            f.close()
    for note in spool_dir.glob(f"*{UPLOAD_NOTE}"):  # a kill between the two unlinks
        if not note.with_name(note.name.removesuffix(UPLOAD_NOTE)).exists():
            upload_id = _read_note(note)
            if upload_id is not None:
                uploads.append(upload_id)
            note.unlink(missing_ok=True)
            removed += 1
    return kept, removed, uploads


class Fill:
    def __init__(self, digest: Digest, spool_dir: Path) -> None:
        self.digest = digest
        self.spool_dir = spool_dir
        self.spool = spool_dir / spool_name(digest)
        self.size: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.written = 0
        # Bytes found in the spool, left by an earlier fill: candidates for ``keep``.
        self.found = 0
        self.repos: set[str] = set()
        self.done = False
        self.error: BaseException | None = None
        self._progress = asyncio.Event()
        self._file: BinaryIO | None = None
        self._kept = False
        self.resumed = 0  # bytes ``keep`` took over from the spool
        # The upload a gone fill of this spool was storing into, found beside it.
        self.stale_upload: str | None = None

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _wait(self) -> None:
        await self._progress.wait()

    def readable(self) -> int:
        """How many bytes a client may have: all once verified, else all but the last one."""
        if self.done and self.error is None:
            return self.written
        total = self.size.result() if self.size.done() and not self.size.exception() else None
        if total is not None and self.written >= total:
            return total - 1
        return self.written

    async def run(self, fetch: FetchAndStore, resumable: Callable[[BaseException], bool]) -> None:
        """Drive the fetch (which calls ``keep`` once, then tees the rest, see ``tee``).

        When it fails for a reason ``resumable`` accepts, the spool stays for the next fill
        of the digest; otherwise, and once the blob is committed, it is removed.
        """
        keep_spool = False
        try:
            self.spool, self._file, self.found = await asyncio.to_thread(
                _open_spool, self.spool_dir, self.digest
            )
            self.stale_upload = await asyncio.to_thread(_read_note, _upload_note(self.spool))
            await fetch(self)
        except BaseException as exc:
            self.error = exc
            if not self.size.done():
                self.size.set_exception(FillFailed(str(exc)))
            spooled = self.written if self._kept else self.found
            keep_spool = self._file is not None and spooled > 0 and resumable(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.done = True
            self._notify()
            # Clients already reading keep their open descriptor; new ones go to storage.
            if self._file is not None:  # the spool is ours (else it may be another's)
                # The fetch ended its upload (committed or cancelled); a kill leaves the note.
                with suppress(OSError):
                    await asyncio.to_thread(os.unlink, _upload_note(self.spool))
                if not keep_spool or self.spool.suffix != PARTIAL:
                    with suppress(OSError):
                        await asyncio.to_thread(os.unlink, self.spool)
                await asyncio.to_thread(self._file.close)  # releases the lock

    async def note_upload(self, upload_id: str) -> None:
        """Record beside the spool the upload this fill stores into, so that whoever finds
        the spool after a kill can cancel it."""
        await asyncio.to_thread(_upload_note(self.spool).write_text, upload_id)

    async def keep(self, count: int) -> None:
        """Use the first ``count`` of the bytes found in the spool (the upstream sends what
        follows them); the rest, if any, is dropped. Call it once, before ``tee``."""
        assert self._file is not None and 0 <= count <= self.found
        f = self._file

        def truncate() -> None:
            f.truncate(count)
            f.seek(count)

        await asyncio.to_thread(truncate)
        self.written = self.resumed = count
        self._kept = True
        if count:
            log.info("resuming the fill of %s after %d spooled bytes", self.digest, count)
        self._notify()

    async def kept(self) -> AsyncIterator[bytes]:
        """The spooled bytes ``keep`` took over, to store them with the rest."""
        async for chunk in self._pread(0, self.resumed):
            yield chunk

    async def tee(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Spool each piece of ``body`` (for clients to read) and pass it on to storage."""
        assert self._file is not None
        f = self._file
        async for chunk in body:
            await asyncio.to_thread(f.write, chunk)
            self.written += len(chunk)
            self._notify()
            yield chunk

    async def _pread(self, start: int, end: int) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self.spool, os.O_RDONLY)
        try:
            while start < end:
                want = min(KEPT_READ_SIZE, end - start)
                chunk = await asyncio.to_thread(os.pread, fd, want, start)
                if not chunk:
                    raise FillFailed("spool shorter than expected")
                start += len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(os.close, fd)

    def set_size(self, size: int) -> None:
        if not self.size.done():
            self.size.set_result(size)

    async def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        """Bytes ``start .. start+length`` as the fill brings them in.

        The pieces are read on the event loop, not in a worker thread: this fill (or, for
        kept bytes, the fill it resumes) wrote them moments ago, so they come from the page
        cache, and a thread hop per piece costs more than the copy of 128 KiB. Worse, each
        worker thread allocates from a malloc arena of its own, whose high-water mark stays:
        reading in threads made a third of the peak RSS of 8 concurrent cold pulls.
        """
        try:
            fd = await asyncio.to_thread(os.open, self.spool, os.O_RDONLY)
        except FileNotFoundError:
            if self.done and self.error is None:
                raise SpoolGone(str(self.digest)) from None
            raise FillFailed(f"fill of {self.digest} failed before the read began") from None
        try:
            position, end = start, start + length
            while position < end:
                available = min(self.readable(), end)
                if position < available:
                    want = min(available - position, READ_SIZE)
                    chunk = os.pread(fd, want, position)
                    if not chunk:
                        raise FillFailed("spool shorter than announced")
                    position += len(chunk)
                    yield chunk
                elif self.error is not None:
                    raise FillFailed(f"upstream fetch of {self.digest} failed") from self.error
                elif self.done:
                    raise FillFailed(f"fill of {self.digest} ended at {self.written} bytes")
                else:
                    await self._wait()
        finally:
            await asyncio.to_thread(os.close, fd)
