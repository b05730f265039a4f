"""``regproxy user add|remove NAME``: keep the htpasswd file that the server reads.

The password comes from a prompt (asked twice) when standard input is a terminal, else from
the first line of standard input (``--password-stdin`` insists on that), so it never shows up
in a process list or shell history.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TextIO

from regproxy.auth.rules import RESERVED_NAMES, valid_user_name
from regproxy.auth.service import users_path
from regproxy.auth.users import (
    DEFAULT_ROUNDS,
    MAX_PASSWORD_BYTES,
    HtpasswdError,
    read_htpasswd,
    remove_user,
    set_user,
)
from regproxy.config import Config


def _read_password(stdin: TextIO, from_stdin: bool) -> str:
    if from_stdin or not stdin.isatty():
        return stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise ValueError("the passwords differ")
    return first


def user_command(
    config: Config,
    action: str,
    name: str,
    *,
    file: str | None = None,
    password_stdin: bool = False,
    rounds: int = DEFAULT_ROUNDS,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    out = out or sys.stderr
    path = Path(file) if file else users_path(config)
    try:
        if action == "remove":
            if not remove_user(path, name):
                print(f"regproxy: no user {name!r} in {path}", file=out)
                return 1
            print(f"removed user {name} from {path}", file=out)
            return 0
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is reserved: rules use it for clients without a login")
        if not valid_user_name(name):
            raise ValueError(f"invalid user name {name!r}: letters, digits, '.', '_', '-'")
        password = _read_password(stdin, password_stdin)
        if not password or len(password.encode()) > MAX_PASSWORD_BYTES:
            raise ValueError(f"the password must be 1 to {MAX_PASSWORD_BYTES} bytes long")
        new = set_user(path, name, password, rounds)
    except (ValueError, HtpasswdError, OSError) as exc:
        print(f"regproxy: {exc}", file=out)
        return 1
    print(f"{'added' if new else 'updated'} user {name} in {path}", file=out)
    return 0


def list_users(config: Config, *, file: str | None = None, out: TextIO | None = None) -> int:
    """Print every user a client can log in as, where it is defined, and its groups."""
    out = out or sys.stdout
    path = Path(file) if file else users_path(config)
    try:
        in_file = read_htpasswd(path) if path.is_file() else {}
    except (HtpasswdError, OSError) as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 1
    groups: dict[str, list[str]] = {}
    for group, members in sorted(config.auth.groups.items()):
        for member in members:
            groups.setdefault(member, []).append(group)
    for name in sorted({*in_file, *config.auth.users}):
        source = str(path) if name in in_file else "[auth.users]"
        member_of = ",".join(groups.get(name, [])) or "-"
        print(f"{name}\t{source}\tgroups: {member_of}", file=out)
    if not in_file and not config.auth.users:
        print(f"no users (none in {path} or [auth.users])", file=sys.stderr)
    return 0
