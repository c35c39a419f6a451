-- The nodes of a cluster: each one upserts its row on every lease tick
-- (last_seen_ms, on the database's clock, so nodes' clocks never have to
-- agree) and deletes it when it stops gracefully. A node is live while its
-- last_seen_ms is within one lease length; shards are spread over live nodes.
CREATE TABLE cluster_nodes (
    node_id       TEXT PRIMARY KEY,
    advertise_url TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL
);

-- Every shard has its lease row from the start (owner '' and epoch 0: never
-- owned, expired), so taking a shard is always an UPDATE of one row that a
-- commit's FOR SHARE lock orders against.
INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms)
SELECT shard, '', 0, 0 FROM generate_series(0, 255) AS shard
ON CONFLICT (shard) DO NOTHING;
