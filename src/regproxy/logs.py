"""Log output: readable text lines by default, one JSON object per line with ``log_format =
"json"``, for access and application lines alike.

An access line is logged with its fields in ``extra={"access": {...}}``: the text format
shows them as ``key=value`` pairs after the message, the JSON format merges them into the
object. Client TLS probes on the plain-HTTP port (skopeo and podman try https first) become
one debug line instead of an error with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from typing import Any, Final, TextIO

ACCESS_FIELDS: Final = "access"
# Access fields the text format leaves out: the message ("GET /v2/... 200") has them.
_IN_ACCESS_MESSAGE: Final = frozenset({"method", "path", "status"})
# How aiohttp's HTTP parsers (C and Python) report a request starting with a TLS record.
_TLS_MARKER: Final = "HTTPS traffic on an HTTP port"


class _Seconds:
    """The formatted second of the last record: most lines fall in the same second as the
    one before them, and ``strftime`` costs more than the rest of a timestamp."""

    second = -1
    text = ""


def _timestamp(record: logging.LogRecord) -> str:
    second = int(record.created)
    if second != _Seconds.second:
        _Seconds.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _Seconds.second = second
    return f"{_Seconds.text}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, access fields, exception;
    with ``with_pid`` (several workers) also the process id."""

    def __init__(self, with_pid: bool = False) -> None:
        super().__init__()
        self.pid = os.getpid() if with_pid else None

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.pid is not None:
            doc["pid"] = self.pid
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """``time [pid] level logger message key=value ...`` (the pid with ``with_pid``: several
    workers); tracebacks follow on their own lines."""

    def __init__(self, with_pid: bool = False) -> None:
        super().__init__()
        self.pid = f" [{os.getpid()}]" if with_pid else ""

    def format(self, record: logging.LogRecord) -> str:
        pid = self.pid
        line = f"{_timestamp(record)}{pid} {record.levelname} {record.name} {record.getMessage()}"
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            pairs = [
                f"{key}={value if type(value) is int else _text(value)}"  # ints need no quotes
                for key, value in fields.items()
                if value is not None and value != "" and key not in _IN_ACCESS_MESSAGE
            ]
            if pairs:
                line = f"{line} {' '.join(pairs)}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


_NEEDS_QUOTES: Final = re.compile(r'[ "=\n]')


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or _NEEDS_QUOTES.search(text) else text


class TlsProbeFilter(logging.Filter):
    """Turns aiohttp's error for a TLS ClientHello on the plain-HTTP port into one debug line.

    Installed on the ``aiohttp.server`` logger. Other unparseable requests pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ != "BadHttpMethod":
            return True
        if _TLS_MARKER not in str(exc):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
        record.msg = "TLS handshake from %s on the plain-HTTP port ignored (client probing https)"
        record.args = (remote,)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class LoopFlushedHandler(logging.StreamHandler[TextIO]):
    """Writes lines to a buffered stream and flushes it once per iteration of the event loop
    they were written on; a line written off the loop (start-up, a worker thread, exit) is
    flushed at once. Under load one iteration logs dozens of access lines: one write(2) for
    them all instead of one each. The flush runs before the loop next waits for anything, so
    lines reach the file as soon as before, and a SIGKILL loses at most one iteration's."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: asyncio.AbstractEventLoop | None = None  # a flush is queued there

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if self._pending is not loop:  # (a loop that closed never ran its flush: not that)
            self._pending = loop
            loop.call_soon(self._flush_queued)

    def _flush_queued(self) -> None:
        self._pending = None
        super().flush()


def _stderr() -> TextIO:
    """Standard error as a block-buffered stream (``sys.stderr`` flushes every line)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by something without a file
        return sys.stderr
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return open(fd, "w", encoding=encoding, errors="backslashreplace", closefd=False)


def flush() -> None:
    """Write out every buffered line now (before a process ends without ``atexit``)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure_logging(
    level: str, log_format: str, stream: TextIO | None = None, *, with_pid: bool = False
) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``log_format``."""
    handler = LoopFlushedHandler(stream or _stderr())
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    handler.setFormatter(formatter(with_pid))
    root = logging.getLogger()
    for old in list(root.handlers):
        old.flush()  # what a LoopFlushedHandler still holds
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # What a record costs to make (an access line per request): no formatter here shows the
    # thread, the process name or the calling function, so logging need not look them up.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # with_pid: the formatter has it (getpid is a system call)
    logging._srcfile = None  # the logging HOWTO's "Optimization": no caller frame lookup
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, TlsProbeFilter) for f in server.filters):
        server.addFilter(TlsProbeFilter())
