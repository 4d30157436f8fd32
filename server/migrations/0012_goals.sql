-- Tip goals (issue #12, section 1): a model's goal for her room, counted by
-- the tips of her room inside tip.lua and tip_item.lua (a hash in Redis,
-- `{eco}:goal:<room>`, loaded from this table and the ledger when missing).
--
-- An all-or-nothing goal's tips are held in the escrow account
-- `esc:goal:<id>` (ledger kind `tip`, the escrow as payee, meta `goal`),
-- released to the model when the target is reached (kind `release`) and
-- refunded tip by tipper (kind `escrow_refund`, meta `fan`) when the
-- deadline passes first or the goal is deleted.
--
-- state: active -> reached (the target reached) | failed (the deadline
-- passed first) | deleted (the model removed it). The outcome's money is
-- moved after the state commits; settled_at says it was.
CREATE TABLE goals (
    -- `g_` and 24 hex digits: an id of another kind never names a goal.
    id             text        PRIMARY KEY CHECK (id ~ '^g_[0-9a-f]{24}$'),
    room           text        NOT NULL REFERENCES rooms (id),
    model          text        NOT NULL REFERENCES users (id),
    title          text        NOT NULL,
    target         bigint      NOT NULL CHECK (target > 0),
    all_or_nothing boolean     NOT NULL DEFAULT false,
    deadline_at    timestamptz,
    state          text        NOT NULL DEFAULT 'active'
                   CHECK (state IN ('active', 'reached', 'failed', 'deleted')),
    -- The room's current goal is its newest one not deleted (join's room.goal).
    created_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz,
    -- What the escrow's tokens do, decided when the goal leaves `active`:
    -- `release` (reached) or `refund` (failed, or deleted while active).
    -- Kept when a closed goal is later deleted from the room's view.
    outcome        text        CHECK (outcome IN ('release', 'refund')),
    settled_at     timestamptz,
    CHECK ((state = 'active') = (closed_at IS NULL)),
    CHECK ((state = 'active') = (outcome IS NULL))
);
-- One active goal per room.
CREATE UNIQUE INDEX goals_one_active ON goals (room) WHERE state = 'active';
CREATE INDEX goals_room ON goals (room, created_at DESC);
-- The sweeper's check of active goals (a reach recorded in Redis but not
-- yet in Postgres, when the process that saw it died).
CREATE INDEX goals_active ON goals (state) WHERE state = 'active';

-- A goal's progress (its tips) and held tips per fan, read when Redis must
-- be rebuilt for a goal and when an all-or-nothing goal is refunded.
CREATE INDEX ledger_transactions_goal ON ledger_transactions ((meta->>'goal'))
    WHERE meta ? 'goal';

-- Reconcile: a settled goal's escrow must be empty. Extended from the view's
-- current definition, as 0011 does, so no other feature's rows are dropped.
DO $$
BEGIN
    EXECUTE 'CREATE OR REPLACE VIEW escrow_objects AS '
        || rtrim(rtrim(pg_get_viewdef('escrow_objects'::regclass)), ';')
        || ' UNION ALL SELECT ''esc:goal:'' || id AS account,'
        || ' settled_at IS NOT NULL AS closed FROM goals';
END
$$;
