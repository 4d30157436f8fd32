"""The ``tokenchat`` command: serve, migrate, token, dev, chat."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from .auth import ROLES, TOKEN_TTL_DEFAULT_S, issue_token
from .config import Settings
from .logs import LOG_FORMATS, LogFormat, log_format_from_env
from .logs import configure as configure_logs

log = logging.getLogger("tokenchat")

# Where other tokenchat packages register commands of their own (`chat`).
COMMANDS_ENTRY_POINT_GROUP = "tokenchat.commands"
DEV_DATA_DIR = Path(".tokenchat")
DEV_MODEL = "demo_model"
DEV_FAN = "demo_fan"
# The admin `tokenchat dev` prints a token for, for the admin page: printed in
# the terminal, never handed out by a web page (POST /v1/dev/token refuses it).
DEV_ADMIN = "dev_admin"
DEV_TOKEN_TTL_S = 7 * 24 * 3600  # a week: demo tokens survive a few restarts
DEV_FAN_TOKENS = 1000  # granted once to the demo fan
DEV_MODEL_DM_PRICE = 5  # tokens per private message to the demo model
# The demo model's tip menu (label, price in tokens), saved while she has none.
DEV_MODEL_MENU = (("Say my name", 10), ("Dance", 50), ("Song request", 100))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenchat", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TOKENCHAT_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text lines or JSON lines (default: TOKENCHAT_LOG_FORMAT, else text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway and HTTP API")
    _listen_args(serve)
    serve.add_argument("--workers", type=int, default=None, help="processes sharing the ports")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow dev mode and the fake payment provider (TOKENCHAT_INSECURE=1)",
    )

    sub.add_parser("migrate", help="apply database migrations")
    ledger = sub.add_parser("ledger", help="run the ledger writer and the DM archiver alone")
    ledger.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve its Prometheus metrics (ledger lag, entries written) here; 0: off "
        "(default: TOKENCHAT_METRICS_PORT)",
    )
    reconcile = sub.add_parser("reconcile", help="compare Redis with the Postgres ledger")
    reconcile.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the outbox to drain"
    )

    token = sub.add_parser("token", help="print a signed session token")
    token.add_argument("sub", help="user id")
    token.add_argument("--role", choices=ROLES, default="fan")
    token.add_argument(
        "--ttl",
        type=int,
        default=TOKEN_TTL_DEFAULT_S,
        help="lifetime in seconds, at most TOKENCHAT_TOKEN_TTL_MAX_S",
    )

    dev = sub.add_parser("dev", help="run everything locally, embedded servers included")
    _listen_args(dev)
    dev.add_argument("--data-dir", type=Path, default=DEV_DATA_DIR)

    # Commands that other tokenchat packages add (the terminal client's `chat`):
    # each parses its own arguments, and is imported only when it is the one run.
    added = _added_commands()
    for name, entry_point in sorted(added.items()):
        sub.add_parser(
            name,
            add_help=False,
            help=f"from {entry_point.module} (tokenchat {name} -h for its options)",
        )

    args, rest = parser.parse_known_args(argv)
    if args.command not in added and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        log_format: LogFormat = args.log_format or log_format_from_env()
    except ValueError as exc:
        parser.error(str(exc))
    configure_logs(args.log_level, log_format)
    args.log_format = log_format  # what serve's workers use too
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "migrate":
            return _migrate(Settings.from_env())
        if args.command == "ledger":
            settings = Settings.from_env()
            metrics_port = settings.metrics_port if args.metrics_port is None else args.metrics_port
            return _ledger(settings, metrics_port)
        if args.command == "reconcile":
            return _reconcile(Settings.from_env(), args.timeout)
        if args.command == "token":
            return _token(args)
        if args.command == "dev":
            return _dev(args)
        if args.command in added:
            command: Callable[[list[str]], int] = added[args.command].load()
            return command(rest)
    except ValueError as exc:
        print(f"tokenchat: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C (or, in dev, SIGTERM) before serving started: cleaned up already.
        return 130
    raise AssertionError(args.command)


def _added_commands() -> dict[str, EntryPoint]:
    """The commands registered in the ``tokenchat.commands`` entry-point group.

    The terminal client registers ``chat`` there (pyproject.toml), so the server
    names no client code: the dependency points from the client to the server's
    command line, never back.
    """
    return {ep.name: ep for ep in entry_points(group=COMMANDS_ENTRY_POINT_GROUP)}


def _listen_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None)
    parser.add_argument("--http-port", type=int, default=None)
    parser.add_argument("--ws-port", type=int, default=None)
    parser.add_argument(
        "--one-port",
        action="store_const",
        const=1,
        default=None,
        help="serve the WebSocket at /ws on the HTTP port, no WebSocket port "
        "(TOKENCHAT_ONE_PORT=1; also when --ws-port equals --http-port)",
    )


def _settings_from(args: argparse.Namespace, **extra: object) -> Settings:
    overrides: dict[str, object] = dict(extra)
    for name in ("host", "http_port", "ws_port", "one_port", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings.from_env(**overrides)


def _serve(args: argparse.Namespace) -> int:
    from .app import serve_workers

    settings = _settings_from(args, **({"insecure": 1} if args.insecure else {}))
    if not settings.jwt_secret:
        raise ValueError(
            "set TOKENCHAT_JWT_SECRET (tokens signed with a known secret are forgeable)"
        )
    reasons = settings.insecure_reasons()
    if reasons and not settings.insecure:
        raise ValueError(
            "refusing to serve: "
            + "; ".join(reasons)
            + ". These are for development only; set TOKENCHAT_INSECURE=1 (or pass "
            "--insecure) if this server will never see real users or money"
        )
    return serve_workers(settings, args.log_level.upper(), args.log_format)


def _migrate(settings: Settings) -> int:
    from .db import migrate

    applied = asyncio.run(migrate(settings.database_url, settings.database_schema))
    print(f"applied migrations: {applied}" if applied else "database is up to date")
    return 0


def _ledger(settings: Settings, metrics_port: int) -> int:
    """The ledger writer and the DM archiver as their own process (`serve`
    runs both too unless TOKENCHAT_LEDGER_ENABLED=0); several may run at once
    (consumer groups share the outbox and the DM archive stream)."""
    from .app import run
    from .ledger.standalone import LedgerStack

    if metrics_port:
        # The writer has no HTTP API of its own; the metrics server (a thread)
        # answers scrapes without touching the event loop.
        from .metrics import serve_on_port

        serve_on_port(settings.host, metrics_port)

    async def write_until_signalled() -> None:
        ledger = await LedgerStack.connect(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loops = [
            asyncio.create_task(ledger.writer.run(), name="ledger-writer"),
            asyncio.create_task(ledger.dm_archive.run(), name="dm-archive"),
        ]
        log.info("ledger writer and DM archiver %s running", ledger.writer.consumer)
        try:
            await stop.wait()
        finally:
            for loop_task in loops:
                loop_task.cancel()
            for loop_task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
            await ledger.close()

    run(write_until_signalled)
    return 0


def _reconcile(settings: Settings, timeout_s: float) -> int:
    """Exit 0 when Redis and Postgres agree, 1 with the mismatches otherwise."""
    import json

    from .ledger.standalone import LedgerStack
    from .ledger.writer import reconcile

    async def check() -> dict[str, object]:
        ledger = await LedgerStack.connect(settings)
        try:
            return await reconcile(
                ledger.redis,
                ledger.pool,
                ledger.keys,
                ledger.writer,
                timeout_s,
                settings.relay_lag_max_s,
            )
        finally:
            await ledger.close()

    result = asyncio.run(check())
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get("TOKENCHAT_JWT_SECRET") or _dev_secret(DEV_DATA_DIR, create=False)
    if not secret:
        raise ValueError("set TOKENCHAT_JWT_SECRET (or run `tokenchat dev` once in this folder)")
    # The server refuses a token that outlives its cap; so does its issuer.
    ttl_max_s = Settings.from_env(jwt_secret=secret).token_ttl_max_s
    print(issue_token(secret, args.sub, args.role, args.ttl, ttl_max_s=ttl_max_s))
    return 0


def _dev_secret(data_dir: Path, *, create: bool) -> str:
    path = data_dir / "jwt_secret"
    if path.exists():
        return path.read_text().strip()
    if not create:
        return ""
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    # Created 0600 (O_EXCL: never an existing file or a planted symlink), so
    # the secret is never readable by others, not even between write and chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _dev(args: argparse.Namespace) -> int:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # While starting, SIGTERM (kill, systemd, docker stop) unwinds like Ctrl-C,
    # so the embedded servers started so far are stopped rather than orphaned
    # (they run in their own sessions). While serving, the event loop's
    # handlers take over (serve_until_signalled).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _dev_run(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _dev_run(args: argparse.Namespace) -> int:
    from .app import run, serve_until_signalled

    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if not os.environ.get("TOKENCHAT_REDIS_URL") or not os.environ.get(
            "TOKENCHAT_DATABASE_URL"
        ):
            from .devstack import embedded

            available, hint = embedded.binaries_available()
            if not available:
                raise ValueError(hint)
        if not os.environ.get("TOKENCHAT_REDIS_URL"):
            # Each server makes its own subfolder (redis/, postgres/).
            # With an append-only file: a restart of `tokenchat dev` keeps balances.
            redis_server = stack.enter_context(embedded.EmbeddedRedis(data_dir, appendonly=True))
            env["redis_url"] = redis_server.url
        if not os.environ.get("TOKENCHAT_DATABASE_URL"):
            postgres = stack.enter_context(embedded.EmbeddedPostgres(data_dir))
            env["database_url"] = postgres.url
        # Registered last, so it runs first on the way out: a second Ctrl-C
        # must not cut short stopping the servers (each stop is bounded).
        stack.callback(_ignore_stop_signals)
        secret = os.environ.get("TOKENCHAT_JWT_SECRET") or _dev_secret(data_dir, create=True)
        # Dev only: the fake payment provider approves every purchase.
        env.setdefault("payment_provider", os.environ.get("TOKENCHAT_PAYMENT_PROVIDER", "fake"))
        # Dev mode and fake payments are what `serve` refuses without insecure.
        # Uploaded media stays with the rest of the demo's data.
        if not os.environ.get("TOKENCHAT_MEDIA_DIR"):
            env["media_dir"] = str(data_dir / "media")
        settings = _settings_from(args, jwt_secret=secret, dev_mode=1, insecure=1, **env)
        _migrate(settings)
        ttl_s = min(DEV_TOKEN_TTL_S, settings.token_ttl_max_s)
        tokens = {
            DEV_MODEL: issue_token(secret, DEV_MODEL, "model", ttl_s, ttl_max_s=ttl_s),
            DEV_FAN: issue_token(secret, DEV_FAN, "fan", ttl_s, ttl_max_s=ttl_s),
        }
        admin_token = issue_token(secret, DEV_ADMIN, "admin", ttl_s, ttl_max_s=ttl_s)

        def announce(process: object) -> None:
            from .app import Process

            assert isinstance(process, Process)
            host = settings.host
            print(
                "\ntokenchat dev is running (Ctrl-C stops it and everything it started)\n"
                f"  WebSocket  ws://{host}:{process.ws_port}/ws\n"
                f"  Demo page  http://{host}:{process.http_port}/  (open it in a browser)\n"
                f"  Redis      {settings.redis_url}\n"
                f"  Postgres   {settings.database_url}\n"
                f"  demo model {DEV_MODEL}: {tokens[DEV_MODEL]}\n"
                f"  demo fan   {DEV_FAN}: {tokens[DEV_FAN]}\n"
                f"  Admin page http://{host}:{process.http_port}/admin  (paste the token below)\n"
                f"  dev admin  {DEV_ADMIN}: {admin_token}\n",
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
    from .economy.economy import DEV_INITIATOR, MenuItem
    from .gateway.node import Node

    # The seed runs before serving, with no ledger writer yet to confirm its
    # credit: it is acknowledged by Redis, and the server's writer records it.
    node = await Node.connect(settings.replace(durability="redis"))
    try:
        for token in tokens.values():
            identity = verify_token(settings.jwt_secret, token, ttl_max_s=settings.token_ttl_max_s)
            await node.directory.touch_user(identity)
        # Something to spend and something to pay for; idempotent keys, so a
        # restart of `tokenchat dev` does not grant the tokens again.
        await node.economy.credit(
            DEV_FAN, DEV_FAN_TOKENS, initiator=DEV_INITIATOR, key="seed-demo-fan"
        )
        if await node.directory.room(DEV_MODEL) is not None:
            await node.economy.set_prices(DEV_MODEL, dm=DEV_MODEL_DM_PRICE, tip_min=None)
            # Only while she has none: a restart keeps the menu she edited.
            if not await node.economy.menu(DEV_MODEL):
                await node.economy.set_menu(
                    DEV_MODEL, [MenuItem(None, label, price) for label, price in DEV_MODEL_MENU]
                )
    finally:
        await node.close()


if __name__ == "__main__":
    sys.exit(main())
