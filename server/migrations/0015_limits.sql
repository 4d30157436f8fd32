-- Spending limits, self-exclusion and reality checks (issue #12 section 5):
-- what a fan set for herself. The Redis hash `{eco}:lim:<user>` caches one
-- row (server/economy/limits.py); the money scripts enforce it in
-- money_lib.lua's user_gate. What she spent per window is not stored here:
-- it is the ledger's (kinds tip, dm, unlock, ticket, hold, meter debiting
-- her account), summed when Redis lacks the counters.
CREATE TABLE spend_limits (
    user_id           text    PRIMARY KEY REFERENCES users (id),
    -- Tokens per calendar window in UTC (day, ISO week from Monday, month);
    -- NULL: no limit.
    daily             bigint  CHECK (daily BETWEEN 0 AND 1000000000000),
    weekly            bigint  CHECK (weekly BETWEEN 0 AND 1000000000000),
    monthly           bigint  CHECK (monthly BETWEEN 0 AND 1000000000000),
    -- A raise (or a removal) waiting for its delay: the value it becomes
    -- (NULL: none) from *_next_at (ms since the epoch; NULL: nothing pending).
    daily_next        bigint  CHECK (daily_next BETWEEN 0 AND 1000000000000),
    daily_next_at     bigint,
    weekly_next       bigint  CHECK (weekly_next BETWEEN 0 AND 1000000000000),
    weekly_next_at    bigint,
    monthly_next      bigint  CHECK (monthly_next BETWEEN 0 AND 1000000000000),
    monthly_next_at   bigint,
    -- Self-exclusion: no spend and no purchase before this (ms); only ever
    -- moved later.
    excluded_until    bigint,
    -- A `reality_check` event every this many minutes; NULL: none.
    reality_check_min integer CHECK (reality_check_min BETWEEN 1 AND 1440),
    -- Bumped by every change: the Redis cache keeps the newest it was given.
    version           bigint  NOT NULL DEFAULT 1,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Rebuilding a fan's counters sums her debits through the existing
-- ledger_postings_account index: no index of its own, so that the ledger
-- writer's inserts cost what they did.
