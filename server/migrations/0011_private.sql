-- Private shows billed per minute (issue #11 section 4): a model's rate and
-- minimum length, and each show's workflow state and meter.
--
-- A show's money lives in its escrow account `esc:private:<id>` (the
-- minimum, held at the start) and moves by ledger kinds `hold`, `meter`
-- (one per billing period and one final, keyed by the show and the tick),
-- `release` (a forfeited minimum to the model) and `escrow_refund` (the
-- unused minimum back to the fan). The state decides, the money follows, as
-- for custom requests (0009; docs/economy.md, "Private shows").

-- The model's private-show prices (PUT /v1/me/prices). A table of its own
-- rather than columns of `prices`, so that other features changing that
-- table and this one never touch the same statement.
CREATE TABLE private_prices (
    model_id   text        PRIMARY KEY REFERENCES users (id),
    -- Tokens per minute; 0 turns private shows off. The contract's amount
    -- range: one minute never costs more than one spend may.
    rate       bigint      NOT NULL CHECK (rate BETWEEN 0 AND 1000000),
    -- The minimum length paid in full, held in escrow at the start: at most
    -- an hour (protocol/limits.py, PRIVATE_MIN_S_MAX).
    min_s      integer     NOT NULL CHECK (min_s BETWEEN 0 AND 3600),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE private_shows (
    -- `p_` and 24 hex digits: a prefix of its own (an `r_...` never names a show).
    id          text        PRIMARY KEY CHECK (id ~ '^p_[0-9a-f]{24}$'),
    fan         text        NOT NULL REFERENCES users (id),
    model       text        NOT NULL REFERENCES users (id),
    -- The fan's idempotency key of `private_request` and the rate she
    -- agreed to (a retry with other fields is a CONFLICT); the rate billed,
    -- the model's at the request (never more than the agreed one).
    request_key text        NOT NULL CHECK (length(request_key) BETWEEN 1 AND 64),
    agreed_rate bigint      NOT NULL CHECK (agreed_rate BETWEEN 1 AND 1000000),
    rate        bigint      NOT NULL CHECK (rate BETWEEN 1 AND 1000000),
    min_s       integer     NOT NULL CHECK (min_s BETWEEN 0 AND 3600),
    -- requested -> accepted (the minimum being held) -> running -> ended;
    -- requested -> declined | expired. Nothing is charged before running.
    state       text        NOT NULL CHECK (state IN
                    ('requested', 'accepted', 'running', 'ended', 'declined', 'expired')),
    hold_tx     text,
    held        bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    started_at  timestamptz,
    -- Billing periods charged so far (each `private_tick_s` billable seconds).
    ticks       integer     NOT NULL DEFAULT 0 CHECK (ticks >= 0),
    -- Disconnect grace: when each side went away (NULL: connected), and the
    -- pause of billing while either is away (its start, and the seconds of
    -- the pauses that ended).
    fan_away_at   timestamptz,
    model_away_at timestamptz,
    paused_since  timestamptz,
    paused_s    double precision NOT NULL DEFAULT 0 CHECK (paused_s >= 0),
    low_warned  boolean     NOT NULL DEFAULT false,
    -- The end: who or what ended it ('fan', 'model', 'balance', 'fan_left',
    -- 'model_left', 'no_funds', 'cancelled'), the billable seconds then, the
    -- tokens the fan paid in all (metered, plus a forfeited minimum).
    end_reason  text,
    end_s       integer     CHECK (end_s >= 0),
    charged     bigint      NOT NULL DEFAULT 0 CHECK (charged >= 0),
    ended_at    timestamptz,
    settled_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When a request not answered expires (NULL once answered).
    expires_at  timestamptz,
    CHECK (fan <> model),
    UNIQUE (fan, request_key)
);
-- One running show per model at a time (`accepted` counts: its minimum is
-- being held and the room is about to open).
CREATE UNIQUE INDEX private_shows_one_running ON private_shows (model)
    WHERE state IN ('accepted', 'running');
-- The meter's scan of running shows (every node, every meter interval).
CREATE INDEX private_shows_running ON private_shows (state) WHERE state = 'running';
CREATE INDEX private_shows_fan ON private_shows (fan, created_at DESC);
CREATE INDEX private_shows_model ON private_shows (model, created_at DESC);

-- Reconcile: a settled show's escrow must be empty. The view is extended
-- from its current definition, whatever other features (ticket shows) added
-- to it before this migration, so that no feature's rows are dropped.
DO $$
BEGIN
    EXECUTE 'CREATE OR REPLACE VIEW escrow_objects AS '
        || rtrim(rtrim(pg_get_viewdef('escrow_objects'::regclass)), ';')
        || ' UNION ALL SELECT ''esc:private:'' || id AS account,'
        || ' settled_at IS NOT NULL AS closed FROM private_shows';
END
$$;
