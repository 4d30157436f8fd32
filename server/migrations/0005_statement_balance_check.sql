-- Double entry, checked once per statement instead of once per posting row.
-- The deferred per-row trigger of 0002 ran a query per posting at commit:
-- most of the ledger writer's Postgres time for small batches. This trigger
-- sees every row one INSERT added (a transition table) and refuses the
-- statement if any transaction among them has fewer than two postings or
-- postings that do not sum to zero. So the postings of a transaction must
-- arrive in one statement, as the ledger writer sends them. check_violation,
-- not a plain exception: the writer parks what no retry can fix.
DROP TRIGGER ledger_postings_balanced ON ledger_postings;
DROP FUNCTION ledger_transaction_balanced();

CREATE FUNCTION ledger_postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
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
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_postings_balanced
    AFTER INSERT ON ledger_postings
    REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_postings_balanced();
