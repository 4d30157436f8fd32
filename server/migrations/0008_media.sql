-- Locked media (issue #11, section 2): photos and videos a model sells.
--
-- The content itself is in the media store (server/catalog/media.py; the
-- local disk in development), under the media's id; this row is what the
-- server knows of it. `kind` and `content_type` come from sniffing the
-- bytes, never from what the uploader claimed. A preview is public: a text,
-- or an image (a blurred thumbnail the server made, or for a video an image
-- the model uploaded), stored beside the content.
CREATE TABLE media (
    id            text        PRIMARY KEY CHECK (id ~ '^m_[A-Za-z0-9_-]{1,62}$'),
    owner_id      text        NOT NULL REFERENCES users (id),
    kind          text        NOT NULL CHECK (kind IN ('image', 'video')),
    content_type  text        NOT NULL CHECK (length(content_type) BETWEEN 1 AND 64),
    size_bytes    bigint      NOT NULL CHECK (size_bytes > 0),
    -- Tokens an unlock costs now (the contract's amount range; free media is
    -- not locked media). A model may change it; an unlock names `max_price`.
    price         integer     NOT NULL CHECK (price BETWEEN 1 AND 1000000),
    preview_text  text        CHECK (length(preview_text) <= 255),
    preview_image boolean     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (preview_text IS NOT NULL OR preview_image)
);
CREATE INDEX media_owner ON media (owner_id, created_at);

-- Who may see what: the `unlock` ledger rows are the entitlements (the fan
-- is the initiator, `meta.media` the media), minus those an admin refunded
-- (a refund revokes). Redis caches each fan's set; this index is what loads
-- it after Redis lost its data.
CREATE INDEX ledger_transactions_unlocks ON ledger_transactions (initiator)
    WHERE kind = 'unlock';
