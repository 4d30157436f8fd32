-- The newest outbox entry of each Redis dataset (epoch) that the ledger holds,
-- one row per writer. A Redis whose outbox has not reached it has gone back in
-- time with its epoch unchanged (AOF everysec lost its last second, a lagging
-- replica was promoted): its hot balances are rebuilt from Postgres before it
-- takes another spend (server/economy.py, ensure_fresh).
CREATE TABLE ledger_watermarks (
    epoch       text        NOT NULL,
    writer      text        NOT NULL,
    last_ms     bigint      NOT NULL,
    last_seq    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (epoch, writer)
);
