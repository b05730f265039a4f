"""Command line: argument parsing and delegation only."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from regproxy import __version__
from regproxy.config import Config, ConfigError, load_config

DESCRIPTION = """\
regproxy: a container registry and pull-through cache in one service.

It hosts repositories you push to, and caches the registries configured as upstreams
(Docker Hub, ghcr.io, ...) under a name prefix: pulling <upstream>/<path> fetches from the
upstream once and serves every later pull from the cache. Configuration comes from a TOML
file (--config or REGPROXY_CONFIG) and REGPROXY_* variables; see README.md.
"""

# Request bodies are read from the socket in pieces of this size.
READ_BUFSIZE = 1 << 20
# Longest request line read (aiohttp's default is 8190): a longer one gets a bare 400 from the
# HTTP parser, so this is generous enough for over-long names to get the spec's NAME_INVALID.
MAX_LINE_SIZE = 16 << 10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regproxy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `regproxy COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"regproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the registry",
        description="Run the registry and cache until SIGTERM or SIGINT, then drain and stop."
        " Exits 2 with one line on stderr when it cannot start (a configuration error, a"
        " port in use, a data directory it cannot use).",
    )
    serve.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--data-dir", help="where blobs and metadata live (default ./data)")
    serve.add_argument(
        "--workers", type=int, help="processes serving the one port (default 1, or workers)"
    )
    user = commands.add_parser(
        "user",
        help="list, add or remove users of the htpasswd file",
        description="Keep the users clients log in as: `user list` shows every user (from"
        " the htpasswd file and [auth.users]); `user add NAME` asks for a password (or reads"
        " one line of stdin) and stores its bcrypt hash; `user remove NAME` deletes it. A"
        " running server picks the changes up without a restart.",
    )
    user.add_argument("action", choices=["list", "add", "remove"])
    user.add_argument("name", nargs="?", help="user name: letters, digits, '.', '_', '-'")
    user.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    user.add_argument("--data-dir", help="data directory whose htpasswd to use")
    user.add_argument("--file", help="htpasswd file (default: auth.users_file)")
    user.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    user.add_argument("--rounds", type=int, default=12, help="bcrypt cost (default 12)")
    cache = commands.add_parser(
        "cache",
        help="list or pre-fetch cached images",
        description="Work on the pull-through cache in the configured data directory (a"
        " running server may share it).",
    )
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = cache_commands.add_parser(
        "ls",
        help="list cached images with their size",
        description="List the cached tags of every upstream (or one), with the image's size"
        " (its manifests and blobs, each once) and when the tag was last fetched or"
        " confirmed upstream.",
    )
    ls.add_argument("--upstream", metavar="NAME", help="only this upstream's cache")
    warm = cache_commands.add_parser(
        "warm",
        help="pre-fetch images into the cache",
        description="Fetch images into the cache before clients ask for them (e.g. before a"
        " CI fleet rolls out): the manifest, every platform of an index, and every blob, as"
        " a pull through the cache would. IMAGE is <upstream>/<path>[:tag|@digest], the"
        " upstream given by its name or host (docker.io/library/alpine:3.20); without one,"
        " default_upstream. Exits 1 if any image failed.",
    )
    warm.add_argument("images", nargs="+", metavar="IMAGE")
    warm.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="of an index, fetch only these platforms (repeatable; default: all)",
    )
    for sub in (ls, warm):
        sub.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
        sub.add_argument("--data-dir", help="the data directory (default ./data)")
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
    from regproxy.logs import configure_logging

    # With several workers, each line says which process wrote it.
    configure_logging(config.log_level, config.log_format, with_pid=config.workers > 1)


def serve(config: Config) -> int:
    _configure_logging(config)
    if config.workers > 1:
        return _supervise(config)
    return _serve_one(config)


def _serve_one(
    config: Config, *, reuse_port: bool = False, ready: Callable[[], None] | None = None
) -> int:
    import asyncio

    from regproxy.api.middleware import AccessLogger
    from regproxy.logs import flush as flush_logs
    from regproxy.preflight import StartupError
    from regproxy.server import run

    try:
        asyncio.run(
            run(
                config,
                reuse_port=reuse_port,
                ready=ready,
                access_log_class=AccessLogger,
                access_log=logging.getLogger("regproxy.access"),
                read_bufsize=READ_BUFSIZE,
                max_line_size=MAX_LINE_SIZE,
            )
        )
    except ConfigError as exc:  # found at start-up, e.g. an S3 bucket that does not exist
        return _cannot_start(config, f"configuration error: {exc}")
    except StartupError as exc:  # a port in use, a data directory it cannot use
        return _cannot_start(config, str(exc))
    finally:
        flush_logs()  # a worker ends with os._exit: no atexit flushes its last lines
    return 0


def _supervise(config: Config) -> int:
    import asyncio

    from regproxy.app import prepare
    from regproxy.preflight import StartupError, check_data_dirs
    from regproxy.server import supervise

    try:
        check_data_dirs(config)
        asyncio.run(prepare(config))
    except ConfigError as exc:
        return _cannot_start(config, f"configuration error: {exc}")
    except StartupError as exc:
        return _cannot_start(config, str(exc))
    return supervise(config, serve_worker)


def serve_worker(config: Config, slot: int, ready: Connection) -> None:
    """One of the processes of ``serve --workers N`` (the supervisor spawns it)."""
    from regproxy.server import die_with_parent

    die_with_parent()
    _configure_logging(config)

    def bound() -> None:
        ready.send(slot)
        ready.close()

    sys.exit(_serve_one(config, reuse_port=True, ready=bound))


def _cannot_start(config: Config, message: str) -> int:
    """One line on stderr (a JSON object with log_format = "json"), exit status 2."""
    from regproxy.logs import flush as flush_logs

    flush_logs()  # the lines logged before it, first
    if config.log_format == "json":
        logging.getLogger("regproxy").error("%s", message)
    else:
        print(f"regproxy: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            env=os.environ,
            overrides={
                "listen": getattr(args, "listen", None),
                "data_dir": args.data_dir,
                "workers": getattr(args, "workers", None),
            },
        )
    except ConfigError as exc:
        print(f"regproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "cache":
        from regproxy import cache_cli

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        if args.cache_command == "ls":
            return cache_cli.run_ls(config, args.upstream)
        return cache_cli.run_warm(config, args.images, args.platform)
    if args.command == "user" and args.action == "list":
        from regproxy.auth.admin import list_users

        return list_users(config, file=args.file)
    if args.command == "user" and not args.name:
        print(f"regproxy: user {args.action} needs a NAME", file=sys.stderr)
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
