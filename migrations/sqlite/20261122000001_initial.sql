-- gavel's schema on SQLite: the same tables as on Postgres (UUIDs as 16-byte
-- BLOBs, integers as INTEGER), so one set of queries serves both. Times are
-- milliseconds since the Unix epoch (UTC); money is integer minor units.

CREATE TABLE users (
    id            BLOB PRIMARY KEY NOT NULL,
    username      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    CONSTRAINT users_username_key UNIQUE (username)
);

CREATE TABLE auctions (
    id              BLOB PRIMARY KEY NOT NULL,
    -- stable hash of the id; the unit of ownership in a cluster
    shard           INTEGER NOT NULL,
    seller_id       BLOB NOT NULL REFERENCES users (id),
    title           TEXT NOT NULL,
    description     TEXT NOT NULL,
    currency        TEXT NOT NULL,
    starting_price  INTEGER NOT NULL,
    reserve_price   INTEGER,
    min_increment   INTEGER NOT NULL,
    soft_close_secs INTEGER NOT NULL,
    start_at_ms     INTEGER NOT NULL,
    end_at_ms       INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('scheduled', 'active', 'ended', 'cancelled')),
    current_price   INTEGER NOT NULL,
    leader_id       BLOB REFERENCES users (id),
    -- the leader's secret proxy maximum; never shown
    leader_max      INTEGER,
    bid_count       INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    winner_id       BLOB REFERENCES users (id),
    final_price     INTEGER,
    created_at_ms   INTEGER NOT NULL
);

-- listing (ending soonest first) and the sweeper's due scan
CREATE INDEX auctions_status_end ON auctions (status, end_at_ms, id);
CREATE INDEX auctions_status_start ON auctions (status, start_at_ms, id);

-- one row per accepted bid, in the auction's total order
CREATE TABLE bids (
    auction_id    BLOB NOT NULL REFERENCES auctions (id),
    seq           INTEGER NOT NULL,
    bidder_id     BLOB NOT NULL REFERENCES users (id),
    amount        INTEGER NOT NULL,
    -- the bidder's effective maximum, max(amount, max_amount); secret
    max_amount    INTEGER NOT NULL,
    placed_at_ms  INTEGER NOT NULL,
    -- the auction right after this bid
    current_price INTEGER NOT NULL,
    leader_id     BLOB NOT NULL REFERENCES users (id),
    end_at_ms     INTEGER NOT NULL,
    PRIMARY KEY (auction_id, seq)
);

CREATE INDEX bids_bidder ON bids (bidder_id, auction_id);

-- the first result of each (user, key): kind 'bid' points at the bid's seq,
-- 'cancel' and 'create' at the auction
CREATE TABLE idempotency_keys (
    user_id       BLOB NOT NULL,
    key           TEXT NOT NULL,
    fingerprint   INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    auction_id    BLOB NOT NULL,
    seq           INTEGER,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
);

CREATE INDEX idempotency_keys_auction ON idempotency_keys (auction_id, created_at_ms);

-- who may write for a shard; epoch is the fencing token, raised on every change of owner
CREATE TABLE shard_leases (
    shard         INTEGER PRIMARY KEY,
    owner         TEXT NOT NULL,
    epoch         INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
