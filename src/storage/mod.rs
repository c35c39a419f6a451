//! Storage adapters: SQLite (embedded default) and Postgres, one behaviour.
//!
//! Both schemas have the same tables and column types as far as queries can
//! tell (UUIDs, 64-bit integers, text), and SQLite accepts Postgres' `$1`
//! parameters, so every query below is written once and runs on either pool.
//! Only the group commit differs: Postgres takes whole columns as arrays
//! (`UNNEST`), SQLite takes multi-row `VALUES` in chunks. Every call has a time
//! limit: the pools' acquire timeout and, on Postgres, `statement_timeout`.
//!
//! The `Store` port of `gavel-actors` is implemented here (load an auction,
//! commit a batch, find due auctions); the HTTP edge reads through the same
//! `Db` for everything else (users, listings, history).

mod direct;
mod page_cache;
mod rows;
mod wal_writes;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use gavel_actors::ports::{BoxFuture, DueAuction, KeyRecord, LoadedAuction, Store, StoreError, StoredKey, Write};
use gavel_actors::{AuctionId, Status, TimestampMs, UserId};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use uuid::Uuid;

pub use rows::{AuctionRow, BidRow, KeyRow, MyBidRow, UserRow};

/// The database, whichever it is.
#[derive(Clone)]
pub enum Db {
    /// One writer connection (SQLite has one writer anyway), kept between
    /// writes (`kept`), a few readers, which WAL mode lets read while the
    /// writer commits, and the connection that checkpoints
    /// (`spawn_checkpoints`).
    Sqlite { writer: Arc<SqliteWriter>, readers: SqlitePool, checkpointer: SqlitePool },
    Postgres {
        pool: PgPool,
        /// The group commit's own connections, one kept between commits
        /// (`kept`). They skip the liveness ping before each use (a round
        /// trip per commit): a connection that died fails its commit, which
        /// the persistence actor retries on a new one.
        committer: Arc<PgCommitter>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unique constraint violated")]
    UniqueViolation,
    #[error(transparent)]
    Other(#[from] sqlx::Error),
}

impl DbError {
    fn classify(error: sqlx::Error) -> DbError {
        let unique = error.as_database_error().is_some_and(|db_error| db_error.is_unique_violation());
        if unique { DbError::UniqueViolation } else { DbError::Other(error) }
    }
}

/// Runs `$body` with `$pool` bound to the pool that reads.
macro_rules! reading {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite { readers: $pool, .. } => $body,
            Db::Postgres { pool: $pool, .. } => $body,
        }
    };
}

/// Runs `$body` with `$pool` bound to the pool that writes.
/// On SQLite the body runs on the writer connection, its turn taken first
/// (so the enclosing function returns a `Result` whose error converts from
/// `sqlx::Error`), and `$pool` is that connection, for one use or a `begin`.
/// The body is a `Result` and its `?` ends the body, not the function: a
/// write that fails (a name taken) keeps the connection, warm, for the next;
/// only one dropped before it ended closes it (`kept::WriterGuard`).
macro_rules! writing {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite { writer, .. } => {
                let mut guard = writer.lock().await?;
                let outcome = async {
                    let $pool = &mut *guard;
                    $body
                }
                .await;
                guard.finish();
                outcome
            }
            Db::Postgres { pool: $pool, .. } => async { $body }.await,
        }
    };
}

// After the macros above, which they use.
mod commit;
mod kept;
mod leases;
pub use kept::{PgCommitter, SqliteWriter};
pub use leases::PgLeases;

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The idempotency keys an auction's activation loads, its most recent:
/// as many as its actor keeps (`NodeSettings::recent_keys_per_auction`).
pub const RECENT_KEYS_LOADED: i64 = 1_000;

/// The group commit's connections: the pool's settings, and no plan but
/// nested loops over index lookups. The commit is one prepared statement,
/// and after five runs Postgres may switch to a generic plan for it, planned
/// for the tables as they were then, and keep it. A node that starts on a
/// near-empty database (or whose first commits name one auction) gets a
/// plan that reads the whole `auctions` table into a hash, cheapest for a
/// few rows, and keeps it as the table grows, until an `ANALYZE` replaces
/// it: measured, every commit of a many-auctions load read all 10,000
/// auction rows. Every statement on these connections touches rows by key,
/// so the plan that stays right at any size is the only one offered, and it
/// is kept from the first run (`force_generic_plan`): left to choose, Postgres
/// went on planning the commit afresh at every run on a node some seconds
/// old (measured under "The path of a bid").
pub(super) fn committer_options(pool_options: &PgConnectOptions) -> PgConnectOptions {
    pool_options.clone().options([
        ("enable_seqscan", "off"),
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ])
}

/// A new, empty database in the machine's Postgres for one test
/// (`GAVEL_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432`): its URL.
#[cfg(test)]
pub(crate) async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let base = std::env::var("GAVEL_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    let name = format!("gavel_test_{}", Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres")).await.expect("Postgres runs");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    format!("{base}/{name}")
}

/// A new active auction for a test: a lamp from 10.00 EUR in steps of 1.00,
/// ending at 1,000,000 ms, whose end soft close moves by `soft_close_secs`.
#[cfg(test)]
pub(crate) fn test_lamp(seller_id: UserId, soft_close_secs: u32) -> NewAuction {
    NewAuction {
        id: Uuid::now_v7(),
        seller_id,
        title: "a lamp".to_owned(),
        description: String::new(),
        currency: "EUR".to_owned(),
        starting_price: 1_000,
        reserve_price: None,
        min_increment: 100,
        soft_close_secs,
        start_at_ms: 0,
        end_at_ms: 1_000_000,
        status: Status::Active,
    }
}

/// An auction as it stands: its row, overlaid with its latest bid's row where
/// that is newer (a higher `seq`). A bid that changes neither the auction's
/// status nor its end is written only as its own row, which carries the
/// auction's price, leader, leader's maximum and bid count after it (see
/// `commit::changed_rows`); the auction's row is written when its status or
/// end changes. The latest bid is found by the bids' primary key, on both
/// backends (a correlated `max` that Postgres and SQLite answer from the
/// index's last entry for the auction).
const AUCTION_SELECT: &str = "SELECT a.id, a.seller_id, s.username AS seller_username, a.title, a.description, \
     a.currency, a.starting_price, a.reserve_price, a.min_increment, a.soft_close_secs, a.start_at_ms, \
     a.end_at_ms, a.status, COALESCE(lb.current_price, a.current_price) AS current_price, \
     COALESCE(lb.leader_id, a.leader_id) AS leader_id, l.username AS leader_username, \
     COALESCE(lb.leader_max, a.leader_max) AS leader_max, COALESCE(lb.bid_count, a.bid_count) AS bid_count, \
     COALESCE(lb.seq, a.seq) AS seq, a.winner_id, w.username AS winner_username, a.final_price \
     FROM auctions a JOIN users s ON s.id = a.seller_id \
     LEFT JOIN bids lb ON lb.auction_id = a.id AND lb.seq > a.seq \
         AND lb.seq = (SELECT max(b.seq) FROM bids b WHERE b.auction_id = a.id) \
     LEFT JOIN users l ON l.id = COALESCE(lb.leader_id, a.leader_id) LEFT JOIN users w ON w.id = a.winner_id";

/// How often the WAL's committed pages are copied back to the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Copies the WAL's committed pages back to the database file on a connection
/// of its own, beside the writer: SQLite's automatic checkpoint runs inside
/// the commit that fills the WAL, and every bid waiting for that commit would
/// wait for megabytes written back (the tail of `many_auctions` at half rate).
/// A `PASSIVE` checkpoint waits for no reader or writer; the writer starts
/// the WAL afresh once everything in it has been copied back. Stops when the
/// pool is closed.
fn spawn_checkpoints(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECKPOINT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pool.is_closed() {
            every.tick().await;
            let checkpoint = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool);
            match tokio::time::timeout(CHECKPOINT_TIMEOUT, checkpoint).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) if pool.is_closed() => break,
                Ok(Err(error)) => tracing::warn!(%error, "checkpoint failed"),
                Err(_) => tracing::warn!(timeout = ?CHECKPOINT_TIMEOUT, "checkpoint timed out"),
            }
        }
    });
}

/// A checkpoint writes back at most what the WAL holds: about 100 MiB.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);

impl Db {
    /// Opens (creating if needed) `data_dir/gavel.db` in WAL mode with
    /// `synchronous=FULL`: a commit is on disk when it returns.
    pub async fn open_sqlite(data_dir: &Path) -> Result<Db, sqlx::Error> {
        std::fs::create_dir_all(data_dir).map_err(sqlx::Error::Io)?;
        // SQLite takes a page cache only before it starts, which registering
        // the VFS below does.
        page_cache::install();
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("gavel.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // A commit of many auctions changes a row or two in each of a few
            // dozen pages, and every changed page goes whole to the WAL and later
            // to the database: small pages write half the bytes (`many_auctions`:
            // 255 against 527 KB per commit, +17% accepted bids/s).
            // Only a new database takes it; an existing one keeps its size.
            .page_size(1024)
            // A statement that may fail halfway keeps the pages it changes in a
            // statement journal until it ends: in memory, not in a temporary file
            // written page by page.
            .pragma("temp_store", "memory")
            // SQLite's own checkpoint runs inside a commit once the WAL holds this
            // many pages (100 MiB of 1 KiB pages). `spawn_checkpoints` copies
            // pages back beside the commits, but under steady load the WAL
            // starts afresh only after this one, since the writer always finds
            // pages not yet copied: every bid of that commit waits for the
            // pages of the last 50 ms and a sync of the database. At 10,000
            // pages that was a commit in seventy (`many_auctions`: 8% of the
            // writer thread's time in `walCheckpoint`, `perf record`), and the
            // closed-loop p99 fell from 19.5–20.9 to 12.1–15.2 ms with
            // 100,000 and the writer's larger cache below (three alternating
            // pairs).
            .pragma("wal_autocheckpoint", "100000")
            // The platform's VFS with a commit's WAL writes gathered into a few
            // (`wal_writes`): the writer thread's 227 `pwrite`s a commit of many
            // auctions became 4, the same bytes on disk before the same sync.
            .vfs(wal_writes::register()?);
        // The writer's page cache, 16 MiB (SQLite's default is 2 MiB): the
        // B-tree pages of 10,000 auctions and their bids do not fit in 2 MiB,
        // and every page missed is a read from the file on the serial commit
        // path (`many_auctions`: with the checkpoint setting above, the writer
        // thread's 64 `pread`s a commit became 2).
        let writer_options = options.clone().pragma("cache_size", "-16384");
        // SQLite connections cannot die on their own: no liveness ping (a round
        // trip to the connection's thread) before each use.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .after_connect(|connection, _| {
                Box::pin(
                    async move { sqlx::query(commit::SQLITE_CREATE_COMMIT_CHECKS).execute(connection).await.map(drop) },
                )
            })
            .connect_with(writer_options.statement_cache_capacity(commit::SQLITE_WRITER_STATEMENTS))
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        let writer = Arc::new(SqliteWriter::new(writer, ACQUIRE_TIMEOUT));
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_with(options.clone().read_only(true))
            .await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        spawn_checkpoints(checkpointer.clone());
        Ok(Db::Sqlite { writer, readers, checkpointer })
    }

    /// Connects to Postgres with `synchronous_commit` on (batching, not weaker
    /// durability, is what makes commits cheap) and a statement time limit.
    pub async fn open_postgres(url: &str) -> Result<Db, sqlx::Error> {
        let options =
            PgConnectOptions::from_str(url)?.options([("synchronous_commit", "on"), ("statement_timeout", "10000")]);
        let pool =
            PgPoolOptions::new().max_connections(16).acquire_timeout(ACQUIRE_TIMEOUT).connect_with(options).await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        let committer = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_lazy_with(committer_options(&pool.connect_options()));
        Ok(Db::Postgres { pool, committer: Arc::new(PgCommitter::new(committer)) })
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres { .. } => "postgres",
        }
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite { writer, readers, checkpointer } => {
                checkpointer.close().await;
                readers.close().await;
                if let Err(error) = writer.close().await {
                    tracing::warn!(%error, "closing the SQLite writer connection");
                }
            }
            Db::Postgres { pool, committer } => {
                committer.close().await;
                pool.close().await;
            }
        }
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        reading!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
    }

    /// This database's identity, made at the first start and kept for good.
    pub async fn database_id(&self) -> Result<String, sqlx::Error> {
        let candidate = Uuid::now_v7().to_string();
        // The stored value, whether this call stored it or an earlier start did.
        let sql = "INSERT INTO database_meta (key, value) VALUES ('database_id', $1) \
                   ON CONFLICT (key) DO UPDATE SET value = database_meta.value RETURNING value";
        writing!(self, pool => sqlx::query_scalar(sql).bind(&candidate).fetch_one(pool).await)
    }

    pub async fn insert_user(
        &self,
        id: UserId,
        username: &str,
        password_hash: &str,
        now_ms: TimestampMs,
    ) -> Result<(), DbError> {
        let sql = "INSERT INTO users (id, username, password_hash, created_at_ms) VALUES ($1, $2, $3, $4)";
        writing!(self, pool => sqlx::query(sql)
            .bind(id)
            .bind(username)
            .bind(password_hash)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(DbError::classify))
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = "SELECT id, username, password_hash FROM users WHERE username = $1";
        reading!(self, pool => sqlx::query_as(sql).bind(username).fetch_optional(pool).await)
    }

    pub async fn user_by_id(&self, id: UserId) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = "SELECT id, username, password_hash FROM users WHERE id = $1";
        reading!(self, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)
    }

    /// Inserts a new auction, and its idempotency key if given, in one transaction.
    pub async fn insert_auction(
        &self,
        auction: &NewAuction,
        key: Option<&KeyRecord>,
        now_ms: TimestampMs,
    ) -> Result<(), DbError> {
        let insert = "INSERT INTO auctions (id, shard, seller_id, title, description, currency, starting_price, \
             reserve_price, min_increment, soft_close_secs, start_at_ms, end_at_ms, status, current_price, \
             leader_id, leader_max, bid_count, seq, winner_id, final_price, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $7, NULL, NULL, 0, 0, NULL, NULL, $14)";
        let insert_key = "INSERT INTO idempotency_keys (user_id, key, fingerprint, kind, auction_id, seq, created_at_ms) \
             VALUES ($1, $2, $3, 'create', $4, NULL, $5)";
        writing!(self, pool => {
            let mut tx = pool.begin().await.map_err(DbError::classify)?;
            sqlx::query(insert)
                .bind(auction.id)
                .bind(gavel_actors::ports::shard_of(auction.id) as i32)
                .bind(auction.seller_id)
                .bind(&auction.title)
                .bind(&auction.description)
                .bind(&auction.currency)
                .bind(auction.starting_price)
                .bind(auction.reserve_price)
                .bind(auction.min_increment)
                .bind(auction.soft_close_secs as i32)
                .bind(auction.start_at_ms)
                .bind(auction.end_at_ms)
                .bind(auction.status.as_str())
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(DbError::classify)?;
            if let Some(key) = key {
                sqlx::query(insert_key)
                    .bind(key.user_id)
                    .bind(&key.key)
                    .bind(key.fingerprint as i64)
                    .bind(auction.id)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(DbError::classify)?;
            }
            tx.commit().await.map_err(DbError::classify)
        })
    }

    pub async fn auction(&self, id: AuctionId) -> Result<Option<AuctionRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!("{AUCTION_SELECT} WHERE a.id = $1"));
        reading!(self, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)
    }

    /// The auction's `seq` and status: which committed state it is at (its
    /// latest bid's `seq` where that is newer than its row, as in `AUCTION_SELECT`).
    pub async fn auction_version(&self, id: AuctionId) -> Result<Option<(i64, String)>, sqlx::Error> {
        let sql = "SELECT COALESCE((SELECT max(b.seq) FROM bids b WHERE b.auction_id = a.id AND b.seq > a.seq), a.seq), \
                   a.status FROM auctions a WHERE a.id = $1";
        reading!(self, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)
    }

    /// What the auctions' states do not hold: (id, title, description, currency).
    pub async fn auction_texts(
        &self,
        ids: &[AuctionId],
    ) -> Result<Vec<(AuctionId, String, String, String)>, sqlx::Error> {
        match self {
            Db::Postgres { pool, .. } => {
                sqlx::query_as("SELECT id, title, description, currency FROM auctions WHERE id = ANY($1)")
                    .bind(ids)
                    .fetch_all(pool)
                    .await
            }
            Db::Sqlite { readers, .. } => {
                let mut rows = Vec::with_capacity(ids.len());
                for id in ids {
                    let sql = "SELECT id, title, description, currency FROM auctions WHERE id = $1";
                    rows.extend(sqlx::query_as(sql).bind(id).fetch_optional(readers).await?);
                }
                Ok(rows)
            }
        }
    }

    /// One page of auctions in `status`, keyset-paginated after `after`.
    pub async fn list_auctions(
        &self,
        status: Status,
        after: Option<(i64, Uuid)>,
        limit: u32,
    ) -> Result<Vec<AuctionRow>, sqlx::Error> {
        // Active: ending soonest first. Scheduled: starting soonest first.
        // Ended and cancelled: most recently ended first.
        let (column, comparison, order) = match status {
            Status::Active => ("a.end_at_ms", ">", "ASC"),
            Status::Scheduled => ("a.start_at_ms", ">", "ASC"),
            Status::Ended | Status::Cancelled => ("a.end_at_ms", "<", "DESC"),
        };
        let (after_ms, after_id) = after.unwrap_or(match order {
            "ASC" => (i64::MIN, Uuid::nil()),
            _ => (i64::MAX, Uuid::max()),
        });
        let sql = sqlx::AssertSqlSafe(format!(
            "{AUCTION_SELECT} WHERE a.status = $1 AND ({column}, a.id) {comparison} ($2, $3) \
             ORDER BY {column} {order}, a.id {order} LIMIT $4"
        ));
        reading!(self, pool => sqlx::query_as(sql)
            .bind(status.as_str())
            .bind(after_ms)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)
    }

    /// Bids of an auction, newest first, with `seq < before_seq`.
    pub async fn bids(&self, auction_id: AuctionId, before_seq: i64, limit: u32) -> Result<Vec<BidRow>, sqlx::Error> {
        let sql = "SELECT b.auction_id, b.seq, b.bidder_id, u.username AS bidder_username, b.amount, b.max_amount, \
             b.placed_at_ms, b.current_price, b.leader_id, l.username AS leader_username, b.end_at_ms \
             FROM bids b JOIN users u ON u.id = b.bidder_id JOIN users l ON l.id = b.leader_id \
             WHERE b.auction_id = $1 AND b.seq < $2 ORDER BY b.seq DESC LIMIT $3";
        reading!(self, pool => sqlx::query_as(sql)
            .bind(auction_id)
            .bind(before_seq)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)
    }

    pub async fn bid(&self, auction_id: AuctionId, seq: u64) -> Result<Option<BidRow>, sqlx::Error> {
        let sql = "SELECT b.auction_id, b.seq, b.bidder_id, u.username AS bidder_username, b.amount, b.max_amount, \
             b.placed_at_ms, b.current_price, b.leader_id, l.username AS leader_username, b.end_at_ms \
             FROM bids b JOIN users u ON u.id = b.bidder_id JOIN users l ON l.id = b.leader_id \
             WHERE b.auction_id = $1 AND b.seq = $2";
        reading!(self, pool => sqlx::query_as(sql).bind(auction_id).bind(seq as i64).fetch_optional(pool).await)
    }

    /// The auctions a user has bid on, most recently ending first, with the
    /// user's highest maximum on each and the number of their bids there.
    /// SQLite keeps a row per (bidder, auction) for it, written with the
    /// bids; Postgres sums the bidder's bids from its index of bids by bidder.
    pub async fn bids_of_user(&self, user_id: UserId, limit: u32) -> Result<Vec<MyBidRow>, sqlx::Error> {
        let participations = match self {
            Db::Sqlite { .. } => "SELECT auction_id, max_amount, bid_count FROM participations WHERE user_id = $1",
            Db::Postgres { .. } => {
                "SELECT auction_id, max(max_amount) AS max_amount, count(*) AS bid_count FROM bids \
                 WHERE bidder_id = $1 GROUP BY auction_id"
            }
        };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT x.*, p.max_amount AS your_max, p.bid_count AS your_bid_count FROM ({AUCTION_SELECT}) x \
             JOIN ({participations}) p ON p.auction_id = x.id ORDER BY x.end_at_ms DESC, x.id DESC LIMIT $2"
        ));
        reading!(self, pool => sqlx::query_as(sql).bind(user_id).bind(i64::from(limit)).fetch_all(pool).await)
    }

    pub async fn key(&self, user_id: UserId, key: &str) -> Result<Option<KeyRow>, sqlx::Error> {
        let sql = "SELECT fingerprint, kind, auction_id, seq, response FROM idempotency_keys \
                   WHERE user_id = $1 AND key = $2";
        reading!(self, pool => sqlx::query_as(sql).bind(user_id).bind(key).fetch_optional(pool).await)
    }

    /// Records the body of the first answer to the write made under `key`
    /// (once: a later call changes nothing), and returns the body recorded.
    pub async fn remember_response(
        &self,
        user_id: UserId,
        key: &str,
        response: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let sql = "UPDATE idempotency_keys SET response = COALESCE(response, $3) WHERE user_id = $1 AND key = $2 \
                   RETURNING response";
        let recorded: Option<(Option<String>,)> = writing!(self, pool => {
            sqlx::query_as(sql).bind(user_id).bind(key).bind(response).fetch_optional(pool).await
        })?;
        Ok(recorded.and_then(|(response,)| response))
    }

    async fn load(&self, id: AuctionId) -> Result<Option<LoadedAuction>, sqlx::Error> {
        let Some(row) = self.auction(id).await? else {
            return Ok(None);
        };
        let state = row.to_state().map_err(|reason| sqlx::Error::Decode(reason.into()))?;
        // Keys are committed with their writes: an auction without bids, not
        // cancelled, has none. A cancel's key comes too, so that a retry of the
        // cancel that finds a fresh actor is answered as the first was.
        if state.seq == 0 && state.status != Status::Cancelled {
            return Ok(Some(LoadedAuction { state, recent_keys: Vec::new() }));
        }
        let sql = "SELECT user_id, key, fingerprint, seq FROM idempotency_keys \
                   WHERE auction_id = $1 AND kind IN ('bid', 'cancel') \
                   ORDER BY created_at_ms DESC, seq DESC LIMIT $2";
        let keys: Vec<(Uuid, String, i64, Option<i64>)> =
            reading!(self, pool => sqlx::query_as(sql).bind(id).bind(RECENT_KEYS_LOADED).fetch_all(pool).await)?;
        let recent_keys = keys
            .into_iter()
            .rev()
            .map(|(user_id, key, fingerprint, seq)| StoredKey {
                record: KeyRecord { user_id, key, fingerprint: fingerprint as u64 },
                seq: seq.unwrap_or(0) as u64,
            })
            .collect();
        Ok(Some(LoadedAuction { state, recent_keys }))
    }

    /// A page of the auctions due by `horizon_ms`, by `(at_ms, id)` after `after`.
    async fn due(
        &self,
        horizon_ms: TimestampMs,
        after: Option<DueAuction>,
        limit: u32,
    ) -> Result<Vec<DueAuction>, sqlx::Error> {
        let sql = "SELECT at_ms, id FROM (\
                   SELECT start_at_ms AS at_ms, id FROM auctions WHERE status = 'scheduled' \
                   AND start_at_ms <= $1 AND (start_at_ms, id) > ($2, $3) \
                   UNION ALL SELECT end_at_ms AS at_ms, id FROM auctions WHERE status = 'active' \
                   AND end_at_ms <= $1 AND (end_at_ms, id) > ($2, $3)\
                   ) AS due ORDER BY at_ms, id LIMIT $4";
        let after = after.unwrap_or(DueAuction { at_ms: TimestampMs::MIN, id: Uuid::nil() });
        let rows: Vec<(i64, Uuid)> = reading!(self, pool => sqlx::query_as(sql)
            .bind(horizon_ms)
            .bind(after.at_ms)
            .bind(after.id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(|(at_ms, id)| DueAuction { at_ms, id }).collect())
    }
}

/// A validated auction about to be created.
#[derive(Clone, Debug)]
pub struct NewAuction {
    pub id: AuctionId,
    pub seller_id: UserId,
    pub title: String,
    pub description: String,
    pub currency: String,
    pub starting_price: i64,
    pub reserve_price: Option<i64>,
    pub min_increment: i64,
    pub soft_close_secs: u32,
    pub start_at_ms: TimestampMs,
    pub end_at_ms: TimestampMs,
    pub status: Status,
}

fn unavailable(error: sqlx::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// The actors' view of the database.
pub struct DbStore {
    pub db: Db,
    pub node_id: String,
}

impl Store for DbStore {
    fn load_auction(&self, id: AuctionId) -> BoxFuture<'_, Result<Option<LoadedAuction>, StoreError>> {
        Box::pin(async move { self.db.load(id).await.map_err(unavailable) })
    }

    fn commit<'a>(&'a self, batch: &'a [Write]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(commit::commit(&self.db, &self.node_id, batch))
    }

    fn due_auctions(
        &self,
        horizon_ms: TimestampMs,
        after: Option<DueAuction>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DueAuction>, StoreError>> {
        Box::pin(async move { self.db.due(horizon_ms, after, limit).await.map_err(unavailable) })
    }
}
