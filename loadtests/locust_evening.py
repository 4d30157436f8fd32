"""Locust: a real evening on tokenchat, a mixed crowd in live rooms.

Most of the people in a live room watch and never pay; a few chat, fewer
tip, fewer still DM the model, and now and then one asks for a private
show while the models run the odd ticket show. This locustfile plays that
crowd with the fans and models of ``loadtests/locustfile.py`` (its session,
retries with the same idempotency key, reporting and set-up are reused: its
rooms, menus and locked photos are created at test start, its ``--tc-*``
options apply), in these proportions of ``-u`` (after the ``--tc-models``
models, which locust starts first):

- ``Viewer``, weight 80, thinks 20-40 s: joins a room and watches (receives
  every event, sends nothing most turns); now and then reads its balance,
  browses the grid or moves to another room. Never funded.
- ``Chatter``, weight 10, 3-10 s: chats (``say``) most turns, tips now and then.
- ``Tipper``, weight 6, 5-15 s: tips (the locustfile's amounts), tips menu
  items, buys a ticket when a show is open in its room, reads the
  leaderboard, chats.
- ``DirectMessager``, weight 3, 5-15 s: paid DMs to its room's model,
  unlocks her photo, chats.
- ``PrivateShowFan``, weight 1, 10-20 s: asks its room's model for a private
  show and ends it at its next turn (metered by the minute, or withdrawn if
  not accepted yet), tips, buys tickets.
- ``EveningModel``, ``--tc-models`` of them (fixed), 0.5-1.5 s: hosts her
  room (stays joined), thanks tippers, accepts or ends private shows, and
  now and then runs a ticket show (schedule, start, end or cancel).

Why these weights: they are this scenario's assumption, not a measurement
of any platform. Payers are a small share of a live audience (here 20 %,
chat included, which is on the generous side so that a short run moves
money); chat is the commonest action after watching; DMs and private shows
are the rarest and dearest. The viewers' long think time makes them what
they are on a real evening: open sessions that cost memory and fan-out,
and almost no commands. Change the weights with ``--tc-evening-weights
viewer,chatter,tipper,dm,private`` (e.g. ``90,6,3,1,0``).

Bounded: only ``127.0.0.1`` (``--tc-allow-remote`` is refused here), at most
``EVENING_USERS_MAX`` users, and a headless run must say its ``--run-time``
(at most ``EVENING_RUN_TIME_MAX_S``). Run it from the repository root
against a local server (``tokenchat dev``, or ``tokenchat serve`` as the
locustfile's docstring starts it)::

    locust -f loadtests/locust_evening.py --headless -u 500 -r 50 -t 60s \\
        --host http://127.0.0.1:8000 --csv /tmp/evening

or let ``python -m loadtests.evening`` start a server of its own (own Redis
prefix and Postgres schema, removed afterwards), run this file, print
requests, failures and p50/p99 per task, and check the books (reconcile).
The rows are the locustfile's (``WS say``, ``WS tip``, ``WS tip
(insufficient)``, ...: its docstring says what each means).
"""

from __future__ import annotations

import random
from typing import Any, cast

from locust import events
from locust.env import Environment

from loadtests import locustfile as base

# --- the mix ------------------------------------------------------------------------
# Weights of the fan classes (the share of -u after the models); see the docstring.
WEIGHTS_DEFAULT = (80, 10, 6, 3, 1)  # viewer, chatter, tipper, dm, private
# Think times, seconds: a viewer mostly watches, a payer acts every few seconds.
VIEWER_WAIT_S = (20.0, 40.0)
CHATTER_WAIT_S = (3.0, 10.0)
TIPPER_WAIT_S = (5.0, 15.0)
DM_WAIT_S = (5.0, 15.0)
PRIVATE_WAIT_S = (10.0, 20.0)

# --- bounds -------------------------------------------------------------------------
# A laptop-sized evening: 5,000 users are 5,000 sockets and greenlets in one
# locust process, about all one process drives (use --processes beyond).
EVENING_USERS_MAX = 5_000  # users
# A headless run stops by itself within this: an hour is a long evening.
EVENING_RUN_TIME_MAX_S = 3_600  # seconds


@base.listen(events.init_command_line_parser)
def _add_evening_options(parser: Any) -> None:
    parser.add_argument(
        "--tc-evening-weights",
        env_var="LOCUST_TC_EVENING_WEIGHTS",
        default=",".join(str(w) for w in WEIGHTS_DEFAULT),
        help="weights of viewer, chatter, tipper, dm and private-show fans",
    )


def _seconds(run_time: Any) -> float | None:
    """``--run-time`` as locust keeps it (seconds, or the text when unparsed)."""
    if run_time is None or run_time == "":
        return None
    if isinstance(run_time, int | float):
        return float(run_time)
    from locust.util.timespan import parse_timespan

    return float(parse_timespan(str(run_time)))


@base.listen(events.init)
def _bound_the_evening(environment: Environment, **_kwargs: Any) -> None:
    """Refuse what is not a bounded local run; set the classes' weights."""
    options = environment.parsed_options
    if options is None:
        return
    problems = []
    if options.tc_allow_remote:
        problems.append("the evening scenario runs against 127.0.0.1 only (no --tc-allow-remote)")
    users = getattr(options, "num_users", None) or 0
    if users > EVENING_USERS_MAX:
        problems.append(f"-u {users} is over EVENING_USERS_MAX ({EVENING_USERS_MAX})")
    run_time = _seconds(getattr(options, "run_time", None))
    if options.headless and run_time is None:
        problems.append("a headless evening needs --run-time (-t)")
    if run_time is not None and run_time > EVENING_RUN_TIME_MAX_S:
        problems.append(f"--run-time over EVENING_RUN_TIME_MAX_S ({EVENING_RUN_TIME_MAX_S} s)")
    try:
        weights = [int(w) for w in options.tc_evening_weights.split(",")]
    except ValueError:
        weights = []
    if len(weights) != len(FAN_CLASSES) or min(weights) < 0 or sum(weights) == 0:
        problems.append("--tc-evening-weights takes 5 integers >= 0, not all 0")
    if problems:
        raise SystemExit("locust_evening: " + "; ".join(problems))
    for cls, weight in zip(FAN_CLASSES, weights, strict=True):
        cls.weight = weight


# ==================================================================================
# The crowd
# ==================================================================================


def _weighted(tasks: dict[Any, int]) -> list[Any]:
    """Locust's task list: each task as many times as its weight."""
    return [fn for fn, count in tasks.items() for _ in range(count)]


class Viewer(base.TokenchatUser):
    """Watches a room: an open session that receives every event of it."""

    weight = WEIGHTS_DEFAULT[0]
    role = "fan"

    def wait_time(self) -> float:
        return random.uniform(*VIEWER_WAIT_S)

    def pick_user_id(self) -> str:
        cfg = base.config()
        return f"{cfg.prefix}_{cfg.run_tag}_viewer{next(base.FanUser._numbers):05d}"

    def home_room(self) -> str:
        return self.cfg.model_id(random.randrange(self.cfg.models))

    def on_start(self) -> None:
        super().on_start()
        self.in_room()

    def watch(self) -> None:
        """Nothing sent: be in the room (a lost session reconnects here)."""
        self.in_room()

    def check_balance(self) -> None:
        self.command("balance", {"type": "balance"})


Viewer.tasks = _weighted(
    {
        Viewer.watch: 20,
        Viewer.check_balance: 1,
        # FanUser's, which need only what every TokenchatUser has.
        base.FanUser.change_room: 1,
        base.FanUser.discover: 1,
    }
)


def _fan_class(
    name: str,
    weight: int,
    wait_s: tuple[float, float],
    tasks: dict[Any, int],
    doc: str,
) -> type[base.FanUser]:
    """A ``FanUser`` (funded at start, topped up now and then) with its own
    think time and only ``tasks`` (FanUser's methods, by weight)."""

    def wait_time(self: base.FanUser) -> float:
        return random.uniform(*wait_s)

    def pick_user_id(self: base.FanUser) -> str:
        cfg = base.config()
        return f"{cfg.prefix}_{cfg.run_tag}_{name.lower()}{next(base.FanUser._numbers):05d}"

    cls = cast(
        type[base.FanUser],
        type(
            name,
            (base.FanUser,),
            {
                "__doc__": doc,
                "__module__": __name__,
                "weight": weight,
                "wait_time": wait_time,
                "pick_user_id": pick_user_id,
            },
        ),
    )
    # Locust's metaclass gathered FanUser's whole mix; this class has its own.
    cls.tasks = _weighted(tasks)
    return cls


Chatter = _fan_class(
    "Chatter",
    WEIGHTS_DEFAULT[1],
    CHATTER_WAIT_S,
    {base.FanUser.say: 10, base.FanUser.tip: 1, base.FanUser.check_balance: 1},
    "Chats most turns, tips now and then.",
)
Tipper = _fan_class(
    "Tipper",
    WEIGHTS_DEFAULT[2],
    TIPPER_WAIT_S,
    {
        base.FanUser.tip: 6,
        base.FanUser.tip_item: 2,
        base.FanUser.buy_ticket: 2,
        base.FanUser.say: 2,
        base.FanUser.read_leaderboard: 1,
    },
    "Tips, tips menu items, buys tickets to open shows, chats.",
)
DirectMessager = _fan_class(
    "DirectMessager",
    WEIGHTS_DEFAULT[3],
    DM_WAIT_S,
    {base.FanUser.dm: 5, base.FanUser.unlock: 1, base.FanUser.say: 1},
    "Sends paid DMs to the room's model, unlocks her photo.",
)
PrivateShowFan = _fan_class(
    "PrivateShowFan",
    WEIGHTS_DEFAULT[4],
    PRIVATE_WAIT_S,
    {base.FanUser.private_show: 3, base.FanUser.tip: 2, base.FanUser.buy_ticket: 1},
    "Asks for a private show and ends it at the next turn; tips, buys tickets.",
)
FAN_CLASSES: tuple[type[base.TokenchatUser], ...] = (
    Viewer,
    Chatter,
    Tipper,
    DirectMessager,
    PrivateShowFan,
)


class EveningModel(base.ModelUser):
    """Hosts her room; private shows when asked, a ticket show now and then.
    As many as ``--tc-models`` (ModelUser.fixed_count, set at init)."""


# Locust's metaclass gave her ModelUser's whole mix (moderation, goals,
# payouts, ...); an evening's host does these, by weight.
EveningModel.tasks = _weighted(
    {
        base.ModelUser.stay: 20,
        base.ModelUser.thank: 2,
        base.ModelUser.private_show: 2,
        base.ModelUser.run_show: 1,
        base.ModelUser.check_balance: 1,
    }
)
