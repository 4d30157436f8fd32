"""Limits of wire contract v1 (DESIGN.md section 3).

These are part of the contract, not tuning knobs: clients validate against
them, so changing one is a protocol change. Operational limits (frame size,
rates, buffers, timeouts) live in the server's config.

Regular expressions end in ``\\Z``, not ``$``: ``$`` also matches before a
trailing newline, so ``"alice\\n"`` would pass ``match()``.
"""

import re
from typing import Final

# Command ids are echoed in `re` of every reply; both bounds keep an id
# representable in every client (msgpack and most languages have int64) and
# keep replies small.
ID_STR_LEN_MAX: Final = 64  # characters
ID_INT_MIN: Final = -(2**63)  # signed 64-bit
ID_INT_MAX: Final = 2**63 - 1  # signed 64-bit

# A user id is a JWT `sub` and a room id (a room is its owner's user id). It
# appears in every event and in Redis key names, so it is short and needs no
# escaping anywhere: ASCII letters, digits and `_ . : -`.
USER_ID_LEN_MAX: Final = 64  # characters
USER_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")

# Chat text is stored in each room's history stream (TOKENCHAT_HISTORY_LEN events)
# and in pending DMs; a bound on characters bounds that memory (at most 4
# UTF-8 bytes a character).
SAY_TEXT_LEN_MAX: Final = 1000  # characters; a `say` text is 1..this
DM_TEXT_LEN_MAX: Final = 1000  # characters; a `dm` text is 1..this
TIP_TEXT_LEN_MAX: Final = 255  # characters; a tip's note (0..this) is a one-line overlay

# Custom requests (request_offer, request_deliver). The fan's description and
# the model's note are prose like a DM, stored in Postgres with the request
# and carried in every `request` event, so they share the DM's bound. A
# delivery's `media` names what was delivered (a URL or a media id), not the
# media itself: a short printable identifier.
REQUEST_TEXT_LEN_MAX: Final = 1000  # characters; an offer's text is 1..this
DELIVERY_TEXT_LEN_MAX: Final = 1000  # characters; a delivery's note is 0..this
MEDIA_REF_LEN_MAX: Final = 512  # characters, printable ASCII; fits a long URL
# Ids of the objects the server makes: see OBJECT_ID_RE below. A request's
# own id is `r_` and 24 hex digits.
REQUEST_ID_RE: Final = re.compile(r"^r_[0-9a-f]{24}\Z")
PRIVATE_ID_RE: Final = re.compile(r"^p_[0-9a-f]{24}\Z")
# A private show's room is `p:<show id>`: a room id no user id collides with
# in practice, and that the server recognises before the catalog.
PRIVATE_ROOM_PREFIX: Final = "p:"
# A private show's minimum length (PUT /v1/me/prices, private_min_s): at
# most an hour, which is already more than any minimum a model would ask.
PRIVATE_MIN_S_MAX: Final = 3600  # seconds
SHOW_ID_RE: Final = re.compile(r"^t_[0-9a-f]{24}\Z")
# A ticket show's title: a line in a room's schedule, not a description.
SHOW_TITLE_LEN_MAX: Final = 200  # characters
# A show's minimum length (seconds it must run for the model to be paid):
# 1 s up to a day, longer than any show a room runs in one sitting.
SHOW_MIN_S_MAX: Final = 86400
# How far ahead a show may be scheduled: a year, in seconds; further is a
# typo rather than a plan.
SHOW_AHEAD_S_MAX: Final = 366 * 86400
# Tip goals (PUT /v1/me/goal): ids `g_` and 24 hex digits; a title is one
# line of a goal bar; a target up to a billion tokens (a thousand maximal
# tips), far below 2**53 and below what Lua's cjson prints exactly (1e14).
GOAL_ID_RE: Final = re.compile(r"^g_[0-9a-f]{24}\Z")
GOAL_TITLE_LEN_MAX: Final = 200  # characters
GOAL_TARGET_MAX: Final = 1_000_000_000  # tokens

# Amounts are integer tokens. The minimum: a zero tip moves nothing and only
# adds ledger rows. The maximum caps one mistaken or malicious spend and keeps
# any sum of spends far below 2**53 (exact in JavaScript numbers).
AMOUNT_MIN: Final = 1  # tokens
AMOUNT_MAX: Final = 1_000_000  # tokens; also the largest `max_price`

# An idempotency key is stored for 24 hours with every spend; its bound
# bounds that storage and still fits a UUID (36 characters).
KEY_LEN_MAX: Final = 64  # characters
# A purchase's payment_ref (HTTP) names a payment at the provider, whose ids
# run longer than ours; it is also the purchase's idempotency key.
PAYMENT_REF_LEN_MAX: Final = 128  # characters
# A transaction id as a client names it (a refund's `tx`): ours are 32 hex
# digits; the bound is the ledger column's.
TX_ID_LEN_MAX: Final = 64  # characters
# An id of a stored object as a client names it (`unlock`'s `media`): any
# kind's prefix is accepted here and the wrong kind is answered NOT_FOUND,
# so the wire never tells which kinds of ids exist. Ours are a two-letter
# prefix and 22 characters of URL-safe base64; the bound is generous.
OBJECT_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# A `media` event's or a `dm`'s text beside locked media: a caption.
MEDIA_TEXT_LEN_MAX: Final = 1000  # characters, like a `say` line

# Identifiers a client chooses (idempotency keys, payment_ref, transaction
# ids) reach Postgres text and jsonb columns, log lines and Redis key names.
# Printable ASCII (0x20-0x7E) needs no escaping in any of them: Postgres
# refuses NUL in text and jsonb (and the escape \u0000 in jsonb), and a
# control character in a log line can forge another line. A key is an
# identifier, not prose, so nothing is lost by refusing the rest.
PRINTABLE_ASCII_RE: Final = re.compile(r"^[\x20-\x7e]*\Z")

# A JWT is verified before the session exists, on the first frame of any
# anonymous connection; bounding it bounds the work (base64, JSON, HMAC) an
# unauthenticated peer can cause. HS256 tokens with our claims are ~200 bytes.
TOKEN_LEN_MAX: Final = 4096  # bytes (UTF-8)

# Offsets are Redis stream ids (`<ms>-<seq>`, each a uint64: at most 20
# digits). Clients must treat them as opaque strings; the server checks the
# shape so a bad `since` is BAD_REQUEST rather than a Redis error.
OFFSET_RE: Final = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")

# A model's tip menu (PUT /v1/me/menu, `tip` with `item`). Each item is a
# button on every fan's page and a hash field pair in the `{eco}` slot that
# the tip script reads: 50 buttons is more than a room's screen shows, and
# bounds the cache and the PUT body (50 items fit well inside its 16 KiB).
MENU_ITEMS_MAX: Final = 50  # items per menu
# A label is a button's text and a tip line's overlay: one short line.
MENU_LABEL_LEN_MAX: Final = 40  # characters
# A menu item's id: `i_` and 16 hex digits, made by the server. What a client
# sends as `item` is checked only for the user-id alphabet (safe in a Redis
# hash field and in logs), so an id of another kind answers NOT_FOUND, not
# BAD_REQUEST, like every id of the wrong kind.
ITEM_ID_RE: Final = re.compile(r"^i_[0-9a-f]{16}\Z")
ITEM_REF_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")

# A `join` without `since` carries at most this many history events (the
# room's newest): the context a newcomer sees, and a bound on that reply's
# size. The stream itself keeps more (TOKENCHAT_HISTORY_LEN) for recovery.
HISTORY_LEN_MAX: Final = 50  # events
# A `join` with `since` and each `history` reply carry at most this many
# events, oldest first, with `more: true` when later ones follow. It bounds one
# reply: even at the longest lines written the longest way (1000 characters,
# each a 6-byte JSON escape) 100 events stay under 1 MiB (~610 KB), the
# default frame limit of common WebSocket clients (Python websockets); at
# typical 200-byte lines a page is ~20 KB. 2,000 missed events (10 s of a
# room at 200 events/s) are 20 pages, within the command burst
# (TOKENCHAT_COMMANDS_BURST, 40).
HISTORY_PAGE_LEN: Final = 100  # events

# A msgpack decoder allocates an array's or map's slots when it reads the
# header, before the items arrive, and up to ~1000 containers can be open at
# once (nesting), so the bound on elements bounds what one crafted frame can
# allocate: about 1000 * CONTAINER_LEN_MAX * 8 bytes = 8 MiB, briefly. No
# command needs more than a few dozen.
CONTAINER_LEN_MAX: Final = 1024  # elements of an array, or pairs of a map

# Moderation (issue #12 section 4). A mute or ban lasts at most a year when
# given `seconds` (leave it out for a permanent ban): a longer one is a
# permanent one in practice, and the bound keeps `until` far from any
# timestamp overflow.
RESTRICTION_S_MAX: Final = 366 * 24 * 3600  # seconds
# Slow mode: at most one chat line per this many seconds per member; a day is
# the longest wait a chat can meaningfully ask (0 turns it off).
SLOW_S_MAX: Final = 24 * 3600  # seconds
# A room's chat_min_balance: the contract's amount range.
CHAT_MIN_BALANCE_MAX: Final = 1_000_000  # tokens
# Who may chat in a room (PUT /v1/me/room `chat_requires`).
CHAT_REQUIRES: Final = ("none", "purchased", "balance")
