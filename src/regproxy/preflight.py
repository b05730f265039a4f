"""Checks before start-up whose failures an operator fixes by hand: one line each, no traceback."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from regproxy.config import Config


class StartupError(Exception):
    """regproxy cannot start; the message says why in one line (the CLI exits 2)."""


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def check_dir(path: Path, what: str) -> None:
    """``path`` is a directory regproxy can create files in (created if missing)."""
    if path.exists() and not path.is_dir():
        raise StartupError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {what} {path}: {_reason(exc)}") from exc
    probe = path / f".regproxy-write-test-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(f"cannot write to {what} {path}: {_reason(exc)}") from exc


def check_data_dirs(config: Config) -> None:
    """The data directory (metadata, spool, keys) and, on the filesystem backend, the blob
    directory are usable."""
    check_dir(config.data_path, "data directory")
    if config.storage.backend == "filesystem":
        check_dir(config.storage_path, "blob directory")
