"""The ``moorage`` command: ``serve``, ``check-config`` and ``--version``.

A user mistake (a bad config file, an unreadable password file, a port in use) is one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aiohttp import web

from moorage.config import CONFIG_ENV, ConfigError, Settings, load_settings

from ._app import build_app
from ._logging import configure_logging

__all__ = ["main"]

EXIT_USAGE = 2
log = logging.getLogger("moorage")


def _version() -> str:
    try:
        return version("moorage")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moorage",
        description="A pull-through cache for container registries.",
        epilog="Example: moorage serve --config /etc/moorage/config.yaml",
    )
    parser.add_argument("--version", action="version", version=f"moorage {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the cache",
        description="Run the cache. With no config file it mirrors Docker Hub and other public registries "
        "on 0.0.0.0:5000 with the store in ./moorage-data.",
        epilog=f"Examples: moorage serve | moorage serve --config config.yaml | {CONFIG_ENV}=config.yaml moorage serve",
    )
    serve.add_argument("--config", type=Path, help=f"YAML settings file (default: ${CONFIG_ENV}, else none)")
    check = commands.add_parser(
        "check-config",
        help="validate a settings file without serving",
        epilog="Example: moorage check-config config.yaml",
    )
    check.add_argument("file", type=Path)
    return parser


def _settings(path: Path | None) -> Settings:
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    return load_settings(path, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            settings = load_settings(args.file, os.environ)
            print(f"{args.file}: ok ({len(settings.upstreams)} upstreams, store in {settings.storage.path})")
            return 0
        settings = _settings(args.config)
    except ConfigError as error:
        print(f"moorage: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level)
    try:
        return _serve(settings)
    except ConfigError as error:
        print(f"moorage: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"moorage: cannot listen on {settings.listen}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE


def _serve(settings: Settings) -> int:
    log.info(
        "starting",
        extra={
            "event": "starting",
            "version": _version(),
            "listen": settings.listen,
            "store": str(settings.storage.path),
            "upstreams": [u.host for u in settings.upstreams],
        },
    )
    web.run_app(
        build_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        access_log=None,  # access_middleware writes the access log
        handler_cancellation=False,  # a client that leaves ends its handler at the next write
        shutdown_timeout=settings.shutdown_timeout,
        print=lambda message: log.info("listening", extra={"event": "listening", "listen": settings.listen}),
    )
    return 0
