-- Moderation (issue #12 section 4) and the audit log (section 7).
--
-- Postgres is the truth for every restriction: Redis only carries the news
-- of a change (the `M` bus payload, server/bus.py) and each node keeps an
-- in-process copy it rebuilds from these tables (server/moderation.py), so a
-- ban survives a restart and the loss of everything in Redis.

-- A room's chat settings, one row once the model sets any.
CREATE TABLE room_settings (
    room              text        PRIMARY KEY REFERENCES rooms (id),
    -- Seconds a member waits between two chat lines (0: no slow mode);
    -- protocol/limits.py SLOW_S_MAX.
    slow_s            integer     NOT NULL DEFAULT 0 CHECK (slow_s BETWEEN 0 AND 86400),
    -- Who may chat: anyone, fans who bought tokens once, or fans holding at
    -- least chat_min_balance tokens.
    chat_requires     text        NOT NULL DEFAULT 'none'
                                  CHECK (chat_requires IN ('none', 'purchased', 'balance')),
    chat_min_balance  bigint      NOT NULL DEFAULT 0
                                  CHECK (chat_min_balance BETWEEN 0 AND 1000000),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- The moderators a model appoints for her room (at most
-- Settings.moderators_max, checked by the server).
CREATE TABLE room_moderators (
    room        text        NOT NULL REFERENCES rooms (id),
    user_id     text        NOT NULL REFERENCES users (id),
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, user_id),
    CHECK (user_id <> room)
);

-- Mutes and bans of one user in one room. One row per (room, user, kind):
-- a new mute or ban replaces the old one; unmute and unban delete it.
-- `until` NULL: permanent. A row whose `until` passed is ignored (and
-- replaced by the next one).
CREATE TABLE room_restrictions (
    room        text        NOT NULL REFERENCES rooms (id),
    user_id     text        NOT NULL REFERENCES users (id),
    kind        text        NOT NULL CHECK (kind IN ('mute', 'ban')),
    until       timestamptz,
    by_user     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, user_id, kind)
);

-- Users an admin banned from the whole platform. `until` NULL: permanent.
CREATE TABLE platform_bans (
    user_id     text        PRIMARY KEY REFERENCES users (id),
    until       timestamptz,
    reason      text        NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    by_user     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Every moderation and admin action, append only (GET /v1/admin/audit).
-- Written in the same transaction as the change it records, so the log
-- never misses a change and never names one that did not happen.
CREATE TABLE audit_log (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    -- mute, unmute, kick, ban, unban, clear, slow, room_settings,
    -- moderators, platform_ban, platform_unban, credit, refund
    action      text        NOT NULL CHECK (length(action) BETWEEN 1 AND 32),
    room        text,
    target      text,
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_target ON audit_log (target, id);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append only';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
