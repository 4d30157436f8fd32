-- Payouts (issue #13 section 1, and the verification and payout method of
-- section 4): versioned payout rules, models' payout requests held in
-- escrow `esc:payout:<id>`, admins' verification of models and the payout
-- method a model sets (stored only: no bank is integrated).

-- A payout rule version: what one token is worth when paid out, the least a
-- model may ask for, and when it takes effect. Rows are never updated: a new
-- rule is a new row, so a past payout or earning keeps the rule it was made
-- under (the one with the latest effective_at at or before its time). Before
-- the first row, TOKENCHAT_PAYOUT_CENTS_PER_TOKEN and
-- TOKENCHAT_PAYOUT_MIN_TOKENS are the rule (rule id 0).
CREATE TABLE payout_rules (
    id                 bigserial   PRIMARY KEY,
    cents_per_token    numeric(12, 4) NOT NULL CHECK (cents_per_token >= 0 AND cents_per_token <= 100000),
    min_payout_tokens  bigint      NOT NULL CHECK (min_payout_tokens BETWEEN 1 AND 1000000000),
    effective_at       timestamptz NOT NULL,
    created_by         text        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- "A rule can never take effect in the past": the server refuses it, and
    -- so does the database (a small clock allowance for the round trip).
    CHECK (effective_at >= created_at - interval '5 seconds')
);
CREATE INDEX payout_rules_effective ON payout_rules (effective_at DESC, id DESC);

-- Models an admin has verified (age and identity). A payout needs a row here.
CREATE TABLE model_verifications (
    user_id      text        PRIMARY KEY REFERENCES users (id),
    verified_by  text        NOT NULL,
    verified_at  timestamptz NOT NULL DEFAULT now()
);

-- Where a model's payouts go: its shape is checked by the server
-- (server/economy/payouts.py, PAYOUT_METHODS); nothing is sent anywhere.
CREATE TABLE payout_methods (
    user_id     text        PRIMARY KEY REFERENCES users (id),
    method      jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A payout request. States:
--   requesting --hold applied--> requested --approve--> paid     [payout]
--                                          --reject---> rejected [escrow_refund]
-- `requesting`: the row is written before the hold, so an escrow never
-- holds tokens for no row; the model's retry with the same key finishes it.
-- `refused`: the hold was refused (her balance was short) and nothing moved;
-- a retry with the same key tries again, and the listings leave it out.
-- `settled_at`: when the escrow was emptied (the approve's or reject's money
-- moved); reconcile checks a settled payout's escrow is 0.
CREATE TABLE payouts (
    id                 text        PRIMARY KEY CHECK (id ~ '^po_[0-9a-f]{24}$'),
    model              text        NOT NULL REFERENCES users (id),
    idem_key           text        NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 200),
    tokens             bigint      NOT NULL CHECK (tokens > 0),
    state              text        NOT NULL
                       CHECK (state IN ('requesting', 'refused', 'requested', 'paid', 'rejected')),
    -- The rule in force when she asked (0: the settings' default rule), and
    -- its value copied, so the payout's money never changes with the rules.
    rule_id            bigint      NOT NULL,
    cents_per_token    numeric(12, 4) NOT NULL,
    cents              bigint      NOT NULL CHECK (cents >= 0),
    method             jsonb       NOT NULL,
    hold_tx            text,
    settle_tx          text,
    decided_by         text,
    reason             text        CHECK (length(reason) <= 500),
    created_at         timestamptz NOT NULL DEFAULT now(),
    decided_at         timestamptz,
    settled_at         timestamptz,
    UNIQUE (model, idem_key),
    CHECK ((state IN ('paid', 'rejected')) = (decided_at IS NOT NULL))
);
CREATE INDEX payouts_model ON payouts (model, created_at DESC);
CREATE INDEX payouts_state ON payouts (state, created_at DESC);

-- Reconcile: a settled payout's escrow must be empty. Extended from the
-- view's current definition, as 0011 does, so no other feature's rows drop.
DO $$
BEGIN
    EXECUTE 'CREATE OR REPLACE VIEW escrow_objects AS '
        || rtrim(rtrim(pg_get_viewdef('escrow_objects'::regclass)), ';')
        || ' UNION ALL SELECT ''esc:payout:'' || id AS account,'
        || ' settled_at IS NOT NULL AS closed FROM payouts';
END
$$;

-- The earnings statement reads a model's postings (ledger_postings_account)
-- and filters them by time: no new index on the ledger, whose writer is on
-- the hot path of every spend.
