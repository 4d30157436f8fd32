"""A terminal chat client on ``tokenchat.client_demo.client.Session``.

    python -m tokenchat.client_demo.cli --url ws://127.0.0.1:8001/ws --token TOKEN [--room ROOM]
    tokenchat chat --url ... --token ... [--room ROOM] [--http http://127.0.0.1:8000]

It reads lines from standard input (a terminal or a pipe) and prints what
happens, one line each, to standard output:

    plain text        say it in the current room
    /join ROOM        join ROOM (its recent history is shown) and make it current
    /leave            leave the current room
    /tip N [TEXT]     tip N tokens in the current room
    /menu [USER]      show the tip menu of USER (default: the current room's
                      model), numbered (GET on the HTTP API, --http)
    /item N [TEXT]    tip item N of the current room's menu, at most at the
                      price last shown (looked up and shown first when none
                      was); refused, not charged, if the price rose since
    /price USER       show what a DM to USER costs (GET on the HTTP API, --http)
    /dm USER TEXT     send a private message at the price last shown for USER
                      (looked up and shown first when none was); it is refused,
                      not charged, if USER's price rose since
    /dm --max N USER TEXT   the same, paying at most N tokens
    /balance          show your balance
    /rooms            list the rooms (GET /v1/rooms on the HTTP API, --http)
    /rooms [trending|viewers|new] [#TAG] [TEXT]   sorted, filtered by tag and text
    /rooms more       the next page of the last /rooms (the same ranking, even
                      if ranks moved since)
    /follow MODEL, /unfollow MODEL   follow a model: her `live` reaches you (--http)
    /follows          the models you follow (--http)
    /notifications    your stored notifications, newest first (--http)
    /offer MODEL N TEXT   offer MODEL N tokens for a custom request (held in escrow)
    /requests         list your custom requests, as fan and as model
    /accept R, /decline R, /cancel R   accept or decline request R (model),
                      cancel it (fan); R is its id, or its number in /requests
    /deliver R [TEXT] deliver request R (model): its tokens are released to you
    /upload PATH PRICE [PREVIEW TEXT]   (a model) upload a photo or video
                      (--http); a video needs the preview text
    /post MEDIA [TEXT]  (a model) show your locked media in your room
    /unlock MEDIA     buy locked media at the price last shown for it, and
                      print its URL; refused, not charged, if it rose since
    /unlock --max N MEDIA   the same, paying at most N tokens
    /url MEDIA        a new URL of media you own or unlocked (--http)
    /private MODEL RATE   ask MODEL for a private show at RATE tokens a minute
    /paccept S, /pdecline S, /pend S   accept or decline show S (model), end
                      it (either side); accepting joins its private room
    /shows            list the current room's ticket shows (numbered; --http)
    /leaderboard [WINDOW]   the current room's top tippers over 12h, day,
                      week or all (default 12h; --http); a sender's tier
                      shows as "(tier N)" beside their name when above 0
    /limits           show your spending limits, what you spent and what is
                      left per window (--http)
    /limits WINDOW N|none   set your daily, weekly or monthly limit (lower:
                      at once; higher or none: after 24 h)
    /limits reality N|off   a reality check every N minutes (or none)
    /exclude DAYS     exclude yourself from spending and buying for DAYS days
                      (it cannot be lifted early)
    /schedule PRICE MIN_S IN_S TITLE   schedule a ticket show in your room
                      (model; POST /v1/me/shows on --http): PRICE tokens a
                      ticket, paid if it runs MIN_S seconds, starting in IN_S
    /ticket S         buy a ticket to show S of the current room (S: its id,
                      or its number in /shows)
    /start S, /end S, /showcancel S   start, end or cancel your show S (model)
    /mute USER SECONDS, /unmute USER   (the room's model or a moderator)
                      USER may not chat in the current room for SECONDS
    /kick USER        remove USER from the current room (they may come back)
    /ban USER [SECONDS], /unban USER   keep USER out of the current room,
                      for SECONDS or until unbanned
    /clear USER       remove USER's lines from the current room's history
    /slow SECONDS     one line per SECONDS per member in the current room (0: off)
    /goal             show the current room's tip goal (--http)
    /setgoal [--aon] [--in S] TARGET TITLE   set your room's tip goal (model;
                      PUT /v1/me/goal on --http): TARGET tokens, within S
                      seconds if given; --aon holds the tips until it is
                      reached (refunded if the time runs out first)
    /delgoal          remove your room's goal (model); held tips go back
    /history [KIND]   your transactions, newest first, numbered (--http);
                      `/history more` shows the next older page
    /receipt T        the receipt of transaction T (its id, or its number in
                      /history): what, to whom, tokens, money value, earnings
    /dms USER         your DM conversation with USER, oldest of the page first
    /block USER, /unblock USER, /blocks   refuse (or take again) USER's DMs
    /report USER REASON   report USER to the admins
    /payout TOKENS    ask for TOKENS of your earnings to be paid out (model;
                      --http): held until an admin approves or rejects it
    /payouts          your payouts and their states (model; --http)
    /earnings [FROM [TO]]   your earnings statement by kind, in tokens and
                      money at the payout rule of each earning (model;
                      FROM/TO: ISO dates or epoch ms; default the last 30 days)
    /payoutmethod [bank HOLDER_IBAN | paypal EMAIL]   show or set your payout
                      method (bank: `bank "Alice A" DE89...`; model; --http)
    /export [FILE]    your data as JSON (GET /v1/me/export on --http): a
                      summary, and the whole of it written to FILE if given
    /deleteaccount ID delete your account (DELETE /v1/me); ID: your own user
                      id, typed again to confirm. Your balance is forfeited.
    /help             this list
    /quit             leave (so does the end of the input)

The connection is re-established by itself when it drops; the rooms are
re-joined and the messages missed meanwhile are shown, every one in order,
however many pages of history they take (the client reads them with
`history` until the server says there are no more, then the live ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import InvalidHandshake

from tokenchat.protocol import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

from .client import (
    CommandError,
    Event,
    HttpError,
    Session,
    SessionClosed,
    block,
    blocks,
    delete_account,
    delete_goal,
    dm_history,
    earnings,
    export_data,
    follow,
    follows,
    get_goal,
    get_leaderboard,
    get_limits,
    get_menu,
    media_url,
    my_payouts,
    notifications,
    payout_status,
    put_limits,
    receipt,
    request_payout,
    self_exclude,
    set_goal,
    set_payout_method,
    transactions,
    upload_media,
)
from .client import report as report_user

DEFAULT_URL = "ws://127.0.0.1:8001/ws"
# How long GET /v1/rooms may take.
HTTP_TIMEOUT_S = 5.0
# Rooms one /rooms line names: a line a terminal shows whole; /rooms more
# gives the next ones.
ROOMS_PAGE = 20
SUBPROTOCOLS = {"json": JSON_SUBPROTOCOL, "msgpack": MSGPACK_SUBPROTOCOL}
HELP = """commands:
  TEXT            say TEXT in the current room
  /join ROOM      join ROOM and make it the current room
  /leave          leave the current room
  /tip N [TEXT]   tip N tokens in the current room
  /menu [USER]    show the tip menu of USER (default: this room's model)
  /item N [TEXT]  tip item N of this room's menu, at most at the price shown
  /price USER     show what a DM to USER costs
  /dm USER TEXT   send USER a private message, at most at the price shown
  /dm --max N USER TEXT   ... paying at most N tokens
  /balance        show your balance
  /rooms [trending|viewers|new] [#TAG] [TEXT]   list the rooms, sorted and filtered
  /rooms more     the next page of that list
  /follow MODEL, /unfollow MODEL   follow a model (you see when she goes live)
  /follows        the models you follow
  /notifications  your notifications, newest first
  /offer MODEL N TEXT   offer MODEL N tokens for a custom request
  /requests       list your custom requests (numbered)
  /accept R, /deliver R [TEXT], /decline R   a model's answers to request R
  /cancel R       withdraw your offer R
  /upload PATH PRICE [PREVIEW TEXT]   upload a photo or video (a model)
  /post MEDIA [TEXT]   show your locked media in your room (a model)
  /unlock [--max N] MEDIA   buy locked media and print its URL
  /url MEDIA      a new URL of media you own or unlocked
  /private MODEL RATE   ask MODEL for a private show (RATE tokens a minute)
  /paccept S, /pdecline S   a model's answers to show S
  /pend S         end show S (either side)
  /shows          list the current room's ticket shows (numbered)
  /leaderboard [WINDOW]   the current room's top tippers (12h, day, week, all)
  /schedule PRICE MIN_S IN_S TITLE   schedule a ticket show (model)
  /ticket S       buy a ticket to show S of the current room
  /start S, /end S, /showcancel S   run your show S (model)
  /mute USER SECONDS, /unmute USER   mute USER in the current room (moderators)
  /kick USER, /ban USER [SECONDS], /unban USER   remove USER (moderators)
  /clear USER     remove USER's lines from the room's history (moderators)
  /slow SECONDS   slow mode in the current room, 0 turns it off (moderators)
  /goal           show the current room's tip goal
  /setgoal [--aon] [--in S] TARGET TITLE   set your room's tip goal (model)
  /delgoal        remove your room's tip goal (model)
  /history [KIND] your transactions (numbered); /history more: older ones
  /receipt T      the receipt of transaction T (id or number in /history)
  /dms USER       your DM conversation with USER
  /block USER, /unblock USER, /blocks   refuse or take USER's DMs again
  /report USER REASON   report USER to the admins
  /limits         your spending limits and what is left
  /limits daily|weekly|monthly N|none   set a limit (higher: after 24 h)
  /limits reality N|off   a reality check every N minutes
  /exclude DAYS   no spending or buying for DAYS days (not liftable)
  /payout TOKENS  ask for a payout (model); /payouts lists yours
  /earnings [FROM [TO]]   your earnings statement (model)
  /payoutmethod [bank "HOLDER" IBAN | paypal EMAIL]   your payout method (model)
  /export [FILE]  your data as JSON (written to FILE if given)
  /deleteaccount ID   delete your account (ID: your user id, to confirm)
  /quit           leave"""

Output = Callable[[str], None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's options (shared with ``tokenchat chat``)."""
    parser.add_argument(
        "--url",
        default=os.environ.get("TOKENCHAT_WS_URL", DEFAULT_URL),
        help=f"WebSocket URL (default {DEFAULT_URL}, or TOKENCHAT_WS_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TOKENCHAT_TOKEN"),
        help="session token, e.g. from `tokenchat token USER` (or TOKENCHAT_TOKEN)",
    )
    parser.add_argument(
        "--failover-url",
        action="append",
        default=[],
        metavar="URL",
        help="another gateway node of the same deployment (repeatable): each reconnect "
        "attempt dials the next of --url and these, in rotation",
    )
    parser.add_argument("--room", help="room to join at start")
    parser.add_argument(
        "--http",
        default=os.environ.get("TOKENCHAT_HTTP_URL"),
        help="HTTP API base URL for /rooms and /price, e.g. http://127.0.0.1:8000 "
        "(or TOKENCHAT_HTTP_URL)",
    )
    parser.add_argument(
        "--subprotocol", choices=sorted(SUBPROTOCOLS), default="json", help="wire encoding"
    )


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m tokenchat.client_demo.cli"
) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="tokenchat terminal client",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def tokenchat_chat(argv: Sequence[str]) -> int:
    """``tokenchat chat ARGS``: registered in the ``tokenchat.commands`` entry points."""
    return main(argv, prog="tokenchat chat")


def run(args: argparse.Namespace) -> int:
    """Run the client with parsed ``args``; the process exit status."""
    if not args.token:
        print("error: give --token (or set TOKENCHAT_TOKEN)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(chat(args))
    except KeyboardInterrupt:
        return 130


def say(line: str) -> None:
    print(line, flush=True)  # flushed: the output is often a pipe


# --- formatting ------------------------------------------------------------------------


def format_event(event: Event) -> str | None:
    """One readable line for an event, None for one not worth a line."""
    type_ = event.get("type")
    room = event.get("room")
    if type_ == "message":
        return f"[{room}] {event.get('from')}{_tier(event)}: {event.get('text')}"
    if type_ == "tip":
        text = event.get("text")
        item = event.get("item")
        what = f" for {item.get('label')}" if isinstance(item, dict) else ""
        who = f"{event.get('from')}{_tier(event)}"
        return f"[{room}] {who} tipped {event.get('amount')}{what}" + (f": {text}" if text else "")
    if type_ == "king":
        return f"[{room}] * {format_king(event.get('king'))}"
    if type_ == "live":
        return f"* {event.get('model')} is live (/join {event.get('model')})"
    if type_ == "dm":
        price = event.get("price")
        cost = f"{price} tokens" if price else "free"
        line = f"DM from {event.get('from')}{_tier(event)} ({cost}): {event.get('text')}"
        media = event.get("media")
        return line + (f" [{format_media(media)}]" if isinstance(media, dict) else "")
    if type_ == "media":
        media = event.get("media")
        text = event.get("text")
        shown = format_media(media) if isinstance(media, dict) else "?"
        return f"[{room}] {event.get('from')} posted {shown}" + (f": {text}" if text else "")
    if type_ == "presence":
        viewers = event.get("viewers")
        return f"[{room}] {viewers} viewer{'' if viewers == 1 else 's'}"
    if type_ == "balance":
        return f"balance: {event.get('balance')}"
    if type_ == "request":
        return f"request {format_request(event)}"
    if type_ == "private":
        return f"private {format_private(event)}"
    if type_ == "show":
        return f"[{room}] show {format_show(event)}"
    if type_ == "clear" and event.get("all") is True:
        return f"[{room}] * {event.get('user')} deleted their account: their lines are gone"
    if type_ == "clear":
        return f"[{room}] * {event.get('user')}'s messages were cleared by a moderator"
    if type_ == "removed":
        until = event.get("until")
        how = f" until {format_until(until)}" if isinstance(until, int) else ""
        return f"[{room}] * you were {event.get('reason')} from {room}{how}"
    if type_ == "goal" and isinstance(event.get("goal"), dict):
        return f"[{room}] goal {format_goal(event['goal'])}"
    if type_ == "reality_check":
        minutes = int(event.get("online_s") or 0) // 60
        return f"* reality check: online {minutes} min, spent {event.get('spent')} tokens"
    if type_ == "error":
        return f"error {event.get('code')}: {event.get('message')}"
    if type_ == "gap":
        return (
            f"[{room}] * some messages were missed while disconnected "
            "(the room no longer keeps them); the oldest it keeps follow"
        )
    if type_ == "room_lost":
        return f"[{room}] * could not rejoin: {event.get('code')} {event.get('message')}"
    if type_ == "reconnecting":
        code, reason = event.get("code"), event.get("reason")
        why = f"connection lost (code {code}{f', {reason}' if reason else ''})"
        if code is None:
            why = f"could not reconnect ({reason})"
        return f"* {why}; reconnecting in {event.get('delay_s', 0):.1f} s"
    if type_ == "reconnected":
        return "* reconnected"
    return f"* {json.dumps(event, ensure_ascii=False)}"


def _tier(event: Event) -> str:
    """ " (tier N)" after a sender above tier 0 (GET /v1/tiers names them)."""
    tier = event.get("tier")
    return f" (tier {tier})" if isinstance(tier, int) and tier > 0 else ""


def format_king(king: Any) -> str:
    """A room's king ({user, tokens} or null) in words."""
    if isinstance(king, dict):
        return f"king: {king.get('user')} ({king.get('tokens')} tokens in 12 h)"
    return "no king"


def format_private(show: Event) -> str:
    """A private show on one line: id, sides, rate, state, meter."""
    line = (
        f"{show.get('show')} {show.get('fan')} -> {show.get('model')}: "
        f"{show.get('rate')} tokens/min, {show.get('state')}, "
        f"{show.get('seconds')} s, {show.get('charged')} charged"
    )
    if show.get("reason"):
        line += f" (ended: {show.get('reason')})"
    if show.get("warning") == "low_balance":
        line += f"; low balance: {show.get('seconds_left')} s left"
    return line


def format_request(request: Event) -> str:
    """A custom request on one line: id, sides, amount, state, text."""
    line = (
        f"{request.get('request')} {request.get('from')} -> {request.get('to')}: "
        f"{request.get('amount')} tokens, {request.get('state')}: {request.get('text')}"
    )
    delivery = request.get("delivery")
    if isinstance(delivery, dict):
        media = delivery.get("media")
        line += f" | delivered: {delivery.get('text') or ''}" + (f" [{media}]" if media else "")
    return line


def format_media(media: dict[str, Any]) -> str:
    """Locked media in one line: what it is, its price, how to unlock it."""
    preview = media.get("preview") or {}
    teaser = f' "{preview.get("text")}"' if preview.get("kind") == "text" else ""
    kind = "a photo" if media.get("kind") == "image" else "a video"
    return f"{kind}{teaser}, {media.get('price')} tokens: /unlock {media.get('id')}"


def format_goal(goal: dict[str, Any]) -> str:
    """A tip goal on one line: title, progress of target, state, kind."""
    kind = ", all or nothing" if goal.get("all_or_nothing") else ""
    deadline = goal.get("deadline")
    if isinstance(deadline, int) and goal.get("state") == "active":
        kind += f", {max(0, int(deadline / 1000 - time.time()))} s left"
    return (
        f"{goal.get('title')}: {goal.get('progress')}/{goal.get('target')} "
        f"({goal.get('state')}{kind})"
    )


def format_show(show: Event) -> str:
    """A ticket show on one line: id, state, price, minimum length, title."""
    return (
        f"{show.get('show')} {show.get('state')}: {show.get('title')} "
        f"({show.get('price')} tokens a ticket, min {show.get('min_s')} s)"
    )


def format_until(until_ms: int) -> str:
    """A restriction's end, in local time (the seconds matter for a mute)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until_ms / 1000))


def format_error(exc: BaseException) -> str:
    if isinstance(exc, CommandError) and exc.code == "SPEND_LIMIT":
        reply = exc.reply
        return (
            f"error SPEND_LIMIT: your {reply.get('window')} limit leaves {reply.get('remaining')}"
            f" tokens until {format_ms(reply.get('resets_at'))}; nothing was charged"
        )
    if isinstance(exc, CommandError) and exc.code == "SELF_EXCLUDED":
        return (
            f"error SELF_EXCLUDED: you excluded yourself until {format_ms(exc.reply.get('until'))}"
        )
    if isinstance(exc, CommandError):
        until = exc.reply.get("until")
        ends = f" (until {format_until(until)})" if isinstance(until, int) else ""
        return f"error {exc.code}: {exc.reply.get('message')}{ends}"
    return f"error: {exc}"


# --- the loop --------------------------------------------------------------------------


@dataclass
class State:
    room: str | None = None  # the current room
    # The DM price last shown for each user: a /dm to them pays at most this
    # (max_price), so a price raised after it was shown is refused, not charged.
    dm_prices: dict[str, int] = field(default_factory=dict)
    # The menu last shown for each model (items {id, label, price}): /item N
    # tips the N-th at most at its shown price, like /dm.
    menus: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # The ids of the last /requests listing, so `/accept 1` names the first.
    requests: list[str] = field(default_factory=list)
    # The price last shown for each media (in a `media` or `dm` event): an
    # /unlock pays at most this, as a /dm does.
    media_prices: dict[str, int] = field(default_factory=dict)
    # The ids of the last /shows listing, so `/ticket 1` names the first.
    shows: list[str] = field(default_factory=list)
    # The transactions of the last /history listing (`/receipt 1` names the
    # first), and what `/history more` asks for: the kind and the cursor.
    transactions: list[str] = field(default_factory=list)
    history_kind: str | None = None
    history_next: str | None = None
    # What `/rooms more` asks for: the last /rooms query and its next cursor.
    rooms_query: str = ""
    rooms_next: str | None = None


async def chat(args: argparse.Namespace, out: Output = say) -> int:
    session = Session(
        args.url,
        args.token,
        subprotocol=SUBPROTOCOLS[args.subprotocol],
        failover_urls=args.failover_url,
    )
    try:
        await session.start()
    except SessionClosed as exc:
        out(f"error: {exc}")
        return 1
    except (OSError, ConnectionError, InvalidHandshake) as exc:
        out(f"error: cannot connect to {args.url}: {exc or type(exc).__name__}")
        return 1
    welcome = session.welcome or {}
    user = welcome.get("user", {})
    out(f"* connected as {user.get('id')} ({user.get('role')}); balance {welcome.get('balance')}")
    state = State()
    printer = asyncio.create_task(print_events(session, out, state))
    lines = stdin_lines()
    try:
        if args.room:
            await handle_line(f"/join {args.room}", session, state, args, out)
        while True:
            next_line = asyncio.ensure_future(lines.get())
            await asyncio.wait({next_line, printer}, return_when=asyncio.FIRST_COMPLETED)
            if not next_line.done():  # the session ended
                next_line.cancel()
                break
            line = next_line.result()
            if line is None or not await handle_line(line, session, state, args, out):
                break
    finally:
        await session.close()
        status = await printer  # prints the events still queued
    return status


async def print_events(session: Session, out: Output, state: State | None = None) -> int:
    try:
        async for event in session:
            media = event.get("media")
            if state is not None and isinstance(media, dict):
                remember_media_price(state, media)
            line = format_event(event)
            if line is not None:
                out(line)
    except SessionClosed as exc:
        out(f"* disconnected: {exc}")
        return 1
    return 0


def remember_media_price(state: State, media: dict[str, Any]) -> None:
    if isinstance(media.get("id"), str) and isinstance(media.get("price"), int):
        state.media_prices[media["id"]] = media["price"]


def stdin_lines() -> asyncio.Queue[str | None]:
    """Lines of standard input, then None at its end.

    Read by a daemon thread: it works the same for a terminal, a pipe and a
    file, and does not keep the process alive once the chat is over."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def put(line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting
            loop.call_soon_threadsafe(queue.put_nowait, line)

    def read() -> None:
        try:
            for line in sys.stdin:
                put(line.rstrip("\r\n"))
        finally:
            put(None)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return queue


async def handle_line(
    line: str, session: Session, state: State, args: argparse.Namespace, out: Output
) -> bool:
    """Run one input line; False to quit."""
    if not line.strip():
        return True
    if not line.startswith("/"):
        if state.room is None:
            out("error: join a room first (/join ROOM)")
            return True
        await report(out, session.say(state.room, line))
        return True
    command, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if command in ("quit", "exit", "q"):
        return False
    if command == "help":
        out(HELP)
    elif command == "join" and rest:
        reply = await report(out, session.join(rest))
        if reply is not None:
            state.room = rest
            room = reply["room"]
            out(f"* joined {rest} ({room.get('viewers')} here, tip min {room.get('tip_min')})")
            if room.get("king"):
                out(f"* {format_king(room['king'])}")
            if room.get("show"):
                ticket = "you have a ticket" if reply.get("ticket") else "no ticket"
                out(f"* show {format_show(room['show'])}; {ticket}")
            if room.get("goal"):
                out(f"* goal {format_goal(room['goal'])}")
    elif command == "leave":
        if state.room is None:
            out("error: not in a room")
        elif await report(out, session.leave(state.room)) is not None:
            out(f"* left {state.room}")
            state.room = next(iter(session.rooms), None)
            if state.room is not None:
                out(f"* current room: {state.room}")
    elif command == "tip":
        await tip(rest, session, state, out)
    elif command == "dm":
        await dm(rest, session, state, args, out)
    elif command == "menu":
        await show_menu(rest or state.room, state, args, out)
    elif command == "item":
        await tip_item(rest, session, state, args, out)
    elif command == "price" and rest:
        await show_price(rest, state, args, out)
    elif command == "balance":
        if (reply := await report(out, session.call("balance"))) is not None:
            out(f"balance: {reply['balance']}")
    elif command == "rooms":
        await list_rooms(args, out, rest, state)
    elif command in ("follow", "unfollow", "follows", "notifications"):
        await follow_command(command, rest, args, out)
    elif command == "offer":
        await offer(rest, session, out)
    elif command == "requests":
        await list_requests(session, state, out)
    elif command in ("accept", "deliver", "decline", "cancel"):
        await answer_request(command, rest, session, state, out)
    elif command == "upload" and rest:
        await upload(rest, args, out)
    elif command == "post" and rest:
        media, _, text = rest.partition(" ")
        if state.room is None:
            out("error: join your room first (/join ROOM)")
        elif (reply := await report(out, session.post_media(state.room, media, text))) is not None:
            out(f"* posted {media} in {state.room}")
    elif command == "unlock" and rest:
        await unlock(rest, session, state, args, out)
    elif command == "url" and rest:
        await show_url(rest, args, out)
    elif command == "private":
        await private_request(rest, session, out)
    elif command in ("paccept", "pdecline", "pend") and rest:
        await answer_private(command, rest, session, state, out)
    elif command == "shows":
        await list_shows(state, args, out)
    elif command == "leaderboard":
        await show_leaderboard(rest or "12h", state, args, out)
    elif command == "schedule":
        await schedule_show(rest, args, out)
    elif command in ("ticket", "start", "end", "showcancel"):
        await show_command(command, rest, session, state, out)
    elif command in MODERATION_COMMANDS:
        await moderate(command, rest, session, state, out)
    elif command in ("goal", "setgoal", "delgoal"):
        await goal_command(command, rest, state, args, out)
    elif command in ("history", "receipt", "dms", "block", "unblock", "blocks", "report"):
        await history_command(command, rest, state, args, out)
    elif command == "limits":
        await limits(rest, args, out)
    elif command == "exclude":
        await exclude(rest, args, out)
    elif command in PAYOUT_COMMANDS:
        await payout_command(command, rest, args, out)
    elif command in ("export", "deleteaccount"):
        await account_command(command, rest, args, out)
    else:
        out(f"error: unknown command {line.split()[0]!r} (/help lists them)")
    return True


# --- moderation ----------------------------------------------------------------------
MODERATION_COMMANDS = ("mute", "unmute", "kick", "ban", "unban", "clear", "slow")
MODERATION_DONE = {
    "mute": "muted",
    "unmute": "unmuted",
    "kick": "kicked",
    "ban": "banned",
    "unban": "unbanned",
    "clear": "cleared",
}


async def moderate(command: str, rest: str, session: Session, state: State, out: Output) -> None:
    """/mute USER SECONDS, /unmute USER, /kick USER, /ban USER [SECONDS],
    /unban USER, /clear USER, /slow SECONDS: in the current room."""
    room = state.room
    if room is None:
        out("error: join a room first (/join ROOM)")
        return
    words = rest.split()
    if command == "slow":
        if len(words) != 1 or not words[0].isdigit():
            out("usage: /slow SECONDS (0 turns slow mode off)")
        elif await report(out, session.slow(room, int(words[0]))) is not None:
            slow_s = int(words[0])
            out(f"* slow mode in {room}: {slow_s} s" if slow_s else f"* slow mode off in {room}")
        return
    takes_seconds = command in ("mute", "ban")
    seconds_ok = len(words) == 2 and words[1].isdigit()
    if not words or len(words) > 2 or (len(words) == 2 and not (takes_seconds and seconds_ok)):
        out(f"usage: /{command} USER" + (" SECONDS" if takes_seconds else ""))
        return
    if command == "mute" and not seconds_ok:
        out("usage: /mute USER SECONDS")
        return
    user = words[0]
    seconds = int(words[1]) if seconds_ok else None
    call: Awaitable[dict[str, Any]]
    if command == "mute":
        call = session.mute(room, user, seconds or 0)
    elif command == "ban":
        call = session.ban(room, user, seconds)
    else:
        call = getattr(session, command)(room, user)
    reply = await report(out, call)
    if reply is not None:
        until = reply.get("until")
        ends = f" until {format_until(until)}" if isinstance(until, int) else ""
        out(f"* {user} {MODERATION_DONE[command]} in {room}{ends}")


async def tip(rest: str, session: Session, state: State, out: Output) -> None:
    amount_text, _, text = rest.partition(" ")
    try:
        amount = int(amount_text)
    except ValueError:
        out("usage: /tip N [TEXT]")
        return
    if state.room is None:
        out("error: join a room first (/join ROOM)")
        return
    room = state.room
    if (reply := await report(out, session.tip(room, amount, text.strip()))) is not None:
        out(f"* tipped {amount} in {room}; balance {reply.get('balance')}{_again(reply)}")


async def show_menu(
    user: str | None, state: State, args: argparse.Namespace, out: Output
) -> list[dict[str, Any]] | None:
    """Print ``user``'s tip menu, numbered, and remember it; None on failure."""
    if user is None:
        out("usage: /menu USER (or join a room first)")
        return None
    if not args.http:
        out("error: /menu needs the HTTP API's URL (--http http://HOST:8000)")
        return None
    try:
        items = await get_menu(args.http, user)
    except HttpError as exc:
        out(f"error {exc.code}: {exc.message}")
        return None
    except OSError as exc:
        out(f"error: GET menu of {user}: {exc}")
        return None
    state.menus[user] = items
    if not items:
        out(f"* {user} has no tip menu")
    for n, item in enumerate(items, 1):
        out(f"  {n}. {item['label']}: {item['price']} tokens")
    return items


async def tip_item(
    rest: str, session: Session, state: State, args: argparse.Namespace, out: Output
) -> None:
    number_text, _, text = rest.partition(" ")
    if not number_text.isdigit():
        out("usage: /item N [TEXT] (N from /menu)")
        return
    room = state.room
    if room is None:
        out("error: join a room first (/join ROOM)")
        return
    items = state.menus.get(room)
    if items is None and (items := await show_menu(room, state, args, out)) is None:
        return
    number = int(number_text)
    if not 1 <= number <= len(items):
        out(f"error: no item {number} on {room}'s menu (/menu shows it)")
        return
    item = items[number - 1]
    try:
        reply = await session.tip_item(room, item["id"], text.strip(), max_price=item["price"])
    except (CommandError, ConnectionError, TimeoutError) as exc:
        out(format_error(exc))
        if isinstance(exc, CommandError) and exc.code in ("PRICE_CHANGED", "NOT_FOUND"):
            state.menus.pop(room, None)  # the menu changed: the next /item shows it again
        return
    out(
        f"* tipped {reply.get('price')} for {item['label']} in {room}; "
        f"balance {reply.get('balance')}{_again(reply)}"
    )


async def dm(
    rest: str, session: Session, state: State, args: argparse.Namespace, out: Output
) -> None:
    max_price: int | None = None
    if rest.startswith("--max "):
        cap, _, rest = rest[len("--max ") :].strip().partition(" ")
        try:
            max_price = int(cap)
        except ValueError:
            out("usage: /dm [--max N] USER TEXT")
            return
    to, _, text = rest.partition(" ")
    if not to or not text.strip():
        out("usage: /dm [--max N] USER TEXT")
        return
    if max_price is None:
        max_price = state.dm_prices.get(to)
    if max_price is None:
        if not args.http:
            out("error: /dm needs a price cap: /dm --max N USER TEXT, or --http to look it up")
            return
        max_price = await show_price(to, state, args, out)
        if max_price is None:
            return
    try:
        reply: dict[str, Any] = await session.dm(to, text.strip(), max_price=max_price)
    except (CommandError, ConnectionError, TimeoutError) as exc:
        out(format_error(exc))
        if isinstance(exc, CommandError) and exc.code == "PRICE_CHANGED":
            state.dm_prices.pop(to, None)  # the next /dm looks it up (and shows it) again
        return
    price = reply.get("price")
    cost = f"{price} tokens" if price else "free"
    out(f"* DM sent to {to} ({cost}); balance {reply.get('balance')}{_again(reply)}")


async def upload(rest: str, args: argparse.Namespace, out: Output) -> None:
    parts = rest.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        out("usage: /upload PATH PRICE [PREVIEW TEXT]")
        return
    if not args.http:
        out("error: /upload needs the HTTP API's URL (--http http://HOST:8000)")
        return
    path, price = parts[0], int(parts[1])
    preview_text = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    try:
        content = await asyncio.to_thread(_read_file, path)
        media = await upload_media(
            args.http, args.token, content, price, filename=path, preview_text=preview_text
        )
    except (OSError, HttpError) as exc:
        out(f"error: {exc}")
        return
    out(f"* uploaded {media['id']} ({media['kind']}, {media['price']} tokens)")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


async def unlock(
    rest: str, session: Session, state: State, args: argparse.Namespace, out: Output
) -> None:
    max_price: int | None = None
    if rest.startswith("--max "):
        cap, _, rest = rest[len("--max ") :].strip().partition(" ")
        if not cap.isdigit():
            out("usage: /unlock [--max N] MEDIA")
            return
        max_price = int(cap)
    media = rest.strip()
    if max_price is None:
        max_price = state.media_prices.get(media)
    if max_price is None:
        out("error: no price seen for this media: /unlock --max N MEDIA")
        return
    try:
        reply: dict[str, Any] = await session.unlock(media, max_price=max_price)
    except (CommandError, ConnectionError, TimeoutError) as exc:
        out(format_error(exc))
        return
    url = (args.http.rstrip("/") if args.http else "") + str(reply.get("url"))
    if reply.get("already"):
        out(f"* {media} is yours already (nothing charged): {url}")
    else:
        out(
            f"* unlocked {media} for {reply.get('price')} tokens; balance "
            f"{reply.get('balance')}{_again(reply)}: {url}"
        )


async def show_url(media: str, args: argparse.Namespace, out: Output) -> None:
    if not args.http:
        out("error: /url needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        signed = await media_url(args.http, args.token, media)
    except (OSError, HttpError) as exc:
        out(f"error: {exc}")
        return
    out(f"* {media}: {signed['url']}")


async def show_price(user: str, state: State, args: argparse.Namespace, out: Output) -> int | None:
    """Print what a DM to ``user`` costs and remember it; None on failure."""
    if not args.http:
        out("error: /price needs the HTTP API's URL (--http http://HOST:8000)")
        return None
    url = f"{args.http.rstrip('/')}/v1/users/{urllib.parse.quote(user, safe='')}/prices"
    try:
        status, body = await asyncio.to_thread(http_get, url, args.token)
    except OSError as exc:
        out(f"error: GET {url}: {exc}")
        return None
    price = body.get("dm") if isinstance(body, dict) else None
    if status != 200 or not isinstance(price, int):
        problem = body.get("error", {}) if isinstance(body, dict) else {}
        out(f"error {problem.get('code', status)}: {problem.get('message', 'no price')}")
        return None
    state.dm_prices[user] = price
    out(f"* a DM to {user} costs {price} tokens" if price else f"* a DM to {user} is free")
    return price


async def offer(rest: str, session: Session, out: Output) -> None:
    parts = rest.split(" ", 2)
    if len(parts) < 3 or not parts[1].isdigit() or not parts[2].strip():
        out("usage: /offer MODEL N TEXT")
        return
    model, amount, text = parts[0], int(parts[1]), parts[2].strip()
    reply = await report(out, session.request_offer(model, text, amount))
    if reply is not None:
        out(f"* request {reply['request']} offered to {model}; balance {reply['balance']}")


async def list_requests(session: Session, state: State, out: Output) -> None:
    listed = await report(out, session.call("request_list"))
    if listed is None:
        return
    requests = listed["requests"]
    state.requests = [request["request"] for request in requests]
    if not requests:
        out("* no requests")
    for number, request in enumerate(requests, 1):
        out(f"{number}. {format_request(request)}")


async def answer_request(
    command: str, rest: str, session: Session, state: State, out: Output
) -> None:
    name, _, text = rest.partition(" ")
    if not name:
        out(f"usage: /{command} R" + (" [TEXT]" if command == "deliver" else ""))
        return
    request = name
    if name.isdigit() and 1 <= int(name) <= len(state.requests):
        request = state.requests[int(name) - 1]
    calls = {
        "accept": lambda: session.request_accept(request),
        "deliver": lambda: session.request_deliver(request, text.strip()),
        "decline": lambda: session.request_decline(request),
        "cancel": lambda: session.request_cancel(request),
    }
    reply = await report(out, calls[command]())
    if reply is not None:
        out(f"* request {request} {reply['state']}{_again(reply)}")


async def private_request(rest: str, session: Session, out: Output) -> None:
    parts = rest.split()
    if len(parts) != 2 or not parts[1].isdigit():
        out("usage: /private MODEL RATE")
        return
    model, rate = parts[0], int(parts[1])
    reply = await report(out, session.private_request(model, rate))
    if reply is not None:
        out(f"* private show {reply['show']} requested from {model} at {reply['rate']}/min")


async def answer_private(
    command: str, show: str, session: Session, state: State, out: Output
) -> None:
    calls = {
        "paccept": lambda: session.private_accept(show),
        "pdecline": lambda: session.private_decline(show),
        "pend": lambda: session.private_end(show),
    }
    reply = await report(out, calls[command]())
    if reply is None:
        return
    if reply.get("state") == "ended":
        out(
            f"* private show {show} ended: {reply.get('seconds')} s, "
            f"{reply.get('charged')} tokens{_again(reply)}"
        )
        return
    out(f"* private show {show} {reply['state']}{_again(reply)}")
    room = reply.get("room")
    if room and await report(out, session.join(room)) is not None:
        state.room = room
        out(f"* joined the private room {room}")


async def list_shows(state: State, args: argparse.Namespace, out: Output) -> None:
    if state.room is None:
        out("error: join a room first (/join ROOM)")
        return
    if not args.http:
        out("error: /shows needs the HTTP API's URL (--http http://HOST:8000)")
        return
    url = f"{args.http.rstrip('/')}/v1/rooms/{urllib.parse.quote(state.room)}/shows"
    try:
        status, body = await asyncio.to_thread(http_get, url, args.token)
    except OSError as exc:
        out(f"error: GET {url}: {exc}")
        return
    if status != 200 or not isinstance(body, dict):
        out(f"error: GET {url} answered {status}")
        return
    shows = body.get("shows") or []
    state.shows = [show["show"] for show in shows]
    if not shows:
        out("* no shows")
    for number, show in enumerate(shows, 1):
        out(f"{number}. {format_show(show)}")


async def schedule_show(rest: str, args: argparse.Namespace, out: Output) -> None:
    parts = rest.split(" ", 3)
    if len(parts) < 4 or not all(part.isdigit() for part in parts[:3]) or not parts[3].strip():
        out("usage: /schedule PRICE MIN_S IN_S TITLE")
        return
    if not args.http:
        out("error: /schedule needs the HTTP API's URL (--http http://HOST:8000)")
        return
    price, min_s, in_s = (int(part) for part in parts[:3])
    body = {
        "title": parts[3].strip(),
        "price": price,
        "min_s": min_s,
        "starts_at": int((time.time() + in_s) * 1000),
    }
    url = args.http.rstrip("/") + "/v1/me/shows"
    try:
        status, reply = await asyncio.to_thread(http_post, url, args.token, body)
    except OSError as exc:
        out(f"error: POST {url}: {exc}")
        return
    if status != 201 or not isinstance(reply, dict):
        problem = reply.get("error", {}) if isinstance(reply, dict) else {}
        out(f"error {problem.get('code', status)}: {problem.get('message', 'not scheduled')}")
        return
    out(f"* show {format_show(reply)}")


async def show_command(
    command: str, rest: str, session: Session, state: State, out: Output
) -> None:
    name = rest.strip()
    if not name:
        out(f"usage: /{command} S")
        return
    show = name
    if name.isdigit() and 1 <= int(name) <= len(state.shows):
        show = state.shows[int(name) - 1]
    if command == "ticket":
        if state.room is None:
            out("error: join a room first (/join ROOM)")
            return
        reply = await report(out, session.buy_ticket(state.room, show))
        if reply is not None:
            had = "you had a ticket already" if reply.get("already") else "ticket bought"
            out(f"* {had} for show {show}; balance {reply['balance']}")
        return
    calls = {
        "start": lambda: session.show_start(show),
        "end": lambda: session.show_end(show),
        "showcancel": lambda: session.show_cancel(show),
    }
    reply = await report(out, calls[command]())
    if reply is not None:
        outcome = f", {reply['outcome']}" if reply.get("outcome") else ""
        out(f"* show {show} {reply['state']}{outcome}{_again(reply)}")


def http_post(url: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST ``body`` as JSON with the token; the status and the JSON reply."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, None


def _again(reply: dict[str, Any]) -> str:
    return " (a retry: it had gone through before)" if reply.get("duplicate") else ""


async def report(out: Output, command: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    """Await a command; its reply, or None after printing why it failed."""
    try:
        reply: dict[str, Any] = await command
    except (CommandError, ConnectionError, TimeoutError) as exc:
        out(format_error(exc))
        return None
    return reply


async def list_rooms(args: argparse.Namespace, out: Output, rest: str, state: State) -> None:
    if not args.http:
        out("error: /rooms needs the HTTP API's URL (--http http://HOST:8000)")
        return
    if rest.strip() == "more":
        if state.rooms_next is None:
            out("no more rooms: /rooms lists them from the top")
            return
        query = state.rooms_query
        page = {"limit": str(ROOMS_PAGE), "cursor": state.rooms_next}
    else:
        query = state.rooms_query = rooms_query(rest)
        page = {"limit": str(ROOMS_PAGE)}
    state.rooms_next = None
    url = (
        args.http.rstrip("/")
        + "/v1/rooms"
        + query
        + ("&" if query else "?")
        + urllib.parse.urlencode(page)
    )
    try:
        status, body = await asyncio.to_thread(http_get, url, args.token)
    except OSError as exc:
        out(f"error: GET {url}: {exc}")
        return
    if status == 404 and not (isinstance(body, dict) and "rooms" in body):
        out(f"error: this server has no room list (GET {url} answered 404)")
        return
    if status != 200 or not isinstance(body, dict):
        problem = body.get("error", {}) if isinstance(body, dict) else {}
        out(
            f"error {problem.get('code', status)}: {problem.get('message', 'GET /v1/rooms failed')}"
        )
        return
    rooms = body.get("rooms") or []
    listed = ", ".join(
        f"{room.get('id')} ({room.get('viewers')} viewer{'' if room.get('viewers') == 1 else 's'})"
        for room in rooms
    )
    next_cursor = body.get("next_cursor")
    state.rooms_next = next_cursor if isinstance(next_cursor, str) else None
    more = " (more: /rooms more)" if state.rooms_next else ""
    out(f"rooms: {listed or 'none'}{more}")


def http_get(url: str, token: str) -> tuple[int, Any]:
    """GET ``url`` with the token; the status and the JSON body (None if not JSON)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, None


# --- receipts, DM history, blocks and reports --------------------------------------------


async def history_command(
    command: str, rest: str, state: State, args: argparse.Namespace, out: Output
) -> None:
    """/history, /receipt, /dms, /block, /unblock, /blocks, /report: the
    HTTP API's (--http) receipts, DM history, blocks and reports."""
    if not args.http:
        out(f"error: /{command} needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        if command == "history":
            await show_history(rest, state, args, out)
        elif command == "receipt":
            await show_receipt(rest, state, args, out)
        elif command == "dms" and rest:
            page = await dm_history(args.http, args.token, rest)
            for message in reversed(page["messages"]):
                paid = f" ({message['price']} tokens)" if message["price"] else ""
                out(f"[dm {message['from']} -> {message['to']}]{paid} {message['text']}")
            if not page["messages"]:
                out(f"* no DMs with {rest}")
        elif command in ("block", "unblock") and rest:
            reply = await block(args.http, args.token, rest, blocked=command == "block")
            out(f"* {rest}'s DMs are {'refused' if reply['blocked'] else 'taken again'}")
        elif command == "blocks":
            listed = await blocks(args.http, args.token)
            out(f"blocked: {', '.join(b['user'] for b in listed) or 'nobody'}")
        elif command == "report":
            user, _, reason = rest.partition(" ")
            if not user or not reason.strip():
                out("usage: /report USER REASON")
                return
            filed = await report_user(args.http, args.token, user, reason.strip())
            out(f"* reported {user} (report {filed['id']})")
        else:
            out(f"usage: /{command} USER")
    except (OSError, HttpError) as exc:
        out(f"error: {exc}")


async def show_history(rest: str, state: State, args: argparse.Namespace, out: Output) -> None:
    if rest == "more":
        if state.history_next is None:
            out("* no older transactions")
            return
        before: str | None = state.history_next
    else:
        state.history_kind, before = rest or None, None
    page = await transactions(args.http, args.token, kind=state.history_kind, before=before)
    state.history_next = page["next"]
    state.transactions = [item["tx"] for item in page["transactions"]]
    for number, item in enumerate(page["transactions"], 1):
        about = item.get("room") or item.get("to") or item.get("media") or item.get("show")
        where = f" ({about})" if about else ""
        who = item.get("counterparty") or "-"
        out(f"{number}. {item['kind']} {item['amount']:+d} {who}{where} tx {item['tx']}")
    if not page["transactions"]:
        out("* no transactions")
    elif page["next"]:
        out("* /history more: older ones")


async def show_receipt(rest: str, state: State, args: argparse.Namespace, out: Output) -> None:
    tx = rest
    if rest.isdigit() and 1 <= int(rest) <= len(state.transactions):
        tx = state.transactions[int(rest) - 1]
    if not tx:
        out("usage: /receipt T (its id, or its number in /history)")
        return
    shown = await receipt(args.http, args.token, tx)
    about = ", ".join(
        f"{name} {shown[name]}" for name in ("room", "media", "show") if name in shown
    )
    out(
        f"receipt {shown['tx']}: {shown['kind']} of {shown['tokens']} tokens "
        f"from {shown['from'] or '-'} to {shown['to'] or '-'}" + (f" ({about})" if about else "")
    )
    value = shown.get("value")
    if value is not None:
        cents = value.get("cents")
        out(
            "  value: "
            + (f"${cents / 100:.2f} at your average purchase price" if cents is not None else "-")
        )
    earnings = shown.get("earnings")
    if earnings is not None:
        out(f"  earnings: ${earnings['cents'] / 100:.2f} at the payout rate")


async def show_leaderboard(
    window: str, state: State, args: argparse.Namespace, out: Output
) -> None:
    """Print the current room's top tippers over ``window``, ranked."""
    if state.room is None:
        out("error: join a room first (/join ROOM)")
        return
    if not args.http:
        out("error: /leaderboard needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        board = await get_leaderboard(args.http, state.room, window)
    except (HttpError, OSError) as exc:
        out(f"error: GET leaderboard of {state.room}: {exc}")
        return
    entries = board.get("entries") or []
    if not entries:
        out(f"* {state.room} ({window}): no tips yet")
        return
    out(f"* {state.room} top tippers ({window}):")
    for entry in entries:
        out(f"  {entry['rank']}. {entry['user']}{_tier(entry)} {entry['tokens']} tokens")


async def goal_command(
    command: str, rest: str, state: State, args: argparse.Namespace, out: Output
) -> None:
    """/goal, /setgoal and /delgoal, over the HTTP API."""
    if not args.http:
        out(f"error: /{command} needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        if command == "goal":
            if state.room is None:
                out("error: join a room first (/join ROOM)")
                return
            goal = await get_goal(args.http, state.room)
            out(f"* goal {format_goal(goal)}" if goal else f"* {state.room} has no goal")
        elif command == "delgoal":
            reply = await delete_goal(args.http, args.token)
            out(f"* goal {format_goal(reply['goal'])}")
        else:
            parsed = parse_setgoal(rest)
            if parsed is None:
                out("usage: /setgoal [--aon] [--in SECONDS] TARGET TITLE")
                return
            target, title, in_s, aon = parsed
            deadline = None if in_s is None else int((time.time() + in_s) * 1000)
            goal = await set_goal(
                args.http, args.token, title, target, deadline_ms=deadline, all_or_nothing=aon
            )
            out(f"* goal {format_goal(goal)}")
    except HttpError as exc:
        out(f"error {exc.code}: {exc.message}")
    except OSError as exc:
        out(f"error: /{command}: {exc}")


def parse_setgoal(rest: str) -> tuple[int, str, int | None, bool] | None:
    """``[--aon] [--in SECONDS] TARGET TITLE``: (target, title, seconds, aon)."""
    words = rest.split()
    aon, in_s = False, None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag == "--aon":
            aon = True
        elif flag == "--in" and words and words[0].isdigit():
            in_s = int(words.pop(0))
        else:
            return None
    if len(words) < 2 or not words[0].isdigit():
        return None
    return int(words[0]), " ".join(words[1:]), in_s, aon


# --- spending limits and self-exclusion ---------------------------------------------


def format_ms(ms: Any) -> str:
    """A time the server gave (ms since the epoch) in UTC, to the minute."""
    if not isinstance(ms, int):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def format_limits(view: dict[str, Any]) -> list[str]:
    lines = []
    for name, window in view["windows"].items():
        limit = window["limit"]
        shown = "no limit" if limit is None else f"limit {limit}, {window['remaining']} left"
        line = (
            f"* {name}: spent {window['spent']}, {shown} (resets {format_ms(window['resets_at'])})"
        )
        pending = view["pending"].get(name)
        if pending is not None:
            to = "none" if pending["to"] is None else pending["to"]
            line += f"; becomes {to} at {format_ms(pending['at'])}"
        lines.append(line)
    if view.get("excluded_until"):
        lines.append(f"* self-excluded until {format_ms(view['excluded_until'])}")
    if view.get("reality_check_min"):
        lines.append(f"* reality check every {view['reality_check_min']} min")
    return lines


async def limits(rest: str, args: argparse.Namespace, out: Output) -> None:
    """/limits (show), /limits WINDOW N|none, /limits reality N|off."""
    if not args.http:
        out("error: /limits needs the HTTP API's URL (--http http://HOST:8000)")
        return
    parts = rest.split()
    changes: dict[str, int | None] = {}
    if parts:
        names = {"daily": "daily", "weekly": "weekly", "monthly": "monthly"}
        names["reality"] = "reality_check_min"
        off = ("none", "off")
        if len(parts) != 2 or parts[0] not in names or not (parts[1].isdigit() or parts[1] in off):
            out("usage: /limits [daily|weekly|monthly N|none] [reality N|off]")
            return
        changes[names[parts[0]]] = None if parts[1] in off else int(parts[1])
    try:
        if changes:
            view = await put_limits(args.http, args.token, **changes)
        else:
            view = await get_limits(args.http, args.token)
    except (HttpError, OSError) as exc:
        out(f"error: {exc}")
        return
    for line in format_limits(view):
        out(line)


async def exclude(rest: str, args: argparse.Namespace, out: Output) -> None:
    if not rest.isdigit():
        out("usage: /exclude DAYS")
        return
    if not args.http:
        out("error: /exclude needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        until = await self_exclude(args.http, args.token, int(rest))
    except (HttpError, OSError) as exc:
        out(f"error: {exc}")
        return
    out(f"* self-excluded until {format_ms(until)}: no spending or buying until then")


# --- payouts (docs/protocol.md, "Payouts") -----------------------------------------------
PAYOUT_COMMANDS = ("payout", "payouts", "earnings", "payoutmethod")


def format_payout(payout: dict[str, Any]) -> str:
    money = f"${payout['cents'] / 100:.2f}"
    return f"{payout['payout']}: {payout['tokens']} tokens ({money}) {payout['state']}"


async def payout_command(command: str, rest: str, args: argparse.Namespace, out: Output) -> None:
    """/payout, /payouts, /earnings, /payoutmethod: the HTTP API's payouts."""
    if not args.http:
        out(f"error: /{command} needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        if command == "payout":
            if not rest.isdigit():
                out("usage: /payout TOKENS")
                return
            payout = await request_payout(args.http, args.token, int(rest))
            out(f"* payout {format_payout(payout)}; balance {payout.get('balance', '-')}")
        elif command == "payouts":
            listed = await my_payouts(args.http, args.token)
            for payout in listed:
                out(format_payout(payout))
            if not listed:
                out("* no payouts")
        elif command == "earnings":
            bounds = rest.split()
            statement = await earnings(
                args.http,
                args.token,
                start=bounds[0] if bounds else None,
                end=bounds[1] if len(bounds) > 1 else None,
            )
            for kind, figures in sorted(statement["kinds"].items()):
                out(f"  {kind}: {figures['tokens']} tokens, ${figures['cents'] / 100:.2f}")
            total = statement["total"]
            out(f"earnings: {total['tokens']} tokens, ${total['cents'] / 100:.2f}")
        else:
            await payout_method(rest, args, out)
    except (OSError, HttpError) as exc:
        out(f"error: {exc}")


async def payout_method(rest: str, args: argparse.Namespace, out: Output) -> None:
    words = shlex.split(rest) if rest else []
    if not words:
        status = await payout_status(args.http, args.token)
    elif words[0] == "bank" and len(words) == 3:
        status = await set_payout_method(
            args.http, args.token, type="bank", holder=words[1], iban=words[2]
        )
    elif words[0] == "paypal" and len(words) == 2:
        status = await set_payout_method(args.http, args.token, type="paypal", email=words[1])
    else:
        out('usage: /payoutmethod [bank "HOLDER" IBAN | paypal EMAIL]')
        return
    method = status["method"]
    shown = "none" if method is None else " ".join(str(v) for v in method.values())
    rule = status["rule"]
    out(
        f"* payout method: {shown}; verified: {'yes' if status['verified'] else 'no'}; "
        f"rule: {rule['cents_per_token']} cents a token, minimum {rule['min_payout_tokens']}"
    )


# --- discovery, follows and notifications (docs/protocol.md, "Discovery") -----------
def rooms_query(rest: str) -> str:
    """``[trending|viewers|new] [#TAG] [TEXT]`` as GET /v1/rooms' query."""
    params: dict[str, str] = {}
    words = rest.split()
    if words and words[0] in ("trending", "viewers", "new"):
        params["sort"] = words.pop(0)
    if words and words[0].startswith("#"):
        params["tag"] = words.pop(0)[1:]
    if words:
        params["q"] = " ".join(words)
    return "?" + urllib.parse.urlencode(params) if params else ""


async def follow_command(command: str, rest: str, args: argparse.Namespace, out: Output) -> None:
    """/follow MODEL, /unfollow MODEL, /follows, /notifications, over HTTP."""
    if not args.http:
        out(f"error: /{command} needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        if command in ("follow", "unfollow"):
            if not rest:
                out(f"usage: /{command} MODEL")
                return
            await follow(args.http, args.token, rest, on=command == "follow")
            out(f"* {'following' if command == 'follow' else 'no longer following'} {rest}")
        elif command == "follows":
            page = await follows(args.http, args.token, limit=200)
            models = ", ".join(f["model"] for f in page["follows"])
            out(f"following: {models or 'nobody'}")
        else:
            page = await notifications(args.http, args.token, limit=20)
            if not page["notifications"]:
                out("* no notifications")
            for note in page["notifications"]:
                when = time.strftime("%H:%M", time.localtime(note["ts"] / 1000))
                out(f"  {when} {note['model']} went live")
    except HttpError as exc:
        out(f"error {exc.code}: {exc.message}")
    except OSError as exc:
        out(f"error: /{command}: {exc}")


# --- data export and account deletion (issue #13 section 4) ------------------------------


async def account_command(command: str, rest: str, args: argparse.Namespace, out: Output) -> None:
    """/export [FILE] and /deleteaccount ID, over the HTTP API (--http)."""
    if not args.http:
        out(f"error: /{command} needs the HTTP API's URL (--http http://HOST:8000)")
        return
    try:
        if command == "export":
            data = await export_data(args.http, args.token)
            sections = [
                f"{name} {len(value)}"
                for name, value in data.items()
                if isinstance(value, list) and name != "truncated"
            ]
            out(
                f"* export of {data['user']['id']}: balance {data['balance']}; "
                + ", ".join(sections)
            )
            if data["truncated"]:
                out(f"* cut at {data['rows_max']} rows: {', '.join(data['truncated'])}")
            if rest:
                text = json.dumps(data, indent=2)
                await asyncio.to_thread(_write_text, rest, text)
                out(f"* written to {rest}")
        elif not rest:
            out("usage: /deleteaccount YOUR_USER_ID (typed again to confirm)")
        else:
            try:
                reply = await delete_account(args.http, args.token, rest)
            except HttpError as exc:
                if exc.code != "CONFLICT" or not isinstance(exc.fields.get("open"), list):
                    raise
                out(f"error: {exc.message}")
                for escrow in exc.fields["open"]:
                    until = escrow.get("until")
                    closes = f", closes by {format_ms(until)}" if until else ""
                    out(f"*   {escrow.get('kind')} {escrow.get('id')}{closes}")
                return
            closed = ", ".join(f"{n} {kind}" for kind, n in reply.get("closed", {}).items() if n)
            out(
                f"* account deleted: {reply['forfeited']} tokens forfeited; "
                f"the books name you {reply['pseudonym']}"
                + (f"; closed first: {closed}" if closed else "")
            )
    except (OSError, HttpError) as exc:
        out(f"error: {exc}")


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


if __name__ == "__main__":
    sys.exit(main())
