-- Discovery, profiles, follows and live notifications (issue #13, sections 2
-- and 3).

-- A model's public profile (PUT /v1/me/profile). Tags are lower-case words;
-- the avatar is an http(s) URL (the media store's, or any image host), never
-- the image itself, so a room listing stays small.
CREATE TABLE profiles (
    user_id        text        PRIMARY KEY REFERENCES users (id),
    display_name   text        NOT NULL DEFAULT '',
    bio            text        NOT NULL DEFAULT '',
    tags           text[]      NOT NULL DEFAULT '{}',
    avatar         text,
    online_status  text        NOT NULL DEFAULT 'offline'
                               CHECK (online_status IN ('online', 'away', 'busy', 'offline')),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Who follows whom. The second index serves the fan-out of a live
-- notification (every follower of one model, in follower order).
CREATE TABLE follows (
    follower    text        NOT NULL REFERENCES users (id),
    model       text        NOT NULL REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (follower, model)
);
CREATE INDEX follows_by_model ON follows (model, follower);

-- A model went live: one job, written by the node she joined on. Any node
-- takes an unfinished job whose lease ran out (FOR UPDATE SKIP LOCKED) and
-- stores its notifications in batches, keyset-paged on the follower id
-- (`cursor`: the last follower done), so a crash resumes where it stopped.
CREATE TABLE live_jobs (
    id           bigserial   PRIMARY KEY,
    model        text        NOT NULL,
    ts_ms        bigint      NOT NULL,
    cursor       text        NOT NULL DEFAULT '',
    done         boolean     NOT NULL DEFAULT false,
    lease_until  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX live_jobs_pending ON live_jobs (lease_until) WHERE NOT done;

-- Stored notifications (GET /v1/me/notifications), newest first by id. The
-- (user, job) key makes a re-run batch insert nothing twice.
CREATE TABLE notifications (
    id       bigserial PRIMARY KEY,
    user_id  text      NOT NULL,
    kind     text      NOT NULL,
    model    text      NOT NULL,
    ts_ms    bigint    NOT NULL,
    job      bigint    NOT NULL,
    UNIQUE (user_id, job)
);
CREATE INDEX notifications_by_user ON notifications (user_id, id DESC);
