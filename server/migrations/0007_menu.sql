-- Tip menus (issue #11, section 1): a model's priced items that fans tip.
-- Postgres is the source of truth; Redis caches each menu in the `{eco}`
-- slot for the tip_item script (server/keys.py, Keys.menu), loaded on a miss.
--
-- One row per model who ever saved a menu: `version` grows by one per save
-- (PUT /v1/me/menu), so a cache write older than the newest save is
-- refused, and the row is the lock that orders two saves of one menu.
CREATE TABLE menus (
    model_id    text        PRIMARY KEY REFERENCES users (id),
    version     bigint      NOT NULL CHECK (version > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The items. A save replaces the set but keeps the ids it names, so a fan's
-- open page still names a live item; an item left out is deleted and later
-- tips on it are NOT_FOUND. The tip's ledger entry keeps the item's id and
-- label in its meta, so statements need no row here.
CREATE TABLE menu_items (
    id          text        PRIMARY KEY CHECK (id ~ '^i_[0-9a-f]{16}$'),
    model_id    text        NOT NULL REFERENCES menus (model_id),
    -- protocol/limits.py: MENU_LABEL_LEN_MAX characters, MENU_ITEMS_MAX items,
    -- prices in the contract's amount range.
    label       text        NOT NULL CHECK (char_length(label) BETWEEN 1 AND 40),
    price       integer     NOT NULL CHECK (price BETWEEN 1 AND 1000000),
    position    smallint    NOT NULL CHECK (position BETWEEN 0 AND 49),
    UNIQUE (model_id, position)
);
