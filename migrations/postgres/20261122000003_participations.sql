-- What /users/me/bids shows, one row per (bidder, auction): the highest
-- maximum the bidder named there, how many of their bids it accepted, and the
-- seq of the last one (so that re-running a batch whose commit was in doubt
-- does not count its bids twice). It replaces the index of bids by bidder
-- (one entry per bid at a random place); the same schema as on SQLite, where
-- that index made every commit write a dozen more pages. Room on each page
-- (fillfactor) lets the updates of a hot auction's bidders, and of the
-- auction rows each commit rewrites, stay on their page without new index
-- entries (HOT updates).
CREATE TABLE participations (
    user_id    UUID NOT NULL,
    auction_id UUID NOT NULL,
    max_amount BIGINT NOT NULL,
    bid_count  BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    PRIMARY KEY (user_id, auction_id)
) WITH (fillfactor = 70);

INSERT INTO participations (user_id, auction_id, max_amount, bid_count, last_seq)
SELECT bidder_id, auction_id, MAX(max_amount), COUNT(*), MAX(seq) FROM bids GROUP BY bidder_id, auction_id;

DROP INDEX bids_bidder;

ALTER TABLE auctions SET (fillfactor = 70);
