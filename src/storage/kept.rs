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
use std::sync::Mutex;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Sqlite, SqliteConnection, SqlitePool};

/// SQLite's one writer connection, kept between writes. Every write takes it
/// in turn (`lock`, first come first served, as the pool's queue did); a
/// write dropped before it finished (its time ran out) closes it, since its
/// thread may have stopped inside a transaction and closing rolls back what
/// did not commit, and the next write opens a new one from the pool.
pub struct SqliteWriter {
    pool: SqlitePool,
    kept: tokio::sync::Mutex<Option<PoolConnection<Sqlite>>>,
    /// How long a write waits for its turn.
    wait: Duration,
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
            *kept = Some(self.pool.acquire().await?);
        }
        Ok(WriterGuard { kept, finished: false })
    }

    /// The pool under the writer, for tests that write beside the store.
    #[cfg(test)]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Gives the connection back and closes the pool.
    pub async fn close(&self) {
        let kept = self.kept.lock().await.take();
        if let Some(connection) = kept {
            let _ = connection.close().await;
        }
        self.pool.close().await;
    }
}

/// A turn on the writer connection. Call `finish` once the write is over,
/// whatever it came to; dropped without, the connection is closed.
pub struct WriterGuard<'a> {
    kept: tokio::sync::MutexGuard<'a, Option<PoolConnection<Sqlite>>>,
    finished: bool,
}

impl WriterGuard<'_> {
    /// The write is over: the connection stays for the next one.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Deref for WriterGuard<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.kept.as_ref().expect("a guard holds the connection")
    }
}

impl DerefMut for WriterGuard<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.kept.as_mut().expect("a guard holds the connection")
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if !self.finished
            && let Some(mut connection) = self.kept.take()
        {
            connection.close_on_drop();
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
