-- Payments and accounts (issue #13 section 4): provider webhooks, reversals
-- of purchases (refunds and chargebacks) with their shortfall, account flags
-- for admins, and deleted accounts with their pseudonyms.

-- Webhook events already applied, by the provider's event id: a replayed
-- event is answered from here and applies nothing twice (each event's effect
-- is idempotent on its payment id as well; this row is the fast path and the
-- record of what the provider told us).
CREATE TABLE payment_events (
    event_id     text        PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 128),
    type         text        NOT NULL CHECK (length(type) BETWEEN 1 AND 64),
    payment_ref  text        NOT NULL CHECK (length(payment_ref) BETWEEN 1 AND 128),
    result       jsonb       NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- One reversal per purchase (a refund or a chargeback, whichever came first):
-- what was clawed back from the fan into sys:mint (the account that minted
-- the tokens) and what could not be, because the fan had spent it already
-- (`shortfall`, tokens). clawed + shortfall = the purchase's tokens, always.
CREATE TABLE payment_reversals (
    payment_ref  text        PRIMARY KEY REFERENCES purchases (payment_ref),
    kind         text        NOT NULL CHECK (kind IN ('refund', 'chargeback')),
    user_id      text        NOT NULL,
    tokens       integer     NOT NULL CHECK (tokens > 0),
    clawed       integer     NOT NULL CHECK (clawed >= 0),
    shortfall    integer     NOT NULL CHECK (shortfall >= 0),
    tx_id        text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (clawed + shortfall = tokens)
);
CREATE INDEX payment_reversals_user ON payment_reversals (user_id);

-- Accounts flagged for an admin (a chargeback; GET /v1/admin/flags).
CREATE TABLE account_flags (
    id           bigserial   PRIMARY KEY,
    user_id      text        NOT NULL,
    reason       text        NOT NULL CHECK (reason IN ('chargeback')),
    payment_ref  text        NOT NULL UNIQUE,
    shortfall    integer     NOT NULL CHECK (shortfall >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX account_flags_user ON account_flags (user_id, id);

-- Deleted accounts. The ledger is append-only (triggers refuse UPDATE and
-- DELETE, postings reference accounts by id), so a deleted user's ledger
-- rows are never rewritten: they keep `u:<id>` and every balance, total and
-- reconcile stays what it was. This mapping is what pseudonymises them:
-- everything the server shows from the ledger names the account by its
-- pseudonym (`del:<hmac>`) once the user is here, and every table that is
-- not the books had the user's personal data removed (docs/economy.md,
-- "Deleted accounts").
CREATE TABLE deleted_users (
    user_id      text        PRIMARY KEY REFERENCES users (id),
    pseudonym    text        NOT NULL UNIQUE CHECK (pseudonym LIKE 'del:%'),
    forfeited    bigint      NOT NULL CHECK (forfeited >= 0),
    deleted_at   timestamptz NOT NULL DEFAULT now()
);

-- Where a deleted account's remaining balance goes (ledger kind `forfeit`).
INSERT INTO accounts (id, kind, allow_negative) VALUES ('sys:forfeited', 'system', false)
    ON CONFLICT (id) DO NOTHING;

-- The ledger kinds `chargeback` (a refund or chargeback's clawback) and
-- `forfeit` (a deleted account's balance). Appended to whatever the current
-- list is, so migrations of other features that add kinds compose with this.
DO $$
DECLARE
    def text;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO def FROM pg_constraint
     WHERE conname = 'ledger_transactions_kind_check'
       AND conrelid = 'ledger_transactions'::regclass;
    EXECUTE 'ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_kind_check';
    EXECUTE 'ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_kind_check '
         || 'CHECK (kind IN (''chargeback'', ''forfeit'') OR ' || substring(def FROM 7) || ')';
END $$;
