-- The nodes of a cluster (Postgres only in practice; the embedded node keeps
-- the same schema so every query is written once). See the Postgres migration.
CREATE TABLE cluster_nodes (
    node_id       TEXT PRIMARY KEY,
    advertise_url TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL
);
