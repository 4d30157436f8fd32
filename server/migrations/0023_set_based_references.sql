-- The postings' references checked once per statement, and one index less on
-- the ledger's hot table (issue #14, goal 1).
--
-- ledger_postings had two foreign keys (tx_id -> ledger_transactions,
-- account_id -> accounts): a query and a row lock per key per posting, four
-- per tip, about 0.75 ms of a 50-tip batch's 2.3 ms in EXPLAIN ANALYZE
-- (docs/benchmarks.md). The same guarantee, set-based: the statement
-- trigger that checks balance (0005) now also refuses a statement whose
-- postings name a ledger transaction or an account that does not exist,
-- with foreign_key_violation and the old constraint names (so the writer
-- and anyone reading the error see what they saw before). What the keys also
-- did, refuse deleting a row a posting names: ledger transactions are
-- append-only already (0002), and accounts are now never deleted (no code
-- path deletes one: a deleted user's account stays, docs/economy.md); so
-- no posting can lose what it names.
--
-- `reverses` (one refund per transaction) was a UNIQUE constraint, so every
-- transaction, refund or not, put a NULL into its index. A partial unique
-- index holds only refunds; ON CONFLICT DO NOTHING (the writer's) still
-- skips a second refund of one transaction.

-- All three at once, in the order the writer's statements take them.
LOCK TABLE accounts, ledger_transactions, ledger_postings IN ACCESS EXCLUSIVE MODE;

ALTER TABLE ledger_postings
    DROP CONSTRAINT ledger_postings_tx_id_fkey,
    DROP CONSTRAINT ledger_postings_account_id_fkey;

CREATE OR REPLACE FUNCTION ledger_postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT tx_id, count(*) AS legs, sum(amount) AS total INTO bad
      FROM new_postings GROUP BY tx_id
      HAVING count(*) < 2 OR sum(amount) <> 0
      LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'transaction % is unbalanced: % postings summing to %',
            bad.tx_id, bad.legs, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT p.tx_id INTO bad FROM new_postings p
     WHERE NOT EXISTS (SELECT FROM ledger_transactions t WHERE t.id = p.tx_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a posting names transaction %, which the ledger does not hold',
            bad.tx_id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'ledger_postings_tx_id_fkey';
    END IF;
    SELECT p.account_id INTO bad FROM new_postings p
     WHERE NOT EXISTS (SELECT FROM accounts a WHERE a.id = p.account_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a posting names account %, which does not exist', bad.account_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'ledger_postings_account_id_fkey';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER accounts_no_delete
    BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER accounts_no_truncate
    BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_reverses_key;
CREATE UNIQUE INDEX ledger_transactions_reverses ON ledger_transactions (reverses)
    WHERE reverses IS NOT NULL;
