-- The rows each commit writes carry no foreign-key checks on Postgres. Each
-- check is a query of its own plus a row lock on the referenced auction or
-- user (FOR KEY SHARE, which writes the tuple and the WAL): three per bid and
-- one per changed leader: a third of a hot auction's commit time. The
-- references hold by construction: bids are written only by their auction's
-- actor, which loaded that auction from this database, for bidders whose
-- token names a user of this database (tokens are bound to its id), and
-- nothing deletes users or auctions. SQLite keeps its checks (an index lookup
-- each, nothing written).
ALTER TABLE bids
    DROP CONSTRAINT bids_auction_id_fkey,
    DROP CONSTRAINT bids_bidder_id_fkey,
    DROP CONSTRAINT bids_leader_id_fkey;

ALTER TABLE auctions
    DROP CONSTRAINT auctions_leader_id_fkey,
    DROP CONSTRAINT auctions_winner_id_fkey;
