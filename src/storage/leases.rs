//! Shard leases and cluster membership in the store.
//!
//! A lease row per shard: `owner`, `epoch` (the fencing token every commit
//! checks) and `expires_at_ms`. Taking a shard raises its epoch; renewing keeps
//! the epoch and moves the expiry; releasing sets the expiry to 0 so the next
//! owner may take it at once. A membership row per node (`cluster_nodes`)
//! says which nodes are live. Every time in these tables is the database's own
//! clock (`clock_timestamp()`), so the nodes' clocks never have to agree.
//!
//! The embedded node (SQLite) has no cluster: it takes every shard at start-up
//! without expiry (`acquire_all_shards`).

use std::time::Duration;

use gavel_actors::ports::{BoxFuture, SHARD_COUNT, ShardLease};
use sqlx::Connection as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::Db;
use crate::cluster::{ClusterRows, LeaseRow, LeaseStore, LeaseStoreError, MemberRow, ShardOwner};

/// How a statement that updates several lease rows locks them first.
#[derive(Clone, Copy)]
enum LeaseLock {
    /// A change of owner or epoch: waits for the commits in flight on those
    /// shards (they hold the rows `FOR KEY SHARE`), and they for it.
    Takeover,
    /// A renewal or a release, which changes only the expiry: no commit waits for it, nor
    /// it for a commit (`FOR NO KEY UPDATE` and `FOR KEY SHARE` do not conflict).
    Renewal,
}

/// Locks the lease rows of `shards` in ascending shard order, before a
/// statement that updates several of them. A commit takes the rows it names
/// `FOR KEY SHARE` in the same order (`storage/commit.rs`), so none of them
/// ever waits for another in a circle: without it, Postgres found a deadlock
/// under load and stalled both for its `deadlock_timeout` (1 s).
async fn lock_in_shard_order(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    shards: impl Iterator<Item = u32>,
    lock: LeaseLock,
) -> Result<(), sqlx::Error> {
    let shards: Vec<i32> = shards.map(|shard| shard as i32).collect();
    let sql = match lock {
        LeaseLock::Takeover => "SELECT shard FROM shard_leases WHERE shard = ANY($1) ORDER BY shard FOR UPDATE",
        LeaseLock::Renewal => "SELECT shard FROM shard_leases WHERE shard = ANY($1) ORDER BY shard FOR NO KEY UPDATE",
    };
    sqlx::query(sql).bind(shards).execute(&mut **tx).await?;
    Ok(())
}

/// Runs `sql`, an update of the lease rows `node_id` holds at the epochs of
/// `held` (`$1` the node, `$2` and `$3` the shards and epochs, `$4` the lease
/// length if given) after locking them in shard order; returns the shards
/// it updated.
async fn update_held(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    sql: &'static str,
    node_id: &str,
    held: &[ShardLease],
    lease_ms: Option<i64>,
) -> Result<Vec<u32>, sqlx::Error> {
    lock_in_shard_order(tx, held.iter().map(|lease| lease.shard), LeaseLock::Renewal).await?;
    let mut query = sqlx::query_scalar(sql)
        .bind(node_id)
        .bind(held.iter().map(|lease| lease.shard as i32).collect::<Vec<_>>())
        .bind(held.iter().map(|lease| lease.epoch).collect::<Vec<_>>());
    if let Some(lease_ms) = lease_ms {
        query = query.bind(lease_ms);
    }
    let shards: Vec<i32> = query.fetch_all(&mut **tx).await?;
    Ok(shards.into_iter().map(|shard| shard as u32).collect())
}

/// The database's clock in milliseconds since the Unix epoch.
macro_rules! now_ms {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000)::int8"
    };
}

impl Db {
    /// Takes every shard for `owner`, raising each epoch, and returns the
    /// leases. For the single embedded node: it holds them without expiry; a
    /// second process started on the same database file takes them over, and
    /// the first one's writes are then refused (fenced).
    pub async fn acquire_all_shards(&self, owner: &str) -> Result<Vec<ShardLease>, sqlx::Error> {
        let sql = "INSERT INTO shard_leases (shard, owner, epoch, expires_at_ms) VALUES ($1, $2, 1, $3) \
                   ON CONFLICT (shard) DO UPDATE SET owner = excluded.owner, \
                   epoch = shard_leases.epoch + 1, expires_at_ms = excluded.expires_at_ms RETURNING epoch";
        let mut leases = Vec::with_capacity(SHARD_COUNT as usize);
        writing!(self, pool => {
            let mut tx = pool.begin().await?;
            for shard in 0..SHARD_COUNT {
                let epoch: i64 = sqlx::query_scalar(sql)
                    .bind(shard as i32)
                    .bind(owner)
                    .bind(i64::MAX)
                    .fetch_one(&mut *tx)
                    .await?;
                leases.push(ShardLease { shard, epoch });
            }
            tx.commit().await
        })?;
        Ok(leases)
    }

    /// Every lease row, for `GET /api/v1/cluster`.
    pub async fn lease_rows(&self) -> Result<Vec<LeaseRow>, sqlx::Error> {
        let sql = "SELECT shard, owner, epoch, expires_at_ms FROM shard_leases ORDER BY shard";
        reading!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
    }

    /// The cluster's leases and membership, when the store is shared (Postgres).
    pub fn cluster_leases(&self, idle_in_transaction_limit: Duration) -> Option<PgLeases> {
        match self {
            Db::Postgres { pool, .. } => {
                let limit = idle_in_transaction_limit.as_millis().max(1).to_string();
                let options = (*pool.connect_options())
                    .clone()
                    .options([("idle_in_transaction_session_timeout", limit.as_str())]);
                let pool = PgPoolOptions::new()
                    .max_connections(LEASE_CONNECTIONS)
                    .acquire_timeout(super::ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Some(PgLeases { pool })
            }
            Db::Sqlite { .. } => None,
        }
    }
}

/// Connections of the lease store's own pool: its ticks never wait behind
/// the node's reads and writes under load.
const LEASE_CONNECTIONS: u32 = 4;

/// Leases and membership of a cluster on Postgres, on a pool of their own
/// whose sessions Postgres ends when they sit in a transaction for longer than
/// `idle_in_transaction_limit`: a node stopped (`SIGSTOP`, a VM paused) between
/// the statements of a renewal keeps its connections open and its lease rows
/// locked, and every other node's takeover would wait on those locks for as
/// long as it stays stopped.
#[derive(Clone)]
pub struct PgLeases {
    pool: PgPool,
}

impl From<sqlx::Error> for LeaseStoreError {
    fn from(error: sqlx::Error) -> LeaseStoreError {
        LeaseStoreError(error.to_string())
    }
}

impl LeaseStore for PgLeases {
    fn heartbeat<'a>(
        &'a self,
        node_id: &'a str,
        advertise_url: &'a str,
    ) -> BoxFuture<'a, Result<i64, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::heartbeat(self, node_id, advertise_url).await?) })
    }

    fn read(&self) -> BoxFuture<'_, Result<ClusterRows, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::read(self).await?) })
    }

    fn renew<'a>(
        &'a self,
        node_id: &'a str,
        held: &'a [ShardLease],
        lease_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<u32>, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::renew(self, node_id, held, lease_ms).await?) })
    }

    fn take<'a>(
        &'a self,
        node_id: &'a str,
        shards: &'a [u32],
        lease_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<ShardLease>, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::take(self, node_id, shards, lease_ms).await?) })
    }

    fn release<'a>(&'a self, node_id: &'a str, lease: ShardLease) -> BoxFuture<'a, Result<bool, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::release(self, node_id, lease).await?) })
    }

    fn leave<'a>(&'a self, node_id: &'a str) -> BoxFuture<'a, Result<Vec<u32>, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::leave(self, node_id).await?) })
    }

    fn owner_of(&self, shard: u32) -> BoxFuture<'_, Result<Option<ShardOwner>, LeaseStoreError>> {
        Box::pin(async move { Ok(PgLeases::owner_of(self, shard).await?) })
    }
}

impl PgLeases {
    /// Says this node is alive (and where to reach it); returns the database's clock.
    pub async fn heartbeat(&self, node_id: &str, advertise_url: &str) -> Result<i64, sqlx::Error> {
        let sql = concat!(
            "INSERT INTO cluster_nodes (node_id, advertise_url, started_at_ms, last_seen_ms) VALUES ($1, $2, ",
            now_ms!(),
            ", ",
            now_ms!(),
            ") ON CONFLICT (node_id) DO UPDATE SET advertise_url = excluded.advertise_url, ",
            "last_seen_ms = excluded.last_seen_ms RETURNING last_seen_ms"
        );
        sqlx::query_scalar(sql).bind(node_id).bind(advertise_url).fetch_one(&self.pool).await
    }

    /// Every member and lease, and the database's clock, in one transaction.
    pub async fn read(&self) -> Result<ClusterRows, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let now_ms: i64 = sqlx::query_scalar(concat!("SELECT ", now_ms!())).fetch_one(&mut *tx).await?;
        let members = sqlx::query_as("SELECT node_id, advertise_url, last_seen_ms FROM cluster_nodes ORDER BY node_id")
            .fetch_all(&mut *tx)
            .await?;
        let leases = sqlx::query_as("SELECT shard, owner, epoch, expires_at_ms FROM shard_leases ORDER BY shard")
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ClusterRows { now_ms, members, leases })
    }

    /// Extends the leases `node_id` still holds at the epochs given; returns
    /// the shards renewed (a shard missing from the answer was taken over).
    pub async fn renew(&self, node_id: &str, held: &[ShardLease], lease_ms: i64) -> Result<Vec<u32>, sqlx::Error> {
        let sql = concat!(
            "UPDATE shard_leases s SET expires_at_ms = ",
            now_ms!(),
            " + $4 FROM UNNEST($2::int4[], $3::int8[]) AS h(shard, epoch) ",
            "WHERE s.shard = h.shard AND s.epoch = h.epoch AND s.owner = $1 RETURNING s.shard"
        );
        let mut tx = self.pool.begin().await?;
        let renewed = update_held(&mut tx, sql, node_id, held, Some(lease_ms)).await?;
        tx.commit().await?;
        Ok(renewed)
    }

    /// Takes each of `shards` that is free (expired, released, never owned) or
    /// was this node's own (a previous run of it), raising its epoch. Returns
    /// the leases taken.
    pub async fn take(&self, node_id: &str, shards: &[u32], lease_ms: i64) -> Result<Vec<ShardLease>, sqlx::Error> {
        let sql = concat!(
            "UPDATE shard_leases SET owner = $1, epoch = epoch + 1, expires_at_ms = ",
            now_ms!(),
            " + $2 WHERE shard = ANY($3) AND (owner = $1 OR owner = '' OR expires_at_ms <= ",
            now_ms!(),
            ") RETURNING shard, epoch"
        );
        let mut tx = self.pool.begin().await?;
        lock_in_shard_order(&mut tx, shards.iter().copied(), LeaseLock::Takeover).await?;
        let rows: Vec<(i32, i64)> = sqlx::query_as(sql)
            .bind(node_id)
            .bind(lease_ms)
            .bind(shards.iter().map(|shard| *shard as i32).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|(shard, epoch)| ShardLease { shard: shard as u32, epoch }).collect())
    }

    /// Gives a lease up: it expires now, so the next owner takes it at once.
    pub async fn release(&self, node_id: &str, lease: ShardLease) -> Result<bool, sqlx::Error> {
        let sql = "UPDATE shard_leases SET expires_at_ms = 0 WHERE shard = $2 AND owner = $1 AND epoch = $3";
        let result =
            sqlx::query(sql).bind(node_id).bind(lease.shard as i32).bind(lease.epoch).execute(&self.pool).await?;
        Ok(result.rows_affected() == 1)
    }

    /// Leaves the cluster in one transaction: this node is no longer counted
    /// when shards are spread, and every lease it owns expires now, whatever
    /// its epoch (the node writes no more). Returns the shards released.
    pub async fn leave(&self, node_id: &str) -> Result<Vec<u32>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM cluster_nodes WHERE node_id = $1").bind(node_id).execute(&mut *tx).await?;
        // Locked in shard order first, as every statement over several lease rows.
        sqlx::query("SELECT shard FROM shard_leases WHERE owner = $1 ORDER BY shard FOR NO KEY UPDATE")
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
        let released: Vec<i32> = sqlx::query_scalar(
            "UPDATE shard_leases SET expires_at_ms = 0 WHERE owner = $1 AND expires_at_ms > 0 RETURNING shard",
        )
        .bind(node_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(released.into_iter().map(|shard| shard as u32).collect())
    }

    /// One shard's lease as the store has it now, with its owner's address.
    pub async fn owner_of(&self, shard: u32) -> Result<Option<ShardOwner>, sqlx::Error> {
        let sql = concat!(
            "SELECT ",
            now_ms!(),
            " AS now_ms, s.shard, s.owner, s.epoch, s.expires_at_ms, n.node_id AS member_id, ",
            "n.advertise_url, n.last_seen_ms FROM shard_leases s ",
            "LEFT JOIN cluster_nodes n ON n.node_id = s.owner WHERE s.shard = $1"
        );
        type Row = (i64, i32, String, i64, i64, Option<String>, Option<String>, Option<i64>);
        let row: Option<Row> = sqlx::query_as(sql).bind(shard as i32).fetch_optional(&self.pool).await?;
        Ok(row.map(|(now_ms, shard, owner, epoch, expires_at_ms, member_id, advertise_url, last_seen_ms)| {
            let member = match (member_id, advertise_url, last_seen_ms) {
                (Some(node_id), Some(advertise_url), Some(last_seen_ms)) => {
                    Some(MemberRow { node_id, advertise_url, last_seen_ms })
                }
                _ => None,
            };
            ShardOwner { now_ms, lease: LeaseRow { shard, owner, epoch, expires_at_ms }, owner: member }
        }))
    }
}

/// The lease store on a database of its own in the machine's Postgres
/// (`GAVEL_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432`).
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use gavel_actors::ports::SHARD_COUNT;

    use super::{LeaseLock, lock_in_shard_order};
    use crate::storage::{Db, fresh_postgres_database};

    /// A node stopped (SIGSTOP) in the middle of a renewal keeps its session
    /// open inside a transaction that holds its lease rows. Postgres ends that
    /// session after the store's limit, so another node takes the shards once
    /// the leases expire instead of waiting for the stopped node to wake up.
    #[tokio::test]
    async fn a_node_stopped_inside_a_renewal_does_not_hold_off_the_takeover() {
        let db = Db::open_postgres(&fresh_postgres_database().await).await.unwrap();
        let limit = Duration::from_millis(300);
        let (a, b) = (db.cluster_leases(limit).unwrap(), db.cluster_leases(limit).unwrap());
        let shards: Vec<u32> = (0..SHARD_COUNT).collect();
        a.heartbeat("node-a", "http://a").await.unwrap();
        assert_eq!(a.take("node-a", &shards, 200).await.unwrap().len(), shards.len());

        // Node A stops after locking its rows for a renewal, before the update.
        let mut stopped = a.pool.begin().await.unwrap();
        lock_in_shard_order(&mut stopped, shards.iter().copied(), LeaseLock::Renewal).await.unwrap();

        // B takes them once they expire (200 ms), within the limit after that.
        let started = Instant::now();
        loop {
            let attempt = tokio::time::timeout(Duration::from_millis(500), b.take("node-b", &shards, 10_000)).await;
            if let Ok(Ok(taken)) = &attempt
                && taken.len() == shards.len()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "node B took nothing in 5 s while node A sat in a transaction: {attempt:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(stopped.commit().await.is_err(), "the stopped node's session was ended");
    }

    /// Leaving gives up every lease the node owns in the store, at whatever
    /// epoch (also one it took without learning of it), and only its own.
    #[tokio::test]
    async fn leaving_releases_every_lease_the_node_owns_and_no_other() {
        let db = Db::open_postgres(&fresh_postgres_database().await).await.unwrap();
        let leases = db.cluster_leases(Duration::from_secs(5)).unwrap();
        leases.heartbeat("node-a", "http://a").await.unwrap();
        leases.heartbeat("node-b", "http://b").await.unwrap();
        let (mine, theirs): (Vec<u32>, Vec<u32>) = (0..SHARD_COUNT).partition(|shard| shard % 2 == 0);
        assert_eq!(leases.take("node-a", &mine, 60_000).await.unwrap().len(), mine.len());
        // Taken again: a later epoch than any the node may have heard of.
        assert_eq!(leases.take("node-a", &mine[..3], 60_000).await.unwrap().len(), 3);
        assert_eq!(leases.take("node-b", &theirs, 60_000).await.unwrap().len(), theirs.len());

        let mut released = leases.leave("node-a").await.unwrap();
        released.sort_unstable();
        assert_eq!(released, mine);
        let rows = leases.read().await.unwrap();
        assert_eq!(rows.members.iter().map(|m| m.node_id.as_str()).collect::<Vec<_>>(), ["node-b"]);
        for row in rows.leases {
            let expired = row.expires_at_ms <= rows.now_ms;
            assert_eq!(expired, row.shard % 2 == 0, "shard {} released only if node A owned it", row.shard);
        }
    }
}
