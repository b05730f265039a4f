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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"regproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the registry")
    serve.add_argument("--config", help="TOML configuration file (or REGPROXY_CONFIG)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--data-dir", help="where blobs and metadata live (default ./data)")
    return parser


def _configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def serve(config: Config) -> int:
    from aiohttp import web

    from regproxy.api.middleware import AccessLogger
    from regproxy.app import create_app

    _configure_logging(config)
    logging.getLogger("regproxy").info(
        "regproxy %s listening on %s, data in %s", __version__, config.listen, config.data_dir
    )
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        shutdown_timeout=config.shutdown_timeout,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("regproxy.access"),
        print=None,
        read_bufsize=READ_BUFSIZE,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            env=os.environ,
            overrides={"listen": args.listen, "data_dir": args.data_dir},
        )
    except ConfigError as exc:
        print(f"regproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    return serve(config)
