-- The durable double-entry ledger. Tokens are integers. Every movement is a
-- transaction whose postings sum to zero; nothing here is ever updated or
-- deleted (a correction is a reversing transaction). `accounts.balance` is the
-- running sum of an account's postings, kept by the ledger writer in the same
-- transaction as the postings, so balances load in O(1) and the database
-- itself refuses a negative user balance.

CREATE TABLE accounts (
    id              text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 80),
    kind            text        NOT NULL CHECK (kind IN ('user', 'system')),
    -- Only system accounts (the mint) may go below zero: the mint's balance is
    -- minus every token ever issued.
    allow_negative  boolean     NOT NULL DEFAULT false,
    balance         bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT balance_not_negative CHECK (allow_negative OR balance >= 0),
    CONSTRAINT only_system_negative CHECK (NOT allow_negative OR kind = 'system')
);

INSERT INTO accounts (id, kind, allow_negative) VALUES
    ('sys:mint', 'system', true),      -- source of purchased and granted tokens
    ('sys:payouts', 'system', false),  -- tokens paid out to models
    ('sys:fees', 'system', false);     -- platform fees, if configured

CREATE TABLE ledger_transactions (
    id           text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 64),
    kind         text        NOT NULL
                 CHECK (kind IN ('credit', 'purchase', 'tip', 'dm', 'spend', 'refund', 'payout')),
    -- Who asked for it, and their idempotency key. A key names one spend for
    -- 24 hours (the contract); after that the client may use it again, so the
    -- pair is indexed, not unique: Redis enforces the window, and loading a
    -- balance restores it from here after Redis lost its data.
    initiator    text        NOT NULL,
    idem_key     text        NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 200),
    -- A refund names the transaction it reverses; one refund per transaction.
    reverses     text        UNIQUE REFERENCES ledger_transactions (id),
    -- What the client sent (for CONFLICT checks) and what it was answered
    -- (for duplicates), so idempotency survives a Redis that lost its data.
    request      text        NOT NULL,
    reply        jsonb       NOT NULL,
    meta         jsonb       NOT NULL DEFAULT '{}',
    -- When Redis applied it (ms since the epoch) and its outbox entry id.
    applied_ms   bigint      NOT NULL,
    outbox_id    text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'refund') = (reverses IS NOT NULL))
);
CREATE INDEX ledger_transactions_idempotency ON ledger_transactions (initiator, idem_key);
CREATE INDEX ledger_transactions_initiator_applied ON ledger_transactions (initiator, applied_ms);

CREATE TABLE ledger_postings (
    tx_id       text   NOT NULL REFERENCES ledger_transactions (id),
    account_id  text   NOT NULL REFERENCES accounts (id),
    amount      bigint NOT NULL CHECK (amount <> 0),
    PRIMARY KEY (tx_id, account_id)
);
CREATE INDEX ledger_postings_account ON ledger_postings (account_id);

-- Append-only: the ledger refuses UPDATE and DELETE, whoever asks.
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
END $$;
CREATE TRIGGER ledger_transactions_append_only
    BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_postings_append_only
    BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_transactions_no_truncate
    BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_postings_no_truncate
    BEFORE TRUNCATE ON ledger_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Double entry: at commit, each transaction's postings sum to zero, and it
-- has at least two of them.
CREATE FUNCTION ledger_transaction_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
    legs  integer;
BEGIN
    SELECT coalesce(sum(amount), 0), count(*) INTO total, legs
      FROM ledger_postings WHERE tx_id = NEW.tx_id;
    IF total <> 0 OR legs < 2 THEN
        RAISE EXCEPTION 'transaction % is unbalanced: % postings summing to %',
            NEW.tx_id, legs, total;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER ledger_postings_balanced
    AFTER INSERT ON ledger_postings
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balanced();

-- Prices a model sets. NULL means "not set": the default applies.
CREATE TABLE prices (
    model_id    text        PRIMARY KEY REFERENCES users (id),
    -- Tokens per private message to this model; 0 = free.
    dm          integer     NOT NULL DEFAULT 0 CHECK (dm BETWEEN 0 AND 1000000),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Purchases of token bundles through a payment provider; one per payment.
CREATE TABLE purchases (
    payment_ref  text        PRIMARY KEY CHECK (length(payment_ref) BETWEEN 1 AND 128),
    provider     text        NOT NULL,
    user_id      text        NOT NULL REFERENCES users (id),
    bundle       text        NOT NULL,
    tokens       integer     NOT NULL CHECK (tokens > 0),
    price_cents  integer     NOT NULL CHECK (price_cents >= 0),
    tx_id        text        NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Outbox entries the writer could not record (say, a second transaction for
-- one idempotency key): kept here for an operator instead of being dropped,
-- and counted by reconcile.
CREATE TABLE ledger_rejected (
    outbox_id    text        PRIMARY KEY,
    tx_id        text        NOT NULL,
    reason       text        NOT NULL,
    entry        jsonb       NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
