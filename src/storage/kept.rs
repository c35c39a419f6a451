//! Connections kept out of their pool between writes.
//!
//! A connection given back to a sqlx pool is not back at once: its return
//! is a task of its own, spawned on the node's worker, that first pings the
//! connection (a round trip to SQLite's thread for the connection, or to
//! Postgres) and only then frees it. The group commit writes one batch after
//! another on the same connections, so every commit paid that task and that
//! round trip, and on SQLite, whose writer pool has one connection, the next
//! commit could not start before both were done. The writes here keep their
//! connection instead: a hot auction on SQLite made 1,220 commits a second of
//! 31.9 bids, each 0.81 ms, back to back, its writer thread busy 254 µs of
//! each (README, "The path of a bid", has the before and after).

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Sqlite, SqliteConnection, SqlitePool};

use super::direct::Direct;

/// SQLite's one writer connection, kept between writes. Every write takes it
/// in turn (`lock`, first come first served, as the pool's queue did); a
/// write dropped before it finished (its time ran out) closes it, since its
/// thread may have stopped inside a transaction and closing rolls back what
/// did not commit, and the next write opens a new one from the pool.
pub struct SqliteWriter {
    pool: SqlitePool,
    kept: tokio::sync::Mutex<Option<KeptWriter>>,
    /// How long a write waits for its turn.
    wait: Duration,
}

/// The writer connection and, between sqlx commands, the group commit's
/// statements on its raw handle (`direct`).
struct KeptWriter {
    connection: PoolConnection<Sqlite>,
    /// The connection's raw handle, taken from sqlx once.
    raw: Option<RawHandle>,
    direct: Option<Direct>,
}

/// A connection's raw handle: only ever used by the holder of the writer's turn.
#[derive(Clone, Copy)]
struct RawHandle(NonNull<libsqlite3_sys::sqlite3>);

// SAFETY: see `RawHandle`; `Direct` says how the turn is shared with sqlx.
unsafe impl Send for RawHandle {}

impl KeptWriter {
    /// Closes the connection: the commit's statements go first (SQLite
    /// refuses to close a connection with statements left).
    fn close(mut self) {
        self.direct = None;
        self.connection.close_on_drop();
    }
}

impl SqliteWriter {
    /// `pool` holds at most one connection: nothing else may write.
    pub fn new(pool: SqlitePool, wait: Duration) -> SqliteWriter {
        SqliteWriter { pool, kept: tokio::sync::Mutex::new(None), wait }
    }

    /// The writer connection, once the writes before are done with it.
    pub async fn lock(&self) -> Result<WriterGuard<'_>, sqlx::Error> {
        let mut kept =
            tokio::time::timeout(self.wait, self.kept.lock()).await.map_err(|_| sqlx::Error::PoolTimedOut)?;
        if kept.is_none() {
            *kept = Some(KeptWriter { connection: self.pool.acquire().await?, raw: None, direct: None });
        }
        Ok(WriterGuard { kept, finished: false })
    }

    /// The pool under the writer, for tests that write beside the store.
    #[cfg(test)]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the connection (the commits' statements on it first) and the pool.
    pub async fn close(&self) -> Result<(), sqlx::Error> {
        let kept = self.kept.lock().await.take();
        let closed = match kept {
            Some(mut kept) => {
                kept.direct = None;
                kept.connection.close().await
            }
            None => Ok(()),
        };
        self.pool.close().await;
        closed
    }
}

/// A turn on the writer connection. Call `finish` once the write is over,
/// whatever it came to; dropped without, the connection is closed.
pub struct WriterGuard<'a> {
    kept: tokio::sync::MutexGuard<'a, Option<KeptWriter>>,
    finished: bool,
}

impl WriterGuard<'_> {
    /// The write is over: the connection stays for the next one.
    pub fn finish(mut self) {
        self.finished = true;
    }

    /// The group commit's statements on the connection's raw handle, run by
    /// this thread (`direct`). The first use on a connection asks sqlx for
    /// its handle (one round trip to its thread).
    pub(super) async fn direct(&mut self) -> Result<&mut Direct, sqlx::Error> {
        let kept = self.kept.as_mut().expect("a guard holds the connection");
        if kept.direct.is_none() {
            let raw = match kept.raw {
                Some(raw) => raw,
                None => {
                    let raw = RawHandle(kept.connection.lock_handle().await?.as_raw_handle());
                    kept.raw = Some(raw);
                    raw
                }
            };
            // SAFETY: the writer's connection, open while it is kept; sqlx's
            // thread uses it only for commands sent through this guard,
            // which drops the `Direct` first (`deref_mut`).
            kept.direct = Some(unsafe { Direct::new(raw.0) });
        }
        Ok(kept.direct.as_mut().expect("made above"))
    }
}

impl Deref for WriterGuard<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.kept.as_ref().expect("a guard holds the connection").connection
    }
}

impl DerefMut for WriterGuard<'_> {
    /// The connection for sqlx: the commit's statements on its raw handle
    /// are finalized first, since sqlx's thread is about to use it.
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        let kept = self.kept.as_mut().expect("a guard holds the connection");
        kept.direct = None;
        &mut kept.connection
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if !self.finished
            && let Some(kept) = self.kept.take()
        {
            kept.close();
        }
    }
}

/// The group commit's Postgres connections: one kept between commits, taken
/// by the next; a commit that finds it taken (one left running beside it,
/// `hedge_after`) takes another from the pool. A connection goes back to be
/// kept only after a commit that got its answer; any other goes back to the
/// pool, which checks it as it always did.
pub struct PgCommitter {
    pool: sqlx::PgPool,
    kept: Mutex<Option<PoolConnection<Postgres>>>,
}

impl PgCommitter {
    pub fn new(pool: sqlx::PgPool) -> PgCommitter {
        PgCommitter { pool, kept: Mutex::new(None) }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Option<PoolConnection<Postgres>>> {
        self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub async fn take(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let kept = self.kept().take();
        match kept {
            Some(connection) => Ok(connection),
            None => self.pool.acquire().await,
        }
    }

    /// After a commit that got its answer: kept for the next, unless one is
    /// kept already (then this one goes back to the pool).
    pub fn keep(&self, connection: PoolConnection<Postgres>) {
        self.kept().get_or_insert(connection);
    }

    /// The pool under the committer, for tests that commit beside it.
    #[cfg(test)]
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        let kept = self.kept().take();
        drop(kept);
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use crate::storage::{Db, DbError, test_lamp};

    /// Writes take turns on one connection, kept between them; a write
    /// dropped inside its transaction (its time ran out) leaves nothing of
    /// it: its connection is closed, which rolls the transaction back, and
    /// the next write goes on, on a new one. The store then closes.
    #[tokio::test]
    async fn a_write_dropped_inside_its_transaction_leaves_nothing_and_the_next_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(dir.path()).await.unwrap();
        let Db::Sqlite { writer, readers, .. } = &db else { unreachable!("a SQLite store") };
        let mut first = writer.lock().await.unwrap();
        sqlx::query("CREATE TEMP TABLE marker (x)").execute(&mut *first).await.unwrap();
        first.finish();
        let mut second = writer.lock().await.unwrap();
        sqlx::query("SELECT count(*) FROM temp.marker").execute(&mut *second).await.expect("the same connection");
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *second).await.unwrap();
        sqlx::query("INSERT INTO database_meta (key, value) VALUES ('dropped', 'x')")
            .execute(&mut *second)
            .await
            .unwrap();
        drop(second);
        let mut third = tokio::time::timeout(Duration::from_secs(10), writer.lock()).await.unwrap().unwrap();
        let marker = sqlx::query("SELECT count(*) FROM temp.marker").execute(&mut *third).await;
        assert!(marker.is_err(), "a new connection after the dropped write");
        sqlx::query("INSERT INTO database_meta (key, value) VALUES ('kept', 'y')").execute(&mut *third).await.unwrap();
        third.finish();
        let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM database_meta WHERE key IN ('dropped', 'kept')")
            .fetch_all(readers)
            .await
            .unwrap();
        assert_eq!(keys, vec!["kept".to_owned()]);
        tokio::time::timeout(Duration::from_secs(10), db.close()).await.expect("the store closes with its writer kept");
    }

    /// The writer closes with the group commit's statements prepared on its
    /// connection: they are finalized first (SQLite refuses to close a
    /// connection with statements left, and sqlx's thread then panics).
    #[tokio::test]
    async fn the_writer_closes_with_the_commits_statements_on_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(dir.path()).await.unwrap();
        let Db::Sqlite { writer, .. } = &db else { unreachable!("a SQLite store") };
        let mut turn = writer.lock().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        turn.direct().await.unwrap().execute(&[1], || "SELECT 1;".to_owned(), &[], deadline).unwrap();
        turn.finish();
        writer.close().await.expect("closed without a statement left");
    }

    /// A write that fails inside its transaction (the auction is there
    /// already) keeps the connection, warm, for the next write: only one
    /// dropped before it ended closes it.
    #[tokio::test]
    async fn a_write_that_fails_keeps_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(dir.path()).await.unwrap();
        let Db::Sqlite { writer, .. } = &db else { unreachable!("a SQLite store") };
        let seller = Uuid::now_v7();
        db.insert_user(seller, "seller", "not a hash", 0).await.unwrap();
        let auction = test_lamp(seller, 0);
        db.insert_auction(&auction, None, 0).await.unwrap();
        let mut marking = writer.lock().await.unwrap();
        sqlx::query("CREATE TEMP TABLE marker (x)").execute(&mut *marking).await.unwrap();
        marking.finish();
        let again = db.insert_auction(&auction, None, 0).await;
        assert!(matches!(again, Err(DbError::UniqueViolation)), "{again:?}");
        let mut next = writer.lock().await.unwrap();
        let marker = sqlx::query("SELECT count(*) FROM temp.marker").execute(&mut *next).await;
        assert!(marker.is_ok(), "the write after a failed one runs on the same connection: {marker:?}");
        next.finish();
        db.close().await;
    }
}
