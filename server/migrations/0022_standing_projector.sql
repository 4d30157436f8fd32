-- Standing leaves the ledger writer's transaction (issue #14, goal 1).
--
-- Migration 0013's statement trigger folded every batch the ledger writer
-- inserted into the standing sums in the writer's own transaction: about
-- 50 us of Postgres per tip, and upserts on rows every writer shares. Now a
-- projector (server/standing.py, `project`) reads committed ledger rows
-- behind a watermark and folds them in a transaction of its own.
--
-- Which rows are behind the watermark. Ledger ids are not ordered and
-- writers commit in any order, so the order is the writer's transaction id
-- (`writer_xid`, a 64-bit xid8 that never wraps), then the ledger id. The
-- projector only reads rows whose writer_xid is below its snapshot's xmin:
-- every transaction with a smaller xid has ended (committed or rolled back),
-- and every transaction still to start gets a larger one, so no row can
-- later appear behind the watermark. Exactly once: the sums and the
-- watermark move in one transaction, and the watermark row is locked for it.
--
-- Existing ledgers: the trigger is dropped in this migration's transaction,
-- which ALTER TABLE makes wait for the writers' transactions in flight. So
-- every row already there has been projected by the trigger; those rows keep
-- writer_xid NULL (adding a column without a volatile default rewrites
-- nothing, and the ledger refuses UPDATE) and the projector never reads a
-- NULL. Every row inserted afterwards gets the default, which the NOT VALID
-- check enforces (NOT VALID: it checks new rows, not the history).

-- Both ledger tables at once, in the order the writer's statement takes
-- them, so a writer waiting between the two cannot deadlock with this.
LOCK TABLE ledger_transactions, ledger_postings IN ACCESS EXCLUSIVE MODE;

DROP TRIGGER ledger_postings_standing ON ledger_postings;
DROP FUNCTION standing_project();

ALTER TABLE ledger_transactions ADD COLUMN writer_xid xid8;
ALTER TABLE ledger_transactions ALTER COLUMN writer_xid SET DEFAULT pg_current_xact_id();
ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_writer_xid_set
    CHECK (writer_xid IS NOT NULL) NOT VALID;
-- The projector's scan: (writer_xid, id) after the watermark. Keys grow with
-- the xid, so an insert lands on the index's rightmost page.
CREATE INDEX ledger_transactions_writer_xid ON ledger_transactions (writer_xid, id)
    WHERE writer_xid IS NOT NULL;

-- The last ledger row projected, in (writer_xid, id) order: one row.
CREATE TABLE standing_watermark (
    one         boolean     PRIMARY KEY DEFAULT true CHECK (one),
    writer_xid  xid8        NOT NULL,
    tx_id       text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Before every xid ('0' is below any real one) and every id.
INSERT INTO standing_watermark (writer_xid, tx_id) VALUES ('0', '');
