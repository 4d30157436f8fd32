-- Idempotency initiators get namespaces: `u:<user id>` for users (their
-- spends, an admin's credits and refunds) and `sys:<name>` for the system
-- (`sys:payments` for purchases, `sys:dev` for the `tokenchat dev` seed).
-- Before this, a user's id was the initiator as is, so a user named
-- `payments` shared the purchases' keys and could block a purchase.
--
-- Existing rows are rewritten here, once, so that the code knows one form
-- only (docs/economy.md says why). The ledger is append-only; its UPDATE
-- trigger is disabled for this one statement, inside this migration's
-- transaction, and enabled again before it commits. No ledger data had been
-- released when this was written.
--
-- An old row's kind and meta tell who made it: a purchase was `payments`; a
-- credit by `tokenchat-dev` without the `by` that admin credits carry was the
-- dev seed; every other initiator was a user's id.
ALTER TABLE ledger_transactions DISABLE TRIGGER ledger_transactions_append_only;

UPDATE ledger_transactions SET initiator = CASE
    WHEN kind = 'purchase' AND initiator = 'payments' THEN 'sys:payments'
    WHEN kind = 'credit' AND initiator = 'tokenchat-dev' AND NOT meta ? 'by' THEN 'sys:dev'
    ELSE 'u:' || initiator
END;

ALTER TABLE ledger_transactions ENABLE TRIGGER ledger_transactions_append_only;
