-- Receipts and private messages (issue #12 sections 6 and 7): the DM
-- archive, blocks and reports. Transaction history and receipts read the
-- ledger itself (0002): its postings are indexed by account already.

-- Every DM, paid or free, as delivered: written off the hot path by the DM
-- archiver from the `{eco}:dmlog` stream that dm.lua appends to in the same
-- atomic call as the delivery (server/catalog/dms.py). Keyed by the DM's
-- transaction id (a free DM has one too, with no ledger row), so an entry
-- archived twice is one row.
CREATE TABLE dms (
    tx          text        PRIMARY KEY CHECK (length(tx) BETWEEN 1 AND 64),
    sender      text        NOT NULL,
    recipient   text        NOT NULL,
    text        text        NOT NULL CHECK (length(text) BETWEEN 1 AND 1000),
    price       bigint      NOT NULL CHECK (price >= 0),
    -- The attached media's descriptor, when the DM carried one.
    media       jsonb,
    -- When Redis applied it (ms since the epoch): the DM event's `ts`.
    ts          bigint      NOT NULL,
    -- The conversation, whoever wrote: (least, greatest) of the two ids, so
    -- both directions of one pair page through one index range.
    pair_low    text        NOT NULL,
    pair_high   text        NOT NULL,
    CHECK (pair_low = least(sender, recipient) AND pair_high = greatest(sender, recipient))
);
CREATE INDEX dms_conversation ON dms (pair_low, pair_high, ts DESC, tx DESC);

-- Who blocks whose DMs. Redis keeps a set per blocker, loaded lazily from
-- here (dm.lua refuses a blocked sender inside the charging script).
CREATE TABLE dm_blocks (
    blocker     text        NOT NULL REFERENCES users (id),
    blocked     text        NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (blocker, blocked),
    CHECK (blocker <> blocked)
);

-- Reports of a user, or of one of their messages, to the admins' queue.
CREATE TABLE reports (
    id           bigserial   PRIMARY KEY,
    reporter     text        NOT NULL REFERENCES users (id),
    reported     text        NOT NULL REFERENCES users (id),
    -- What is reported: a DM's tx or a room event's offset, as the client has it.
    message      text        CHECK (length(message) <= 128),
    reason       text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    state        text        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    resolution   text        CHECK (length(resolution) <= 1000),
    resolved_by  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);
CREATE INDEX reports_state ON reports (state, id DESC);
