-- What /users/me/bids shows, one row per (bidder, auction): the highest
-- maximum the bidder named there, how many of their bids it accepted, and the
-- seq of the last one (so that re-running a batch whose commit was in doubt
-- does not count its bids twice). It replaces the index of bids by bidder:
-- that index took one entry per bid at a random place, and SQLite's WAL
-- writes every page a commit touches in full, so a hot auction's commits
-- wrote a dozen pages more per batch. These rows are few and stay put: a hot
-- auction's bidders update the same page or two.
CREATE TABLE participations (
    user_id    BLOB NOT NULL,
    auction_id BLOB NOT NULL,
    max_amount INTEGER NOT NULL,
    bid_count  INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL,
    PRIMARY KEY (user_id, auction_id)
) WITHOUT ROWID;

INSERT INTO participations (user_id, auction_id, max_amount, bid_count, last_seq)
SELECT bidder_id, auction_id, MAX(max_amount), COUNT(*), MAX(seq) FROM bids GROUP BY bidder_id, auction_id;

DROP INDEX bids_bidder;
