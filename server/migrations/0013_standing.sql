-- Standing (issue #12, sections 2 and 3): who tipped most in a room
-- (leaderboards, the king of the room) and what each user spent over a
-- rolling window (tiers).
--
-- A projection of the ledger, maintained AS THE LEDGER IS WRITTEN: a
-- statement trigger on ledger_postings folds each batch the ledger writer
-- inserts into per-hour sums, in the writer's own transaction. So the
-- projection is exactly as current as the ledger (nothing to replay, nothing
-- counted twice: a re-delivered entry inserts no postings), and a read sums
-- at most one row per (user, hour) instead of grouping the ledger.
--
-- Hours are `applied_ms / 3600000` (when Redis applied the transaction).
-- A refund is subtracted from the hour of the spend it reverses, so a
-- refunded tip leaves every window it was counted in.

-- Tips per room, user and hour (a room's id is its model's).
CREATE TABLE standing_room_hourly (
    room     text   NOT NULL,
    user_id  text   NOT NULL,
    hour     bigint NOT NULL,
    tokens   bigint NOT NULL,
    PRIMARY KEY (room, hour, user_id)
);

-- Tips per room and user, all time (the `all` window without a sum over hours).
CREATE TABLE standing_room_total (
    room     text   NOT NULL,
    user_id  text   NOT NULL,
    tokens   bigint NOT NULL,
    PRIMARY KEY (room, user_id)
);
CREATE INDEX standing_room_total_rank ON standing_room_total (room, tokens DESC);

-- Tokens each user spent (every paid kind), per hour: their tier's input.
CREATE TABLE standing_user_hourly (
    user_id  text   NOT NULL,
    hour     bigint NOT NULL,
    tokens   bigint NOT NULL,
    PRIMARY KEY (user_id, hour)
);

-- Rooms and users whose sums changed since the standing projector last
-- looked (server/standing.py): it takes them with DELETE ... RETURNING, so
-- each change is looked at once, by one node.
CREATE TABLE standing_dirty (
    kind  text NOT NULL CHECK (kind IN ('room', 'user')),
    id    text NOT NULL,
    PRIMARY KEY (kind, id)
);

-- The projector's results: each user's tier, each room's king. Kept here so
-- that a change is noticed once (an UPDATE ... WHERE IS DISTINCT FROM), and
-- so that Redis losing its copy of the tiers loses nothing.
CREATE TABLE standing_tiers (
    user_id     text        PRIMARY KEY,
    spent       bigint      NOT NULL,
    tier        integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE standing_kings (
    room        text        PRIMARY KEY,
    user_id     text        NOT NULL,
    tokens      bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION standing_project() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One statement: `batch` has one row per posting that counts, with its
    -- room (tips), its hour and its signed tokens: a user's outflow in a paid
    -- kind counts plus; their inflow in a refund (in the original's hour) or
    -- an escrow refund counts minus. Credits, purchases, payouts and releases
    -- are not spending. The upserts are sorted, so two writers' batches lock
    -- the rows they share in one order.
    WITH batch AS (
        SELECT CASE WHEN src.kind = 'tip' THEN src.meta->>'room' END AS room,
               substr(p.account_id, 3) AS user_id,
               src.applied_ms / 3600000 AS hour,
               -p.amount AS tokens
        FROM new_postings p
        JOIN ledger_transactions t ON t.id = p.tx_id
        LEFT JOIN ledger_transactions o ON t.kind = 'refund' AND o.id = t.reverses
        CROSS JOIN LATERAL (
            SELECT coalesce(o.kind, t.kind) AS kind, coalesce(o.meta, t.meta) AS meta,
                   coalesce(o.applied_ms, t.applied_ms) AS applied_ms
        ) src
        WHERE p.account_id LIKE 'u:%'
          AND ((p.amount < 0 AND t.kind NOT IN
                    ('credit', 'purchase', 'payout', 'refund', 'escrow_refund', 'release'))
            OR (p.amount > 0 AND t.kind IN ('refund', 'escrow_refund')))
    ), room_hourly AS (
        INSERT INTO standing_room_hourly AS s (room, user_id, hour, tokens)
        SELECT room, user_id, hour, sum(tokens) FROM batch WHERE room IS NOT NULL
        GROUP BY room, hour, user_id ORDER BY room, hour, user_id
        ON CONFLICT (room, hour, user_id) DO UPDATE SET tokens = s.tokens + EXCLUDED.tokens
    ), room_total AS (
        INSERT INTO standing_room_total AS s (room, user_id, tokens)
        SELECT room, user_id, sum(tokens) FROM batch WHERE room IS NOT NULL
        GROUP BY room, user_id ORDER BY room, user_id
        ON CONFLICT (room, user_id) DO UPDATE SET tokens = s.tokens + EXCLUDED.tokens
    ), user_hourly AS (
        INSERT INTO standing_user_hourly AS s (user_id, hour, tokens)
        SELECT user_id, hour, sum(tokens) FROM batch
        GROUP BY user_id, hour ORDER BY user_id, hour
        ON CONFLICT (user_id, hour) DO UPDATE SET tokens = s.tokens + EXCLUDED.tokens
    )
    INSERT INTO standing_dirty (kind, id)
    SELECT kind, id FROM (
        SELECT 'room' AS kind, room AS id FROM batch WHERE room IS NOT NULL
        UNION
        SELECT 'user', user_id FROM batch
    ) d
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_postings_standing
    AFTER INSERT ON ledger_postings
    REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION standing_project();
