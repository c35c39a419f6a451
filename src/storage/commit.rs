//! The group commit: one transaction per batch of writes from any number of
//! auctions. Inside it, first the fencing check (every lease epoch the batch
//! names is still this node's), then the bids, the auctions' new state, the
//! idempotency keys and each bidder's participation. Re-running a batch whose
//! first commit's outcome was lost leaves the same rows (bids and keys skip
//! existing keys, auction rows get absolute values, participations count a
//! batch's bids only past the `last_seq` they hold), so the persistence actor
//! may retry blindly.

use std::collections::HashMap;

use gavel_actors::ports::{StoreError, Write};
use gavel_actors::{AuctionState, BidPlaced};
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::Db;

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
    // SQLite: 19 (SQLITE_CONSTRAINT and its extended codes end in 19), 20 (mismatch), 18 (too big).
    let invalid_value = code.starts_with("22")
        || code.starts_with("23")
        || code.parse::<i32>().is_ok_and(|number| matches!(number & 0xff, 18..=20));
    if constraint || invalid_value {
        StoreError::Invalid(error.to_string())
    } else {
        StoreError::Unavailable(error.to_string())
    }
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
        Db::Sqlite { writer, .. } => {
            let mut tx = writer.begin().await.map_err(unavailable)?;
            check_leases_sqlite(&mut tx, node_id, batch).await?;
            write_sqlite(&mut tx, batch).await.map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)
        }
        Db::Postgres { committer: pool, .. } => {
            let leases_held = write_postgres(pool, node_id, batch).await.map_err(unavailable)?;
            if leases_held { Ok(()) } else { Err(fenced_postgres(pool, node_id, batch).await) }
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

fn fenced(current: &HashMap<i32, (String, i64)>, node_id: &str, named: &[(u32, i64)]) -> Vec<u32> {
    named
        .iter()
        .filter(|(shard, epoch)| {
            current
                .get(&(*shard as i32))
                .is_none_or(|(owner, current_epoch)| owner != node_id || current_epoch != epoch)
        })
        .map(|(shard, _)| *shard)
        .collect()
}

async fn check_leases_sqlite(
    tx: &mut Transaction<'static, Sqlite>,
    node_id: &str,
    batch: &[Write],
) -> Result<(), StoreError> {
    let named = leases_named(batch);
    // One statement for all the batch's shards: each statement is a round trip
    // to the connection's thread, and a batch of many auctions names dozens.
    let shards = named.iter().map(|(shard, _)| shard.to_string()).collect::<Vec<_>>().join(",");
    let rows: Vec<(i32, String, i64)> =
        sqlx::query_as("SELECT shard, owner, epoch FROM shard_leases WHERE shard IN (SELECT value FROM json_each($1))")
            .bind(format!("[{shards}]"))
            .fetch_all(&mut **tx)
            .await
            .map_err(|error| StoreError::Unavailable(error.to_string()))?;
    let current = rows.into_iter().map(|(shard, owner, epoch)| (shard, (owner, epoch))).collect();
    let shards = fenced(&current, node_id, &named);
    if shards.is_empty() { Ok(()) } else { Err(StoreError::Fenced { shards }) }
}

/// Which of the batch's leases moved on (after `write_postgres` found one that did).
async fn fenced_postgres(pool: &sqlx::PgPool, node_id: &str, batch: &[Write]) -> StoreError {
    let named = leases_named(batch);
    let shards: Vec<i32> = named.iter().map(|(shard, _)| *shard as i32).collect();
    let rows: Result<Vec<(i32, String, i64)>, sqlx::Error> =
        sqlx::query_as("SELECT shard, owner, epoch FROM shard_leases WHERE shard = ANY($1)")
            .bind(&shards)
            .fetch_all(pool)
            .await;
    match rows {
        Ok(rows) => {
            let current = rows.into_iter().map(|(shard, owner, epoch)| (shard, (owner, epoch))).collect();
            StoreError::Fenced { shards: fenced(&current, node_id, &named) }
        }
        Err(error) => StoreError::Unavailable(error.to_string()),
    }
}

/// The last state of each auction in the batch, in first-seen order.
fn final_states(batch: &[Write]) -> Vec<&AuctionState> {
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut states: Vec<&AuctionState> = Vec::new();
    for write in batch {
        match index.get(&write.auction.id) {
            Some(&position) => states[position] = &write.auction,
            None => {
                index.insert(write.auction.id, states.len());
                states.push(&write.auction);
            }
        }
    }
    states
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

/// One bidder's bids on one auction within a batch, for `participations`.
struct Participation {
    user_id: Uuid,
    auction_id: Uuid,
    max_amount: i64,
    bid_count: i64,
    last_seq: i64,
}

/// The batch's bids summed per (bidder, auction), in key order (each key once,
/// as an upsert statement needs).
fn participations(batch: &[Write]) -> Vec<Participation> {
    let mut summed: std::collections::BTreeMap<(Uuid, Uuid), Participation> = std::collections::BTreeMap::new();
    for (auction_id, bid) in bids(batch) {
        let entry = summed.entry((bid.bidder.id, auction_id)).or_insert(Participation {
            user_id: bid.bidder.id,
            auction_id,
            max_amount: i64::MIN,
            bid_count: 0,
            last_seq: 0,
        });
        entry.max_amount = entry.max_amount.max(bid.bidder_max.minor_units());
        entry.bid_count += 1;
        entry.last_seq = entry.last_seq.max(bid.seq as i64);
    }
    summed.into_values().collect()
}

/// `UPDATE auctions … FROM (VALUES …)` setting `rows` auctions' state at once,
/// but for the two indexed columns. SQLite rewrites an index entry of every
/// updated row whenever the `SET` names one of the index's columns, changed
/// or not: naming `status` and `end_at_ms` here would dirty a page of each of
/// the two listing indexes per auction, and a commit of many auctions would
/// write three times the pages it needs.
fn sqlite_update_auctions_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "UPDATE auctions SET current_price = u.column2, leader_id = u.column3, leader_max = u.column4, \
         bid_count = u.column5, seq = u.column6, winner_id = u.column7, final_price = u.column8 \
         FROM (VALUES {values}) AS u WHERE auctions.id = u.column1"
    )
}

/// Sets `status` and `end_at_ms` of those of `rows` auctions where either
/// changed (an auction ended, or a soft close moved its end): only those rows'
/// index entries are rewritten.
fn sqlite_update_auction_ends_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?)"; rows].join(", ");
    format!(
        "UPDATE auctions SET status = u.column2, end_at_ms = u.column3 FROM (VALUES {values}) AS u \
         WHERE auctions.id = u.column1 AND (auctions.status <> u.column2 OR auctions.end_at_ms <> u.column3)"
    )
}

/// A batch's rows of one table go in one multi-row statement (two or more
/// past this size): each statement is a round trip to the connection's thread,
/// and each round trip wakes a thread, which is what a commit's time went to.
/// Every size up to this has its own prepared statement, kept in the writer's
/// cache (`SQLITE_WRITER_STATEMENTS`); 64 rows of 9 columns stay far below
/// SQLite's limit of 32,766 parameters.
const SQLITE_MAX_ROWS_PER_STATEMENT: usize = 64;

/// Prepared statements the writer keeps: a statement of each size for bids,
/// participations, the two auction updates and keys, and a few more.
pub(super) const SQLITE_WRITER_STATEMENTS: usize = 5 * SQLITE_MAX_ROWS_PER_STATEMENT + 64;

/// How many of `rows` the next statement takes.
fn sqlite_chunk(rows: usize) -> usize {
    rows.clamp(1, SQLITE_MAX_ROWS_PER_STATEMENT)
}

/// `INSERT INTO bids … VALUES (?, …), …` for `rows` rows. Anonymous `?`
/// parameters: SQLite looks named ones up by a linear scan for each bind.
fn sqlite_insert_bids_sql(rows: usize) -> String {
    let row = "(?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let values = vec![row; rows].join(", ");
    format!(
        "INSERT INTO bids (auction_id, seq, bidder_id, amount, max_amount, placed_at_ms, current_price, leader_id, \
         end_at_ms) VALUES {values} ON CONFLICT (auction_id, seq) DO NOTHING"
    )
}

/// Adds a batch's bids to `participations`, `rows` (bidder, auction) pairs at a
/// time. A batch whose bids were already counted (its first commit's outcome
/// was lost, and it is run again) has a `last_seq` the row already holds, and
/// adds nothing.
fn sqlite_upsert_participations_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO participations (user_id, auction_id, max_amount, bid_count, last_seq) VALUES {values} \
         ON CONFLICT (user_id, auction_id) DO UPDATE SET max_amount = max(max_amount, excluded.max_amount), \
         bid_count = CASE WHEN excluded.last_seq > last_seq THEN bid_count + excluded.bid_count ELSE bid_count END, \
         last_seq = max(last_seq, excluded.last_seq)"
    )
}

/// `INSERT INTO idempotency_keys … VALUES …` for `rows` keys; a key already
/// stored (the batch is run again) is skipped.
fn sqlite_insert_keys_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint, kind, auction_id, seq, created_at_ms) \
         VALUES {values} ON CONFLICT (user_id, key) DO NOTHING"
    )
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// Runs `sql(n)` for the rows in chunks (`sqlite_chunk`), binding each row with `bind`.
async fn execute_chunked<T>(
    tx: &mut Transaction<'static, Sqlite>,
    rows: &[T],
    sql: fn(usize) -> String,
    bind: impl for<'q> Fn(SqliteQuery<'q>, &T) -> SqliteQuery<'q>,
) -> Result<(), sqlx::Error> {
    let mut remaining = rows;
    while !remaining.is_empty() {
        let (chunk, rest) = remaining.split_at(sqlite_chunk(remaining.len()));
        remaining = rest;
        let query = chunk.iter().fold(sqlx::query(sqlx::AssertSqlSafe(sql(chunk.len()))), &bind);
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

async fn write_sqlite(tx: &mut Transaction<'static, Sqlite>, batch: &[Write]) -> Result<(), sqlx::Error> {
    let all_bids: Vec<(Uuid, &BidPlaced)> = bids(batch).collect();
    execute_chunked(tx, &all_bids, sqlite_insert_bids_sql, |query, (auction_id, bid)| {
        query
            .bind(*auction_id)
            .bind(bid.seq as i64)
            .bind(bid.bidder.id)
            .bind(bid.amount.minor_units())
            .bind(bid.bidder_max.minor_units())
            .bind(bid.placed_at_ms)
            .bind(bid.current_price.minor_units())
            .bind(bid.leader.id)
            .bind(bid.end_at_ms)
    })
    .await?;
    execute_chunked(tx, &participations(batch), sqlite_upsert_participations_sql, |query, participation| {
        query
            .bind(participation.user_id)
            .bind(participation.auction_id)
            .bind(participation.max_amount)
            .bind(participation.bid_count)
            .bind(participation.last_seq)
    })
    .await?;
    let states = final_states(batch);
    execute_chunked(tx, &states, sqlite_update_auctions_sql, |query, state| {
        let leader = state.leader.as_ref();
        query
            .bind(state.id)
            .bind(state.current_price.minor_units())
            .bind(leader.map(|leader| leader.user.id))
            .bind(leader.map(|leader| leader.max_amount.minor_units()))
            .bind(state.bid_count as i64)
            .bind(state.seq as i64)
            .bind(state.winner.as_ref().map(|winner| winner.id))
            .bind(state.final_price.map(|price| price.minor_units()))
    })
    .await?;
    execute_chunked(tx, &states, sqlite_update_auction_ends_sql, |query, state| {
        query.bind(state.id).bind(state.status.as_str()).bind(state.end_at_ms)
    })
    .await?;
    let keys = keys(batch);
    execute_chunked(tx, &keys, sqlite_insert_keys_sql, |query, key| {
        query
            .bind(key.user_id)
            .bind(key.key)
            .bind(key.fingerprint)
            .bind(key.kind)
            .bind(key.auction_id)
            .bind(key.seq)
            .bind(key.created_at_ms)
    })
    .await?;
    // A key already stored for another write (the same key sent at once to
    // two auctions, on this node or another): this batch must not commit.
    let stored = "SELECT kind, auction_id, seq FROM idempotency_keys WHERE user_id = $1 AND key = $2";
    for key in &keys {
        let (kind, auction_id, seq): (String, Uuid, Option<i64>) =
            sqlx::query_as(stored).bind(key.user_id).bind(key.key).fetch_one(&mut **tx).await?;
        if kind != key.kind || auction_id != key.auction_id || seq != key.seq {
            return Err(sqlx::Error::Protocol(KEY_REUSED.to_owned()));
        }
    }
    Ok(())
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
/// An idempotency key already stored for another write (the same key sent at
/// once to two auctions, even through two nodes: the insert waits for the
/// other transaction's row) makes the statement fail with a cast of
/// "idempotency key reused" (a data error, not retried): nothing is written,
/// and the persistence actor sets the write at fault apart. A key stored for
/// the same write (the batch run again) matches and passes.
const POSTGRES_COMMIT: &str = "\
WITH named AS (SELECT * FROM UNNEST($1::int4[], $2::int8[]) AS n(shard, epoch)), \
held AS (SELECT s.shard FROM shard_leases s JOIN named n ON n.shard = s.shard AND n.epoch = s.epoch \
         WHERE s.owner = $3 ORDER BY s.shard FOR KEY SHARE OF s), \
verdict AS (SELECT count(*) = cardinality($1::int4[]) AS ok FROM held), \
new_bids AS ( \
    INSERT INTO bids (auction_id, seq, bidder_id, amount, max_amount, placed_at_ms, current_price, leader_id, end_at_ms) \
    SELECT b.* FROM UNNEST($4::uuid[], $5::int8[], $6::uuid[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], \
                           $11::uuid[], $12::int8[]) AS b \
    WHERE (SELECT ok FROM verdict) \
    ON CONFLICT (auction_id, seq) DO NOTHING), \
new_states AS ( \
    UPDATE auctions a SET status = u.status, current_price = u.current_price, leader_id = u.leader_id, \
        leader_max = u.leader_max, bid_count = u.bid_count, seq = u.seq, end_at_ms = u.end_at_ms, \
        winner_id = u.winner_id, final_price = u.final_price \
    FROM UNNEST($13::uuid[], $14::text[], $15::int8[], $16::uuid[], $17::int8[], $18::int8[], $19::int8[], \
                $20::int8[], $21::uuid[], $22::int8[]) \
        AS u(id, status, current_price, leader_id, leader_max, bid_count, seq, end_at_ms, winner_id, final_price) \
    WHERE a.id = u.id AND (SELECT ok FROM verdict)), \
new_keys AS ( \
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
    WHERE s.kind <> k.kind OR s.auction_id <> k.auction_id OR s.seq IS DISTINCT FROM k.seq), \
new_participations AS ( \
    INSERT INTO participations (user_id, auction_id, max_amount, bid_count, last_seq) \
    SELECT p.* FROM UNNEST($30::uuid[], $31::uuid[], $32::int8[], $33::int8[], $34::int8[]) AS p \
    WHERE (SELECT ok FROM verdict) \
    ON CONFLICT (user_id, auction_id) DO UPDATE SET \
        max_amount = GREATEST(participations.max_amount, EXCLUDED.max_amount), \
        bid_count = CASE WHEN EXCLUDED.last_seq > participations.last_seq \
                         THEN participations.bid_count + EXCLUDED.bid_count ELSE participations.bid_count END, \
        last_seq = GREATEST(participations.last_seq, EXCLUDED.last_seq)) \
SELECT CASE WHEN (SELECT n FROM reused) > 0 \
            THEN ('idempotency key reused: ' || (SELECT n FROM reused))::int > 0 \
            ELSE ok END \
FROM verdict";

async fn write_postgres(pool: &sqlx::PgPool, node_id: &str, batch: &[Write]) -> Result<bool, sqlx::Error> {
    let named = leases_named(batch);
    let all_bids: Vec<(Uuid, &BidPlaced)> = bids(batch).collect();
    let states = final_states(batch);
    let keys = keys(batch);
    let participations = participations(batch);
    sqlx::query_scalar(POSTGRES_COMMIT)
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
        .bind(participations.iter().map(|p| p.user_id).collect::<Vec<_>>())
        .bind(participations.iter().map(|p| p.auction_id).collect::<Vec<_>>())
        .bind(participations.iter().map(|p| p.max_amount).collect::<Vec<_>>())
        .bind(participations.iter().map(|p| p.bid_count).collect::<Vec<_>>())
        .bind(participations.iter().map(|p| p.last_seq).collect::<Vec<_>>())
        .fetch_one(pool)
        .await
}
