//! The group commit: one transaction per batch of writes from any number of
//! auctions. Inside it, first the fencing check (every lease epoch the batch
//! names is still this node's), then the bids (each with its auction's state
//! after it), the rows of the auctions whose status or end changed, the
//! idempotency keys and, on SQLite, each bidder's participation (Postgres
//! reads it from its index of bids by bidder). Re-running a batch whose
//! first commit's outcome was lost leaves the same rows (bids and keys skip
//! existing keys, auction rows get absolute values, participations count a
//! batch's bids only past the `last_seq` they hold), so the persistence actor
//! may retry blindly. (On Postgres the bids go in plainly, and a batch one of
//! whose bids is stored goes again at once past them: `postgres_commit_sql`.)

use std::collections::HashMap;
use std::time::Duration;

use gavel_actors::ports::{StoreError, Write};
use gavel_actors::shards::ShardLease;
use gavel_actors::{AuctionState, BidPlaced};
use uuid::Uuid;

use super::direct::SqlValue;
use super::{Db, SqliteWriter};

/// Whether a failed commit is worth retrying: a constraint the batch breaks, or
/// a value the database refuses, fails the same way every time (`Invalid`);
/// anything else (connection, timeout, lock, disk) may pass next time.
fn classify(error: sqlx::Error) -> StoreError {
    if error.to_string().contains(KEY_REUSED) {
        return StoreError::KeyReused;
    }
    let Some(database_error) = error.as_database_error() else {
        return StoreError::Unavailable(error.to_string());
    };
    let constraint = !matches!(database_error.kind(), sqlx::error::ErrorKind::Other);
    let code = database_error.code().unwrap_or_default();
    // Postgres: class 22 (data exception), 23 (integrity constraint violation).
    let invalid_value =
        code.starts_with("22") || code.starts_with("23") || code.parse::<i32>().is_ok_and(is_invalid_sqlite_code);
    if constraint || invalid_value {
        StoreError::Invalid(error.to_string())
    } else {
        StoreError::Unavailable(error.to_string())
    }
}

/// Whether a SQLite result code says the batch itself is at fault: 19
/// (SQLITE_CONSTRAINT; its extended codes end in 19), 20 (mismatch), 18 (too big).
fn is_invalid_sqlite_code(code: i32) -> bool {
    matches!(code & 0xff, 18..=20)
}

pub(super) async fn commit(db: &Db, node_id: &str, batch: &[Write]) -> Result<(), StoreError> {
    // One key twice in a batch (sent at once to two auctions of this node):
    // one of the two must not be written, and the store would only say so
    // obscurely; the persistence actor splits the batch until they part.
    let mut seen = std::collections::HashSet::new();
    if batch.iter().filter_map(|write| write.key.as_ref()).any(|key| !seen.insert((key.user_id, key.key.as_str()))) {
        return Err(StoreError::KeyReused);
    }
    let unavailable = classify;
    match db {
        Db::Sqlite { writer, .. } => commit_sqlite(writer, node_id, batch).await,
        Db::Postgres { committer, .. } => {
            let mut connection = committer.take().await.map_err(unavailable)?;
            let leases_held = match write_postgres(&mut *connection, node_id, batch, false).await {
                // A bid of the batch is stored already: an earlier attempt
                // whose answer was lost committed it. Again, passing over the
                // stored bids (see `postgres_commit_sql`).
                Err(error) if is_stored_bid(&error) => {
                    tracing::debug!("a bid of the batch is stored already; committing it again past the stored ones");
                    write_postgres(&mut *connection, node_id, batch, true).await
                }
                outcome => outcome,
            }
            .map_err(unavailable)?;
            let fenced = if leases_held { None } else { Some(fenced_postgres(&mut connection, node_id, batch).await) };
            committer.keep(connection);
            fenced.map_or(Ok(()), Err)
        }
    }
}

/// `(shard, epoch)` pairs named by the batch, each once.
fn leases_named(batch: &[Write]) -> Vec<(u32, i64)> {
    let mut leases: Vec<(u32, i64)> = batch.iter().map(|write| (write.lease.shard, write.lease.epoch)).collect();
    leases.sort_unstable();
    leases.dedup();
    leases
}

/// The leases of `named` that are not `node_id`'s current ones in `current`
/// (shard → owner and epoch): a shard's other epoch in the same batch may be.
fn fenced(current: &HashMap<i32, (String, i64)>, node_id: &str, named: &[(u32, i64)]) -> Vec<ShardLease> {
    named
        .iter()
        .filter(|(shard, epoch)| {
            current
                .get(&(*shard as i32))
                .is_none_or(|(owner, current_epoch)| owner != node_id || current_epoch != epoch)
        })
        .map(|&(shard, epoch)| ShardLease { shard, epoch })
        .collect()
}

/// The verdict on a fenced batch from the current rows (shard, owner, epoch)
/// of the leases it names.
fn fenced_by(rows: Result<Vec<(i32, String, i64)>, sqlx::Error>, node_id: &str, named: &[(u32, i64)]) -> StoreError {
    match rows {
        Ok(rows) => {
            let current = rows.into_iter().map(|(shard, owner, epoch)| (shard, (owner, epoch))).collect();
            StoreError::Fenced { leases: fenced(&current, node_id, named) }
        }
        Err(error) => StoreError::Unavailable(error.to_string()),
    }
}

/// Which of the batch's leases moved on (after the commit's own check found one that did).
async fn fenced_sqlite(writer: &mut sqlx::SqliteConnection, node_id: &str, batch: &[Write]) -> StoreError {
    let named = leases_named(batch);
    let shards = named.iter().map(|(shard, _)| shard.to_string()).collect::<Vec<_>>().join(",");
    let rows: Result<Vec<(i32, String, i64)>, sqlx::Error> =
        sqlx::query_as("SELECT shard, owner, epoch FROM shard_leases WHERE shard IN (SELECT value FROM json_each($1))")
            .bind(format!("[{shards}]"))
            .fetch_all(writer)
            .await;
    fenced_by(rows, node_id, &named)
}

/// Which of the batch's leases moved on (after `write_postgres` found one that did).
async fn fenced_postgres(connection: &mut sqlx::PgConnection, node_id: &str, batch: &[Write]) -> StoreError {
    let named = leases_named(batch);
    let shards: Vec<i32> = named.iter().map(|(shard, _)| *shard as i32).collect();
    let rows: Result<Vec<(i32, String, i64)>, sqlx::Error> =
        sqlx::query_as("SELECT shard, owner, epoch FROM shard_leases WHERE shard = ANY($1)")
            .bind(&shards)
            .fetch_all(connection)
            .await;
    fenced_by(rows, node_id, &named)
}

/// The auction rows the batch writes: the last state of each auction with a
/// write that changes its status or its end (a start, an end, a
/// cancellation, a bid that soft close moved the end for), in first-seen
/// order. Any other bid leaves its auction's row as it is: the bid's own row
/// carries the auction's state after it, and readers take an auction's latest
/// bid where it is newer than the row (`AUCTION_SELECT`), so that a bid costs
/// one row written, not two. The row keeps what lists are ordered and
/// filtered by (status, end) current, and is whole again once the auction ends.
fn changed_rows(batch: &[Write]) -> Vec<&AuctionState> {
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut states: Vec<Option<&AuctionState>> = Vec::new();
    for write in batch {
        let position = *index.entry(write.auction.id).or_insert_with(|| {
            states.push(None);
            states.len() - 1
        });
        let changes_row = write.bid.as_ref().is_none_or(|bid| bid.extended);
        if changes_row || states[position].is_some() {
            states[position] = Some(&write.auction);
        }
    }
    states.into_iter().flatten().collect()
}

struct KeyInsert<'a> {
    user_id: Uuid,
    key: &'a str,
    fingerprint: i64,
    kind: &'static str,
    auction_id: Uuid,
    seq: Option<i64>,
    created_at_ms: i64,
}

fn keys(batch: &[Write]) -> Vec<KeyInsert<'_>> {
    batch
        .iter()
        .filter_map(|write| {
            let record = write.key.as_ref()?;
            let (kind, seq) = match &write.bid {
                Some(bid) => ("bid", Some(bid.seq as i64)),
                None => ("cancel", None),
            };
            Some(KeyInsert {
                user_id: record.user_id,
                key: &record.key,
                fingerprint: record.fingerprint as i64,
                kind,
                auction_id: write.auction.id,
                seq,
                created_at_ms: write.at_ms,
            })
        })
        .collect()
}

fn bids(batch: &[Write]) -> impl Iterator<Item = (Uuid, &BidPlaced)> {
    batch.iter().filter_map(|write| write.bid.as_ref().map(|bid| (write.auction.id, bid)))
}

/// A batch's rows of one table go in multi-row statements of at most this
/// many rows; 64 rows of 11 columns stay far below SQLite's limit of 32,766
/// parameters.
const SQLITE_MAX_ROWS_PER_STATEMENT: usize = 64;

/// Row counts a statement is made for. A chunk of rows is padded up to the
/// next one by repeating its last row (every statement of the commit is
/// unchanged by a row written twice, see `sqlite_commit_sql`), so that a
/// commit's text, kept prepared on the writer connection (`direct`), takes a few dozen
/// shapes (a dozen sizes of bids by a few of auctions, mostly) rather than
/// one per mix of counts.
const SQLITE_ROW_CLASSES: [usize; 12] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64];

/// Statements sqlx keeps prepared on the writer connection: the other
/// writes' (the commits' are `direct`'s).
pub(super) const SQLITE_WRITER_STATEMENTS: usize = 512;

/// The row count a chunk of `rows` rows is padded to.
fn sqlite_row_class(rows: usize) -> usize {
    match SQLITE_ROW_CLASSES.iter().find(|&&class| class >= rows) {
        Some(&class) => class,
        None => rows.div_ceil(SQLITE_MAX_ROWS_PER_STATEMENT) * SQLITE_MAX_ROWS_PER_STATEMENT,
    }
}

/// `rows` in chunks of at most `SQLITE_MAX_ROWS_PER_STATEMENT`, each padded
/// to its row class with copies of its last row.
fn sqlite_chunks<T>(rows: &[T]) -> Vec<Vec<&T>> {
    rows.chunks(SQLITE_MAX_ROWS_PER_STATEMENT)
        .map(|chunk| {
            let mut padded: Vec<&T> = chunk.iter().collect();
            let last = padded[padded.len() - 1];
            padded.resize(sqlite_row_class(chunk.len()), last);
            padded
        })
        .collect()
}

/// `n` copies of a row's placeholders, as a `VALUES` list.
fn sqlite_values(row: &str, rows: usize) -> String {
    vec![row; rows].join(", ")
}

/// The connection-local table whose two checks stop a commit (see
/// `sqlite_commit_sql`): a check that fails is a statement error, and the
/// error names the check. Made on each writer connection as it opens.
pub(super) const SQLITE_CREATE_COMMIT_CHECKS: &str = "CREATE TEMP TABLE IF NOT EXISTS gavel_commit_checks (\
     id INTEGER PRIMARY KEY, \
     leases_held INTEGER NOT NULL DEFAULT 1 CONSTRAINT leases_held CHECK (leases_held), \
     keys_unchanged INTEGER NOT NULL DEFAULT 1 CONSTRAINT keys_unchanged CHECK (keys_unchanged))";

/// An auction's stage of life from its `status` column: a row moves only to a
/// later `(seq, stage)`, as on Postgres (`postgres_commit_sql`), so an attempt
/// that runs late changes nothing.
macro_rules! sqlite_stage {
    ($status:literal) => {
        concat!("CASE ", $status, " WHEN 'scheduled' THEN 0 WHEN 'active' THEN 1 ELSE 2 END")
    };
}

/// The error text of a commit whose leases moved on, and of one with a key
/// stored for another write: the names of the checks that failed.
const SQLITE_LEASES_MOVED: &str = "leases_held";
const SQLITE_KEY_REUSED: &str = "keys_unchanged";

/// Row counts of the chunks of each part of one SQLite commit.
struct SqliteCommitShape {
    bids: Vec<usize>,
    auctions: Vec<usize>,
    keys: Vec<usize>,
}

impl SqliteCommitShape {
    /// What names the shape's text among the prepared ones.
    fn key(&self) -> Vec<usize> {
        let mut key = self.bids.clone();
        key.push(0);
        key.extend(&self.auctions);
        key.push(0);
        key.extend(&self.keys);
        key
    }
}

/// The whole commit as one text of statements, run in one go by the
/// persistence actor's thread (`direct`); through sqlx each statement was a
/// round trip to the connection's thread (a message there and one back, each
/// waking a thread), and a commit was seven of them. Anonymous `?` parameters are
/// taken in order across the statements (and SQLite looks named ones up by a
/// linear scan for each bind).
///
/// The statements, in order:
/// - `BEGIN`.
/// - The fencing check: the batch's leases (a JSON list of `[shard, epoch]`,
///   so that their number is not part of the text), each still this node's
///   at its epoch, or the `leases_held` check fails and nothing is written.
/// - The bids (`ON CONFLICT DO NOTHING`: a batch run again writes nothing).
/// - Participations, one row per bid in seq order, so that one bidder's
///   several bids on one auction update the row the first inserted; a bid
///   whose `seq` the row already counts (a batch run again, a padding copy)
///   adds nothing.
/// - The rows of the auctions whose status or end changed (`changed_rows`):
///   the last state of each in the batch, as absolute values; `status` and
///   `end_at_ms` apart, only where they changed: SQLite rewrites an index
///   entry of every updated row whenever the `SET` names
///   one of the index's columns, changed or not, and naming both for every
///   row would dirty a page of each of the two listing indexes per auction.
///   A row of `FROM (VALUES …)` twice for one auction is the same values.
/// - The idempotency keys (`ON CONFLICT DO NOTHING`), then the check that each
///   stored key is this write's: the same key sent at once to two auctions,
///   on this node or another, fails `keys_unchanged`.
/// - `COMMIT`.
fn sqlite_commit_sql(shape: &SqliteCommitShape) -> String {
    let mut sql = String::from("BEGIN;\n");
    sql += "INSERT OR REPLACE INTO temp.gavel_commit_checks (id, leases_held) VALUES (1, \
            (SELECT count(*) FROM shard_leases s JOIN json_each(?) n \
             ON s.shard = json_extract(n.value, '$[0]') AND s.epoch = json_extract(n.value, '$[1]') \
             WHERE s.owner = ?) = ?);\n";
    for &rows in &shape.bids {
        sql += &format!(
            "INSERT INTO bids (auction_id, seq, bidder_id, amount, max_amount, placed_at_ms, current_price, \
             leader_id, end_at_ms, leader_max, bid_count) VALUES {} ON CONFLICT (auction_id, seq) DO NOTHING;\n",
            sqlite_values("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        );
    }
    for &rows in &shape.bids {
        sql += &format!(
            "INSERT INTO participations (user_id, auction_id, max_amount, bid_count, last_seq) VALUES {} \
             ON CONFLICT (user_id, auction_id) DO UPDATE SET max_amount = max(max_amount, excluded.max_amount), \
             bid_count = CASE WHEN excluded.last_seq > last_seq THEN bid_count + 1 ELSE bid_count END, \
             last_seq = max(last_seq, excluded.last_seq);\n",
            sqlite_values("(?, ?, ?, 1, ?)", rows)
        );
    }
    for &rows in &shape.auctions {
        sql += &format!(
            "UPDATE auctions SET current_price = u.column2, leader_id = u.column3, leader_max = u.column4, \
             bid_count = u.column5, seq = u.column6, winner_id = u.column7, final_price = u.column8 \
             FROM (VALUES {}) AS u WHERE auctions.id = u.column1 \
             AND (auctions.seq, {}) <= (u.column6, {});\n",
            sqlite_values("(?, ?, ?, ?, ?, ?, ?, ?, ?)", rows),
            sqlite_stage!("auctions.status"),
            sqlite_stage!("u.column9")
        );
    }
    for &rows in &shape.auctions {
        sql += &format!(
            "UPDATE auctions SET status = u.column2, end_at_ms = u.column3 FROM (VALUES {}) AS u \
             WHERE auctions.id = u.column1 AND (auctions.status <> u.column2 OR auctions.end_at_ms <> u.column3) \
             AND (auctions.seq, {}) <= (u.column4, {});\n",
            sqlite_values("(?, ?, ?, ?)", rows),
            sqlite_stage!("auctions.status"),
            sqlite_stage!("u.column2")
        );
    }
    for &rows in &shape.keys {
        sql += &format!(
            "INSERT INTO idempotency_keys (user_id, key, fingerprint, kind, auction_id, seq, created_at_ms) \
             VALUES {} ON CONFLICT (user_id, key) DO NOTHING;\n",
            sqlite_values("(?, ?, ?, ?, ?, ?, ?)", rows)
        );
    }
    for &rows in &shape.keys {
        sql += &format!(
            "INSERT OR REPLACE INTO temp.gavel_commit_checks (id, keys_unchanged) VALUES (1, NOT EXISTS (\
             SELECT 1 FROM idempotency_keys k JOIN (VALUES {}) AS v ON k.user_id = v.column1 AND k.key = v.column2 \
             WHERE k.kind <> v.column3 OR k.auction_id <> v.column4 OR k.seq IS NOT v.column5));\n",
            sqlite_values("(?, ?, ?, ?, ?)", rows)
        );
    }
    sql += "COMMIT;";
    sql
}

fn uuid_value(id: Uuid) -> SqlValue {
    SqlValue::Uuid(*id.as_bytes())
}

fn optional<T>(value: Option<T>, into: impl FnOnce(T) -> SqlValue) -> SqlValue {
    value.map_or(SqlValue::Null, into)
}

/// The commit of `batch`: the shape of its text (`sqlite_commit_sql`) and
/// its parameters, in order across the text's statements.
fn sqlite_commit_parts(node_id: &str, batch: &[Write]) -> (SqliteCommitShape, Vec<SqlValue>) {
    use SqlValue::{Int, Text};
    let named = leases_named(batch);
    let leases = named.iter().map(|(shard, epoch)| format!("[{shard},{epoch}]")).collect::<Vec<_>>().join(",");
    let all_bids: Vec<(Uuid, &BidPlaced)> = bids(batch).collect();
    let bid_chunks = sqlite_chunks(&all_bids);
    let states = changed_rows(batch);
    let state_chunks = sqlite_chunks(&states);
    let keys = keys(batch);
    let key_chunks = sqlite_chunks(&keys);
    let shape = SqliteCommitShape {
        bids: bid_chunks.iter().map(Vec::len).collect(),
        auctions: state_chunks.iter().map(Vec::len).collect(),
        keys: key_chunks.iter().map(Vec::len).collect(),
    };
    let mut values = vec![Text(format!("[{leases}]")), Text(node_id.to_owned()), Int(named.len() as i64)];
    for (auction_id, bid) in bid_chunks.iter().flatten() {
        values.extend([
            uuid_value(*auction_id),
            Int(bid.seq as i64),
            uuid_value(bid.bidder.id),
            Int(bid.amount.minor_units()),
            Int(bid.bidder_max.minor_units()),
            Int(bid.placed_at_ms),
            Int(bid.current_price.minor_units()),
            uuid_value(bid.leader.id),
            Int(bid.end_at_ms),
            Int(bid.leader_max.minor_units()),
            Int(bid.bid_count as i64),
        ]);
    }
    for (auction_id, bid) in bid_chunks.iter().flatten() {
        values.extend([
            uuid_value(bid.bidder.id),
            uuid_value(*auction_id),
            Int(bid.bidder_max.minor_units()),
            Int(bid.seq as i64),
        ]);
    }
    for state in state_chunks.iter().flatten() {
        let leader = state.leader.as_ref();
        values.extend([
            uuid_value(state.id),
            Int(state.current_price.minor_units()),
            optional(leader.map(|leader| leader.user.id), uuid_value),
            optional(leader.map(|leader| leader.max_amount.minor_units()), Int),
            Int(state.bid_count as i64),
            Int(state.seq as i64),
            optional(state.winner.as_ref().map(|winner| winner.id), uuid_value),
            optional(state.final_price.map(|price| price.minor_units()), Int),
            Text(state.status.as_str().to_owned()),
        ]);
    }
    for state in state_chunks.iter().flatten() {
        values.extend([
            uuid_value(state.id),
            Text(state.status.as_str().to_owned()),
            Int(state.end_at_ms),
            Int(state.seq as i64),
        ]);
    }
    for key in key_chunks.iter().flatten() {
        values.extend([
            uuid_value(key.user_id),
            Text(key.key.to_owned()),
            Int(key.fingerprint),
            Text(key.kind.to_owned()),
            uuid_value(key.auction_id),
            optional(key.seq, Int),
            Int(key.created_at_ms),
        ]);
    }
    for key in key_chunks.iter().flatten() {
        values.extend([
            uuid_value(key.user_id),
            Text(key.key.to_owned()),
            Text(key.kind.to_owned()),
            uuid_value(key.auction_id),
            optional(key.seq, Int),
        ]);
    }
    (shape, values)
}

/// How long a SQLite commit's statements may run before SQLite interrupts
/// them (the commit is then retried), as Postgres's `statement_timeout`
/// bounds its commit. The commit runs on the persistence actor's thread
/// without awaiting (`direct`), so the actor's own time limit cannot stop it;
/// waiting for SQLite's write lock is bounded apart, by its busy timeout.
const SQLITE_COMMIT_LIMIT: Duration = Duration::from_secs(5);

/// The commit on the writer connection, its statements run by this thread on
/// the connection's handle (`direct`). One whose rollback failed, still in
/// its transaction, closes the connection rather than keep it (closing rolls
/// back whatever did not commit).
async fn commit_sqlite(writer: &SqliteWriter, node_id: &str, batch: &[Write]) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let (shape, values) = sqlite_commit_parts(node_id, batch);
    let mut connection = writer.lock().await.map_err(classify)?;
    let direct = connection.direct().await.map_err(classify)?;
    let deadline = std::time::Instant::now() + SQLITE_COMMIT_LIMIT;
    let failure = match direct.execute(&shape.key(), || sqlite_commit_sql(&shape), &values, deadline) {
        Ok(()) => {
            connection.finish();
            return Ok(());
        }
        Err(failure) => failure,
    };
    if failure.in_transaction {
        tracing::warn!(error = %failure, "rollback of a failed commit failed, closing the connection");
        drop(connection);
        connection = writer.lock().await.map_err(classify)?;
    }
    let fenced = if failure.message.contains(SQLITE_LEASES_MOVED) {
        Some(fenced_sqlite(&mut connection, node_id, batch).await)
    } else {
        None
    };
    connection.finish();
    if let Some(fenced) = fenced {
        return Err(fenced);
    }
    if failure.message.contains(SQLITE_KEY_REUSED) {
        return Err(StoreError::KeyReused);
    }
    if is_invalid_sqlite_code(failure.code) {
        Err(StoreError::Invalid(failure.to_string()))
    } else {
        Err(StoreError::Unavailable(failure.to_string()))
    }
}

/// What a commit says when one of its idempotency keys was stored for another write.
const KEY_REUSED: &str = "idempotency key reused";

/// On Postgres the whole batch is one statement, hence one round trip and one
/// transaction: the lease rows are taken `FOR KEY SHARE`, in shard order as
/// every multi-row lease update takes them (so they cannot deadlock). A
/// takeover locks them `FOR UPDATE` first, so it waits for this commit (one
/// that came first makes the epochs differ); a renewal, which changes only
/// the expiry, takes `FOR NO KEY UPDATE` and neither waits for a commit nor
/// makes one wait,
/// and the bids, auction rows and keys are written only if every lease the
/// batch names is still this node's at its epoch. Columns are bound as arrays.
/// Returns whether the leases held (nothing was written otherwise).
///
/// An auction row is only ever moved forward: to a later `seq`, or at the
/// same `seq` to a later stage of its life (scheduled, active, then ended or
/// cancelled). A commit attempt given up on when its time ran out can still
/// run later in its backend (paused, or its statement held up on the way),
/// after the retry on the other connection and after the auction's next
/// writes; its auction rows are then older than the stored ones and are left
/// as they are (its bids and keys are already there, and skipped or kept by
/// their own guards).
///
/// An idempotency key already stored for another write (the same key sent at
/// once to two auctions, even through two nodes: the insert waits for the
/// other transaction's row) makes the statement fail with a cast of
/// "idempotency key reused" (a data error, not retried): nothing is written,
/// and the persistence actor sets the write at fault apart. A key stored for
/// the same write (the batch run again) matches and passes.
///
/// The statement has a text per shape of batch (`PostgresCommitShape`):
/// - The auction rows' update, and the keys' insert with its check, are left
///   out of a batch that has none of them (most batches: bids that moved no
///   end, sent without a key). A data-modifying part runs whether or not it
///   has rows, and setting it up (its plan's nodes, the table and its
///   indexes opened and locked) is part of what every commit costs Postgres
///   whatever its size.
/// - The bids are inserted plainly: a write reaches the store once, but for
///   the retry of an attempt whose answer was lost. `ON CONFLICT DO NOTHING`
///   costs each row a search of the key's index before the insert, a
///   speculative insertion lock and a confirmation record in the WAL (a
///   tenth of Postgres's CPU time on a load of bids). When a bid's key is
///   stored already (such an attempt committed, or was still running and
///   committed while this one waited on its rows), the statement fails on
///   `bids_pkey` and nothing of it is written; the batch then goes again
///   at once in the text that passes over stored bids (`skip_stored_bids`).
/// - No participations: `/users/me/bids` sums a bidder's bids from the index
///   of bids by bidder (`bids_bidder`, which holds each bid's auction and
///   maximum), one entry a bid, at the end of the bidder's run. An upsert of
///   a row per (bidder, auction) searched its key before each insert, locked
///   each row it updated and left a page to prune behind each update: a
///   quarter of Postgres's CPU time a bid on many auctions, a third on one.
///
/// Each text is prepared once on each of the commit's connections; a text
/// binds every parameter, used or not.
fn postgres_commit_sql(shape: PostgresCommitShape) -> &'static str {
    static TEXTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        (0..8)
            .map(|index| {
                let shape = PostgresCommitShape {
                    states: index & 4 != 0,
                    keys: index & 2 != 0,
                    skip_stored_bids: index & 1 != 0,
                };
                postgres_commit_text(shape)
            })
            .collect()
    });
    let index = usize::from(shape.states) * 4 + usize::from(shape.keys) * 2 + usize::from(shape.skip_stored_bids);
    &TEXTS[index]
}

/// Which parts of the Postgres commit a batch needs, and how its bids go in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PostgresCommitShape {
    /// Auction rows to write (`changed_rows`).
    states: bool,
    /// Idempotency keys to store and check.
    keys: bool,
    /// Bids whose key is stored already are passed over (`ON CONFLICT DO
    /// NOTHING`) rather than failing the statement.
    skip_stored_bids: bool,
}

/// Whether a commit failed because a bid of its batch is stored already.
fn is_stored_bid(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|error| error.is_unique_violation() && error.constraint() == Some("bids_pkey"))
}

/// The parts a shape may leave out each begin with their comma.
fn postgres_commit_text(shape: PostgresCommitShape) -> String {
    let mut sql = String::from(POSTGRES_COMMIT_LEASES_AND_BIDS);
    if shape.skip_stored_bids {
        sql += " ON CONFLICT (auction_id, seq) DO NOTHING";
    }
    sql += ")";
    if shape.states {
        sql += POSTGRES_COMMIT_STATES;
    }
    if shape.keys {
        sql += POSTGRES_COMMIT_KEYS;
    }
    sql += " ";
    sql += if shape.keys { POSTGRES_COMMIT_VERDICT_AND_KEYS } else { "SELECT ok FROM verdict" };
    sql
}

const POSTGRES_COMMIT_LEASES_AND_BIDS: &str = "\
WITH named AS (SELECT * FROM UNNEST($1::int4[], $2::int8[]) AS n(shard, epoch)), \
held AS (SELECT s.shard FROM shard_leases s JOIN named n ON n.shard = s.shard AND n.epoch = s.epoch \
         WHERE s.owner = $3 ORDER BY s.shard FOR KEY SHARE OF s), \
verdict AS (SELECT count(*) = cardinality($1::int4[]) AS ok FROM held), \
new_bids AS ( \
    INSERT INTO bids (auction_id, seq, bidder_id, amount, max_amount, placed_at_ms, current_price, leader_id, end_at_ms, \
                      leader_max, bid_count) \
    SELECT b.* FROM UNNEST($4::uuid[], $5::int8[], $6::uuid[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], \
                           $11::uuid[], $12::int8[], $30::int8[], $31::int8[]) AS b \
    WHERE (SELECT ok FROM verdict)";

const POSTGRES_COMMIT_STATES: &str = "\
, new_states AS ( \
    UPDATE auctions a SET status = u.status, current_price = u.current_price, leader_id = u.leader_id, \
        leader_max = u.leader_max, bid_count = u.bid_count, seq = u.seq, end_at_ms = u.end_at_ms, \
        winner_id = u.winner_id, final_price = u.final_price \
    FROM UNNEST($13::uuid[], $14::text[], $15::int8[], $16::uuid[], $17::int8[], $18::int8[], $19::int8[], \
                $20::int8[], $21::uuid[], $22::int8[]) \
        AS u(id, status, current_price, leader_id, leader_max, bid_count, seq, end_at_ms, winner_id, final_price) \
    WHERE a.id = u.id AND (SELECT ok FROM verdict) \
      AND (a.seq, CASE a.status WHEN 'scheduled' THEN 0 WHEN 'active' THEN 1 ELSE 2 END) \
       <= (u.seq, CASE u.status WHEN 'scheduled' THEN 0 WHEN 'active' THEN 1 ELSE 2 END))";

const POSTGRES_COMMIT_KEYS: &str = "\
, new_keys AS ( \
    INSERT INTO idempotency_keys (user_id, key, fingerprint, kind, auction_id, seq, created_at_ms) \
    SELECT k.* FROM UNNEST($23::uuid[], $24::text[], $25::int8[], $26::text[], $27::uuid[], $28::int8[], \
                           $29::int8[]) AS k \
    WHERE (SELECT ok FROM verdict) \
    ON CONFLICT (user_id, key) DO UPDATE SET key = EXCLUDED.key \
    RETURNING user_id, key, kind, auction_id, seq), \
reused AS ( \
    SELECT count(*) AS n FROM new_keys s \
    JOIN UNNEST($23::uuid[], $24::text[], $26::text[], $27::uuid[], $28::int8[]) AS k(user_id, key, kind, auction_id, seq) \
        ON s.user_id = k.user_id AND s.key = k.key \
    WHERE s.kind <> k.kind OR s.auction_id <> k.auction_id OR s.seq IS DISTINCT FROM k.seq)";

const POSTGRES_COMMIT_VERDICT_AND_KEYS: &str = "\
SELECT CASE WHEN (SELECT n FROM reused) > 0 \
            THEN ('idempotency key reused: ' || (SELECT n FROM reused))::int > 0 \
            ELSE ok END \
FROM verdict";

/// One attempt at `batch` in the text of its shape (`postgres_commit_sql`);
/// `skip_stored_bids` after a first attempt met a stored bid.
async fn write_postgres(
    executor: impl sqlx::PgExecutor<'_>,
    node_id: &str,
    batch: &[Write],
    skip_stored_bids: bool,
) -> Result<bool, sqlx::Error> {
    let named = leases_named(batch);
    let all_bids: Vec<(Uuid, &BidPlaced)> = bids(batch).collect();
    let states = changed_rows(batch);
    let keys = keys(batch);
    let shape = PostgresCommitShape { states: !states.is_empty(), keys: !keys.is_empty(), skip_stored_bids };
    sqlx::query_scalar(postgres_commit_sql(shape))
        .bind(named.iter().map(|(shard, _)| *shard as i32).collect::<Vec<_>>())
        .bind(named.iter().map(|(_, epoch)| *epoch).collect::<Vec<_>>())
        .bind(node_id)
        .bind(all_bids.iter().map(|(auction_id, _)| *auction_id).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.seq as i64).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.bidder.id).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.amount.minor_units()).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.bidder_max.minor_units()).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.placed_at_ms).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.current_price.minor_units()).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.leader.id).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.end_at_ms).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.id).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.status.as_str()).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.current_price.minor_units()).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.leader.as_ref().map(|leader| leader.user.id)).collect::<Vec<_>>())
        .bind(
            states
                .iter()
                .map(|state| state.leader.as_ref().map(|leader| leader.max_amount.minor_units()))
                .collect::<Vec<_>>(),
        )
        .bind(states.iter().map(|state| state.bid_count as i64).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.seq as i64).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.end_at_ms).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.winner.as_ref().map(|winner| winner.id)).collect::<Vec<_>>())
        .bind(states.iter().map(|state| state.final_price.map(|price| price.minor_units())).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.user_id).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.key).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.fingerprint).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.kind).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.auction_id).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.seq).collect::<Vec<_>>())
        .bind(keys.iter().map(|key| key.created_at_ms).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.leader_max.minor_units()).collect::<Vec<_>>())
        .bind(all_bids.iter().map(|(_, bid)| bid.bid_count as i64).collect::<Vec<_>>())
        .fetch_one(executor)
        .await
}

/// The SQLite commit on a database in a temporary directory: batches built by
/// the auction rules themselves, as the actors build them.
#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use gavel_actors::ports::{KeyRecord, ShardLease, StoreError, StoredKey, Write, shard_of};
    use gavel_actors::{AuctionState, BidCommand, Command, Event, Money, Status, UserRef};
    use uuid::Uuid;

    use super::{PostgresCommitShape, changed_rows, commit, postgres_commit_sql};
    use crate::storage::{Db, NewAuction, committer_options, fresh_postgres_database, test_lamp};

    const NODE: &str = "node-a";

    struct Scene {
        db: Db,
        _dir: tempfile::TempDir,
        leases: Vec<ShardLease>,
        alice: UserRef,
        bob: UserRef,
    }

    impl Scene {
        async fn new() -> Scene {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open_sqlite(dir.path()).await.unwrap();
            Scene::on(db, dir).await
        }

        async fn postgres() -> Scene {
            let db = Db::open_postgres(&fresh_postgres_database().await).await.unwrap();
            Scene::on(db, tempfile::tempdir().unwrap()).await
        }

        async fn on(db: Db, dir: tempfile::TempDir) -> Scene {
            let leases = db.acquire_all_shards(NODE).await.unwrap();
            let mut users = Vec::new();
            for name in ["seller", "alice", "bob"] {
                let id = Uuid::now_v7();
                db.insert_user(id, name, "not a hash", 0).await.unwrap();
                users.push(UserRef { id, username: Arc::from(name) });
            }
            let [_seller, alice, bob] = users.try_into().unwrap();
            Scene { db, _dir: dir, leases, alice, bob }
        }

        /// A new active auction, as the store loads it.
        async fn auction(&self) -> AuctionState {
            self.auction_closing_softly(0).await
        }

        /// A new active auction ending at 1,000,000 ms, whose end soft close
        /// moves by `soft_close_secs`, as the store loads it.
        async fn auction_closing_softly(&self, soft_close_secs: u32) -> AuctionState {
            let seller = self.db.user_by_name("seller").await.unwrap().unwrap().id;
            let auction = test_lamp(seller, soft_close_secs);
            self.db.insert_auction(&auction, None, 0).await.unwrap();
            self.db.load(auction.id).await.unwrap().unwrap().state
        }

        /// Gives `shard`'s lease to `owner` at the next epoch (directly in the
        /// SQLite file, as another process would).
        async fn move_lease(&self, shard: u32, owner: &str) {
            let Db::Sqlite { writer, .. } = &self.db else { unreachable!("the scene is on SQLite") };
            let mut connection = writer.lock().await.unwrap();
            sqlx::query("UPDATE shard_leases SET owner = $2, epoch = epoch + 1 WHERE shard = $1")
                .bind(shard as i64)
                .bind(owner)
                .execute(&mut *connection)
                .await
                .unwrap();
            connection.finish();
        }

        /// Applies a bid to `state` and returns its write.
        fn bid(&self, state: &mut AuctionState, bidder: &UserRef, amount: i64, key: Option<&str>) -> Write {
            self.bid_at(state, bidder, amount, key, 10)
        }

        /// Applies a bid made at `now_ms` to `state` and returns its write.
        fn bid_at(
            &self,
            state: &mut AuctionState,
            bidder: &UserRef,
            amount: i64,
            key: Option<&str>,
            now_ms: i64,
        ) -> Write {
            let command =
                BidCommand { bidder: bidder.clone(), amount: Money::parse(amount).unwrap(), max_amount: None };
            let Ok(Event::BidPlaced(bid)) = state.apply(Command::PlaceBid(command), now_ms) else {
                panic!("the bid of {amount} is accepted");
            };
            Write {
                lease: self.leases[shard_of(state.id) as usize],
                at_ms: now_ms,
                auction: state.clone(),
                bid: Some(bid),
                key: key.map(|key| KeyRecord { user_id: bidder.id, key: key.to_owned(), fingerprint: 7 }),
            }
        }

        /// A bidder's (bid count, maximum) on an auction.
        /// (Postgres reads it from the index of bids by bidder, SQLite from `participations`.)
        async fn participation(&self, auction: &AuctionState, user: &UserRef) -> (i64, i64) {
            let sql = match self.db {
                Db::Sqlite { .. } => {
                    "SELECT bid_count, max_amount FROM participations WHERE auction_id = $1 AND user_id = $2"
                }
                Db::Postgres { .. } => {
                    "SELECT count(*), max(max_amount) FROM bids WHERE auction_id = $1 AND bidder_id = $2"
                }
            };
            reading!(&self.db, pool => sqlx::query_as(sql).bind(auction.id).bind(user.id).fetch_one(pool).await.unwrap())
        }

        /// The write an idempotency key is stored for: (kind, auction, seq).
        async fn key_stored(&self, user: &UserRef, key: &str) -> Option<(String, Uuid, Option<i64>)> {
            let sql = "SELECT kind, auction_id, seq FROM idempotency_keys WHERE user_id = $1 AND key = $2";
            reading!(&self.db, pool => sqlx::query_as(sql).bind(user.id).bind(key).fetch_optional(pool).await.unwrap())
        }

        /// The auction's own row, as stored: (seq, bid_count, current_price, end_at_ms, status).
        async fn stored_row(&self, auction: &AuctionState) -> (i64, i64, i64, i64, String) {
            let sql = "SELECT seq, bid_count, current_price, end_at_ms, status FROM auctions WHERE id = $1";
            reading!(&self.db, pool => sqlx::query_as(sql).bind(auction.id).fetch_one(pool).await.unwrap())
        }

        /// What every reader of the store sees of the auction: activation's
        /// load, the listing, a bidder's own list, the version snapshots are
        /// checked against. Each must be `state`.
        async fn assert_read_as(&self, state: &AuctionState, bidder: &UserRef, context: &str) {
            let backend = self.db.backend_name();
            let loaded = self.db.load(state.id).await.unwrap().unwrap().state;
            assert_eq!(loaded, *state, "{backend}, {context}: loaded");
            let listed = self.db.list_auctions(state.status, None, 100).await.unwrap();
            let listed = listed.into_iter().find(|row| row.id == state.id).expect("listed");
            assert_eq!(listed.to_state().unwrap(), *state, "{backend}, {context}: listed");
            let mine = self.db.bids_of_user(bidder.id, 100).await.unwrap();
            let mine = mine.into_iter().find(|row| row.auction.id == state.id).expect("in the bidder's list");
            assert_eq!(mine.auction.to_state().unwrap(), *state, "{backend}, {context}: in the bidder's list");
            let version = self.db.auction_version(state.id).await.unwrap();
            assert_eq!(version, Some((state.seq as i64, state.status.as_str().to_owned())), "{backend}, {context}");
        }

        /// The auction's own row: `(seq, end_at_ms, status)`.
        async fn auction_row(&self, auction: &AuctionState) -> (i64, i64, String) {
            let sql = "SELECT seq, end_at_ms, status FROM auctions WHERE id = $1";
            reading!(&self.db, pool => sqlx::query_as(sql).bind(auction.id).fetch_one(pool).await.unwrap())
        }

        async fn bids_of(&self, auction: &AuctionState) -> i64 {
            let sql = "SELECT count(*) FROM bids WHERE auction_id = $1";
            reading!(&self.db, pool => sqlx::query_scalar(sql).bind(auction.id).fetch_one(pool).await.unwrap())
        }
    }

    /// The sweep reads due auctions a page at a time: every one due by the
    /// horizon comes once, the earliest first, a start (scheduled) and an end
    /// (active) alike; none past the horizon, none ended or cancelled.
    #[tokio::test]
    async fn due_auctions_come_once_each_earliest_first_a_page_at_a_time() {
        for scene in [Scene::new().await, Scene::postgres().await] {
            due_auctions_by_page(scene).await;
        }
    }

    async fn due_auctions_by_page(scene: Scene) {
        use gavel_actors::ports::DueAuction;

        let seller = scene.db.user_by_name("seller").await.unwrap().unwrap().id;
        let mut expected = Vec::new();
        // Seven at each time, so that pages end inside a run of equal times.
        for (status, start_at_ms, end_at_ms) in [
            (Status::Active, 0, 5_000),
            (Status::Scheduled, 3_000, 9_000),
            (Status::Active, 0, 3_000),
            (Status::Active, 0, 20_000),
            (Status::Scheduled, 15_000, 30_000),
            (Status::Ended, 0, 1_000),
            (Status::Cancelled, 0, 1_000),
        ] {
            for _ in 0..7 {
                let auction = NewAuction { status, start_at_ms, end_at_ms, ..test_lamp(seller, 0) };
                scene.db.insert_auction(&auction, None, 0).await.unwrap();
                let at_ms = if status == Status::Scheduled { start_at_ms } else { end_at_ms };
                if matches!(status, Status::Active | Status::Scheduled) && at_ms <= 10_000 {
                    expected.push(DueAuction { at_ms, id: auction.id });
                }
            }
        }
        expected.sort_unstable();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = scene.db.due(10_000, after, 4).await.unwrap();
            assert!(page.len() <= 4);
            seen.extend_from_slice(&page);
            after = page.last().copied();
            if page.len() < 4 {
                break;
            }
        }
        assert_eq!(seen, expected);
    }

    /// 70 auctions, three bids each (alice, bob, alice again): the statements
    /// go in chunks of 64 rows and a padded chunk, and alice's two bids on one
    /// auction update one participation. Run again, as after a lost outcome,
    /// the batch changes nothing.
    #[tokio::test]
    async fn a_batch_of_many_auctions_writes_every_row_once_even_when_run_again() {
        for scene in [Scene::new().await, Scene::postgres().await] {
            many_auctions_once(scene).await;
        }
    }

    /// `count` new auctions, and a batch of three bids on each: alice 1,000,
    /// bob 1,500, alice 2,000.
    async fn three_bids_on_each(scene: &Scene, count: usize) -> (Vec<Write>, Vec<AuctionState>) {
        let mut batch = Vec::new();
        let mut auctions = Vec::new();
        for _ in 0..count {
            let mut state = scene.auction().await;
            batch.push(scene.bid(&mut state, &scene.alice, 1_000, None));
            batch.push(scene.bid(&mut state, &scene.bob, 1_500, None));
            batch.push(scene.bid(&mut state, &scene.alice, 2_000, None));
            auctions.push(state);
        }
        (batch, auctions)
    }

    async fn many_auctions_once(scene: Scene) {
        let (batch, auctions) = three_bids_on_each(&scene, 70).await;
        for run in 0..2 {
            commit(&scene.db, NODE, &batch).await.unwrap();
            for state in &auctions {
                assert_eq!(scene.bids_of(state).await, 3, "run {run}");
                let stored = scene.db.load(state.id).await.unwrap().unwrap().state;
                assert_eq!(stored, *state, "run {run}: the auction row holds the batch's last state");
                assert_eq!(scene.participation(state, &scene.alice).await, (2, 2_000), "run {run}");
                assert_eq!(scene.participation(state, &scene.bob).await, (1, 1_500), "run {run}");
            }
            // What `/users/me/bids` reads: every auction once, with the bidder's own count and maximum.
            for (bidder, expected) in [(&scene.alice, (2, 2_000)), (&scene.bob, (1, 1_500))] {
                let mine = scene.db.bids_of_user(bidder.id, 100).await.unwrap();
                assert_eq!(mine.len(), auctions.len(), "run {run}: one row per auction");
                for row in &mine {
                    assert!(auctions.iter().any(|state| state.id == row.auction.id), "run {run}");
                    assert_eq!((row.your_bid_count, row.your_max), expected, "run {run}");
                }
            }
        }
    }

    /// Takes a Postgres database back to the schema of the release before the
    /// index of bids by bidder (`20261205000001`, `…000002`): the migration
    /// that made its participations (the table, filled from the bids as its
    /// commits kept it, the index of bids by bidder dropped), those two
    /// migrations unrecorded.
    async fn back_to_the_release_before(pool: &sqlx::PgPool) {
        let participations = include_str!("../../migrations/postgres/20261122000003_participations.sql");
        sqlx::raw_sql(sqlx::AssertSqlSafe(participations)).execute(pool).await.unwrap();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version >= 20261205000001").execute(pool).await.unwrap();
    }

    /// A bidder's `/users/me/bids` as (auction, their bid count, their maximum), by auction.
    async fn bids_of(db: &Db, bidder: Uuid) -> Vec<(Uuid, i64, i64)> {
        let rows = db.bids_of_user(bidder, 100).await.unwrap();
        let mut mine: Vec<_> = rows.into_iter().map(|row| (row.auction.id, row.your_bid_count, row.your_max)).collect();
        mine.sort_unstable();
        mine
    }

    /// A Postgres database of the release before upgrades in place: the node
    /// that starts on it runs the migrations that drop its participations
    /// for the index of bids by bidder, and every bidder's `/users/me/bids`
    /// reads as it did (each auction once, with the bidder's own count and
    /// maximum), its bids and auctions untouched.
    #[tokio::test]
    async fn a_postgres_database_of_the_release_before_upgrades_with_every_bidders_bids() {
        let url = fresh_postgres_database().await;
        let scene = Scene::on(Db::open_postgres(&url).await.unwrap(), tempfile::tempdir().unwrap()).await;
        let (batch, auctions) = three_bids_on_each(&scene, 12).await;
        commit(&scene.db, NODE, &batch).await.unwrap();
        let alice = bids_of(&scene.db, scene.alice.id).await;
        let bob = bids_of(&scene.db, scene.bob.id).await;
        assert_eq!(alice.len(), auctions.len());
        assert!(alice.iter().all(|&(_, count, max)| (count, max) == (2, 2_000)), "{alice:?}");
        assert!(bob.iter().all(|&(_, count, max)| (count, max) == (1, 1_500)), "{bob:?}");

        let Db::Postgres { pool, .. } = &scene.db else { unreachable!("a Postgres scene") };
        back_to_the_release_before(pool).await;
        let participations: i64 =
            sqlx::query_scalar("SELECT count(*) FROM participations").fetch_one(pool).await.unwrap();
        assert_eq!(participations, 2 * auctions.len() as i64, "the release before's rows");
        scene.db.close().await;

        let upgraded = Db::open_postgres(&url).await.unwrap();
        assert_eq!(bids_of(&upgraded, scene.alice.id).await, alice);
        assert_eq!(bids_of(&upgraded, scene.bob.id).await, bob);
        for state in &auctions {
            assert_eq!(upgraded.load(state.id).await.unwrap().unwrap().state, *state);
        }
        let Db::Postgres { pool, .. } = &upgraded else { unreachable!("a Postgres database") };
        let (table, index): (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT to_regclass('participations')::text, \
             (SELECT indexdef FROM pg_indexes WHERE indexname = 'bids_bidder')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(table, None, "the participations are gone");
        assert!(index.is_some_and(|index| index.ends_with("(bidder_id) INCLUDE (auction_id, max_amount)")));
        upgraded.close().await;
    }

    /// A bid that changes neither the auction's status nor its end is written
    /// as its own row only (which carries the auction's state after it); the
    /// auction's row is written when soft close moves the end and when the
    /// auction ends. Every reader sees the auction as it stands throughout.
    #[tokio::test]
    async fn a_bid_writes_its_own_row_and_the_auction_row_follows_status_and_end() {
        for scene in [Scene::new().await, Scene::postgres().await] {
            bids_and_the_auction_row(scene).await;
        }
    }

    async fn bids_and_the_auction_row(scene: Scene) {
        let backend = scene.db.backend_name();
        let mut state = scene.auction_closing_softly(60).await;
        let created = scene.stored_row(&state).await;
        let batch = [scene.bid(&mut state, &scene.alice, 1_000, None), scene.bid(&mut state, &scene.bob, 1_500, None)];
        commit(&scene.db, NODE, &batch).await.unwrap();
        assert_eq!(scene.stored_row(&state).await, created, "{backend}: two bids left the auction's row alone");
        scene.assert_read_as(&state, &scene.bob, "after two bids").await;

        // 50 s before the end: soft close moves it, and the row follows.
        let extending = scene.bid_at(&mut state, &scene.alice, 2_000, None, 950_000);
        assert!(extending.bid.as_ref().unwrap().extended);
        commit(&scene.db, NODE, &[extending]).await.unwrap();
        let row = (3, 3, state.current_price.minor_units(), 1_010_000, "active".to_owned());
        assert_eq!(scene.stored_row(&state).await, row, "{backend}: the moved end is in the row");
        scene.assert_read_as(&state, &scene.alice, "after soft close").await;

        let Ok(Event::Ended { .. }) = state.apply(Command::End, 2_000_000) else {
            panic!("the auction ends");
        };
        let end = Write { at_ms: 2_000_000, auction: state.clone(), bid: None, key: None, ..batch[0].clone() };
        commit(&scene.db, NODE, &[end]).await.unwrap();
        let row = (3, 3, state.current_price.minor_units(), 1_010_000, "ended".to_owned());
        assert_eq!(scene.stored_row(&state).await, row, "{backend}: the ended auction's row is whole");
        scene.assert_read_as(&state, &scene.alice, "ended").await;
    }

    /// The rows a batch writes: an auction whose writes are all bids that left
    /// its end alone has none; one with a bid that moved its end, or with an
    /// end, has its state after its last write in the batch, in the order the
    /// auctions came.
    #[tokio::test]
    async fn a_batch_writes_the_rows_of_the_auctions_it_changed_at_their_last_write() {
        let scene = Scene::new().await;
        let mut plain = scene.auction_closing_softly(60).await;
        let mut extended = scene.auction_closing_softly(60).await;
        let mut ended = scene.auction().await;
        let mut batch = vec![
            scene.bid(&mut plain, &scene.alice, 1_000, None),
            scene.bid(&mut extended, &scene.alice, 1_000, None),
            scene.bid(&mut ended, &scene.bob, 1_000, None),
            scene.bid_at(&mut extended, &scene.bob, 1_500, None, 950_000),
            scene.bid(&mut plain, &scene.bob, 1_500, None),
        ];
        batch.push(scene.bid_at(&mut extended, &scene.alice, 2_000, None, 950_001));
        let Ok(Event::Ended { .. }) = ended.apply(Command::End, 2_000_000) else {
            panic!("the auction ends");
        };
        batch.push(Write { at_ms: 2_000_000, auction: ended.clone(), bid: None, key: None, ..batch[2].clone() });
        let rows: Vec<AuctionState> = changed_rows(&batch).into_iter().cloned().collect();
        assert_eq!(rows, vec![extended, ended]);
    }

    /// A commit attempt given up on (its time ran out) can still run later in
    /// its Postgres backend: here, while the backend was paused, the retry on
    /// the other connection and the auction's next writes went first. Run
    /// then, it must not take the auction row back to an older state: a later
    /// activation would load it and give the next bid a `seq` that is taken.
    /// SQLite's one writer connection should finish an abandoned attempt
    /// before the next starts; its rows are guarded the same way all the same.
    #[tokio::test]
    async fn a_late_attempt_of_an_older_write_leaves_the_newer_state() {
        for scene in [Scene::new().await, Scene::postgres().await] {
            a_late_attempt_changes_nothing(scene).await;
        }
    }

    async fn a_late_attempt_changes_nothing(scene: Scene) {
        // Bids that move the end (soft close) write the auction's row too: a
        // late write of the first must leave the row at the second's state.
        // (A load would show the second's state anyway, from its bid's row;
        // the auction's row itself is read here.)
        let mut state = scene.auction_closing_softly(60).await;
        let first = scene.bid_at(&mut state, &scene.alice, 1_000, None, 950_000);
        let second = scene.bid_at(&mut state, &scene.bob, 1_500, None, 960_000);
        commit(&scene.db, NODE, std::slice::from_ref(&first)).await.unwrap();
        commit(&scene.db, NODE, std::slice::from_ref(&second)).await.unwrap();
        commit(&scene.db, NODE, std::slice::from_ref(&first)).await.unwrap();
        let row = scene.auction_row(&state).await;
        assert_eq!(
            row,
            (2, state.end_at_ms, "active".to_owned()),
            "{}: the row is the second bid's",
            scene.db.backend_name()
        );
        let stored = scene.db.load(state.id).await.unwrap().unwrap().state;
        assert_eq!(stored, state, "{}: the row keeps the second bid's state", scene.db.backend_name());

        // The auction ends at the same seq: a late write of it while active does not reopen it.
        let Ok(Event::Ended { .. }) = state.apply(Command::End, 2_000_000) else {
            panic!("the auction ends");
        };
        let end = Write { at_ms: 2_000_000, auction: state.clone(), bid: None, key: None, ..second.clone() };
        commit(&scene.db, NODE, &[end]).await.unwrap();
        commit(&scene.db, NODE, &[second]).await.unwrap();
        assert_eq!(scene.auction_row(&state).await, (2, state.end_at_ms, "ended".to_owned()));
        let stored = scene.db.load(state.id).await.unwrap().unwrap().state;
        assert_eq!((stored.status, stored.winner.clone()), (Status::Ended, Some(scene.bob.clone())));
        assert_eq!(stored, state, "{}: the row stays ended", scene.db.backend_name());
    }

    /// An activation loads as many keys as an auction's actor keeps: fewer
    /// would forget, at each reload, keys the actor had still answered from;
    /// more would be evicted at once.
    #[test]
    fn an_activation_loads_as_many_keys_as_an_actor_keeps() {
        let kept = gavel_actors::node::NodeSettings::default().recent_keys_per_auction;
        assert_eq!(usize::try_from(crate::storage::RECENT_KEYS_LOADED).unwrap(), kept);
    }

    /// A cancelled auction loads with the key of its cancel (on both
    /// backends), so a retry of the cancel that reaches a fresh actor (the
    /// first's actor passivated or retired in between) is answered as the
    /// first was rather than refused for the auction being cancelled.
    #[tokio::test]
    async fn a_cancelled_auction_loads_with_the_key_of_its_cancel() {
        for scene in [Scene::new().await, Scene::postgres().await] {
            let mut state = scene.auction().await;
            let by = state.seller.id;
            state.apply(Command::Cancel { by }, 10).expect("the seller cancels");
            let record = KeyRecord { user_id: by, key: "cancel-1".to_owned(), fingerprint: 42 };
            let write = Write {
                lease: scene.leases[shard_of(state.id) as usize],
                at_ms: 10,
                auction: state.clone(),
                bid: None,
                key: Some(record.clone()),
            };
            commit(&scene.db, NODE, &[write]).await.unwrap();
            let loaded = scene.db.load(state.id).await.unwrap().expect("stored");
            assert_eq!(loaded.state.status, Status::Cancelled);
            assert_eq!(loaded.recent_keys, vec![StoredKey { record, seq: 0 }], "{}", scene.db.backend_name());
        }
    }

    /// A batch with writes under two epochs of one shard (of a lease this
    /// node lost, and of the one it took again since): the verdict names the
    /// lost epoch alone, and nothing of the batch is written.
    #[tokio::test]
    async fn a_batch_under_two_epochs_of_a_shard_is_fenced_for_the_lost_one_only() {
        let scene = Scene::new().await;
        let mut lost = scene.auction().await;
        let mut sibling = scene.auction().await;
        while shard_of(sibling.id) != shard_of(lost.id) {
            sibling = scene.auction().await;
        }
        let shard = shard_of(lost.id);
        scene.move_lease(shard, NODE).await;
        let old = scene.leases[shard as usize];
        let mut under_new = scene.bid(&mut sibling, &scene.alice, 1_000, None);
        under_new.lease.epoch = old.epoch + 1;
        let batch = [scene.bid(&mut lost, &scene.bob, 1_000, None), under_new];
        match commit(&scene.db, NODE, &batch).await {
            Err(StoreError::Fenced { leases }) => assert_eq!(leases, vec![old], "the lost epoch alone"),
            outcome => panic!("expected the batch to be fenced, got {outcome:?}"),
        }
        assert_eq!(scene.bids_of(&lost).await, 0, "nothing of a fenced batch is written");
        assert_eq!(scene.bids_of(&sibling).await, 0);
        let again = [batch[1].clone()];
        commit(&scene.db, NODE, &again).await.expect("the write under the current epoch commits alone");
        assert_eq!(scene.bids_of(&sibling).await, 1);
    }

    /// A lease that moved on (another process took the database file) fences
    /// the whole batch: nothing of it is written, and the connection goes on
    /// to commit the next batch.
    #[tokio::test]
    async fn a_batch_under_a_lease_that_moved_writes_nothing() {
        let scene = Scene::new().await;
        let mut fenced_auction = scene.auction().await;
        let mut other = scene.auction().await;
        while shard_of(other.id) == shard_of(fenced_auction.id) {
            other = scene.auction().await;
        }
        let shard = shard_of(fenced_auction.id);
        scene.move_lease(shard, "node-b").await;
        let batch =
            [scene.bid(&mut other, &scene.alice, 1_000, None), scene.bid(&mut fenced_auction, &scene.bob, 1_000, None)];
        match commit(&scene.db, NODE, &batch).await {
            Err(StoreError::Fenced { leases }) => assert_eq!(leases, vec![scene.leases[shard as usize]]),
            outcome => panic!("expected the batch to be fenced, got {outcome:?}"),
        }
        assert_eq!(scene.bids_of(&other).await, 0, "nothing of a fenced batch is written");
        assert_eq!(scene.bids_of(&fenced_auction).await, 0);
        let next = [scene.bid(&mut other, &scene.bob, 1_500, None)];
        commit(&scene.db, NODE, &next).await.expect("the next batch commits");
        assert_eq!(scene.bids_of(&other).await, 1);
    }

    /// A key already stored for another write (one key sent at once to two
    /// auctions) fails the batch that repeats it, and nothing of that batch is
    /// written; the same write run again passes.
    #[tokio::test]
    async fn a_key_stored_for_another_write_fails_the_batch_that_reuses_it() {
        for scene in [Scene::new().await, Scene::postgres().await] {
            a_reused_key_fails_its_batch(scene).await;
        }
    }

    async fn a_reused_key_fails_its_batch(scene: Scene) {
        let mut first = scene.auction().await;
        let mut second = scene.auction().await;
        let stored = [scene.bid(&mut first, &scene.alice, 1_000, Some("k-1"))];
        commit(&scene.db, NODE, &stored).await.unwrap();
        let reused = [
            scene.bid(&mut second, &scene.bob, 1_000, Some("k-2")),
            scene.bid(&mut second, &scene.alice, 1_100, Some("k-1")),
        ];
        assert!(matches!(commit(&scene.db, NODE, &reused).await, Err(StoreError::KeyReused)));
        assert_eq!(scene.bids_of(&second).await, 0, "nothing of the batch is written");
        commit(&scene.db, NODE, &stored).await.expect("the same write, run again, passes");
        assert_eq!(scene.bids_of(&first).await, 1);
    }

    /// On Postgres a batch is committed by one of several texts, with or
    /// without the auction rows' part and the keys' part, inserting its bids
    /// plainly or passing over stored ones (`postgres_commit_sql`). A batch
    /// of each shape writes every part it has, and run again (as after a lost
    /// outcome: the plain text fails on a stored bid, the other passes over
    /// it) changes nothing; a text without a part has none of it.
    #[tokio::test]
    async fn each_postgres_commit_text_writes_every_part_its_batch_has() {
        let scene = Scene::postgres().await;
        for (states, keys) in [(false, false), (false, true), (true, false), (true, true)] {
            for skip_stored_bids in [false, true] {
                let text = postgres_commit_sql(PostgresCommitShape { states, keys, skip_stored_bids });
                let context = format!("states {states}, keys {keys}, skip {skip_stored_bids}: {text}");
                assert_eq!(text.contains("UPDATE auctions"), states, "{context}");
                assert_eq!(text.contains("INSERT INTO idempotency_keys"), keys, "{context}");
                assert_eq!(text.contains("ON CONFLICT (auction_id, seq) DO NOTHING"), skip_stored_bids, "{context}");
            }

            let mut state = scene.auction_closing_softly(60).await;
            let created = scene.stored_row(&state).await;
            let key = format!("k-{states}-{keys}");
            let key = keys.then_some(key.as_str());
            let first = scene.bid(&mut state, &scene.alice, 1_000, None);
            // 50 s before the end: soft close moves it, so the row is written.
            let now_ms = if states { 950_000 } else { 10 };
            let second = scene.bid_at(&mut state, &scene.bob, 1_500, key, now_ms);
            assert_eq!(second.bid.as_ref().unwrap().extended, states);
            let batch = [first, second];
            let has_keys = batch.iter().any(|write| write.key.is_some());
            assert_eq!((!changed_rows(&batch).is_empty(), has_keys), (states, keys), "the batch's shape");
            for run in 0..2 {
                let context = format!("states {states}, keys {keys}, run {run}");
                commit(&scene.db, NODE, &batch).await.unwrap_or_else(|error| panic!("{context}: {error:?}"));
                assert_eq!(scene.bids_of(&state).await, 2, "{context}");
                assert_eq!(scene.participation(&state, &scene.alice).await, (1, 1_000), "{context}");
                assert_eq!(scene.participation(&state, &scene.bob).await, (1, 1_500), "{context}");
                let row = scene.stored_row(&state).await;
                if states {
                    let price = state.current_price.minor_units();
                    assert_eq!(row, (2, 2, price, 1_010_000, "active".to_owned()), "{context}: the moved end");
                } else {
                    assert_eq!(row, created, "{context}: the row is left alone");
                }
                scene.assert_read_as(&state, &scene.bob, &context).await;
                let stored_key = match key {
                    Some(key) => scene.key_stored(&scene.bob, key).await,
                    None => None,
                };
                let expected = key.map(|_| ("bid".to_owned(), state.id, Some(2)));
                assert_eq!(stored_key, expected, "{context}");
            }
        }
    }

    /// A commit attempt given up on can still be running in its backend when
    /// the retry starts: the retry's plain insert of a bid waits on that
    /// attempt's row, and once the attempt commits, fails on the stored key.
    /// The batch then goes again past the stored bids, and commits.
    #[tokio::test]
    async fn a_postgres_commit_that_waited_on_an_earlier_attempt_commits_past_its_bids() {
        let scene = Scene::postgres().await;
        let mut state = scene.auction().await;
        let batch = [scene.bid(&mut state, &scene.alice, 1_000, None), scene.bid(&mut state, &scene.bob, 1_500, None)];
        let Db::Postgres { pool, committer, .. } = &scene.db else { unreachable!("on Postgres") };

        // The earlier attempt, still running: its transaction holds the batch's rows.
        let mut earlier = pool.begin().await.unwrap();
        assert!(super::write_postgres(&mut *earlier, NODE, &batch, false).await.unwrap(), "the leases hold");

        // The plain text alone, with the earlier attempt then committed: it fails on the stored bid.
        let plain = {
            let committer = committer.clone();
            let batch = batch.clone();
            tokio::spawn(async move { super::write_postgres(committer.pool(), NODE, &batch, false).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the retry never waited on the earlier attempt's row");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        earlier.commit().await.unwrap();
        let error = plain.await.unwrap().expect_err("the plain insert meets the stored bid");
        assert!(super::is_stored_bid(&error), "{error}");
        assert_eq!(scene.bids_of(&state).await, 2, "the earlier attempt's bids, once each");

        // The whole commit goes again past the stored bids, and changes nothing.
        commit(&scene.db, NODE, &batch).await.expect("the batch commits past its stored bids");
        assert_eq!(scene.bids_of(&state).await, 2);
        assert_eq!(scene.participation(&state, &scene.alice).await, (1, 1_000));
        assert_eq!(scene.participation(&state, &scene.bob).await, (1, 1_500));
        scene.assert_read_as(&state, &scene.bob, "after the retry").await;
    }

    /// On SQLite the commits run on the writer connection's own handle
    /// (`direct`), between the other writes, which run through sqlx on the
    /// same connection: each hands it to the other, the connection is kept
    /// throughout, and the store closes cleanly (SQLite refuses to close a
    /// connection with the commits' statements left on it). Reopened, the
    /// database holds every commit.
    #[tokio::test]
    async fn commits_and_other_writes_take_turns_on_the_sqlite_writer_and_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let scene = Scene::on(Db::open_sqlite(dir.path()).await.unwrap(), tempfile::tempdir().unwrap()).await;
        let Db::Sqlite { writer, .. } = &scene.db else { unreachable!("the scene is on SQLite") };
        let mut marking = writer.lock().await.unwrap();
        sqlx::query("CREATE TEMP TABLE marker (x)").execute(&mut *marking).await.unwrap();
        marking.finish();
        let mut state = scene.auction().await;
        let mut amount = 1_000;
        for round in 0..3 {
            for bidder in [&scene.alice, &scene.bob] {
                commit(&scene.db, NODE, &[scene.bid(&mut state, bidder, amount, None)]).await.unwrap();
                amount += 100;
            }
            scene.db.insert_user(Uuid::now_v7(), &format!("carol-{round}"), "not a hash", 0).await.unwrap();
        }
        let mut next = writer.lock().await.unwrap();
        let marker = sqlx::query("SELECT count(*) FROM temp.marker").execute(&mut *next).await;
        assert!(marker.is_ok(), "the same connection throughout: {marker:?}");
        next.finish();
        tokio::time::timeout(Duration::from_secs(10), scene.db.close()).await.expect("the store closes");
        let reopened = Db::open_sqlite(dir.path()).await.unwrap();
        let stored = reopened.load(state.id).await.unwrap().unwrap().state;
        assert_eq!(stored, state, "every commit is in the database");
        reopened.close().await;
    }

    /// A commit dropped while it runs (its time ran out) must not leave its
    /// transaction open on the writer connection: the next commit, and any
    /// other write, would fail ("cannot start a transaction within a
    /// transaction") or join it.
    #[tokio::test]
    async fn a_commit_abandoned_midway_leaves_no_transaction_open() {
        let scene = Scene::new().await;
        let mut state = scene.auction().await;
        let mut amount = 1_000;
        for _ in 0..20 {
            let batch =
                [scene.bid(&mut state, if amount % 200 == 0 { &scene.alice } else { &scene.bob }, amount, None)];
            let _ = tokio::time::timeout(Duration::ZERO, commit(&scene.db, NODE, &batch)).await;
            commit(&scene.db, NODE, &batch).await.expect("a commit after an abandoned one");
            amount += 100;
        }
        assert_eq!(scene.bids_of(&state).await, 20);
        scene.db.insert_user(Uuid::now_v7(), "carol", "not a hash", 0).await.expect("other writes go on too");
    }

    /// Postgres may keep a generic plan for the commit after its first runs,
    /// planned for the tables as they were then. Made while `auctions` held
    /// one row, it must still find the batch's auctions by key when the table
    /// holds thousands: before the commit's connections offered only keyed
    /// plans (`committer_options`), it read and hashed the whole table, and
    /// every commit of a many-auctions load read all 10,000 rows.
    #[tokio::test]
    async fn the_postgres_commit_planned_on_a_near_empty_database_finds_auctions_by_key() {
        use sqlx::Connection;
        let db = Db::open_postgres(&fresh_postgres_database().await).await.unwrap();
        let Db::Postgres { pool, .. } = &db else { unreachable!("opened on Postgres") };
        let seller = Uuid::now_v7();
        db.insert_user(seller, "seller", "not a hash", 0).await.unwrap();
        let add_auctions = |count: i32| {
            sqlx::query(
                "INSERT INTO auctions (id, shard, seller_id, title, description, currency, starting_price, \
                 min_increment, soft_close_secs, start_at_ms, end_at_ms, status, current_price, bid_count, seq, \
                 created_at_ms) \
                 SELECT gen_random_uuid(), 0, $1, 'a lamp', '', 'EUR', 1000, 100, 0, 0, 1000000, 'active', 1000, \
                 0, 0, 0 FROM generate_series(1, $2)",
            )
            .bind(seller)
            .bind(count)
            .execute(pool)
        };
        add_auctions(1).await.unwrap();
        // Nothing may replace the kept plan during the test: an `ANALYZE` would.
        sqlx::query("ALTER TABLE auctions SET (autovacuum_enabled = false)").execute(pool).await.unwrap();

        // A commit's connection: it keeps the generic plan from the first run.
        let options = committer_options(&pool.connect_options());
        let mut connection = sqlx::PgConnection::connect_with(&options).await.unwrap();
        let every_part = postgres_commit_sql(PostgresCommitShape { states: true, keys: true, skip_stored_bids: true });
        let prepare = format!("PREPARE gavel_commit AS {every_part}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(prepare)).execute(&mut connection).await.unwrap();
        let parameters = every_part
            .split('$')
            .skip(1)
            .filter_map(|after| after.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok())
            .max()
            .expect("the commit has parameters");
        let mut arguments = vec!["'{}'"; parameters];
        arguments[2] = "'node-a'";
        let explain = format!("EXPLAIN EXECUTE gavel_commit({})", arguments.join(", "));
        async fn plan(connection: &mut sqlx::PgConnection, explain: &str) -> String {
            let explain = sqlx::AssertSqlSafe(explain.to_owned());
            let lines: Vec<String> = sqlx::query_scalar(explain).fetch_all(connection).await.unwrap();
            lines.join("\n")
        }
        let first = plan(&mut connection, &explain).await;
        add_auctions(5_000).await.unwrap();
        let later = plan(&mut connection, &explain).await;
        assert_eq!(first, later, "the plan made on one auction is the one kept");
        assert!(
            later.contains("Index Scan using auctions_pkey on auctions") && !later.contains("Seq Scan"),
            "the commit reads auctions by key, whatever their number when it was planned:\n{later}"
        );
    }

    /// Every commit on a connection runs the one plan made at its first: none
    /// is planned again for its values. Left to choose (`plan_cache_mode`
    /// `auto`), Postgres plans the first five runs for their values, and
    /// after that keeps doing so at every run if the plan it would keep is
    /// estimated costlier than those; measured on a node some seconds old,
    /// the hot auction's commits were planned afresh every time (the parser
    /// and planner in a profile of the backend), at 12 µs of Postgres's CPU
    /// a bid.
    #[tokio::test]
    async fn a_postgres_commit_connection_plans_the_commit_once() {
        let scene = Scene::postgres().await;
        let mut state = scene.auction().await;
        for (round, amount) in (1..=8).map(|round| (round, 1_000 + round * 100)) {
            let bidder = if round % 2 == 0 { &scene.alice } else { &scene.bob };
            commit(&scene.db, NODE, &[scene.bid(&mut state, bidder, amount, None)]).await.unwrap();
        }
        let Db::Postgres { committer, .. } = &scene.db else { unreachable!("on Postgres") };
        // The connection kept between commits, which ran them all.
        let mut connection = committer.take().await.unwrap();
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE 'WITH named AS%'",
        )
        .fetch_one(&mut *connection)
        .await
        .unwrap();
        assert_eq!(custom, 0, "no commit planned for its values ({generic} on the kept plan)");
        assert_eq!(generic, 8, "every commit ran on the connection kept between them");
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM bids WHERE auction_id = $1")
            .bind(state.id)
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        assert_eq!(stored, 8);
    }
}
