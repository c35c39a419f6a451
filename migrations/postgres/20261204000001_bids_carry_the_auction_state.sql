-- A bid row carries the whole state of its auction right after it: with
-- current_price, leader_id and end_at_ms, the leader's maximum and the bid
-- count. A bid that leaves the auction's status and end alone is no longer
-- copied into the auction's row; readers take an auction's latest bid row
-- where it is newer than the row (its seq is higher). NULL in bids stored
-- before this migration, each of which was copied into its auction's row.
ALTER TABLE bids ADD COLUMN leader_max BIGINT, ADD COLUMN bid_count BIGINT;
