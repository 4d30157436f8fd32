-- The ledger writer's transaction: checks that cost the same at any ledger
-- size, and two indexes that no query reads (issue #14, goal 1).
--
-- 0023's statement trigger checked the postings' references with
-- `NOT EXISTS (SELECT FROM ledger_transactions ...)` and the same against
-- accounts. The planner turns those into hash anti-joins, and for tables of
-- up to some hundred thousand rows it builds the hash from a sequential scan
-- of the whole table: 4.3 ms per batch at 20,000 ledger rows (86 us per tip
-- in batches of 50), growing with the ledger (docs/benchmarks.md). The
-- checks now probe the primary keys, once per transaction and once per
-- account of the statement, through scalar subqueries, which Postgres runs
-- per row and never turns into joins. The balance check rides on the
-- transaction probe's pass (one grouping of the postings, not two). The
-- guarantees and their errors are the ones 0005 and 0023 gave: a statement
-- whose transactions are unbalanced is refused with check_violation first;
-- one naming a transaction or an account that does not exist with
-- foreign_key_violation and the old constraint's name.
--
-- `ledger_transactions_idempotency` (initiator, idem_key) and
-- `ledger_transactions_initiator_applied` (initiator, applied_ms), from 0002:
-- no query has used them since the idempotency records come back with an
-- account's load (Economy._read_account reads the account's postings, then
-- each transaction by its id), yet every ledger row paid two index inserts
-- for them. Dropping an index leaves the rows as they are (the ledger stays
-- append-only).

CREATE OR REPLACE FUNCTION ledger_postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT g.tx_id, g.legs, g.total, g.legs < 2 OR g.total <> 0 AS unbalanced INTO bad
      FROM (SELECT p.tx_id, count(*) AS legs, sum(p.amount) AS total
              FROM new_postings p GROUP BY p.tx_id) g
     WHERE g.legs < 2 OR g.total <> 0
        OR (SELECT true FROM ledger_transactions t WHERE t.id = g.tx_id) IS NULL
     ORDER BY 4 DESC
     LIMIT 1;
    IF FOUND AND bad.unbalanced THEN
        RAISE EXCEPTION 'transaction % is unbalanced: % postings summing to %',
            bad.tx_id, bad.legs, bad.total
            USING ERRCODE = 'check_violation';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'a posting names transaction %, which the ledger does not hold',
            bad.tx_id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'ledger_postings_tx_id_fkey';
    END IF;
    SELECT n.account_id INTO bad FROM (SELECT DISTINCT account_id FROM new_postings) n
     WHERE (SELECT true FROM accounts a WHERE a.id = n.account_id) IS NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a posting names account %, which does not exist', bad.account_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'ledger_postings_account_id_fkey';
    END IF;
    RETURN NULL;
END $$;

DROP INDEX ledger_transactions_idempotency;
DROP INDEX ledger_transactions_initiator_applied;
