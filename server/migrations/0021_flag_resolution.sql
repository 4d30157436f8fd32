-- Resolving account flags (issue #13 remainder): an admin who looked at a
-- flagged account (a chargeback) closes its flag with a note, as reports are
-- resolved (migration 0014's audit log records who resolved what, written in
-- the same transaction as the flag's close).
--
-- A flag is open until resolved, and resolved once: the server answers a
-- second resolve with the flag as it stands, and the CHECK keeps the state
-- and its three fields in step.
ALTER TABLE account_flags
    ADD COLUMN state        text        NOT NULL DEFAULT 'open'
                                        CHECK (state IN ('open', 'resolved')),
    ADD COLUMN resolution   text        CHECK (length(resolution) <= 1000),
    ADD COLUMN resolved_by  text,
    ADD COLUMN resolved_at  timestamptz,
    ADD CONSTRAINT account_flags_resolved_fields
        CHECK ((state = 'open') = (resolved_by IS NULL AND resolved_at IS NULL));

-- The admin page reads the open flags, newest first: a sliver of the table.
CREATE INDEX account_flags_open ON account_flags (id DESC) WHERE state = 'open';
