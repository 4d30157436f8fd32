"""Every limit and setting of a tokenchat process, in one frozen object.

Each field is set from one environment variable (``TOKENCHAT_`` + the field
name in upper case), so a deployment is configured the 12-factor way. Units
are the last part of each name; the comment above each default says why it
is what it is. ``Settings.describe()`` renders the table that README.md shows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

from .auth import JWT_SECRET_BYTES_MIN

ENV_PREFIX = "TOKENCHAT_"
# The values of TOKENCHAT_FORWARDED_HEADERS (see forwarded_headers).
FORWARDED_HEADER_FAMILIES = ("x-forwarded", "forwarded")
# The contract's bound on a signed media URL's lifetime (issue #11).
MEDIA_URL_TTL_MAX_S = 300
# The most events a room's history may keep (TOKENCHAT_HISTORY_LEN). Memory
# per room is events x bytes: ~165 bytes a stored 60-character chat line
# (MEMORY USAGE, docs/benchmarks.md) make 1.6 MB for a busy room at this bound
# (~10 MB at 1000-character lines; a quiet room holds what it had), and
# recovering it all is 100 `history` pages (protocol/limits.py
# HISTORY_PAGE_LEN): 50 s of a room at 200 events/s, longer than any
# reconnect through jittered backoff, and a moderator's `clear` scans it in
# one script (~15 ms of Redis at this bound).
HISTORY_LEN_STORED_MAX = 10_000  # events
# The oldest a room's history may keep events (TOKENCHAT_HISTORY_AGE_S): a
# week; older chat is an archive, and Redis (which may lose it) is no archive.
HISTORY_AGE_MAX_S = 7 * 86400  # seconds
# The values of TOKENCHAT_DELIVERY (see delivery).
DELIVERY_MODES = ("auto", "script", "relay")
# TOKENCHAT_RELAY_DEDUPE_S at most a day: each relayed tip keeps one key
# (~85 B) that long, and the key only needs to outlive a redelivery (claims
# come after seconds); a day at 5,000 tips/s would be ~430M keys (~36 GB),
# so a day suits only a far quieter platform (see relay_dedupe_s).
RELAY_DEDUPE_MAX_S = 86400.0


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    # --- backends -------------------------------------------------------------
    # Redis holds hot state: balances, history, pub/sub, presence.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis key and channel starts with this, so several deployments (or
    # test runs) can share one Redis without seeing each other.
    redis_prefix: str = "tc:"
    # 1: redis_url names one node of a Redis Cluster (7.0 or newer): every
    # client is a cluster client, which learns the other nodes from it, and
    # each room's channel is subscribed on its slot's primary (docs/deploy.md,
    # "Redis Cluster"). A flag rather than a URL scheme: redis-py knows no
    # cluster scheme, and the URL stays one that redis-cli and the rest take.
    redis_cluster: int = 0
    # Postgres is the durable store (users, rooms, the ledger).
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # The schema tokenchat's tables live in; tests give each run its own.
    database_schema: str = "tokenchat"
    # HS256 secret for session tokens. Empty means "not configured": `serve`
    # refuses to start rather than accept tokens signed with a known secret.
    # A set one must be at least 32 bytes (auth.JWT_SECRET_BYTES_MIN).
    jwt_secret: str = ""
    # Longest lifetime a token may claim: one whose `exp` is further than this
    # from now is refused, so a token minted with a huge `exp` (or a leaked
    # secret's forgery) does not live for years. A week covers the demo tokens.
    token_ttl_max_s: int = 7 * 24 * 3600

    # --- listeners ------------------------------------------------------------
    host: str = "127.0.0.1"
    http_port: int = 8000
    ws_port: int = 8001
    # Gateway processes sharing the ports through SO_REUSEPORT.
    workers: int = 1
    # 1: one public port (a PaaS routes only $PORT): the gateway answers
    # WebSocket upgrades at /ws on the HTTP port and ws_port is not opened.
    # Setting http_port and ws_port to the same port says the same. Two ports
    # stay the default: they are not measurably faster (fan-out one/two 0.96,
    # within the noise: docs/benchmarks.md), but every documented URL names
    # 8001 and operators can route and firewall the gateway apart.
    one_port: int = 0
    # The WebSocket URL the demo page dials (GET /v1/config), as the browser
    # must write it behind a proxy or a CDN: wss://chat.example.com/ws. Empty:
    # derived from the request (see trusted_proxies).
    public_ws_url: str = ""
    # Peers whose X-Forwarded-Proto and X-Forwarded-Host are believed when
    # /v1/config derives the WebSocket URL: comma-separated addresses or CIDR
    # networks, or * for any peer (only where nothing but the proxy can reach
    # the port, as on a PaaS). Default: a proxy on this machine (nginx, Caddy).
    trusted_proxies: str = "127.0.0.1,::1"
    # Which forwarded headers the trusted proxies write: `x-forwarded`
    # (X-Forwarded-Proto, -Host and -For: nginx and Caddy as docs/deploy.md
    # sets them up, most PaaS routers) or `forwarded` (RFC 7239 Forwarded).
    # Only that family is read: a proxy passes the family it does not write
    # from the client untouched, so reading both (or letting either win)
    # would let any client choose its address and the page's host.
    forwarded_headers: str = "x-forwarded"

    # --- per-connection limits -------------------------------------------------
    # Largest frame a client may send. The largest valid command is a 1000-char
    # text (at most 4000 bytes of UTF-8) plus small fields, or a 4 KiB token;
    # 64 KiB leaves room for both codecs and bounds what one frame can cost.
    frame_size_max_bytes: int = 64 * 1024
    # Unsent bytes the server holds for one client before closing it with 4008.
    # About 1000 chat events of 1 KiB: a client this far behind is not reading.
    write_buffer_max_bytes: int = 1024 * 1024
    # How often every session's write buffer is checked against the limit.
    # Between checks a buffer can overshoot by what a room sends in this
    # time; checking on every event instead cost more than the delivery.
    slow_check_interval_s: float = 0.25
    # The contract gives a new connection 10 s to send `hello` (else 4001).
    hello_timeout_s: float = 10.0
    # Hellos arriving within this many seconds of the first share one user
    # upsert, one SUBSCRIBE and one balance read (server/gateway/admission.py):
    # after a restart every client says hello within a second, and a round
    # trip of each kind per hello held one process to ~700 hellos/s. 2 ms is
    # far below what a person notices, and is all a lone hello waits.
    hello_batch_window_s: float = 0.002
    # Hellos in one batch at most (rows of one upsert, channels of one
    # SUBSCRIBE): bounds one statement's parameters (~40 KB at 500) and how
    # long one batch holds a pooled connection. 1 turns coalescing off.
    hello_batch_max: int = 500
    # Sustained commands per second per session; a person types far slower,
    # and the load tests' bots stay under it.
    commands_per_s: float = 20.0
    # Commands a session may send at once before the rate applies.
    commands_burst: int = 40
    # Rate-limited commands in a row before the session is closed with 4029:
    # a client that ignores RATE_LIMITED this long is broken or hostile.
    rate_limit_strikes_max: int = 50
    # Rooms one session may be in at once (each costs a subscription).
    rooms_per_session_max: int = 20
    # Sessions one user may have open on one process: tabs and devices, not a
    # botnet on one account.
    sessions_per_user_max: int = 10
    # Events held for a session while its `join` reads history; past this the
    # session is too slow and is closed with 4008.
    join_buffer_events_max: int = 1000
    # WebSocket keepalive: a ping every 20 s, and a peer silent for 20 s more is
    # gone. Keeps dead TCP connections from holding buffers.
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    # How long the closing handshake may take before the TCP connection is cut;
    # also how long a client closed with 4008 has to read the close frame.
    close_timeout_s: float = 5.0

    # --- rooms ------------------------------------------------------------------
    # Events kept per room for `join` and gap recovery (a `join` without
    # `since` returns the newest 50 of them, the contract; with `since`, every
    # one after it, in pages). 4000 is 20 s of a room at 200 events/s: a node
    # lost and its members back through jittered backoff within seconds, with
    # a margin. At most HISTORY_LEN_STORED_MAX (below).
    history_len: int = 4000
    # Events older than this leave a room's history (trimmed as events are
    # added, approximately: whole stream nodes, never an event younger than
    # this), so a room's memory follows its recent traffic, not its past. A
    # day keeps the context of a quiet room; recovery needs seconds. At most
    # HISTORY_AGE_MAX_S.
    history_age_s: float = 86400.0
    # Presence events are coalesced to at most one per room per this interval.
    presence_interval_s: float = 1.0
    # A node's heartbeat lives this long; viewers counted on a node whose
    # heartbeat expired (a crashed process) are dropped from presence.
    node_ttl_s: float = 30.0

    # Development conveniences (set by `tokenchat dev`, never in production):
    # an endpoint that hands out demo tokens for the demo page.
    dev_mode: int = 0
    # `serve` refuses dev mode and the `fake` payment provider (both hand out
    # value for free) unless this is 1 (or `serve --insecure`): a development
    # setting left on in production must stop the start, not go unnoticed.
    insecure: int = 0

    # --- the economy ----------------------------------------------------------------
    # When a spend is acknowledged (docs/economy.md, "Durability"): `ledger`
    # once its row is committed in Postgres (group commit), so a Redis that
    # loses its data loses nothing acknowledged; `redis` once Redis applied it,
    # the lowest latency, with a window of loss until the writer copies it.
    durability: str = "ledger"
    # In `ledger` mode, how long a spend waits for its ledger row before it is
    # answered UNAVAILABLE ("outcome unknown: retry with the same key"). A
    # healthy commit takes milliseconds; 5 s rides out a Postgres blip without
    # holding a session for long when Postgres is down.
    ledger_ack_timeout_s: float = 5.0
    # Ledger entries Redis may hold for Postgres before spends are refused
    # (UNAVAILABLE): at ~600 bytes each, 1,000,000 is ~600 MB of Redis memory,
    # hours of a busy platform's spends with Postgres away.
    outbox_entries_max: int = 1_000_000
    # DMs kept per user for delivery at their next hello (approximate trim).
    inbox_len: int = 1000
    # Run the ledger writer inside `serve` (0 when `tokenchat ledger` runs it).
    ledger_enabled: int = 1
    # Entries the writer moves to Postgres per transaction: large enough that
    # one statement amortises the round trips, small enough that a batch commits in ms.
    ledger_batch_max: int = 1000
    # How long the writer's read waits for new entries before looking again.
    ledger_block_ms: int = 1000
    # Least time between the starts of two batches while entries keep coming
    # (durability `redis` only: in `ledger` mode spends wait on every commit,
    # so a batch starts as soon as the previous one has committed):
    # each Postgres transaction has a fixed cost (round trips, triggers, commit),
    # so a writer that ran one per handful of entries spent twice the Postgres
    # CPU per tip (tips benchmark); 50 ms bounds that to 20 batches/s at the
    # price of at most 50 ms of ledger lag. An idle writer does not wait.
    ledger_linger_ms: int = 50
    # An entry read by a writer that has not acknowledged it after this long is
    # taken over by another (its writer is presumed dead).
    ledger_claim_idle_s: float = 30.0
    # How a paid action whose delivery lives outside the money slot (a tip's
    # room event: docs/economy.md, "Delivery relay") delivers: `script` in its
    # own money script (one atomic call; impossible on Redis Cluster, where
    # the room is another slot), `relay` through the {eco} delivery stream and
    # the relay, or `auto`: `relay` on a Redis Cluster, `script` otherwise.
    delivery: str = "auto"
    # A delivery read by a relay that has not acknowledged it after this long
    # is taken over by another (its relay is presumed dead). Short: it is how
    # long a room waits for a tip whose relay died; long enough that a relay
    # busy with a batch (milliseconds) is never taken over.
    relay_claim_idle_s: float = 5.0
    # How long the relay remembers, per room, that it delivered a transaction
    # (one small key per relayed tip): a redelivery (a relay died between its
    # room write and its acknowledgement) after this long would be shown
    # twice. Claims happen after relay_claim_idle_s, so an hour covers any
    # outage short of every relay being down for an hour; at 5,000 tips/s an
    # hour of keys is ~18M keys (~1.5 GB): RELAY_DEDUPE_MAX_S bounds it.
    relay_dedupe_s: float = 3600.0
    # Deliveries pending longer than this (the oldest entry's age) make
    # reconcile and /readyz's detail report the relay as behind.
    relay_lag_max_s: float = 10.0
    # `fake` approves every payment (development and tests); `none` refuses
    # purchases. A real provider plugs in behind server/http/payments.py.
    payment_provider: str = "none"
    # Token bundles for sale: id:tokens:price_cents, comma separated. Bigger
    # bundles are cheaper per token; GET /v1/bundles shows the discount.
    bundles: str = "starter:100:999,fan:550:4999,superfan:1200:9999,whale:6500:49999"
    # --- payment webhooks and accounts (server/http/accounts.py) ----------------
    # The secret the provider signs webhooks with (Stripe's "whsec_..."):
    # `Payment-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
    # Empty: POST /v1/payments/webhook refuses every call (no provider set up).
    payment_webhook_secret: str = ""
    # How far a webhook's signed timestamp may be from now, either way: a
    # captured request replayed later than this is refused even though its
    # signature is valid (Stripe's default tolerance is 5 minutes).
    payment_webhook_tolerance_s: int = 300
    # GET /v1/me/export: rows per section at most (a section longer than this
    # is cut, and the answer says so in `truncated`), so one export streams a
    # bounded answer; 10,000 DMs is years of a busy fan's messages.
    export_section_rows_max: int = 10_000

    # --- locked media (server/catalog/media.py) ---------------------------------------
    # Where the local-disk media store keeps uploads and previews (relative to
    # the working directory; `tokenchat dev` puts it in its data folder).
    media_dir: str = "media"
    # Largest photo: a phone's full-resolution JPEG is 2-8 MB; 20 MiB leaves
    # room for a PNG of the same picture and bounds a disk-filling upload.
    media_image_bytes_max: int = 20 * 1024 * 1024
    # Largest video: about two minutes of a phone's 1080p (~8 Mbit/s). There is
    # no transcoding, so what is uploaded is what fans download.
    media_video_bytes_max: int = 128 * 1024 * 1024
    # Largest preview image a model uploads for a video (it is re-encoded
    # into a small thumbnail, so a big one only costs the decode).
    media_preview_bytes_max: int = 8 * 1024 * 1024
    # Largest picture decoded (width x height): pillow's decode of a bomb (a
    # tiny file claiming a huge canvas) would take gigabytes of memory.
    media_image_pixels_max: int = 50_000_000
    # How long a signed content URL works. The contract says at most 5
    # minutes: a leaked URL stops working soon, and a refund's revoke is
    # complete within this long. A player re-asks for a URL past it.
    media_url_ttl_s: int = 300

    # --- backends: pools and timeouts --------------------------------------------
    # One Redis command (or pipeline) may take this long before the command that
    # needed it is answered UNAVAILABLE. Redis answers in well under 1 ms when
    # healthy; 2 s only trips when it is down or stalled.
    redis_timeout_s: float = 2.0
    # Connections from one process to Redis (commands; pub/sub has its own).
    redis_pool_max: int = 64
    # A query may take this long before the command is answered UNAVAILABLE.
    database_timeout_s: float = 5.0
    database_pool_min: int = 1
    database_pool_max: int = 10
    # Connections of the ledger writer's own pool, apart from the one above, so
    # an HTTP flood holding every connection of that pool cannot starve it.
    # It runs one batch transaction at a time; the second connection serves
    # reconcile and drain reads while a batch is open.
    ledger_pool_max: int = 2

    # --- HTTP: creating things -----------------------------------------------------
    # Sustained requests per second per user to the HTTP endpoints that create
    # things (POST /v1/purchases): a person buys a bundle now and then; a
    # script hammering the payment provider with one account is refused 429.
    http_creates_per_s: float = 0.2
    # Such requests a user may send at once before the rate applies.
    http_creates_burst: int = 10

    # --- escrow and deadlines (custom requests; later shows) ------------------------
    # An offer the model has not accepted in this long refunds itself: three
    # days covers a model who works weekends only.
    request_offer_ttl_s: float = 72 * 3600.0
    # An accepted request not delivered in this long refunds itself: a week
    # is the figure for a custom photo or video.
    request_delivery_ttl_s: float = 7 * 24 * 3600.0
    # How long a closed request's escrow may wait for the process that closed
    # it to move the money before the sweeper does it instead: longer than a
    # money call takes (Redis timeout, ledger acknowledgement), so the two
    # rarely race (a race is harmless: both resolve to one transaction).
    request_settle_grace_s: float = 30.0
    # Ticket shows: a scheduled show not started this long after its
    # starts_at cancels itself and refunds every ticket. Half an hour lets a
    # model run late without leaving fans' tokens held for a no-show.
    show_start_grace_s: float = 1800.0
    # A running show not ended this long after it started ends by itself
    # (released, having run its minimum): a model who leaves without
    # show_end does not hold her room closed to non-holders for ever. Twelve
    # hours is longer than any show (SHOW_MIN_S_MAX is a day: min_s over this
    # is refused).
    show_length_max_s: float = 12 * 3600.0
    # The same as request_settle_grace_s, for a closed show's escrow.
    show_settle_grace_s: float = 30.0
    # Tip goals: how far ahead a goal's deadline may be. A month is longer
    # than any goal a room rallies for; further is a typo, and it would
    # keep an all-or-nothing goal's tips held for that long.
    goal_deadline_ahead_s_max: float = 31 * 86400.0
    # The same as request_settle_grace_s, for a closed goal's escrow.
    goal_settle_grace_s: float = 30.0
    # How often the deadline sweeper looks for due deadlines: the precision of
    # every expiry (an offer expires up to this late).
    deadline_sweep_interval_s: float = 1.0
    # The sweeper's Redis lease: one process sweeps; when it dies, another
    # takes over within this long. Renewed every sweep, so it must outlast
    # a few of them.
    deadline_lease_ttl_s: float = 10.0
    # Deadlines handled per sweep: bounds one sweep's work and its queries.
    deadline_batch_max: int = 100
    # A deadline whose handler failed (a backend away) is tried again after
    # this long, doubled per failure up to 64 times it.
    deadline_retry_s: float = 5.0

    # --- private shows (server/economy/privates.py) ----------------------------------
    # A show request the model has not answered in this long expires: long
    # enough to notice it, short enough that the fan is not left waiting.
    private_accept_timeout_s: float = 120.0
    # One billing period, in whole seconds: each is charged by one idempotent
    # tick. Shorter means less owed at a crash and more ledger rows.
    private_tick_s: int = 10
    # After a side disconnects, billing pauses for up to this long; then the
    # show ends (a fan who drops before the minimum forfeits it).
    private_grace_s: float = 30.0
    # How often each node's meter looks at running shows and renews the
    # leases it holds: a period is charged up to this late.
    private_meter_interval_s: float = 1.0
    # Shows one node's meter pass bills at once. One at a time, a node billed
    # only 22-75 ticks/s (docs/benchmarks.md), falling behind past a few
    # hundred shows of 10 s. Each tick holds a Postgres connection across its
    # Redis call, so 2 of the pool's 10 leave commands 8.
    private_meter_concurrency: int = 2
    # A show's meter lease: when its node dies, another node takes the show
    # over within this long (and charges every period missed meanwhile).
    private_lease_ttl_s: float = 5.0
    # How long an ended show's money may wait for the process that ended it
    # before the sweeper settles it instead (see request_settle_grace_s).
    private_settle_grace_s: float = 30.0

    # --- receipts, DM history, blocks and reports (issue #12 sections 6 and 7) -----
    # What a model earns per token, in cents, shown on receipts (GET
    # /v1/me/transactions/{tx}) until payout rules are versioned (the platform
    # issue). 5: the common rate of the large platforms ($0.05 a token). A
    # display figure, never a balance: balances stay integer tokens.
    payout_cents_per_token: float = 5.0
    # Rows in one page of GET /v1/me/transactions, /v1/me/dms and
    # /v1/admin/reports, by default and at most: a screenful, and a bound on
    # one Postgres read.
    history_page_default: int = 50
    history_page_max: int = 200
    # DMs the archive stream may hold for Postgres before DMs are refused
    # (UNAVAILABLE), as the outbox bounds spends: at ~400 bytes each,
    # 1,000,000 is ~400 MB of Redis with Postgres away for hours.
    dm_log_entries_max: int = 1_000_000
    # DMs the archiver copies into Postgres per transaction, and how long its
    # read waits for new ones (a DM shows in history within about this long).
    dm_archive_batch_max: int = 500
    dm_archive_block_ms: int = 1000
    # An archive entry read by an archiver that has not acknowledged it after
    # this long is taken over by another (its process is presumed dead).
    dm_archive_claim_idle_s: float = 30.0
    # Users one user may block: bounds the Redis set dm.lua reads and its load.
    dm_blocks_max: int = 10_000
    # --- standing: leaderboards, the king of the room, tiers (issue #12) -----------
    # The king of a room is its top tipper over this window: 12 hours, the
    # contract's. Sums are kept per hour, so a window covers whole hours: its
    # oldest hour is the one that holds (now - window).
    king_window_s: int = 12 * 3600
    # Tiers rank users by the tokens they spent over this rolling window:
    # 30 days, the contract's.
    tier_window_s: int = 30 * 24 * 3600
    # The tiers, lowest first: `min_tokens:name`, comma-separated, the first
    # one from 0. A user's tier is the index of the last one whose minimum
    # their spend reaches (0 = the first). Five steps of about x10 tell a
    # newcomer from a regular from a whale, the way Chaturbate's colours do.
    tiers: str = "0:grey,1:blue,100:green,1000:purple,10000:gold"
    # How often each node's standing projector looks at what the ledger
    # changed (kings, tiers): with the ledger's own lag, the bound on how
    # stale a king event and a tier are.
    standing_interval_s: float = 1.0
    # How long a node trusts a tier it read from Redis before reading it again:
    # a tier change reaches events within this (plus standing_interval_s),
    # while a chatting user costs one Redis read per this long, not per line.
    tier_cache_ttl_s: float = 5.0
    # --- moderation (issue #12 section 4) -------------------------------------------
    # Moderators one room may have: the 25, enough for a busy room's
    # shifts, few enough that the in-process copy of a room's rules stays small.
    moderators_max: int = 25
    # Rooms whose rules (settings, moderators, mutes, bans) one process keeps
    # in memory for the `say` path; past it the copy is dropped and reloaded
    # from Postgres room by room (a load is one query).
    moderation_rooms_cached_max: int = 10_000
    # With `chat_requires: purchased`, a "has not bought tokens yet" answer is
    # reused this long, so a member typing in such a room costs Postgres one
    # query per this many seconds, and a purchase unlocks chat within it
    # ("has bought" is kept for good: it never changes back).
    chat_purchase_recheck_s: float = 5.0
    # --- spending limits (server/economy/limits.py) ----------------------------------
    # A raised (or removed) spending limit takes effect this long after the
    # fan asked: the contract's 24 hours, a cooling-off against a spending
    # spree; a lowered one applies at once.
    limit_raise_delay_s: float = 24 * 3600.0
    # The length of one day of self-exclusion (`days` in the request): a
    # day; tests shorten it to see an exclusion end without waiting.
    self_exclusion_day_s: float = 24 * 3600.0
    # The length of one minute of `reality_check_min`: a minute; tests
    # shorten it to receive reality checks without waiting.
    reality_check_minute_s: float = 60.0
    # How often a session with no reality check set looks again whether the
    # fan asked for one since (PUT /v1/me/limits): a change shows within this.
    reality_check_poll_s: float = 60.0

    # --- discovery, follows and live notifications (issue #13 sections 2, 3) ------
    # "Goes live" = the model joins her own room after being away at least this
    # long: a flapping connection (or a page reload) does not notify everyone
    # again; five minutes is a break, not a glitch.
    live_away_s: float = 300.0
    # Her presence count in her room expires this long after her last join or
    # leave: a node that crashed with her session in the room leaves a count
    # that would otherwise never fall to 0 (and she would never go live again).
    live_state_ttl_s: int = 12 * 3600
    # Followers whose stored notifications one statement inserts: bounds one
    # transaction (100k followers = 20 short statements, each a few ms).
    live_batch_followers: int = 5000
    # A node taking a live job holds it this long per batch; a job whose node
    # died is taken over by another node once this has passed.
    live_job_lease_s: float = 30.0
    # How often each node looks for live jobs whose node died mid-way.
    live_job_interval_s: float = 2.0
    # Sessions a node pushes a `live` event to before yielding to its event
    # loop: 10,000 connected followers never hold the gateway for one long turn.
    live_push_chunk: int = 500
    # GET /v1/rooms?sort=trending: tips over this many recent seconds, read from
    # the standing projection's hourly sums (so it covers whole hours: the hour
    # holding now - window and every later one).
    trending_window_s: int = 3600
    # Rooms GET /v1/rooms ranks at most (all rooms of a 10,000-model site).
    discovery_rooms_max: int = 10_000
    # How old a node's room listing snapshot gets before a background rebuild
    # (the old one is served meanwhile): the listing's 1 s of old. A site
    # whose rebuild takes longer (10,000 rooms: docs/benchmarks.md) rebuilds
    # every five build durations instead, so it costs at most a fifth of a core.
    discovery_refresh_s: float = 1.0
    # A GET /v1/rooms cursor stays valid this long after its last page was
    # read (each page read renews it): a person reading a page of cards and
    # then asking for more, with a pause. Past it the cursor answers
    # CURSOR_EXPIRED. It bounds the pinned rankings in Redis: at most 3 sorts x
    # (this / the snapshot period) per node, each an id and a newline a room
    # (10,000 ids of 10 characters rebuilt every ~5 s: 72 pins of ~110 KB,
    # ~8 MB per node at worst).
    discovery_cursor_idle_s: float = 120.0

    # --- metrics --------------------------------------------------------------------
    # Serve /metrics on this port instead of the public HTTP port (0: on the
    # public port). Set it to keep metrics off the internet: the public port
    # then answers 404 there. With --workers N it aggregates every worker.
    metrics_port: int = 0

    # --- the admin page (issue #15 item 6) ------------------------------------------
    # GET /v1/admin/stats gives tips/s over about this long: the page polls it
    # every few seconds, and a window of several polls keeps one slow poll
    # from showing a burst as zero or doubling it.
    admin_rate_window_s: float = 10.0
    # Users one GET /v1/admin/users?prefix= answers (a screenful to pick from).
    admin_users_listed_max: int = 50
    # --- payouts (server/economy/payouts.py) ---------------------------------------
    # The least a model may ask to be paid out, in tokens, until an admin adds a
    # payout rule (POST /v1/admin/payout-rules): with
    # TOKENCHAT_PAYOUT_CENTS_PER_TOKEN it is the first rule (id 0). 1000 tokens
    # ($50 at 5 cents): a transfer fee is not worth paying for less.
    payout_min_tokens: int = 1000
    # GET /v1/me/payouts and /v1/admin/payouts: the newest this many (a page
    # of them is a later need); a bound on one Postgres read.
    payouts_listed_max: int = 100
    # GET /v1/me/earnings: the longest period one statement covers, in days
    # (a bound on the ledger rows one statement sums).
    earnings_period_days_max: int = 366
    # The same as request_settle_grace_s, for a decided payout's escrow: the
    # admin's call moves the money; the sweeper does it after this long if
    # that call died on the way.
    payout_settle_grace_s: float = 30.0
    # A payout left `requesting` (its request died between its row and the
    # hold's answer) is finished or cancelled by the sweeper once it is this
    # old, in seconds: far past any live request's own course (Redis 2 s,
    # the ledger's acknowledgement 5 s, Postgres 5 s), so the sweeper never
    # decides a request still on its way, and a model's payout is never stuck
    # for long.
    payout_requesting_max_age_s: float = 300.0

    # --- lifecycle ----------------------------------------------------------------
    # On SIGTERM, commands in flight get this long to finish before sessions are
    # closed with 1012.
    shutdown_grace_s: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Read every field from ``TOKENCHAT_<FIELD>``; ``overrides`` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.name, field.type, raw)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        positive = [
            "frame_size_max_bytes",
            "write_buffer_max_bytes",
            "slow_check_interval_s",
            "hello_timeout_s",
            "hello_batch_window_s",
            "hello_batch_max",
            "moderators_max",
            "moderation_rooms_cached_max",
            "chat_purchase_recheck_s",
            "commands_per_s",
            "commands_burst",
            "rate_limit_strikes_max",
            "rooms_per_session_max",
            "sessions_per_user_max",
            "join_buffer_events_max",
            "ping_interval_s",
            "ping_timeout_s",
            "close_timeout_s",
            "history_len",
            "history_age_s",
            "presence_interval_s",
            "node_ttl_s",
            "redis_timeout_s",
            "redis_pool_max",
            "database_timeout_s",
            "database_pool_max",
            "shutdown_grace_s",
            "self_exclusion_day_s",
            "reality_check_minute_s",
            "reality_check_poll_s",
            "workers",
            "outbox_entries_max",
            "inbox_len",
            "ledger_batch_max",
            "ledger_block_ms",
            "ledger_claim_idle_s",
            "ledger_ack_timeout_s",
            "relay_claim_idle_s",
            "relay_dedupe_s",
            "relay_lag_max_s",
            "ledger_pool_max",
            "token_ttl_max_s",
            "http_creates_per_s",
            "http_creates_burst",
            "request_offer_ttl_s",
            "request_delivery_ttl_s",
            "request_settle_grace_s",
            "show_start_grace_s",
            "show_length_max_s",
            "show_settle_grace_s",
            "goal_deadline_ahead_s_max",
            "goal_settle_grace_s",
            "deadline_sweep_interval_s",
            "deadline_lease_ttl_s",
            "deadline_batch_max",
            "deadline_retry_s",
            "private_accept_timeout_s",
            "private_tick_s",
            "private_grace_s",
            "private_meter_interval_s",
            "private_meter_concurrency",
            "private_lease_ttl_s",
            "private_settle_grace_s",
            "media_image_bytes_max",
            "media_video_bytes_max",
            "media_preview_bytes_max",
            "media_image_pixels_max",
            "media_url_ttl_s",
            "history_page_default",
            "history_page_max",
            "dm_log_entries_max",
            "dm_archive_batch_max",
            "dm_archive_block_ms",
            "dm_archive_claim_idle_s",
            "dm_blocks_max",
            "king_window_s",
            "tier_window_s",
            "standing_interval_s",
            "tier_cache_ttl_s",
            "admin_rate_window_s",
            "admin_users_listed_max",
            "payout_min_tokens",
            "payouts_listed_max",
            "earnings_period_days_max",
            "payout_settle_grace_s",
            "payout_requesting_max_age_s",
            "live_away_s",
            "live_state_ttl_s",
            "live_batch_followers",
            "live_job_lease_s",
            "live_job_interval_s",
            "live_push_chunk",
            "trending_window_s",
            "discovery_rooms_max",
            "discovery_refresh_s",
            "discovery_cursor_idle_s",
            "payment_webhook_tolerance_s",
            "export_section_rows_max",
        ]
        # nan compares false with everything, so `<= 0` lets it through (and
        # turns a rate limit off); inf is no limit at all. Refused first.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must be a finite number")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be > 0")
        if self.history_len > HISTORY_LEN_STORED_MAX:
            raise ValueError(f"TOKENCHAT_HISTORY_LEN must be at most {HISTORY_LEN_STORED_MAX}")
        if not 1 <= self.history_age_s <= HISTORY_AGE_MAX_S:
            raise ValueError(f"TOKENCHAT_HISTORY_AGE_S must be between 1 and {HISTORY_AGE_MAX_S}")
        if self.payout_cents_per_token < 0:
            raise ValueError("TOKENCHAT_PAYOUT_CENTS_PER_TOKEN must be >= 0")
        if self.history_page_default > self.history_page_max:
            raise ValueError("TOKENCHAT_HISTORY_PAGE_DEFAULT must be at most the max")
        if self.ledger_linger_ms < 0:
            raise ValueError("TOKENCHAT_LEDGER_LINGER_MS must be >= 0")
        if not 0 <= self.database_pool_min <= self.database_pool_max:
            raise ValueError("TOKENCHAT_DATABASE_POOL_MIN must be between 0 and the max")
        if self.durability not in ("ledger", "redis"):
            raise ValueError("TOKENCHAT_DURABILITY must be 'ledger' or 'redis'")
        if self.delivery not in DELIVERY_MODES:
            raise ValueError("TOKENCHAT_DELIVERY must be 'auto', 'script' or 'relay'")
        if self.relay_dedupe_s > RELAY_DEDUPE_MAX_S:
            raise ValueError(
                f"TOKENCHAT_RELAY_DEDUPE_S must be at most {RELAY_DEDUPE_MAX_S} (a day)"
            )
        if self.relay_dedupe_s < 2 * self.relay_claim_idle_s:
            raise ValueError(
                "TOKENCHAT_RELAY_DEDUPE_S must be at least twice TOKENCHAT_RELAY_CLAIM_IDLE_S "
                "(a redelivery comes after a claim)"
            )
        if self.payment_provider not in ("none", "fake"):
            raise ValueError("TOKENCHAT_PAYMENT_PROVIDER must be 'none' or 'fake'")
        self.bundle_list()  # refuses a malformed TOKENCHAT_BUNDLES at start-up
        if not self.database_schema.isidentifier():
            raise ValueError("TOKENCHAT_DATABASE_SCHEMA must be a plain SQL identifier")
        if self.jwt_secret and len(self.jwt_secret.encode()) < JWT_SECRET_BYTES_MIN:
            raise ValueError(
                f"TOKENCHAT_JWT_SECRET must be at least {JWT_SECRET_BYTES_MIN} bytes "
                "(a short HS256 secret can be guessed offline from one token)"
            )
        if self.media_url_ttl_s > MEDIA_URL_TTL_MAX_S:
            raise ValueError(
                f"TOKENCHAT_MEDIA_URL_TTL_S must be at most {MEDIA_URL_TTL_MAX_S} (5 minutes)"
            )
        if not self.media_dir:
            raise ValueError("TOKENCHAT_MEDIA_DIR must name a folder")
        for port_name in ("http_port", "ws_port", "metrics_port"):
            if not 0 <= getattr(self, port_name) <= 65535:
                raise ValueError(f"{ENV_PREFIX}{port_name.upper()} must be a TCP port")
        if self.one_port not in (0, 1):
            raise ValueError("TOKENCHAT_ONE_PORT must be 0 or 1")
        if self.redis_cluster not in (0, 1):
            raise ValueError("TOKENCHAT_REDIS_CLUSTER must be 0 or 1")
        if self.public_ws_url:
            parsed = urllib.parse.urlsplit(self.public_ws_url)
            if parsed.scheme not in ("ws", "wss") or not parsed.netloc:
                raise ValueError(
                    "TOKENCHAT_PUBLIC_WS_URL must be a ws:// or wss:// URL, "
                    "such as wss://chat.example.com/ws"
                )
        self.trusted_proxy_networks()  # refuses a malformed list at start-up
        if self.forwarded_headers not in FORWARDED_HEADER_FAMILIES:
            raise ValueError(
                "TOKENCHAT_FORWARDED_HEADERS must be one of " + ", ".join(FORWARDED_HEADER_FAMILIES)
            )
        self.tier_list()  # refuses a malformed TOKENCHAT_TIERS at start-up

    def serves_one_port(self) -> bool:
        """True when the gateway and the HTTP API share the HTTP port."""
        return bool(self.one_port) or (self.ws_port == self.http_port != 0)

    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks of ``trusted_proxies`` (``*``: every address)."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in self.trusted_proxies.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "*":
                networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"TOKENCHAT_TRUSTED_PROXIES: {item!r} is not an address, a network or *"
                ) from None
        return networks

    def bundle_list(self) -> list[tuple[str, int, int]]:
        """(id, tokens, price in cents) of each bundle for sale."""
        bundles = []
        for item in self.bundles.split(","):
            parts = item.strip().split(":")
            try:
                bundle_id, tokens, cents = parts[0], int(parts[1]), int(parts[2])
            except (IndexError, ValueError):
                raise ValueError(
                    f"TOKENCHAT_BUNDLES: {item!r} is not id:tokens:price_cents"
                ) from None
            if not bundle_id or tokens <= 0 or cents < 0 or len(parts) != 3:
                raise ValueError(f"TOKENCHAT_BUNDLES: {item!r} is not id:tokens:price_cents")
            bundles.append((bundle_id, tokens, cents))
        return bundles

    def tier_list(self) -> list[tuple[int, str]]:
        """(min_tokens, name) of each tier, lowest first; tier i is index i."""
        tiers: list[tuple[int, str]] = []
        for item in self.tiers.split(","):
            floor, _, name = item.strip().partition(":")
            try:
                minimum = int(floor)
            except ValueError:
                minimum = -1
            name = name.strip()
            if minimum < 0 or not name or (tiers and minimum <= tiers[-1][0]):
                raise ValueError(
                    f"TOKENCHAT_TIERS: {item!r} is not min_tokens:name with minimums rising"
                )
            tiers.append((minimum, name))
        if tiers[0][0] != 0:
            raise ValueError("TOKENCHAT_TIERS: the first tier must start at 0")
        return tiers

    def insecure_reasons(self) -> list[str]:
        """Why these settings must not serve real users (empty: they may)."""
        reasons = []
        if self.dev_mode:
            reasons.append("dev mode is on (TOKENCHAT_DEV_MODE=1 hands out tokens to anyone)")
        if self.payment_provider == "fake":
            reasons.append(
                "the payment provider is 'fake' (TOKENCHAT_PAYMENT_PROVIDER=fake approves "
                "every purchase: free tokens)"
            )
        return reasons

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> list[tuple[str, str]]:
        """(variable, default) for every setting, in declaration order."""
        rows = []
        for field in dataclasses.fields(cls):
            rows.append((ENV_PREFIX + field.name.upper(), repr(field.default)))
        return rows


def _parse(name: str, type_name: object, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a {kind}") from None
    return raw
