"""Locust scenarios for tokenchat: fans and models over WebSocket.

Fans join a model's room, chat (``say``), tip, tip items of the room's tip
menu, send paid DMs, unlock the model's locked photo, offer custom requests
and cancel them (a hold into escrow, then its refund), buy tickets to their
room's ticket show (staying off its chat without one), ask the model for a
private show and end it at their next turn (metered by the minute, or
withdrawn if she has not accepted it), check their balance and now and then
move to another room, and read their room's leaderboard (``GET
/v1/rooms/{id}/leaderboard``, a window at random); they also read their
newest transactions and one receipt (``GET /v1/me/transactions``, ``GET
/v1/me/transactions/{tx}``), browse the discovery grid (``GET /v1/rooms``
with a sort and now and then a tag), follow or unfollow their room's model
and read their notifications. Models host a room: they
stay joined (reconnecting
within a second or so if the session is lost), read its events, thank
tippers, now and then show their locked photo (``post_media``), accept and
deliver a custom request offered to them (a release from escrow), run ticket
shows (schedule over HTTP, start, end paid or now and then cancel: refunds),
set tip goals (``PUT /v1/me/goal``: half all-or-nothing, some with a deadline
that passes during a run) and now and then delete them (held tips refunded),
accept the newest private show asked of them or end the one they run, and
change their prices with ``PUT /v1/me/prices`` and their profile with
``PUT /v1/me/profile``. Each model's menu is saved and
her photo uploaded once at test start (``PUT /v1/me/menu``,
``POST /v1/media``). A menu tip (``tip item``) reads ``GET
/v1/users/{id}/menu`` (reused 30 s), then sends ``tip`` with ``item`` and
``max_price`` the price read. A fan's first ``unlock`` of a photo pays
``MEDIA_PRICE``, the later ones are answered ``already`` (counted in the
``tokenchat counters`` line) and charge nothing. Every WebSocket command is
reported to locust's
statistics as a request (type ``WS``, named after the command), so the console
table, the ``--csv`` files and the ``--html`` report show its rate, latency
percentiles and failures:

- an ``ok`` reply is a success; an ``error`` reply is a failure whose text is
  its code (``ServerError('NOT_IN_ROOM')``, ``ServerError('UNAVAILABLE')``);
- ``INSUFFICIENT_FUNDS`` is expected (fans run out of tokens): it is counted as
  a success under its own name, ``tip (insufficient)`` / ``dm (insufficient)``;
  so is ``SPEND_LIMIT`` (``tip (spend limit)``): now and then a fan reads her
  spending limits (``GET /v1/me/limits``) or sets a daily one (``PUT``), and a
  low one refuses her later spends;
- no reply within ``--tc-reply-timeout`` seconds (5) is a failure
  (``ReplyTimeout``). ``tip`` and ``dm`` are then sent again with the same
  idempotency ``key``: on the same session first (the first reply to either
  send answers), then on a new session (``hello``, ``join`` with ``since``),
  ``--tc-attempts`` (3) sends in all, reported as ``tip (retry)`` /
  ``dm (retry)``. ``UNAVAILABLE`` is retried the same way after a short
  backoff. A retry whose original was applied gets the original reply back
  (``"duplicate": true``), so nothing is charged twice;
- a connection closed by the server or the network is a failure under
  ``disconnect``, by close code (``close 4008``: too slow, ``close 1012``:
  server restarting, ...). The user reconnects at its next task: ``connect``,
  ``hello``, ``join (since)``, and a ``history`` row per further page of
  what it missed while its join reply says ``more``.

Models also report each ``tip``, ``message`` and ``dm`` event they receive, as
type ``WS recv`` (``recv tip``, ...): its "response time" is the delivery
latency, from the event's ``ts`` (when Redis stored it; same machine, same
clock) to its arrival. A DM delivered twice, or a room event at or before the
newest offset already received, is a failure in these rows
(``DeliveryError``): DESIGN.md section 5, invariant 5. DMs stored before the
model's session opened (replayed from the inbox at ``hello``) are counted, not
timed. ``WS recv`` rows count deliveries, not requests: leave them out when
reading the request rate of the ``Aggregated`` row. HTTP calls (the fans'
funding and top-ups through ``POST /v1/admin/credits``, the models' price
changes) have rows of their own. At the end, a ``tokenchat counters`` log line
gives what the table does not: events received by type, reconnects, retries
answered ``duplicate``, late replies, slow deliveries (the first few are logged
as warnings).

Set-up. Tokens are minted here with ``tokenchat.server.auth.issue_token`` from
``TOKENCHAT_JWT_SECRET`` (or ``.tokenchat/jwt_secret``, which ``tokenchat dev``
writes), so locust needs the server's secret. At test start the ``--tc-models``
(20) rooms are created: a model's first ``PUT /v1/me/prices`` creates the
model, and so her room. Each fan is funded once when it starts, through the
admin endpoint, with an idempotency key of its own. Fans get random budgets
(1/16, 1/4 or all of ``--tc-fund``, 400 tokens), so small budgets run dry
during a run; a fan refused ``INSUFFICIENT_FUNDS`` buys more half the time (an
admin credit with a new key). User ids are ``<prefix>_model<i>`` for models and
``<prefix>_<run tag>_fan<n>`` for fans, the run tag being random per locust
process, so runs against the same server never share fans or keys.

Run it from the repository root, with the ``load`` extra installed
(``pip install -e '.[load]'``). First a server, on a Redis key prefix and a
Postgres schema of its own::

    export TOKENCHAT_JWT_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    export TOKENCHAT_REDIS_PREFIX=locust: TOKENCHAT_DATABASE_SCHEMA=locust
    tokenchat migrate
    TOKENCHAT_COMMANDS_PER_S=100 TOKENCHAT_COMMANDS_BURST=200 tokenchat serve &

(A fan sends under one command per second, so the default limits, 20/s with a
burst of 40, are never reached; raised limits only matter when
``--tc-wait-max`` is near 0. ``tokenchat dev`` also works: locust then finds
its secret in ``.tokenchat/jwt_secret``.) Then, in the same shell::

    locust -f loadtests/locustfile.py --headless -u 500 -r 100 -t 60s \\
        --host http://127.0.0.1:8000 --csv /tmp/locust --html /tmp/locust.html

The WebSocket URL is ``--tc-ws-url`` (env ``TOKENCHAT_WS_URL``), else
``ws://<host of --host>:<--tc-ws-port>/ws``, ``--tc-ws-port`` defaulting to
``TOKENCHAT_WS_PORT`` or 8001. ``-u`` counts models and fans together: locust
starts the ``--tc-models`` models first. Only loopback hosts are accepted
unless ``--tc-allow-remote`` is given. The other ``--tc-*`` options:
``locust -f loadtests/locustfile.py --help``.

Reading the numbers: locust starts ``-r`` users at once, every second, and each
new fan is funded, connects, says ``hello`` and joins at once; the ``fund``,
``connect``, ``hello`` and ``join`` rows therefore measure bursts of ``-r``
onboardings, and the ramp-up weighs on every row's tail. ``--reset-stats``
drops what was measured until the last user was started. In distributed mode
(``--processes``), each process runs its share of the models, numbering them
from 0, so a room may get two hosts and another none; fans are unaffected.

Afterwards, stop the server and remove its state::

    redis-cli --scan --pattern 'locust:*' | xargs -r redis-cli del
    psql -h 127.0.0.1 -U postgres -c 'DROP SCHEMA locust CASCADE'
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import gevent
import orjson
import requests
import websocket
from gevent.event import AsyncResult
from locust import HttpUser, events, task
from locust.env import Environment
from locust.event import EventHook

from tokenchat.protocol import JSON_SUBPROTOCOL, ErrorCode
from tokenchat.server.auth import issue_token

log = logging.getLogger("tokenchat.locust")

# --- the scenario's mix ------------------------------------------------------------
DM_PRICE_MAX = 10  # tokens; models price DMs 1..this, fans accept up to this
# Custom requests offered, then cancelled (a hold, then an escrow_refund):
# small amounts, so a fan's budget is not tied up by the one in flight.
REQUEST_AMOUNTS = (5, 20, 50)  # tokens
# Ticket shows: prices models ask (tokens), and the minimum length (seconds):
# short, so that a show ends paid within the few seconds a run lasts.
SHOW_PRICES = (5, 10, 20)
SHOW_MIN_S = 1
# Tip goals: targets models set (tokens), reached within a run by a room's
# tips now and then; half are all-or-nothing, and some of those have a
# deadline short enough to pass during a run (refunding every held tip).
GOAL_TARGETS = (20, 50, 150)
GOAL_DEADLINE_S = 15
TIP_MIN_MAX = 3  # tokens; models set tip_min 1..this; every tip is at least this
# Private shows: a low rate, so a show a fan forgets to end costs little of
# a budget; a short minimum, so most ends fall after it (metered) and some
# before (a forfeit or a refund).
PRIVATE_RATE = 6  # tokens a minute
PRIVATE_MIN_S = 10  # seconds
TIP_AMOUNTS = (3, 5, 10, 25, 100)  # tokens
TIP_WEIGHTS = (40, 30, 18, 9, 3)
TOPUP_CHANCE = 0.5  # a fan refused INSUFFICIENT_FUNDS buys more this often
CHAT_LINES = (
    "hi!",
    "hello everyone",
    "love this stream",
    "how is everyone doing tonight?",
    "lol",
    "that was amazing",
    "can you say hi to me?",
    "greetings from the load test",
)
TIP_TEXTS = ("", "", "for you", "great show", "keep going!")
MEDIA_PRICE = 5  # tokens; every model's locked photo costs this to unlock
THANKS = ("thank you {}!", "{} you're the best", "welcome {}")
# Each model's tip menu, saved at test start (PUT /v1/me/menu): fans tip an
# item at its shown price (max_price). Prices within the tip amounts above.
MENU = (("Say my name", 5), ("Dance", 25), ("Song request", 10), ("Wave", 3))
# How long a fan reuses a room's menu before reading it again, as a page
# that stays open does; PRICE_CHANGED or NOT_FOUND read it at once.
MENU_REUSE_S = 30.0

# --- bounds -------------------------------------------------------------------------
CONNECT_TIMEOUT_S = 10.0  # TCP + WebSocket handshake
HTTP_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 1.0  # for the server's close frame after ours
RETRY_BACKOFF_S = 0.2  # before resending after UNAVAILABLE, doubled per attempt
# `history` pages one re-join reads at most (while its reply says `more`): a
# room's whole history is 100 pages (docs/protocol.md, "Paging history").
HISTORY_PAGES_MAX = 100
SETUP_ATTEMPTS = 3  # room creation at test start, per model
# A delivery slower than this is counted, and the first few are logged.
SLOW_DELIVERY_MS = 1000.0
SLOW_DELIVERIES_LOGGED = 5
TOKEN_TTL_S = 24 * 3600

REPLY_TYPES = frozenset({"ok", "error", "welcome"})
ROOM_EVENTS = frozenset({"message", "tip", "media"})
SHOW_OPEN = frozenset({"scheduled", "running"})
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


Listener = TypeVar("Listener", bound=Callable[..., None])


def listen(hook: EventHook) -> Callable[[Listener], Listener]:
    """``hook.add_listener`` as a typed decorator (locust's EventHook is untyped)."""

    def register(listener: Listener) -> Listener:
        cast(Callable[[Listener], object], hook.add_listener)(listener)
        return listener

    return register


def fire_request(
    environment: Environment,
    request_type: str,
    name: str,
    response_time_ms: float,
    response_length: int,
    exception: Exception | None,
) -> None:
    """One entry in locust's statistics (``events.request``)."""
    fire = cast(Callable[..., None], environment.events.request.fire)
    fire(
        request_type=request_type,
        name=name,
        response_time=response_time_ms,
        response_length=response_length,
        exception=exception,
        context={},
    )


# ==================================================================================
# Configuration
# ==================================================================================


@listen(events.init_command_line_parser)
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--tc-ws-url",
        env_var="TOKENCHAT_WS_URL",
        default="",
        help="tokenchat WebSocket URL (default: ws://<--host's host>:<--tc-ws-port>/ws)",
    )
    parser.add_argument(
        "--tc-ws-port",
        env_var="TOKENCHAT_WS_PORT",
        type=int,
        default=8001,
        help="WebSocket port used when --tc-ws-url is not given",
    )
    parser.add_argument(
        "--tc-models", env_var="LOCUST_TC_MODELS", type=int, default=20, help="rooms (models)"
    )
    parser.add_argument(
        "--tc-fund",
        env_var="LOCUST_TC_FUND",
        type=int,
        default=400,
        help="tokens granted to the richest fans at start (others get 1/4 or 1/16)",
    )
    parser.add_argument(
        "--tc-reply-timeout",
        env_var="LOCUST_TC_REPLY_TIMEOUT",
        type=float,
        default=5.0,
        help="seconds to wait for a reply before counting a timeout (and retrying a spend)",
    )
    parser.add_argument(
        "--tc-attempts",
        env_var="LOCUST_TC_ATTEMPTS",
        type=int,
        default=3,
        help="attempts per tip or dm (the first plus retries with the same key)",
    )
    parser.add_argument(
        "--tc-wait-min",
        env_var="LOCUST_TC_WAIT_MIN",
        type=float,
        default=1.0,
        help="a fan's least think time between commands, seconds",
    )
    parser.add_argument(
        "--tc-wait-max",
        env_var="LOCUST_TC_WAIT_MAX",
        type=float,
        default=5.0,
        help="a fan's longest think time between commands, seconds",
    )
    parser.add_argument(
        "--tc-prefix", env_var="LOCUST_TC_PREFIX", default="lt", help="user id prefix"
    )
    parser.add_argument(
        "--tc-allow-remote",
        action="store_true",
        default=False,
        help="allow a server that is not on a loopback address",
    )


@dataclass(frozen=True)
class Config:
    http_url: str
    ws_url: str
    secret: str
    models: int
    fund: int
    reply_timeout_s: float
    attempts: int
    wait_min_s: float
    wait_max_s: float
    prefix: str
    run_tag: str  # random per locust process: fan ids and keys never repeat
    admin_token: str

    def model_id(self, index: int) -> str:
        return f"{self.prefix}_model{index:03d}"

    def model_token(self, index: int) -> str:
        return issue_token(self.secret, self.model_id(index), "model", TOKEN_TTL_S)


_config: Config | None = None


def config() -> Config:
    if _config is None:
        raise RuntimeError("the locustfile's init listener has not run")
    return _config


def _jwt_secret() -> str:
    secret = os.environ.get("TOKENCHAT_JWT_SECRET", "")
    if secret:
        return secret
    dev_secret = Path(".tokenchat") / "jwt_secret"  # written by `tokenchat dev`
    return dev_secret.read_text().strip() if dev_secret.exists() else ""


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


@listen(events.init)
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    global _config
    options = environment.parsed_options
    if options is None:  # used as a library, without locust's command line
        return
    http_url = (options.host or FanUser.host or "").rstrip("/")
    http_host = urlsplit(http_url).hostname or ""
    ws_url = options.tc_ws_url or f"ws://{http_host}:{options.tc_ws_port}/ws"
    ws_host = urlsplit(ws_url).hostname or ""
    problems = []
    secret = _jwt_secret()
    if not secret:
        problems.append("set TOKENCHAT_JWT_SECRET to the server's secret")
    if not options.tc_allow_remote:
        for url, host in ((http_url, http_host), (ws_url, ws_host)):
            if not _is_loopback(host):
                problems.append(f"{url} is not on a loopback address (see --tc-allow-remote)")
    if options.tc_models < 1 or options.tc_fund < 16 or options.tc_attempts < 1:
        problems.append("--tc-models and --tc-attempts must be >= 1, --tc-fund >= 16")
    if not 0 <= options.tc_wait_min <= options.tc_wait_max:
        problems.append("--tc-wait-min must be between 0 and --tc-wait-max")
    if problems:
        raise SystemExit("locustfile: " + "; ".join(problems))
    prefix = options.tc_prefix
    _config = Config(
        http_url=http_url,
        ws_url=ws_url,
        secret=secret,
        models=options.tc_models,
        fund=options.tc_fund,
        reply_timeout_s=options.tc_reply_timeout,
        attempts=options.tc_attempts,
        wait_min_s=options.tc_wait_min,
        wait_max_s=options.tc_wait_max,
        prefix=prefix,
        run_tag=secrets.token_hex(4),
        admin_token=issue_token(secret, f"{prefix}_admin", "admin", TOKEN_TTL_S),
    )
    ModelUser.fixed_count = options.tc_models
    log.info("tokenchat at %s and %s, %d rooms", http_url, ws_url, options.tc_models)


@listen(events.test_start)
def _create_rooms(environment: Environment, **_kwargs: Any) -> None:
    """Every model's room exists before the first fan joins: a model's first
    ``PUT /v1/me/prices`` creates the user, and so the room."""
    cfg = config()
    COUNTERS.clear()
    with requests.Session() as http:
        for index in range(cfg.models):
            for attempt in range(SETUP_ATTEMPTS):
                try:
                    response = http.put(
                        f"{cfg.http_url}/v1/me/prices",
                        json={
                            "dm": random.randint(1, DM_PRICE_MAX),
                            "tip_min": 1,
                            "private_rate": PRIVATE_RATE,
                            "private_min_s": PRIVATE_MIN_S,
                        },
                        headers={"Authorization": f"Bearer {cfg.model_token(index)}"},
                        timeout=HTTP_TIMEOUT_S,
                    )
                    response.raise_for_status()
                    _upload_media(http, cfg, index)
                    break
                except requests.RequestException as exc:
                    if attempt + 1 == SETUP_ATTEMPTS:
                        log.error("cannot create the room %s: %s", cfg.model_id(index), exc)
                        environment.process_exit_code = 2
                        if environment.runner is not None:
                            gevent.spawn(environment.runner.quit)
                        return
                    gevent.sleep(RETRY_BACKOFF_S * 2**attempt)


# Each model's locked photo (model id -> media id), uploaded at test start.
MEDIA: dict[str, str] = {}


def _photo() -> bytes:
    """A small PNG: the server sniffs and decodes what it is sent."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (random.randrange(256), 90, 160)).save(out, "PNG")
    return out.getvalue()


def _upload_media(http: requests.Session, cfg: Config, index: int) -> None:
    """The model's locked photo, for the fans' ``unlock`` task; a failure
    leaves her room without one (logged; that room's fans skip the task)."""
    model_id = cfg.model_id(index)
    try:
        response = http.post(
            f"{cfg.http_url}/v1/media",
            files={"file": ("photo.png", _photo(), "image/png")},
            data={"price": str(MEDIA_PRICE)},
            headers={"Authorization": f"Bearer {cfg.model_token(index)}"},
            timeout=HTTP_TIMEOUT_S,
        )
        response.raise_for_status()
        MEDIA[model_id] = response.json()["media"]["id"]
    except (requests.RequestException, ValueError, KeyError) as exc:
        log.warning("no locked photo for %s: %s", model_id, exc)


@listen(events.test_start)
def _create_menus(environment: Environment, **_kwargs: Any) -> None:
    """Every model has a tip menu (MENU) before the first fan tips an item."""
    cfg = config()
    items: list[dict[str, Any]] = [{"label": label, "price": price} for label, price in MENU]
    with requests.Session() as http:
        for index in range(cfg.models):
            for attempt in range(SETUP_ATTEMPTS):
                try:
                    response = http.put(
                        f"{cfg.http_url}/v1/me/menu",
                        json={"items": items},
                        headers={"Authorization": f"Bearer {cfg.model_token(index)}"},
                        timeout=HTTP_TIMEOUT_S,
                    )
                    response.raise_for_status()
                    break
                except requests.RequestException as exc:
                    if attempt + 1 == SETUP_ATTEMPTS:
                        # Menu tips then fail (NOT_FOUND); the rest of the run is fine.
                        log.error("cannot save the menu of %s: %s", cfg.model_id(index), exc)
                        break
                    gevent.sleep(RETRY_BACKOFF_S * 2**attempt)


# What happened that locust's request table does not show.
COUNTERS: Counter[str] = Counter()


@listen(events.test_stop)
def _report_counters(environment: Environment, **_kwargs: Any) -> None:
    if COUNTERS:
        log.info(
            "tokenchat counters: %s",
            ", ".join(f"{name}={count}" for name, count in sorted(COUNTERS.items())),
        )


# ==================================================================================
# A WebSocket session
# ==================================================================================


# Moderation by the models (`ModelUser.moderate`): what they do, and how long
# a mute or ban lasts (short, so a banned fan is back within the run).
MODERATION_ACTIONS = ("mute", "kick", "ban", "clear", "slow", "unmute")
MODERATION_SECONDS = 3
# A fan's `say` may meet a ticket show starting (FORBIDDEN), her own mute,
# a slow room or a ban, or a kick on its way (NOT_IN_ROOM): rows of their own.
SAY_EXPECTED = frozenset(
    {
        ErrorCode.FORBIDDEN,
        ErrorCode.MUTED,
        ErrorCode.SLOW_MODE,
        ErrorCode.BANNED,
        ErrorCode.NOT_IN_ROOM,
    }
)


class ReplyTimeout(Exception):
    pass


class ConnectionLost(Exception):
    pass


class DeliveryError(Exception):
    """An event delivered twice or out of order (DESIGN.md section 5, invariant 5)."""


class ServerError(Exception):
    """An ``error`` reply; its text is the code, so locust groups failures by code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Call:
    """A command sent one or more times (the same ``key``) on one session;
    the first reply to any of its ids answers it."""

    session: Session
    result: Any = field(default_factory=AsyncResult)
    ids: list[int] = field(default_factory=list)


class Session:
    """One WebSocket connection: a reader greenlet routes replies by ``re`` to
    the waiting call and hands events to ``on_event``."""

    def __init__(
        self,
        environment: Environment,
        url: str,
        on_event: Callable[[dict[str, Any]], None],
    ) -> None:
        self._environment = environment
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._closing = False
        self.closed = False
        self._ws = websocket.create_connection(
            url,
            timeout=CONNECT_TIMEOUT_S,
            subprotocols=[JSON_SUBPROTOCOL],
            enable_multithread=True,  # the reader answers pings while a task sends
            skip_utf8_validation=True,  # orjson validates what it parses
        )
        self._ws.settimeout(None)  # the reader waits for as long as it takes
        self._reader = gevent.spawn(self._read_loop)

    def send(self, command: dict[str, Any], call: Call | None = None) -> Call:
        if self.closed:
            raise ConnectionLost("connection closed")
        if call is None or call.session is not self:
            call = Call(self)
        command_id = next(self._ids)
        call.ids.append(command_id)
        self._calls[command_id] = call
        try:
            self._ws.send(orjson.dumps({**command, "id": command_id}))
        except (OSError, websocket.WebSocketException) as exc:
            self._fail(f"send failed: {exc}")
            raise ConnectionLost(f"send failed: {exc}") from exc
        return call

    def wait(self, call: Call, timeout_s: float) -> tuple[dict[str, Any], int]:
        """The reply and its size in bytes; ``ReplyTimeout`` or ``ConnectionLost``."""
        try:
            reply, size = call.result.get(timeout=timeout_s)
        except gevent.Timeout:
            raise ReplyTimeout(f"Timeout: no reply in {timeout_s:g} s") from None
        return reply, size

    def request(self, command: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], int]:
        return self.wait(self.send(command), timeout_s)

    def forget(self, call: Call) -> None:
        """Stop waiting for replies to ``call`` (a late one is counted, not used)."""
        for command_id in call.ids:
            self._calls.pop(command_id, None)

    def _read_loop(self) -> None:
        try:
            while True:
                opcode, frame = self._ws.recv_data_frame()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    data = frame.data
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    self._fail(f"closed by the server: {code}", code)
                    return
                data = frame.data
                message = orjson.loads(data)
                kind = message.get("type")
                if kind in REPLY_TYPES:
                    call = self._calls.pop(message.get("re", -1), None)
                    if call is None:
                        COUNTERS["late replies"] += 1
                    elif not call.result.ready():
                        call.result.set((message, len(data)))
                else:
                    self._on_event(message)
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # the connection is gone, however it went
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, reason: str, close_code: int | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._closing:
            # A close nobody asked for: a failure in its own row, by close code.
            fire_request(
                self._environment,
                "WS",
                "disconnect",
                0,
                0,
                ConnectionLost(
                    f"close {close_code}" if close_code is not None else "connection lost"
                ),
            )
            log.debug("session lost: %s", reason)
        lost = ConnectionLost(reason)
        for call in self._calls.values():
            if not call.result.ready():
                call.result.set_exception(lost)
        self._calls.clear()
        self._close_socket()

    def _close_socket(self) -> None:
        with contextlib.suppress(Exception):  # already closed
            cast(Callable[[], None], self._ws.shutdown)()

    def close(self) -> None:
        if self.closed:
            return
        self._closing = True
        try:
            self._ws.send_close()
            self._reader.join(timeout=CLOSE_WAIT_S)
        except Exception:  # the connection is already gone
            pass
        self._fail("closed by the client")
        self._reader.kill(block=False)


# ==================================================================================
# Users
# ==================================================================================


class TokenchatUser(HttpUser):
    """What fans and models share: a session, reconnects, reporting."""

    abstract = True
    host = "http://127.0.0.1:8000"
    role = "fan"

    def on_start(self) -> None:
        self.cfg = config()
        self.user_id = self.pick_user_id()
        self.token = issue_token(self.cfg.secret, self.user_id, self.role, TOKEN_TTL_S)
        self.session: Session | None = None
        self.room: str | None = None
        self.last_offset: dict[str, str] = {}
        self.balance = 0
        self.keys = itertools.count(1)
        self.connecting_since_ms = time.time() * 1000
        self.welcomed = False  # a session of this user got a welcome already

    def pick_user_id(self) -> str:
        raise NotImplementedError

    def home_room(self) -> str:
        """The room to join when the user is in none."""
        raise NotImplementedError

    def in_room(self) -> str | None:
        """The user's room, after joining one if it is in none; None if that failed."""
        if self.ensure_session() is None:
            return None
        if self.room is None:
            self.join(self.home_room())
        return self.room

    def on_stop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # --- reporting ---------------------------------------------------------------
    def report(
        self,
        name: str,
        started: float,
        size: int = 0,
        exception: Exception | None = None,
        request_type: str = "WS",
    ) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        fire_request(self.environment, request_type, name, elapsed_ms, size, exception)

    def command(
        self, name: str, command: dict[str, Any], expected: frozenset[str] = frozenset()
    ) -> dict[str, Any] | None:
        """Send a command that is not a spend: its ``ok`` reply, or None.
        ``expected``: error codes counted as a success under ``name (code)``
        (a race the load makes on purpose, like posting as a ticket show starts)."""
        session = self.ensure_session()
        if session is None:
            return None
        started = time.perf_counter()
        try:
            reply, size = session.request(command, self.cfg.reply_timeout_s)
        except (ReplyTimeout, ConnectionLost) as exc:
            self.report(name, started, exception=exc)
            return None
        if reply["type"] == "error":
            code = reply.get("code", "?")
            if code in expected:
                self.report(f"{name} ({code})", started, size)
                return None
            self.report(name, started, size, ServerError(code))
            return None
        self.report(name, started, size)
        return reply

    def spend(
        self, name: str, command: dict[str, Any], expected: frozenset[str] = frozenset()
    ) -> dict[str, Any] | None:
        """Send a tip or dm (``command`` holds its ``key``) until it gets an
        answer, resending it with the same key after a timeout, a lost
        connection or UNAVAILABLE; the ``ok`` reply, or None."""
        call: Call | None = None
        for attempt in range(self.cfg.attempts):
            label = name if attempt == 0 else f"{name} (retry)"
            session = self.ensure_session()
            if session is None:
                continue
            started = time.perf_counter()
            try:
                # On the same session, the retry joins the first call: the
                # first reply to either answers it.
                call = session.send(command, call)
                reply, size = session.wait(call, self.cfg.reply_timeout_s)
            except ReplyTimeout as exc:
                self.report(label, started, exception=exc)
                if attempt >= 1:  # twice no answer: try a new session
                    self.drop_session()
                continue
            except ConnectionLost as exc:
                self.report(label, started, exception=exc)
                continue
            session.forget(call)
            if reply["type"] == "ok":
                if "balance" in reply:
                    self.balance = reply["balance"]
                if reply.get("duplicate") and attempt == 0:
                    # A fresh key answered as a retry: keys collided somewhere.
                    self.report(label, started, size, ServerError("unexpected duplicate"))
                else:
                    if reply.get("duplicate"):
                        COUNTERS[f"{name} retries answered duplicate"] += 1
                    self.report(label, started, size)
                return reply
            code = reply.get("code", "?")
            if code in expected:
                self.report(f"{name} ({code})", started, size)
                return None
            if code == ErrorCode.INSUFFICIENT_FUNDS:
                self.report(f"{name} (insufficient)", started, size)
                self.on_insufficient_funds()
                return None
            if code == ErrorCode.SPEND_LIMIT:
                # The fan's own limit (FanUser.limits sets some): an answer, not a failure.
                self.report(f"{name} (spend limit)", started, size)
                return None
            self.report(label, started, size, ServerError(code))
            if code != ErrorCode.UNAVAILABLE:
                return None
            gevent.sleep(RETRY_BACKOFF_S * 2**attempt)
        if call is not None:
            call.session.forget(call)
        COUNTERS[f"{name} given up"] += 1
        return None

    def on_insufficient_funds(self) -> None:
        pass

    def new_key(self, kind: str) -> str:
        return f"{self.cfg.run_tag}:{kind}{next(self.keys)}"

    # --- the session -------------------------------------------------------------
    def ensure_session(self) -> Session | None:
        """The open session, after connecting, ``hello`` and (re)joining the
        room if it was lost; None when that failed (reported)."""
        if self.session is not None and not self.session.closed:
            return self.session
        self.session = None
        self.connecting_since_ms = time.time() * 1000
        started = time.perf_counter()
        try:
            session = Session(self.environment, self.cfg.ws_url, self.on_event)
        except (OSError, websocket.WebSocketException) as exc:
            self.report("connect", started, exception=ConnectionLost(f"connect failed: {exc}"))
            return None
        self.report("connect", started)
        if self.welcomed:
            COUNTERS["reconnects"] += 1
        started = time.perf_counter()
        try:
            reply, size = session.request(
                {"type": "hello", "token": self.token}, self.cfg.reply_timeout_s
            )
        except (ReplyTimeout, ConnectionLost) as exc:
            self.report("hello", started, exception=exc)
            session.close()
            return None
        if reply["type"] != "welcome":
            self.report("hello", started, size, ServerError(reply.get("code", "?")))
            session.close()
            return None
        self.report("hello", started, size)
        self.balance = reply["balance"]
        self.session = session
        self.welcomed = True
        if self.room is not None:  # back into the room the lost session was in
            room, self.room = self.room, None
            self.join(room)
        return session

    def drop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
            COUNTERS["sessions dropped after timeouts"] += 1

    def join(self, room: str) -> bool:
        """Join ``room``, from the last offset seen in it when there is one."""
        if self.session is None:
            return False
        command: dict[str, Any] = {"type": "join", "room": room}
        name = "join"
        since = self.last_offset.get(room)
        if since is not None:
            command["since"] = since
            name = "join (since)"
        started = time.perf_counter()
        try:
            reply, size = self.session.request(command, self.cfg.reply_timeout_s)
        except (ReplyTimeout, ConnectionLost) as exc:
            self.report(name, started, exception=exc)
            self.drop_session()
            return False
        if reply["type"] != "ok":
            if reply.get("code") == ErrorCode.BANNED:  # a model's short ban (`moderate`)
                self.report(f"{name} (BANNED)", started, size)
                return False
            self.report(name, started, size, ServerError(reply.get("code", "?")))
            return False
        self.report(name, started, size)
        if since is not None and not reply.get("recovered", True):
            COUNTERS["joins not recovered"] += 1
        for event in reply.get("history", ()):
            self.see_offset(event)
        if reply.get("more"):
            self.page_history(room, reply["next"])
        self.room = room
        self.on_joined(room, reply)
        return True

    def page_history(self, room: str, since: str) -> None:
        """The rest of a re-join's gap, page by page, as every client reads
        it after a reconnect: each page a ``history`` row (a hot path in a
        reconnect storm). Live events keep coming meanwhile (``on_event``)."""
        for _ in range(HISTORY_PAGES_MAX):
            if self.session is None:
                return
            started = time.perf_counter()
            command = {"type": "history", "room": room, "since": since}
            try:
                reply, size = self.session.request(command, self.cfg.reply_timeout_s)
            except (ReplyTimeout, ConnectionLost) as exc:
                self.report("history", started, exception=exc)
                return
            if reply["type"] != "ok":
                self.report("history", started, size, ServerError(reply.get("code", "?")))
                return
            self.report("history", started, size)
            COUNTERS["history pages"] += 1
            if not reply.get("recovered", True):
                COUNTERS["history pages not recovered"] += 1
            for event in reply["history"]:
                self.see_offset(event)
            if not reply.get("more"):
                return
            since = reply["next"]

    def on_joined(self, room: str, reply: dict[str, Any]) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ROOM_EVENTS:
            self.see_offset(event)
        elif kind == "balance":
            self.balance = event["balance"]
        elif kind == "removed" and event.get("room") == self.room:
            self.room = None  # kicked or banned: `in_room` joins again (BANNED meanwhile)
        COUNTERS[f"events {kind}"] += 1

    def see_offset(self, event: dict[str, Any]) -> None:
        room, offset = event.get("room"), event.get("offset")
        if not isinstance(room, str) or not isinstance(offset, str):
            return
        # Only forward: a history page read after live events is older than them.
        seen = offset_key(self.last_offset.get(room))
        position = offset_key(offset)
        if seen is None or (position is not None and position > seen):
            self.last_offset[room] = offset


class ModelUser(TokenchatUser):
    """Hosts a room: stays joined, reads every event (reporting its delivery
    latency), thanks tippers, changes prices now and then."""

    fixed_count = 20  # replaced by --tc-models at init
    role = "model"
    _indexes = itertools.count()

    def wait_time(self) -> float:
        # Short, so that a lost session is noticed (task `stay`) within a
        # second or so; `thank` and `set_prices` are picked rarely.
        return random.uniform(0.5, 1.5)

    def pick_user_id(self) -> str:
        self.index = next(ModelUser._indexes) % config().models
        return config().model_id(self.index)

    def home_room(self) -> str:
        return self.user_id  # a model's room is her own id

    def on_start(self) -> None:
        super().on_start()
        self.tippers: list[str] = []
        self.offers: list[str] = []  # custom requests offered to her, newest last
        self.show_requests: list[str] = []  # private shows asked of her, newest last
        self.running_show: str | None = None  # the show she accepted, until it ends
        self.dms_seen: set[str] = set()  # the tx of every DM received
        self.newest: tuple[int, ...] = ()  # the newest room offset received
        self.show: str | None = None  # her ticket show, scheduled or running
        self.show_running = False
        self.goal: str | None = None  # her room's active tip goal
        self.in_room()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ROOM_EVENTS or kind == "dm":
            self.record_delivery(str(kind), event)  # before the offset is taken as seen
        super().on_event(event)
        if kind == "tip" and event.get("from") != self.user_id:
            self.tippers = [*self.tippers[-9:], str(event.get("from"))]
        if kind == "message" and event.get("from") != self.user_id:
            self.chatters = [*getattr(self, "chatters", [])[-9:], str(event.get("from"))]
        if kind == "goal" and event.get("room") == self.user_id:
            goal = event.get("goal") or {}
            COUNTERS[f"goals {goal.get('state')}"] += 1
            if goal.get("id") == self.goal and goal.get("state") != "active":
                self.goal = None  # reached, failed or deleted: set a new one
        if kind == "request" and event.get("state") == "offered":
            self.offers = [*self.offers[-9:], str(event.get("request"))]
        if kind == "private":
            show, state = str(event.get("show")), event.get("state")
            if state == "requested":
                self.show_requests = [*self.show_requests[-9:], show]
            elif state != "running" and show == self.running_show:
                self.running_show = None

    def record_delivery(self, kind: str, event: dict[str, Any]) -> None:
        """A ``recv <kind>`` row: from the event's ``ts`` (stored in Redis) to now."""
        ts = event.get("ts")
        if not isinstance(ts, int):
            return
        if kind == "dm" and ts < self.connecting_since_ms:
            # Stored before this session existed: replayed from the inbox after
            # the welcome (say, sent to the model after the previous run
            # ended). Its age is no delivery latency.
            COUNTERS["dms replayed from the inbox"] += 1
            error = self.misdelivery(event)
            if error is not None:
                fire_request(self.environment, "WS recv", "recv dm (inbox)", 0, 0, error)
            return
        text = event.get("text", "")
        size = len(text) if isinstance(text, str) else 0
        latency_ms = max(0.0, time.time() * 1000 - ts)
        fire_request(
            self.environment, "WS recv", f"recv {kind}", latency_ms, size, self.misdelivery(event)
        )
        if latency_ms > SLOW_DELIVERY_MS:
            COUNTERS[f"recv {kind} over {SLOW_DELIVERY_MS:g} ms"] += 1
            if COUNTERS["slow deliveries logged"] < SLOW_DELIVERIES_LOGGED:
                COUNTERS["slow deliveries logged"] += 1
                log.warning(
                    "%s got a %s event %.0f ms after Redis stored it: %s",
                    self.user_id,
                    kind,
                    latency_ms,
                    event,
                )

    def misdelivery(self, event: dict[str, Any]) -> DeliveryError | None:
        """What is wrong with receiving ``event`` now, if anything: a DM seen
        before, or a room event not after the newest one seen."""
        if event.get("type") == "dm":
            tx = str(event.get("tx"))
            if tx in self.dms_seen:
                return DeliveryError("dm delivered twice")
            self.dms_seen.add(tx)
            return None
        position = offset_key(event.get("offset"))
        if position is None:
            return DeliveryError("event without a valid offset")
        if position <= self.newest:
            return DeliveryError("room event duplicated or out of order")
        self.newest = position
        return None

    def see_offset(self, event: dict[str, Any]) -> None:
        super().see_offset(event)
        position = offset_key(event.get("offset"))
        if event.get("room") == self.user_id and position is not None:
            self.newest = max(self.newest, position)  # history of a (re)join

    @task(20)
    def stay(self) -> None:
        """Host: be in the room, reconnecting at once if the session was lost."""
        self.in_room()

    @task(2)
    def thank(self) -> None:
        room = self.in_room()
        if room is not None:
            who = self.tippers.pop() if self.tippers else "everyone"
            text = random.choice(THANKS).format(who)
            self.command("say", {"type": "say", "room": room, "text": text})

    @task(4)
    def moderate(self) -> None:
        """Moderation (issue #12): now and then a chatter is muted or banned
        for a few seconds, kicked, or has their lines cleared; slow mode goes
        on and off. Fans count MUTED, SLOW_MODE and BANNED as their own rows."""
        room = self.in_room()
        chatters = getattr(self, "chatters", [])
        if room is None or not chatters:
            return
        user = random.choice(chatters)
        action = random.choice(MODERATION_ACTIONS)
        command: dict[str, Any] = {"type": action, "room": room, "user": user}
        if action in ("mute", "ban"):
            command["seconds"] = MODERATION_SECONDS
        if action == "slow":
            command = {"type": "slow", "room": room, "seconds": random.choice((0, 0, 1))}
        self.command(action, command)

    @task(1)
    def post_media(self) -> None:
        room, media = self.in_room(), MEDIA.get(self.user_id)
        if room is not None and media is not None:
            self.command("post_media", {"type": "post_media", "room": room, "media": media})

    @task(1)
    def set_prices(self) -> None:
        prices = {
            "dm": random.randint(1, DM_PRICE_MAX),
            "tip_min": random.randint(1, TIP_MIN_MAX),
        }
        with self.client.put(
            "/v1/me/prices",
            json=prices,
            headers={"Authorization": f"Bearer {self.token}"},
            name="PUT /v1/me/prices",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")

    @task(1)
    def check_balance(self) -> None:
        self.command("balance", {"type": "balance"})

    @task(1)
    def fulfil_request(self) -> None:
        """Accept and deliver the newest offer (a release from escrow). Fans
        cancel theirs at once, so most are gone: CONFLICT on accept is
        expected, counted as a success under ``request_accept (cancelled)``."""
        session = self.ensure_session()
        if not self.offers or session is None:
            return
        request = self.offers.pop()
        started = time.perf_counter()
        try:
            accept = {"type": "request_accept", "request": request}
            reply, size = session.request(accept, self.cfg.reply_timeout_s)
        except (ReplyTimeout, ConnectionLost) as exc:
            self.report("request_accept", started, exception=exc)
            return
        if reply["type"] == "error" and reply.get("code") == ErrorCode.CONFLICT:
            self.report("request_accept (cancelled)", started, size)
            return
        failed = ServerError(reply.get("code", "?")) if reply["type"] == "error" else None
        self.report("request_accept", started, size, failed)
        if failed is None:
            deliver = {"type": "request_deliver", "request": request, "text": "done"}
            self.command("request_deliver", deliver)

    @task(1)
    def private_show(self) -> None:
        """Accept the newest private show asked of her, or end the one she
        runs (after its fan had a few seconds of it). The fan may have ended
        or withdrawn it first, or she runs another: CONFLICT on accept is
        counted as a success under ``private_accept (gone)``."""
        session = self.ensure_session()
        if session is None:
            return
        if self.running_show is not None:
            show, self.running_show = self.running_show, None
            self.command("private_end", {"type": "private_end", "show": show})
            return
        if not self.show_requests:
            return
        show = self.show_requests.pop()
        started = time.perf_counter()
        try:
            accept = {"type": "private_accept", "show": show}
            reply, size = session.request(accept, self.cfg.reply_timeout_s)
        except (ReplyTimeout, ConnectionLost) as exc:
            self.report("private_accept", started, exception=exc)
            return
        if reply["type"] == "error" and reply.get("code") == ErrorCode.CONFLICT:
            self.report("private_accept (gone)", started, size)
            return
        failed = ServerError(reply.get("code", "?")) if reply["type"] == "error" else None
        self.report("private_accept", started, size, failed)
        if failed is None and reply.get("state") == "running":
            self.running_show = show

    @task(4)
    def run_show(self) -> None:
        """A ticket show, one step per pick: schedule it (HTTP), start it, then
        end it (paid: it ran SHOW_MIN_S) or now and then cancel it (every
        ticket refunded). Fans buy tickets meanwhile (FanUser.buy_ticket)."""
        if self.show is None:
            body = {
                "title": "load show",
                "price": random.choice(SHOW_PRICES),
                "starts_at": int(time.time() * 1000),
                "min_s": SHOW_MIN_S,
            }
            with self.client.post(
                "/v1/me/shows",
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                name="POST /v1/me/shows",
                timeout=HTTP_TIMEOUT_S,
                catch_response=True,
            ) as response:
                if response.status_code != 201:
                    response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                    return
                self.show, self.show_running = str(response.json()["show"]), False
        elif not self.show_running:
            if self.command("show_start", {"type": "show_start", "show": self.show}) is None:
                self.show = None  # cancelled meanwhile (not started in time): a new one
            else:
                self.show_running = True
        else:
            kind = "show_cancel" if random.random() < 0.2 else "show_end"
            self.command(kind, {"type": kind, "show": self.show})
            self.show = None

    @task(2)
    def run_goal(self) -> None:
        """A tip goal, one step per pick: set one (HTTP PUT; fans' tips count
        toward it), and now and then delete it (an all-or-nothing goal's held
        tips are refunded). A goal left active by an earlier run is deleted."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.goal is not None:
            if random.random() < 0.2:
                self.delete_goal(headers)
            return
        body: dict[str, Any] = {
            "title": "load goal",
            "target": random.choice(GOAL_TARGETS),
            "all_or_nothing": random.random() < 0.5,
        }
        if body["all_or_nothing"] and random.random() < 0.5:
            body["deadline"] = int((time.time() + GOAL_DEADLINE_S) * 1000)
        with self.client.put(
            "/v1/me/goal",
            json=body,
            headers=headers,
            name="PUT /v1/me/goal",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code == 409:  # one is active (an earlier run's): not a failure
                response.success()
                self.delete_goal(headers)
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
            else:
                self.goal = str(response.json()["goal"]["id"])

    def delete_goal(self, headers: dict[str, str]) -> None:
        with self.client.delete(
            "/v1/me/goal",
            headers=headers,
            name="DELETE /v1/me/goal",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code not in (200, 404):  # 404: closed and removed meanwhile
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
            else:
                response.success()
                self.goal = None

    # --- payouts (server/economy/payouts.py) ---------------------------------------------
    @task(1)
    def payout(self) -> None:
        """Read her earnings statement; when her balance reaches the minimum
        payout, ask for it, and the admin approves or rejects it at once
        (escrow to sys:payouts, or back to her). The first pick has the admin
        verify her and sets a payout method."""
        headers = {"Authorization": f"Bearer {self.token}"}
        admin = {"Authorization": f"Bearer {self.cfg.admin_token}"}
        if not getattr(self, "payouts_ready", False):
            self.payouts_ready = self.http_ok(
                "POST", f"/v1/admin/users/{self.user_id}/verify", admin, "POST verify"
            ) and self.http_ok(
                "PUT",
                "/v1/me/payout-method",
                headers,
                "PUT /v1/me/payout-method",
                {"type": "paypal", "email": f"{self.user_id}@example.com"},
            )
            return
        self.http_ok("GET", "/v1/me/earnings", headers, "GET /v1/me/earnings")
        rule = self.http_ok("GET", "/v1/payout-rule", headers, "GET /v1/payout-rule")
        me = self.http_ok("GET", "/v1/me", headers, "GET /v1/me")
        if not rule or not me or me["balance"] < rule["min_payout_tokens"]:
            return
        body = {"tokens": rule["min_payout_tokens"], "key": self.new_key("payout")}
        with self.client.post(
            "/v1/me/payouts",
            json=body,
            headers=headers,
            name="POST /v1/me/payouts",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code == 409:  # spent meanwhile: nothing moved
                response.success()
                return
            if response.status_code != 201:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return
            payout_id = response.json()["payout"]
        decision = "approve" if random.random() < 0.7 else "reject"
        self.http_ok(
            "POST",
            f"/v1/admin/payouts/{payout_id}/{decision}",
            admin,
            f"POST /v1/admin/payouts/{{id}}/{decision}",
        )

    def http_ok(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        name: str,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """One HTTP call; its JSON reply on a 2xx, else None (a failure)."""
        with self.client.request(
            method,
            path,
            json=body,
            headers=headers,
            name=name,
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if not 200 <= response.status_code < 300:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return None
            return response.json()

    # --- discovery (issue #13 section 2) ------------------------------------------------
    @task(1)
    def update_profile(self) -> None:
        """Save her profile (PUT /v1/me/profile): two tags of PROFILE_TAGS,
        so the fans' tag filters find some rooms."""
        body = {
            "display_name": f"Model {self.user_id}",
            "bio": random.choice(CHAT_LINES),
            "tags": random.sample(PROFILE_TAGS, 2),
            "online_status": random.choice(("online", "busy")),
        }
        with self.client.put(
            "/v1/me/profile",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            name="PUT /v1/me/profile",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")


# Transactions one read_transactions task asks for (a screenful).
HISTORY_PAGE = 20


class FanUser(TokenchatUser):
    """Joins a room, chats, tips the model, DMs her, checks the balance and
    moves to another room now and then."""

    weight = 1
    role = "fan"
    _numbers = itertools.count(1)

    def wait_time(self) -> float:
        return random.uniform(self.cfg.wait_min_s, self.cfg.wait_max_s)

    def pick_user_id(self) -> str:
        cfg = config()
        return f"{cfg.prefix}_{cfg.run_tag}_fan{next(FanUser._numbers):05d}"

    def on_start(self) -> None:
        super().on_start()
        self.topups = 0
        self.show: str | None = None  # the private show asked for, until ended
        self.room_show: tuple[str, str] | None = None  # (show, state) of her room's open show
        self.tickets: set[str] = set()
        # Each room's menu as last read: (monotonic time, items).
        self.menus: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        budget = self.cfg.fund // random.choice((16, 4, 1))
        self.credit(budget, f"{self.user_id}:fund", "POST /v1/admin/credits (fund)")
        self.in_room()

    def credit(self, amount: int, key: str, name: str) -> None:
        """An admin grant, retried with the same key until it is answered."""
        body = {"user": self.user_id, "amount": amount, "key": key}
        headers = {"Authorization": f"Bearer {self.cfg.admin_token}"}
        for attempt in range(self.cfg.attempts):
            with self.client.post(
                "/v1/admin/credits",
                json=body,
                headers=headers,
                name=name,
                timeout=HTTP_TIMEOUT_S,
                catch_response=True,
            ) as response:
                if response.status_code == 200:
                    return
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                if response.status_code not in (0, 503):  # 0: no response at all
                    return
            gevent.sleep(RETRY_BACKOFF_S * 2**attempt)

    def home_room(self) -> str:
        return self.cfg.model_id(random.randrange(self.cfg.models))

    def on_joined(self, room: str, reply: dict[str, Any]) -> None:
        show = reply.get("room", {}).get("show")
        self.room_show = (str(show["show"]), str(show["state"])) if show else None
        if show and reply.get("ticket"):
            self.tickets.add(str(show["show"]))

    def on_event(self, event: dict[str, Any]) -> None:
        super().on_event(event)
        if event.get("type") == "show" and event.get("room") == self.room:
            state = str(event.get("state"))
            self.room_show = (str(event["show"]), state) if state in SHOW_OPEN else None

    def walled(self) -> bool:
        """Whether a ticket show runs in her room and she holds no ticket."""
        show = self.room_show
        return show is not None and show[1] == "running" and show[0] not in self.tickets

    @task(2)
    def buy_ticket(self) -> None:
        """A ticket to her room's open show (a charge into its escrow, refunded
        if the model cancels). A show just closed answers CONFLICT."""
        room = self.in_room()
        show = self.room_show
        if room is None or show is None or show[0] in self.tickets:
            return
        command = {"type": "buy_ticket", "room": room, "show": show[0], "key": self.new_key("s")}
        if self.spend("buy_ticket", command, frozenset({ErrorCode.CONFLICT})) is not None:
            self.tickets.add(show[0])

    def on_insufficient_funds(self) -> None:
        if random.random() < TOPUP_CHANCE:
            self.topups += 1
            key = f"{self.user_id}:topup{self.topups}"
            self.credit(self.cfg.fund, key, "POST /v1/admin/credits (top-up)")

    @task(5)
    def say(self) -> None:
        room = self.in_room()
        if room is not None and not self.walled():
            # FORBIDDEN: a show started before its event reached her.
            command = {"type": "say", "room": room, "text": random.choice(CHAT_LINES)}
            self.command("say", command, SAY_EXPECTED)

    @task(3)
    def tip(self) -> None:
        room = self.in_room()
        if room is None or self.walled():
            return
        amount = random.choices(TIP_AMOUNTS, TIP_WEIGHTS)[0]
        command = {
            "type": "tip",
            "room": room,
            "amount": amount,
            "text": random.choice(TIP_TEXTS),
            "key": self.new_key("t"),
        }
        # FORBIDDEN as in `say`; NOT_IN_ROOM: kicked or banned while it was on its way.
        self.spend("tip", command, frozenset({ErrorCode.FORBIDDEN, ErrorCode.NOT_IN_ROOM}))

    @task(1)
    def tip_item(self) -> None:
        """Tip an item of the room's menu at the price the fan last read."""
        room = self.in_room()
        if room is None or self.walled():
            return
        menu = self.menu_of(room)
        if not menu:
            return
        item = random.choice(menu)
        command = {
            "type": "tip",
            "room": room,
            "item": item["id"],
            "max_price": item["price"],
            "text": random.choice(TIP_TEXTS),
            "key": self.new_key("i"),
        }
        # FORBIDDEN: a ticket show started before its event reached her.
        if self.spend("tip item", command, frozenset({ErrorCode.FORBIDDEN})) is None:
            self.menus.pop(room, None)  # PRICE_CHANGED, NOT_FOUND...: read it again

    def menu_of(self, room: str) -> list[dict[str, Any]] | None:
        """The room's menu (GET /v1/users/{room}/menu), reused MENU_REUSE_S."""
        cached = self.menus.get(room)
        if cached is not None and time.monotonic() - cached[0] < MENU_REUSE_S:
            return cached[1]
        with self.client.get(
            f"/v1/users/{room}/menu",
            name="GET /v1/users/{id}/menu",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return None
            items: list[dict[str, Any]] = response.json()["items"]
        self.menus[room] = (time.monotonic(), items)
        return items

    @task(1)
    def dm(self) -> None:
        room = self.in_room()
        if room is None:
            return
        command = {
            "type": "dm",
            "to": room,  # the model of the fan's room
            "text": random.choice(CHAT_LINES),
            "max_price": DM_PRICE_MAX,
            "key": self.new_key("d"),
        }
        self.spend("dm", command)

    @task(1)
    def unlock(self) -> None:
        room = self.in_room()
        media = MEDIA.get(room) if room is not None else None
        if media is None:
            return
        command = {
            "type": "unlock",
            "media": media,
            "max_price": MEDIA_PRICE,
            "key": self.new_key("u"),
        }
        reply = self.spend("unlock", command)
        if reply is not None and reply.get("already"):
            COUNTERS["unlocks answered already"] += 1

    @task(1)
    def check_balance(self) -> None:
        self.command("balance", {"type": "balance"})

    @task(1)
    def offer_and_cancel_request(self) -> None:
        """A custom request to the room's model (held in escrow), then its
        cancellation (refunded): ``request_offer`` is retried like a tip, the
        cancel is idempotent without a key. The model may have accepted it
        first (``ModelUser.fulfil_request``): the cancel is then CONFLICT."""
        room = self.in_room()
        if room is None:
            return
        command = {
            "type": "request_offer",
            "model": room,
            "text": random.choice(CHAT_LINES),
            "amount": random.choice(REQUEST_AMOUNTS),
            "key": self.new_key("r"),
        }
        reply = self.spend("request_offer", command)
        if reply is not None:
            cancel = {"type": "request_cancel", "request": reply["request"]}
            self.command("request_cancel", cancel)

    @task(1)
    def private_show(self) -> None:
        """Ask the room's model for a private show at her rate, or end the
        one asked for before (withdrawn if she has not accepted it yet;
        metered, or the minimum forfeited, if she has). ``private_request``
        is retried like a tip; the end is idempotent without a key."""
        show = self.show
        if show is not None:
            self.show = None
            self.command("private_end", {"type": "private_end", "show": show})
            return
        room = self.in_room()
        if room is None:
            return
        command = {
            "type": "private_request",
            "model": room,
            "rate": PRIVATE_RATE,
            "key": self.new_key("p"),
        }
        reply = self.spend("private_request", command)
        if reply is not None:
            self.show = str(reply["show"])

    @task(1)
    def limits(self) -> None:
        """Read her spending limits; now and then set a daily one (a lower one
        applies at once, so some of her later spends answer SPEND_LIMIT,
        counted apart) or ask to lift it (pending for the raise delay)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        roll = random.random()
        if roll < 0.8:
            method, body, name = "GET", None, "GET /v1/me/limits"
        else:
            daily = None if roll < 0.85 else random.choice((50, 200, 1000, 10_000))
            method, body, name = "PUT", {"daily": daily}, "PUT /v1/me/limits"
        with self.client.request(
            method,
            "/v1/me/limits",
            json=body,
            headers=headers,
            name=name,
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")

    @task(1)
    def change_room(self) -> None:
        if self.ensure_session() is None:
            return
        if self.room is not None:
            old, self.room = self.room, None
            self.command("leave", {"type": "leave", "room": old})
            # Back in it later, the fan starts from the newest events, as an
            # app does; `since` is for resuming after a lost connection.
            self.last_offset.pop(old, None)
        self.join(self.home_room())

    @task(1)
    def read_leaderboard(self) -> None:
        """Read the room's top tippers (a projection of the ledger, issue
        #12), as the page does after each tip it sees; a window at random."""
        room = self.room or self.home_room()
        window = random.choice(LEADERBOARD_WINDOWS)
        with self.client.get(
            f"/v1/rooms/{room}/leaderboard?window={window}",
            name="GET /v1/rooms/{id}/leaderboard",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return
            entries = response.json()["entries"]
            if any(not isinstance(e.get("tier"), int) for e in entries):
                response.failure("a leaderboard entry without an integer tier")

    # --- receipts and history (issue #12 section 6) ---------------------------------------
    @task(1)
    def read_transactions(self) -> None:
        """A fan reads her newest transactions (GET /v1/me/transactions), then
        the receipt of one of them (GET /v1/me/transactions/{tx}): reads of
        the Postgres ledger, off the hot path, beside the spends."""
        headers = {"Authorization": f"Bearer {self.token}"}
        with self.client.get(
            f"/v1/me/transactions?limit={HISTORY_PAGE}",
            headers=headers,
            name="GET /v1/me/transactions",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return
            page: list[dict[str, Any]] = response.json()["transactions"]
        if not page:
            return
        tx = random.choice(page)["tx"]
        with self.client.get(
            f"/v1/me/transactions/{tx}",
            headers=headers,
            name="GET /v1/me/transactions/{tx}",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
            elif response.json().get("tx") != tx:
                response.failure("the receipt names another transaction")

    # --- discovery, follows and notifications (issue #13 sections 2 and 3) ---------------
    @task(1)
    def discover(self) -> None:
        """The discovery grid: GET /v1/rooms, a sort at random, now and then a
        tag or a text filter (a node's snapshot, filtered and paged)."""
        sort = random.choice(("trending", "viewers", "new"))
        query = f"?sort={sort}&limit=24"
        if random.random() < 0.3:
            query += f"&tag={random.choice(PROFILE_TAGS)}"
        with self.client.get(
            f"/v1/rooms{query}",
            name=f"GET /v1/rooms?sort={sort}",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return
            page = response.json()
            if not isinstance(page.get("rooms"), list):
                response.failure("no room list")
                return
        # Now and then "Show more": the next page of the same ranking (its
        # pin, read from Redis by whichever node answers).
        cursor = page.get("next_cursor")
        if cursor and random.random() < 0.3:
            with self.client.get(
                f"/v1/rooms{query}&cursor={cursor}",
                name=f"GET /v1/rooms?sort={sort}&cursor=",
                timeout=HTTP_TIMEOUT_S,
                catch_response=True,
            ) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")

    @task(1)
    def follow_and_read_notifications(self) -> None:
        """Follow (or now and then unfollow) the home room's model, then read
        the newest notifications (her `live` ones when she came back)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        model = self.home_room()
        method = "DELETE" if random.random() < 0.2 else "PUT"
        with self.client.request(
            method,
            f"/v1/me/follows/{model}",
            headers=headers,
            name=f"{method} /v1/me/follows/{{model}}",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
        with self.client.get(
            "/v1/me/notifications?limit=20",
            headers=headers,
            name="GET /v1/me/notifications",
            timeout=HTTP_TIMEOUT_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")

    # --- payment webhooks (issue #13 section 4) -----------------------------------------
    @task(3)
    def webhook_purchase(self) -> None:
        """A bundle bought through the provider's signed webhook
        (``payment.confirmed``), delivered twice now and then (credited once),
        and now and then charged back (what is left of it is clawed back)."""
        if not WEBHOOK_SECRET or self.session is None:
            return  # no secret shared, or not connected yet (the user row)
        self.webhooks = getattr(self, "webhooks", 0) + 1
        ref = f"{self.user_id}:pi{self.webhooks}"
        bundle, cents = WEBHOOK_BUNDLE
        data = {"payment_ref": ref, "user": self.user_id, "bundle": bundle, "amount_cents": cents}
        event = {"id": f"evt:{ref}", "type": "payment.confirmed", "data": data}
        self.post_webhook(event, "POST /v1/payments/webhook (confirmed)")
        if random.random() < WEBHOOK_REPLAY_CHANCE:
            self.post_webhook(event, "POST /v1/payments/webhook (replay)")
        if random.random() < WEBHOOK_CHARGEBACK_CHANCE:
            chargeback = {
                "id": f"evt:{ref}:cb",
                "type": "payment.charged_back",
                "data": {"payment_ref": ref},
            }
            self.post_webhook(chargeback, "POST /v1/payments/webhook (chargeback)")

    def post_webhook(self, event: dict[str, Any], name: str) -> None:
        body = orjson.dumps(event)
        headers = {
            "Payment-Signature": webhook_signature(WEBHOOK_SECRET, body, int(time.time())),
            "Content-Type": "application/json",
        }
        for attempt in range(self.cfg.attempts):
            with self.client.post(
                "/v1/payments/webhook",
                data=body,
                headers=headers,
                name=name,
                timeout=HTTP_TIMEOUT_S,
                catch_response=True,
            ) as response:
                if response.status_code == 200:
                    return
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                if response.status_code not in (0, 503):
                    return
            gevent.sleep(RETRY_BACKOFF_S * 2**attempt)


# Tags models put on their profiles and fans filter the grid by (issue #13).
PROFILE_TAGS = ["jazz", "piano", "talk", "games", "art", "late-night"]


# The windows a fan's leaderboard read picks from (docs/protocol.md, "Standing").
LEADERBOARD_WINDOWS = ("12h", "day", "week", "all")


def offset_key(offset: object) -> tuple[int, ...] | None:
    """A room offset (``<ms>-<seq>``) as something that sorts like it."""
    if not isinstance(offset, str):
        return None
    ms, dash, seq = offset.partition("-")
    if not (dash and ms.isdigit() and seq.isdigit()):
        return None
    return (int(ms), int(seq))


# --- payment webhooks (issue #13 section 4) ----------------------------------------------
# The provider's signing secret, shared with the server under test; the
# webhook tasks are skipped without it.
WEBHOOK_SECRET = os.environ.get("TOKENCHAT_PAYMENT_WEBHOOK_SECRET", "")
# The bundle a webhook purchase buys (TOKENCHAT_BUNDLES' default smallest).
WEBHOOK_BUNDLE = ("starter", 999)
# Share of webhook purchases delivered twice (providers retry) and of those
# charged back afterwards (a clawback of what is left of its tokens).
WEBHOOK_REPLAY_CHANCE = 0.3
WEBHOOK_CHARGEBACK_CHANCE = 0.2


def webhook_signature(secret: str, body: bytes, timestamp: int) -> str:
    """``Payment-Signature``: ``t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def _http_error_code(response: Any) -> str:
    if response.status_code == 0:  # locust's HttpSession: the request itself failed
        return f"no response ({response.error})"
    try:
        return str(response.json()["error"]["code"])
    except Exception:  # not the API's error shape (no response, proxy page, ...)
        return "no error code"


class AdminUser(HttpUser):
    """One operator with the admin page open (/admin, docs/ops/README.md): it
    polls the live counters every 2 s as the page does, and now and then finds
    a fan of this run with her balance and transactions, and reads the
    refunds, the reports queue and the audit log. One per locust process
    (``fixed_count``), on top of the models; fans take the rest of ``-u``."""

    fixed_count = 1

    def wait_time(self) -> float:
        return 2.0  # the page's STATS_EVERY_MS

    def get(self, path: str, name: str) -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {config().admin_token}"}
        with self.client.get(
            path, headers=headers, name=name, timeout=HTTP_TIMEOUT_S, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_http_error_code(response)}")
                return None
            return cast(dict[str, Any], response.json())

    @task(10)
    def stats(self) -> None:
        self.get("/v1/admin/stats", "GET /v1/admin/stats")

    @task(1)
    def find_a_fan(self) -> None:
        cfg = config()
        found = self.get(
            f"/v1/admin/users?prefix={cfg.prefix}_{cfg.run_tag}_fan&limit=10",
            "GET /v1/admin/users?prefix=",
        )
        if not found or not found["users"]:
            return
        user = random.choice(found["users"])["id"]
        self.get(f"/v1/admin/users/{user}", "GET /v1/admin/users/{user}")
        self.get(
            f"/v1/admin/users/{user}/transactions?limit=50",
            "GET /v1/admin/users/{user}/transactions",
        )

    @task(1)
    def queues(self) -> None:
        self.get("/v1/admin/refunds?limit=50", "GET /v1/admin/refunds")
        self.get("/v1/admin/reports?state=open", "GET /v1/admin/reports")
        self.get("/v1/admin/audit?limit=50", "GET /v1/admin/audit")
