"""Users: bcrypt hashes from an htpasswd file and the config, and password checks.

The htpasswd file holds ``name:$2b$...`` lines (bcrypt only, as docker-registry requires). It
is re-read when it changes, so ``regproxy user add`` takes effect without a restart; an entry
in the file wins over one of the same name in ``[auth.users]``.

Every check costs one bcrypt comparison, also for an unknown user (against a dummy hash of
the same cost), so timing tells nothing about which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from regproxy.auth.rules import valid_user_name

log = logging.getLogger(__name__)

# bcrypt looks at no more than 72 bytes; longer passwords are refused, never truncated.
MAX_PASSWORD_BYTES = 72
DEFAULT_ROUNDS = 12
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# Successful checks are remembered this long, so clients that send Basic credentials on
# every request do not pay for a bcrypt comparison each time.
VERIFIED_TTL = 60.0
VERIFIED_MAX = 1024


class HtpasswdError(ValueError):
    """An htpasswd file that cannot be used; the message names the file and line."""


def is_bcrypt_hash(value: str) -> bool:
    return value.startswith(_BCRYPT_PREFIXES) and len(value) == 60


def hash_password(password: str, rounds: int = DEFAULT_ROUNDS) -> str:
    data = password.encode()
    if not data:
        raise ValueError("the password is empty")
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode()


def read_htpasswd(path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not valid_user_name(name):
            raise HtpasswdError(f"{path}:{number}: expected NAME:BCRYPT-HASH")
        if not is_bcrypt_hash(hashed):
            raise HtpasswdError(f"{path}:{number}: user {name!r} has no bcrypt hash ($2b$...)")
        users[name] = hashed
    return users


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """Replace the file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".htpasswd-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{name}:{hashed}\n" for name, hashed in sorted(users.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_user(path: Path, name: str, password: str, rounds: int = DEFAULT_ROUNDS) -> bool:
    """Add ``name`` to the htpasswd file or change its password; True if it was new."""
    if not valid_user_name(name):
        raise ValueError(f"invalid user name {name!r}: letters, digits, '.', '_', '-'")
    users = read_htpasswd(path) if path.exists() else {}
    new = name not in users
    users[name] = hash_password(password, rounds)
    write_htpasswd(path, users)
    return new


def remove_user(path: Path, name: str) -> bool:
    users = read_htpasswd(path) if path.exists() else {}
    if users.pop(name, None) is None:
        return False
    write_htpasswd(path, users)
    return True


def fingerprint(hashed: str) -> str:
    """Stands for a password in refresh tokens: changing the password revokes them."""
    return hashlib.sha256(b"regproxy refresh\0" + hashed.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _FileState:
    mtime_ns: int
    size: int
    inode: int


class UserStore:
    """The users of ``[auth.users]`` and of an htpasswd file; thread-safe.

    Every method may read the file: call them from a worker thread (``asyncio.to_thread``).
    """

    def __init__(self, config_users: Mapping[str, str], path: Path | None) -> None:
        self._config_users = dict(config_users)
        self._path = path
        self._lock = threading.Lock()
        self._state: _FileState | None = None
        self._users = dict(self._config_users)
        self._dummy: dict[int, bytes] = {}
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._reload()

    def _reload(self) -> None:
        """Re-read the file if it changed (or appeared, or went away)."""
        if self._path is None:
            return
        try:
            st = self._path.stat()
        except FileNotFoundError:
            state = None
        else:
            state = _FileState(st.st_mtime_ns, st.st_size, st.st_ino)
        if state == self._state:
            return
        file_users = read_htpasswd(self._path) if state is not None else {}
        self._users = {**self._config_users, **file_users}
        self._state = state

    def _refresh(self) -> None:
        try:
            self._reload()
        except (OSError, HtpasswdError) as exc:
            log.error("keeping the users read before: %s", exc)

    def names(self) -> list[str]:
        with self._lock:
            self._refresh()
            return sorted(self._users)

    def count(self) -> int:
        return len(self.names())

    def hash_of(self, name: str) -> str | None:
        with self._lock:
            self._refresh()
            return self._users.get(name)

    def _dummy_hash(self, rounds: int) -> bytes:
        dummy = self._dummy.get(rounds)
        if dummy is None:
            dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds))
            self._dummy[rounds] = dummy
        return dummy

    def _typical_rounds(self) -> int:
        for hashed in self._users.values():
            try:
                return int(hashed[4:6])
            except ValueError:
                continue
        return DEFAULT_ROUNDS

    def verify(self, name: str, password: str) -> bool:
        """True if ``password`` is ``name``'s: one bcrypt comparison, known user or not."""
        with self._lock:
            self._refresh()
            hashed = self._users.get(name)
            target = hashed.encode() if hashed else self._dummy_hash(self._typical_rounds())
        data = password.encode()
        usable = hashed is not None and 0 < len(data) <= MAX_PASSWORD_BYTES
        cache_key = hmac.digest(self._key, f"{name}\0{hashed}\0".encode() + data, "sha256")
        if usable and self._recently_verified(cache_key):
            return True
        try:
            # Compared even when it cannot match, so every failure takes as long.
            matched = bcrypt.checkpw(data if usable else b"-", target)
        except ValueError:
            matched = False
        if matched and usable:
            self._remember(cache_key)
            return True
        return False

    def _recently_verified(self, key: bytes) -> bool:
        with self._lock:
            expires = self._verified.get(key)
            if expires is None:
                return False
            if expires < time.monotonic():
                del self._verified[key]
                return False
            return True

    def _remember(self, key: bytes) -> None:
        with self._lock:
            self._verified[key] = time.monotonic() + VERIFIED_TTL
            self._verified.move_to_end(key)
            while len(self._verified) > VERIFIED_MAX:
                self._verified.popitem(last=False)
