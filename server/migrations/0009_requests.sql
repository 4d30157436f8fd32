-- Custom requests (issue #11 section 5), and the escrow foundation that
-- ticket shows and private shows reuse: deadlines swept under a lease, and
-- the list of escrowed objects that reconcile checks.
--
-- A request's workflow state lives here; its money lives in its escrow
-- account `esc:request:<id>` (ledger kinds hold, release, escrow_refund,
-- added by 0006). The state decides, the money follows: a transition to a
-- closed state (delivered, declined, cancelled, expired) commits first,
-- with a `request.settle` deadline, and only then moves the escrow's whole
-- balance (release to the model for delivered, escrow_refund to the fan for
-- the others). A crash between the two leaves the deadline, which the
-- sweeper finishes (docs/economy.md, "Escrow").
CREATE TABLE requests (
    -- `r_` and 24 hex digits, made by the server: a prefix of its own, so an
    -- id of another kind (`t_...`, `m_...`) never names a request.
    id           text        PRIMARY KEY CHECK (id ~ '^r_[0-9a-f]{24}$'),
    fan          text        NOT NULL REFERENCES users (id),
    model        text        NOT NULL REFERENCES users (id),
    -- What the fan asks for (protocol/limits.py: REQUEST_TEXT_LEN_MAX).
    text         text        NOT NULL CHECK (length(text) BETWEEN 1 AND 1000),
    -- Tokens held in escrow (the contract's amount range).
    amount       bigint      NOT NULL CHECK (amount BETWEEN 1 AND 1000000),
    state        text        NOT NULL CHECK (state IN
                     ('offered', 'accepted', 'delivered', 'declined', 'cancelled', 'expired')),
    hold_tx      text        NOT NULL,
    -- What the model delivered (both optional; limits.py).
    delivery_text text       CHECK (length(delivery_text) <= 1000),
    media        text        CHECK (length(media) <= 512),
    -- When the escrow of a closed request was emptied (NULL while open, and
    -- while a closed one is being settled), and by which release or
    -- escrow_refund (NULL when that call found the escrow empty already).
    settled_at   timestamptz,
    settle_tx    text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- When the current state ends by itself: an offer's expiry, an accepted
    -- request's delivery deadline; NULL once closed. The deadline row below
    -- is what the sweeper acts on; this copy is what clients are shown.
    expires_at   timestamptz,
    CHECK (fan <> model),
    CHECK ((state IN ('offered', 'accepted')) = (expires_at IS NOT NULL))
);
-- GET /v1/me/requests, newest first, as a fan and as a model.
CREATE INDEX requests_fan ON requests (fan, created_at DESC);
CREATE INDEX requests_model ON requests (model, created_at DESC);

-- Every pending deadline of every feature, one row per (subject, action):
-- `request.expire` (an offer's expiry or an accepted request's delivery
-- deadline) and `request.settle` (move the escrow of a closed request); later
-- `show.*` and `private.*`. Stored here, not in Redis, so a restart or a
-- Redis loss strands none; one process at a time sweeps them, under a Redis
-- lease (server/economy/deadlines.py). A handler is idempotent: two sweepers
-- (a lease lost with Redis) or a sweeper racing a user resolve to one outcome.
CREATE TABLE deadlines (
    subject   text        NOT NULL CHECK (length(subject) BETWEEN 1 AND 80),
    action    text        NOT NULL CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    due_at    timestamptz NOT NULL,
    -- Failed attempts so far: each pushes due_at back (backoff), so one
    -- subject whose handler keeps failing cannot starve the others.
    attempts  integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, action)
);
CREATE INDEX deadlines_due ON deadlines (due_at);

-- Every object that holds an escrow account, and whether it is closed (its
-- escrow must then be 0). Reconcile reads this view; a feature with escrow
-- adds its objects with CREATE OR REPLACE VIEW ... UNION ALL.
CREATE VIEW escrow_objects AS
    SELECT 'esc:request:' || id AS account,
           state IN ('delivered', 'declined', 'cancelled', 'expired') AS closed
    FROM requests;

-- Holds by the time the ledger recorded them, so the sweeper finds a hold
-- whose request row a crash kept from being written (Requests.adopt_orphans)
-- by reading only the holds recorded since its last look.
CREATE INDEX ledger_transactions_holds ON ledger_transactions (recorded_at) WHERE kind = 'hold';
