-- The body of the first answer to a create or a cancel made with an
-- Idempotency-Key: a retry gets it again as it was (the auction may have
-- changed since). Written right after the write's own commit; NULL until then
-- (and for bids, whose answer is rebuilt from their row).
ALTER TABLE idempotency_keys ADD COLUMN response TEXT;
