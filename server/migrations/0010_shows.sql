-- Ticket shows (issue #11 section 3): a model schedules a show with a ticket
-- price and a minimum length; fans buy tickets into the show's escrow
-- account `esc:show:<id>` (ledger kind `ticket`, one per fan and show); the
-- escrow is released to the model once the show has run its minimum length,
-- and every ticket is refunded (kind `escrow_refund`, one per ticket) when the
-- show is cancelled, ends early, or is not started in time.
--
-- The state decides, the money follows (docs/economy.md, "Escrow"): a
-- transition to a closed state (ended, cancelled) commits here first, with a
-- `show.settle` deadline, and only then moves the money; a crash between the
-- two leaves the deadline, which the sweeper finishes.
--
-- Who holds a ticket is the ledger's `ticket` transactions (meta: show, fan)
-- less its `escrow_refund` ones for that show: no table of its own, so a
-- ticket can never exist without its payment, and Redis can be rebuilt from
-- the ledger alone (server/economy/shows.py, `load`).
CREATE TABLE shows (
    -- `t_` and 24 hex digits, made by the server: a prefix of its own, so an
    -- id of another kind (`r_...`, `m_...`) never names a show.
    id          text        PRIMARY KEY CHECK (id ~ '^t_[0-9a-f]{24}$'),
    room        text        NOT NULL REFERENCES rooms (id),
    model       text        NOT NULL REFERENCES users (id),
    -- protocol/limits.py: SHOW_TITLE_LEN_MAX.
    title       text        NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    -- Tokens per ticket (the contract's amount range).
    price       bigint      NOT NULL CHECK (price BETWEEN 1 AND 1000000),
    starts_at   timestamptz NOT NULL,
    -- Seconds the show must run for its escrow to go to the model
    -- (protocol/limits.py: SHOW_MIN_S_MAX, a day).
    min_s       integer     NOT NULL CHECK (min_s BETWEEN 1 AND 86400),
    state       text        NOT NULL CHECK (state IN ('scheduled', 'running', 'ended', 'cancelled')),
    -- Set by show_start and by show_end / the end of a show.
    started_at  timestamptz,
    ended_at    timestamptz,
    -- Which way the escrow went once closed: 'release' (ran min_s) or
    -- 'refund' (cancelled, not started in time, ended early).
    outcome     text        CHECK (outcome IN ('release', 'refund')),
    -- When the closed show's escrow was settled (NULL while open or settling).
    settled_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((state IN ('ended', 'cancelled')) = (outcome IS NOT NULL))
);
-- GET /v1/rooms/{room}/shows, newest first; one running show per room.
CREATE INDEX shows_room ON shows (room, starts_at DESC);
CREATE UNIQUE INDEX shows_one_running ON shows (room) WHERE state = 'running';
-- The sweeper restores the room markers of running shows after a Redis loss.
CREATE INDEX shows_running ON shows (state) WHERE state = 'running';

ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_kind_check;
ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_kind_check
    CHECK (kind IN ('credit', 'purchase', 'tip', 'dm', 'spend', 'refund', 'payout',
                    'unlock', 'hold', 'release', 'escrow_refund', 'meter', 'ticket'));
-- A show's tickets and refunds, read when Redis must be rebuilt for a show.
CREATE INDEX ledger_transactions_show ON ledger_transactions ((meta->>'show'))
    WHERE meta ? 'show';

-- Reconcile: a closed show's escrow must be 0 once settled.
CREATE OR REPLACE VIEW escrow_objects AS
    SELECT 'esc:request:' || id AS account,
           state IN ('delivered', 'declined', 'cancelled', 'expired') AS closed
    FROM requests
    UNION ALL
    SELECT 'esc:show:' || id AS account, state IN ('ended', 'cancelled') AS closed
    FROM shows;
