"""Command line: argument parsing and delegation only."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from regproxy import __version__
from regproxy.config import Config, ConfigError, load_config

# Request bodies are read from the socket in pieces of this size.
READ_BUFSIZE = 1 << 20
# Longest request line read (aiohttp's default is 8190): a longer one gets a bare 400 from the
# HTTP parser, so this is generous enough for over-long names to get the spec's NAME_INVALID.
MAX_LINE_SIZE = 16 << 10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"regproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the registry")
    serve.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--data-dir", help="where blobs and metadata live (default ./data)")
    user = commands.add_parser("user", help="add or remove a user of the htpasswd file")
    user.add_argument("action", choices=["add", "remove"])
    user.add_argument("name", help="user name: letters, digits, '.', '_', '-'")
    user.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    user.add_argument("--data-dir", help="data directory whose htpasswd to use")
    user.add_argument("--file", help="htpasswd file (default: auth.users_file)")
    user.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    user.add_argument("--rounds", type=int, default=12, help="bcrypt cost (default 12)")
    gc = commands.add_parser(
        "gc", help="collect garbage now (safe while `regproxy serve` runs on the same data)"
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    gc.add_argument("--data-dir", help="where blobs and metadata live (default ./data)")
    check = commands.add_parser("check", help="find blob rows whose bytes are missing or wrong")
    check.add_argument("--deep", action="store_true", help="re-hash every blob")
    check.add_argument(
        "--repair",
        action="store_true",
        help="forget broken cached blobs (the next pull fetches them again)",
    )
    check.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    check.add_argument("--data-dir", help="where blobs and metadata live (default ./data)")
    return parser


def _configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def serve(config: Config) -> int:
    import asyncio

    from regproxy.api.middleware import AccessLogger
    from regproxy.server import run

    _configure_logging(config)
    logging.getLogger("regproxy").info(
        "regproxy %s listening on %s, data in %s", __version__, config.listen, config.data_dir
    )
    try:
        asyncio.run(
            run(
                config,
                access_log_class=AccessLogger,
                access_log=logging.getLogger("regproxy.access"),
                read_bufsize=READ_BUFSIZE,
                max_line_size=MAX_LINE_SIZE,
            )
        )
    except ConfigError as exc:  # found at start-up, e.g. an S3 bucket that does not exist
        print(f"regproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            env=os.environ,
            overrides={"listen": getattr(args, "listen", None), "data_dir": args.data_dir},
        )
    except ConfigError as exc:
        print(f"regproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "user":
        from regproxy.auth.admin import user_command

        return user_command(
            config,
            args.action,
            args.name,
            file=args.file,
            password_stdin=args.password_stdin,
            rounds=args.rounds,
        )
    if args.command in ("gc", "check"):
        _configure_logging(config)
    if args.command == "gc":
        from regproxy.lifecycle.commands import gc_command

        return gc_command(config, dry_run=args.dry_run)
    if args.command == "check":
        from regproxy.lifecycle.commands import check_command

        return check_command(config, deep=args.deep, repair=args.repair)
    try:
        return serve(config)
    except ConfigError as exc:  # found while wiring the app, e.g. users, rules, token key
        print(f"regproxy: configuration error: {exc}", file=sys.stderr)
        return 2
