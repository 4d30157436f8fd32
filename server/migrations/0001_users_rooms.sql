-- Users are created on first sight (their first `hello` or HTTP call).
CREATE TABLE users (
    id          text        PRIMARY KEY
                            CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    role        text        NOT NULL CHECK (role IN ('fan', 'model', 'admin')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- A room's id is its owner's id: the room `alice` belongs to the model `alice`.
CREATE TABLE rooms (
    id          text        PRIMARY KEY REFERENCES users (id),
    -- The smallest tip the room accepts, in tokens (the contract's amount range).
    tip_min     integer     NOT NULL DEFAULT 1 CHECK (tip_min BETWEEN 1 AND 1000000),
    created_at  timestamptz NOT NULL DEFAULT now()
);
