-- What /users/me/bids shows is read from the bids themselves on Postgres, by
-- an index of them by bidder (with each bid's maximum, so the read needs no
-- row of the table), rather than from a table of participations that every
-- commit upserted. The upsert searched the key's index before each insert,
-- locked each row it updated, and left a page to clean up behind each
-- update: a third of Postgres's work in a commit of bids on many auctions.
-- An index entry per bid is one insert, where the bidder's entries of that
-- auction are. SQLite keeps its participations (an index of bids by bidder
-- there made every commit write a dozen more pages).
CREATE INDEX bids_bidder ON bids (bidder_id, auction_id) INCLUDE (max_amount);

DROP TABLE participations;
