-- The index of bids by bidder keyed by the bidder alone, the auction carried
-- beside the maximum: a bidder's entries are then in the order their bids
-- were stored (Postgres breaks ties by the row's place), so each new one goes
-- at the end of its bidder's run of the index, on a page just written,
-- rather than at a random place among the bidder's auctions. What
-- `/users/me/bids` reads is unchanged: all of a bidder's entries, summed per
-- auction.
DROP INDEX bids_bidder;
CREATE INDEX bids_bidder ON bids (bidder_id) INCLUDE (auction_id, max_amount);
