"""Builders of the frames the server sends (DESIGN.md section 3).

Replies answer one command and carry ``re`` (its ``id``) when the command had
one; events are pushed and never carry ``re``. The keys here are the wire
names (``from``, which is a Python keyword, is taken as ``from_``). Amounts,
prices and balances are integer tokens; ``ts`` is integer milliseconds since
the Unix epoch; offsets are opaque strings.
"""

from typing import Any

from .errors import ErrorCode


def ok(re: int | str | None, **fields: Any) -> dict[str, Any]:
    """The success reply to a command; ``fields`` are its result fields."""
    assert "type" not in fields, "a result field cannot be named 'type'"
    reply: dict[str, Any] = {"type": "ok"}
    if re is not None:
        reply["re"] = re
    reply.update(fields)
    return reply


def error(re: int | str | None, code: ErrorCode, message: str) -> dict[str, Any]:
    """The failure reply to a command (or to a frame that was not one)."""
    reply: dict[str, Any] = {"type": "error"}
    if re is not None:
        reply["re"] = re
    reply["code"] = code.value
    reply["message"] = message
    return reply


def welcome(
    re: int | str | None, user_id: str, role: str, balance: int, session: str
) -> dict[str, Any]:
    """The reply to ``hello``."""
    reply: dict[str, Any] = {"type": "welcome"}
    if re is not None:
        reply["re"] = re
    reply["user"] = {"id": user_id, "role": role}
    reply["balance"] = balance
    reply["session"] = session
    return reply


def message_event_body(room: str, from_: str, text: str, tier: int = 0) -> dict[str, Any]:
    """A ``message`` event as the server stores it in the room's history:
    without ``offset`` and ``ts``, which it adds from the stored event's id.
    ``tier``: the poster's tier (GET /v1/tiers) when they posted."""
    return {"type": "message", "room": room, "from": from_, "text": text, "tier": tier}


def message_event(
    room: str, from_: str, text: str, offset: str, ts: int, tier: int = 0
) -> dict[str, Any]:
    return {**message_event_body(room, from_, text, tier), "offset": offset, "ts": ts}


def tip_event_body(
    room: str, from_: str, amount: int, text: str, tier: int = 0, tx: str | None = None
) -> dict[str, Any]:
    """A tip event as the tip script stores and publishes it: the room's
    history gives it ``offset`` and ``ts`` (see ``tip_event``). ``tier``:
    the tipper's tier before this tip counted. ``tx``: the tip's
    transaction, by which clients that keep a seen-set de-duplicate it."""
    body: dict[str, Any] = {
        "type": "tip",
        "room": room,
        "from": from_,
        "amount": amount,
        "text": text,
        "tier": tier,
    }
    if tx is not None:
        body["tx"] = tx
    return body


def tip_event(
    room: str, from_: str, amount: int, text: str, offset: str, ts: int, tier: int = 0
) -> dict[str, Any]:
    return {**tip_event_body(room, from_, amount, text, tier), "offset": offset, "ts": ts}


def item_tip_event_body(
    room: str, from_: str, text: str, item_id: str, tier: int = 0, tx: str | None = None
) -> dict[str, Any]:
    """A tip of a menu item as the server hands it to the tip_item script,
    which sets ``amount`` (the item's price when charged) and
    ``item.label``, then the history gives ``offset`` and ``ts``. ``item``
    stays the last field: the script fills it in. ``tx`` as in
    ``tip_event_body``."""
    body: dict[str, Any] = {"type": "tip", "room": room, "from": from_, "text": text, "tier": tier}
    if tx is not None:
        body["tx"] = tx
    body["item"] = {"id": item_id}
    return body


def item_tip_event(
    room: str,
    from_: str,
    amount: int,
    text: str,
    item: dict[str, str],
    offset: str,
    ts: int,
    tier: int = 0,
) -> dict[str, Any]:
    """A ``tip`` event of a menu item: a tip event with ``item: {id, label}``."""
    return {**tip_event(room, from_, amount, text, offset, ts, tier), "item": item}


def dm_event_body(
    from_: str, text: str, media: dict[str, Any] | None = None, tier: int = 0
) -> dict[str, Any]:
    """A dm event as the server hands it to the dm script, which adds
    ``price``, ``tx`` and ``ts`` (see ``dm_event``). ``media``: the
    descriptor of locked media attached to it (never its content).
    ``tier``: the sender's tier."""
    body: dict[str, Any] = {"type": "dm", "from": from_, "text": text, "tier": tier}
    if media is not None:
        body["media"] = media
    return body


def dm_event(
    from_: str,
    text: str,
    price: int,
    tx: str,
    ts: int,
    media: dict[str, Any] | None = None,
    tier: int = 0,
) -> dict[str, Any]:
    return {**dm_event_body(from_, text, media, tier), "price": price, "tx": tx, "ts": ts}


def media_event_body(room: str, from_: str, media: dict[str, Any], text: str) -> dict[str, Any]:
    """A ``media`` event as the room's history stores it (without ``offset``
    and ``ts``). ``media``: the descriptor {id, kind, price, preview}; the
    content is served only to its owner and to fans who unlocked it."""
    return {"type": "media", "room": room, "from": from_, "media": media, "text": text}


def media_event(
    room: str, from_: str, media: dict[str, Any], text: str, offset: str, ts: int
) -> dict[str, Any]:
    return {**media_event_body(room, from_, media, text), "offset": offset, "ts": ts}


def presence_event(room: str, viewers: int) -> dict[str, Any]:
    return {"type": "presence", "room": room, "viewers": viewers}


def balance_event(balance: int) -> dict[str, Any]:
    """Pushed when someone else's action changed the balance."""
    return {"type": "balance", "balance": balance}


def request_event(request: dict[str, Any]) -> dict[str, Any]:
    """A custom request's state, to both its fan and its model, on every
    change: ``request`` (its id), ``from`` (the fan), ``to`` (the model),
    ``text``, ``amount``, ``state``, ``expires_ms`` (when the current state
    ends by itself; null once closed), ``ts``; once delivered, ``delivery``
    {``text``, ``media``}. ``request`` is a listed request
    (GET /v1/me/requests), which has these fields but ``type`` and ``ts``."""
    return {"type": "request", **request}


def private_event(show: dict[str, Any]) -> dict[str, Any]:
    """A private show's state, to both its fan and its model, on every change
    and every charged period: ``show`` (its id), ``fan``, ``model``,
    ``rate`` (tokens a minute), ``min_s``, ``state`` (requested, accepted,
    running, ended, declined, expired), ``seconds`` (billed so far),
    ``charged`` (tokens the fan paid so far), ``expires_ms`` (a request's
    accept deadline), ``room`` (the private room while running), ``reason``
    once ended; to the fan alone, ``warning: "low_balance"`` with
    ``seconds_left`` when less than a minute of balance is left."""
    return {"type": "private", **show}


def show_event(show: dict[str, Any]) -> dict[str, Any]:
    """A ticket show's state, to every member of its room on every change:
    ``room``, ``show`` (its id), ``state`` (scheduled, running, ended,
    cancelled), ``price``, ``starts_at`` (ms since the epoch), ``min_s``,
    ``title``. ``show`` is a listed show (GET /v1/rooms/{room}/shows)."""
    return {"type": "show", **show}


def king_event(room: str, king: dict[str, Any] | None) -> dict[str, Any]:
    """The room's king changed: ``king`` is {user, tokens} (the top tipper
    over the king window) or null (nobody tipped within it). A room event:
    it has ``offset`` and ``ts`` like a message."""
    return {"type": "king", "room": room, "king": king}


def clear_event(room: str, user: str, everything: bool = False) -> dict[str, Any]:
    """A moderator cleared ``user``'s chat lines from ``room``: clients hide
    every ``message`` of theirs in that room (history no longer holds them).
    ``everything`` (``all: true``): ``user`` deleted her account, and every
    line of hers went (tips, media, `king` events crowning her too): clients
    hide them all."""
    event: dict[str, Any] = {"type": "clear", "room": room, "user": user}
    if everything:
        event["all"] = True
    return event


def removed_event(room: str, reason: str, until_ms: int | None) -> dict[str, Any]:
    """To the removed member alone: ``reason`` is ``kicked`` or ``banned``
    (``until``: when a ban ends, ms; absent: permanent or a kick). The
    session has left the room when this arrives."""
    event: dict[str, Any] = {"type": "removed", "room": room, "reason": reason}
    if until_ms is not None:
        event["until"] = until_ms
    return event


def goal_event(room: str, goal: dict[str, Any]) -> dict[str, Any]:
    """A room's tip goal, to every member of the room: when it is set, on
    each tip that counts toward it (published by the tip's own script, after
    the tip event), when reached, failed (its deadline passed first) or
    deleted. ``goal``: ``id``, ``title``, ``target``, ``progress`` (tokens
    tipped toward it), ``state`` (active, reached, failed, deleted),
    ``all_or_nothing``, ``deadline`` (ms since the epoch, or null)."""
    return {"type": "goal", "room": room, "goal": goal}


def reality_check_event(online_s: int, spent: int, every_min: int) -> dict[str, Any]:
    """Every ``every_min`` minutes to a fan who asked for it: how long this
    session has been online and the tokens she spent since it opened."""
    return {"type": "reality_check", "online_s": online_s, "spent": spent, "every_min": every_min}


def live_event(model: str, ts_ms: int) -> dict[str, Any]:
    """A model the user follows went live (issue #13): pushed to each of her
    connected followers; the others find it in GET /v1/me/notifications."""
    return {"type": "live", "model": model, "ts": ts_ms}
