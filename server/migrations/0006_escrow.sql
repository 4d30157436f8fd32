-- Escrow, and the ledger kinds of the paid features of issue #11.
--
-- Escrow is an account kind of its own: `esc:<kind>:<id>`, one account per
-- thing held for (a ticket show `esc:show:t_...`, a private show
-- `esc:private:p_...`, a custom request `esc:request:r_...`); the writer
-- makes them (server/ledger/writer.py). It never goes below zero, like a user's account, and
-- its balance sums to zero with every other account, so reconcile covers it
-- without a special case.
--
-- Kinds: `unlock` (a fan pays for locked media), `hold` (a fan's tokens go
-- into escrow: a ticket, a private show's minimum, a custom request's
-- offer), `release` (escrow to the model who earned it), `escrow_refund`
-- (escrow back to the fan it came from) and `meter` (a private show's
-- per-period charge after its minimum). A tip on a menu item is a `tip`.
ALTER TABLE accounts DROP CONSTRAINT accounts_kind_check;
ALTER TABLE accounts ADD CONSTRAINT accounts_kind_check
    CHECK (kind IN ('user', 'system', 'escrow'));

ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_kind_check;
ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_kind_check
    CHECK (kind IN ('credit', 'purchase', 'tip', 'dm', 'spend', 'refund', 'payout',
                    'unlock', 'hold', 'release', 'escrow_refund', 'meter'));
