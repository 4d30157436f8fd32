-- A deleted account on the WebSocket side (issue #13 section 4): when her
-- events left the rooms' histories, her kingships took her pseudonym and her
-- DMs left the inboxes (server/catalog/forgetting.py). DELETE /v1/me does it
-- after her sessions are closed; one that failed there (Redis away) is
-- finished by the sweeper, which finds it by this column being NULL. Rows of
-- accounts deleted before this migration are NULL too, so the sweeper
-- forgets them as well, once.
ALTER TABLE deleted_users ADD COLUMN forgotten_at timestamptz;

-- The sweeper reads the ones left: a sliver of the table.
CREATE INDEX deleted_users_unforgotten ON deleted_users (user_id) WHERE forgotten_at IS NULL;
