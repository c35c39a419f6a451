-- Facts about this database itself. `database_id` is made once, at the first
-- start; tokens carry it, so a token issued against another database (one that
-- was reset, or a different deployment sharing the JWT secret) is refused
-- instead of naming a user this database has never seen.
CREATE TABLE database_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
