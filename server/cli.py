"""The ``tokenchat`` command: serve, migrate, token, dev."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from .auth import ROLES, TOKEN_TTL_DEFAULT_S, issue_token
from .config import Settings

log = logging.getLogger("tokenchat")

DEV_DATA_DIR = Path(".tokenchat")
DEV_MODEL = "demo_model"
DEV_FAN = "demo_fan"
DEV_TOKEN_TTL_S = 7 * 24 * 3600  # a week: demo tokens survive a few restarts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenchat", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TOKENCHAT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway and HTTP API")
    _listen_args(serve)
    serve.add_argument("--workers", type=int, default=None, help="processes sharing the ports")

    sub.add_parser("migrate", help="apply database migrations")

    token = sub.add_parser("token", help="print a signed session token")
    token.add_argument("sub", help="user id")
    token.add_argument("--role", choices=ROLES, default="fan")
    token.add_argument("--ttl", type=int, default=TOKEN_TTL_DEFAULT_S, help="lifetime in seconds")

    dev = sub.add_parser("dev", help="run everything locally, embedded servers included")
    _listen_args(dev)
    dev.add_argument("--data-dir", type=Path, default=DEV_DATA_DIR)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "migrate":
            return _migrate(Settings.from_env())
        if args.command == "token":
            return _token(args)
        if args.command == "dev":
            return _dev(args)
    except ValueError as exc:
        print(f"tokenchat: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _listen_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None)
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--ws-port", type=int, default=None)


def _settings_from(args: argparse.Namespace, **extra: object) -> Settings:
    overrides: dict[str, object] = dict(extra)
    for name in ("host", "http_port", "ws_port", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings.from_env(**overrides)


def _serve(args: argparse.Namespace) -> int:
    from .app import serve_workers

    settings = _settings_from(args)
    if not settings.jwt_secret:
        raise ValueError(
            "set TOKENCHAT_JWT_SECRET (tokens signed with a known secret are forgeable)"
        )
    return serve_workers(settings, args.log_level.upper())


def _migrate(settings: Settings) -> int:
    from .db import migrate

    applied = asyncio.run(migrate(settings.database_url, settings.database_schema))
    print(f"applied migrations: {applied}" if applied else "database is up to date")
    return 0


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get("TOKENCHAT_JWT_SECRET") or _dev_secret(DEV_DATA_DIR, create=False)
    if not secret:
        raise ValueError("set TOKENCHAT_JWT_SECRET (or run `tokenchat dev` once in this folder)")
    print(issue_token(secret, args.sub, args.role, args.ttl))
    return 0


def _dev_secret(data_dir: Path, *, create: bool) -> str:
    path = data_dir / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    if not create:
        return ""
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def _dev(args: argparse.Namespace) -> int:
    from .app import run, serve_until_signalled

    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if not os.environ.get("TOKENCHAT_REDIS_URL") or not os.environ.get(
            "TOKENCHAT_DATABASE_URL"
        ):
            from . import embedded

            available, hint = embedded.binaries_available()
            if not available:
                raise ValueError(hint)
        if not os.environ.get("TOKENCHAT_REDIS_URL"):
            redis_server = stack.enter_context(embedded.EmbeddedRedis(data_dir / "redis"))
            env["redis_url"] = redis_server.url
        if not os.environ.get("TOKENCHAT_DATABASE_URL"):
            postgres = stack.enter_context(embedded.EmbeddedPostgres(data_dir / "postgres"))
            env["database_url"] = postgres.url
        secret = os.environ.get("TOKENCHAT_JWT_SECRET") or _dev_secret(data_dir, create=True)
        settings = _settings_from(args, jwt_secret=secret, **env)
        _migrate(settings)
        tokens = {
            DEV_MODEL: issue_token(secret, DEV_MODEL, "model", DEV_TOKEN_TTL_S),
            DEV_FAN: issue_token(secret, DEV_FAN, "fan", DEV_TOKEN_TTL_S),
        }

        def announce(process: object) -> None:
            from .app import Process

            assert isinstance(process, Process)
            host = settings.host
            print(
                "\ntokenchat dev is running (Ctrl-C stops it and everything it started)\n"
                f"  WebSocket  ws://{host}:{process.ws_port}/ws\n"
                f"  HTTP       http://{host}:{process.http_port}/  (/healthz /readyz /v1/me)\n"
                f"  Redis      {settings.redis_url}\n"
                f"  Postgres   {settings.database_url}\n"
                f"  demo model {DEV_MODEL}: {tokens[DEV_MODEL]}\n"
                f"  demo fan   {DEV_FAN}: {tokens[DEV_FAN]}\n",
                flush=True,
            )

        async def serve_seeded() -> None:
            await _seed(settings, tokens)
            await serve_until_signalled(settings, on_ready=announce)

        run(serve_seeded)
    return 0


async def _seed(settings: Settings, tokens: dict[str, str]) -> None:
    """Create the demo users (and so the demo model's room)."""
    from .auth import verify_token
    from .node import Node

    node = await Node.connect(settings)
    try:
        for token in tokens.values():
            await node.directory.touch_user(verify_token(settings.jwt_secret, token))
    finally:
        await node.close()


if __name__ == "__main__":
    sys.exit(main())
