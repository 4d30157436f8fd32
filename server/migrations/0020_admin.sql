-- The admin page (issue #15 item 6): GET /v1/admin/refunds lists the newest
-- refunds. Refunds are a sliver of the ledger, so a partial index keeps that
-- read from scanning every transaction (the ledger is append-only; an index
-- is not a change to its rows).
CREATE INDEX ledger_transactions_refunds
    ON ledger_transactions (applied_ms DESC, id DESC) WHERE kind = 'refund';
