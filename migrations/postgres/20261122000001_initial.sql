-- gavel's schema on Postgres. Times are milliseconds since the Unix epoch (UTC)
-- in BIGINT, money is BIGINT minor units; the same shape as the SQLite schema so
-- one set of queries serves both.

CREATE TABLE users (
    id            UUID PRIMARY KEY,
    username      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    CONSTRAINT users_username_key UNIQUE (username)
);

CREATE TABLE auctions (
    id              UUID PRIMARY KEY,
    -- stable hash of the id; the unit of ownership in a cluster
    shard           INTEGER NOT NULL,
    seller_id       UUID NOT NULL REFERENCES users (id),
    title           TEXT NOT NULL,
    description     TEXT NOT NULL,
    currency        TEXT NOT NULL,
    starting_price  BIGINT NOT NULL,
    reserve_price   BIGINT,
    min_increment   BIGINT NOT NULL,
    soft_close_secs INTEGER NOT NULL,
    start_at_ms     BIGINT NOT NULL,
    end_at_ms       BIGINT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('scheduled', 'active', 'ended', 'cancelled')),
    current_price   BIGINT NOT NULL,
    leader_id       UUID REFERENCES users (id),
    -- the leader's secret proxy maximum; never shown
    leader_max      BIGINT,
    bid_count       BIGINT NOT NULL,
    seq             BIGINT NOT NULL,
    winner_id       UUID REFERENCES users (id),
    final_price     BIGINT,
    created_at_ms   BIGINT NOT NULL
);

-- listing (ending soonest first) and the sweeper's due scan
CREATE INDEX auctions_status_end ON auctions (status, end_at_ms, id);
CREATE INDEX auctions_status_start ON auctions (status, start_at_ms, id);

-- one row per accepted bid, in the auction's total order
CREATE TABLE bids (
    auction_id    UUID NOT NULL REFERENCES auctions (id),
    seq           BIGINT NOT NULL,
    bidder_id     UUID NOT NULL REFERENCES users (id),
    amount        BIGINT NOT NULL,
    -- the bidder's effective maximum, max(amount, max_amount); secret
    max_amount    BIGINT NOT NULL,
    placed_at_ms  BIGINT NOT NULL,
    -- the auction right after this bid
    current_price BIGINT NOT NULL,
    leader_id     UUID NOT NULL REFERENCES users (id),
    end_at_ms     BIGINT NOT NULL,
    PRIMARY KEY (auction_id, seq)
);

CREATE INDEX bids_bidder ON bids (bidder_id, auction_id);

-- the first result of each (user, key): kind 'bid' points at the bid's seq,
-- 'cancel' and 'create' at the auction
CREATE TABLE idempotency_keys (
    user_id       UUID NOT NULL,
    key           TEXT NOT NULL,
    fingerprint   BIGINT NOT NULL,
    kind          TEXT NOT NULL,
    auction_id    UUID NOT NULL,
    seq           BIGINT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, key)
);

CREATE INDEX idempotency_keys_auction ON idempotency_keys (auction_id, created_at_ms);

-- who may write for a shard; epoch is the fencing token, raised on every change of owner
CREATE TABLE shard_leases (
    shard         INTEGER PRIMARY KEY,
    owner         TEXT NOT NULL,
    epoch         BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
