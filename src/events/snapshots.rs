//! Auction snapshots in Redis, for the nodes that do not own an auction.
//!
//! - **Writing.** The owner marks every committed event's auction dirty (in
//!   its actor: a map insert, no I/O). A task wakes on the first mark, waits
//!   `COALESCE` for more, and writes the latest state of each dirty auction in
//!   one pipeline: at most one write per auction per few milliseconds, and
//!   never an older state after a newer one (one writer, latest state wins).
//!   A snapshot also holds the auction's last ten bids and the fields the
//!   state does not (title, description, currency): the task keeps those per
//!   auction (`Known`, bounded) from the events, and reads them from the store
//!   only the first time it sees an auction or when it missed one of its bids.
//! - **Reading.** `current` reads the snapshot, then the store's `seq` and
//!   status of the auction (a primary-key read of two columns), and answers
//!   from the snapshot only when they match: a snapshot may lag a commit that
//!   another node has already acknowledged, and a read after a `201` must show
//!   the bid. Otherwise, and while Redis is down, the auction comes from the
//!   store as before. `gavel_snapshot_reads_total{source}` counts both.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::interfaces::KeysInterface;
use fred::prelude::{Client, Expiration};
use fred::types::Value as RedisValue;
use gavel_actors::ports::{Clock, shard_of};
use gavel_actors::shards::Leases;
use gavel_actors::{AuctionId, AuctionState, BidPlaced, Event};
use tokio::sync::Notify;
use tracing::warn;

use super::wire::{AuctionSnapshot, EVENTS_VERSION, SnapshotBid};
use crate::storage::{AuctionRow, BidRow, Db};
use crate::telemetry;

/// Bids a snapshot holds (the WebSocket `snapshot`'s `recent_bids`).
pub const RECENT_BIDS: usize = 10;
/// How long the writer gathers marks before a pipeline.
const COALESCE: Duration = Duration::from_millis(5);
/// A snapshot not refreshed for this long leaves Redis.
const KEEP: Duration = Duration::from_secs(3_600);
/// Auctions whose title and recent bids the writer keeps.
const KNOWN_AUCTIONS: usize = 10_000;
/// Auctions waiting for their write; past it a mark is dropped (and the
/// writer forgets what it kept, so every auction is read afresh).
const DIRTY_AUCTIONS: usize = 100_000;
/// A read's deadline: past it the store answers instead.
const READ_TIMEOUT: Duration = Duration::from_millis(250);
/// A write pipeline's deadline, and the store reads' of the writer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Snapshots {
    client: Client,
    /// `gavel:<database id>:snapshot:`; the auction id completes a key.
    prefix: String,
    node_id: String,
    leases: Arc<Leases>,
    clock: Arc<dyn Clock>,
    db: Db,
    dirty: Mutex<Dirty>,
    wake: Notify,
}

#[derive(Default)]
struct Dirty {
    pending: HashMap<AuctionId, Pending>,
    overflowed: bool,
}

/// An auction's latest committed state, and its bids since the last write.
struct Pending {
    state: AuctionState,
    /// Oldest first, at most `RECENT_BIDS`.
    bids: VecDeque<SnapshotBid>,
}

/// What the writer keeps of an auction between writes.
struct Known {
    title: String,
    description: String,
    currency: String,
    seq: u64,
    /// Oldest first: the last `min(seq, RECENT_BIDS)` bids.
    recent: VecDeque<SnapshotBid>,
}

fn snapshot_bid(bid: &BidPlaced) -> SnapshotBid {
    SnapshotBid {
        seq: bid.seq,
        bidder: bid.bidder.clone(),
        amount: bid.amount.minor_units(),
        max_amount: bid.bidder_max.minor_units(),
        placed_at_ms: bid.placed_at_ms,
        current_price: bid.current_price.minor_units(),
        leader: bid.leader.clone(),
        end_at_ms: bid.end_at_ms,
    }
}

fn stored_bid(row: &BidRow) -> SnapshotBid {
    SnapshotBid {
        seq: row.seq as u64,
        bidder: gavel_actors::UserRef { id: row.bidder_id, username: row.bidder_username.as_str().into() },
        amount: row.amount,
        max_amount: row.max_amount,
        placed_at_ms: row.placed_at_ms,
        current_price: row.current_price,
        leader: gavel_actors::UserRef { id: row.leader_id, username: row.leader_username.as_str().into() },
        end_at_ms: row.end_at_ms,
    }
}

fn bid_row(auction_id: AuctionId, bid: &SnapshotBid) -> BidRow {
    BidRow {
        auction_id,
        seq: bid.seq as i64,
        bidder_id: bid.bidder.id,
        bidder_username: bid.bidder.username.to_string(),
        amount: bid.amount,
        max_amount: bid.max_amount,
        placed_at_ms: bid.placed_at_ms,
        current_price: bid.current_price,
        leader_id: bid.leader.id,
        leader_username: bid.leader.username.to_string(),
        end_at_ms: bid.end_at_ms,
    }
}

/// The auction's row as the store would give it at the snapshot's `seq`.
pub fn auction_row(snapshot: &AuctionSnapshot) -> AuctionRow {
    let state = &snapshot.state;
    AuctionRow {
        id: state.id,
        seller_id: state.seller.id,
        seller_username: state.seller.username.to_string(),
        title: snapshot.title.clone(),
        description: snapshot.description.clone(),
        currency: snapshot.currency.clone(),
        starting_price: state.terms.starting_price.minor_units(),
        reserve_price: state.terms.reserve_price.map(|price| price.minor_units()),
        min_increment: state.terms.min_increment.minor_units(),
        soft_close_secs: state.terms.soft_close_secs as i32,
        start_at_ms: state.start_at_ms,
        end_at_ms: state.end_at_ms,
        status: state.status.as_str().to_owned(),
        current_price: state.current_price.minor_units(),
        leader_id: state.leader.as_ref().map(|leader| leader.user.id),
        leader_username: state.leader.as_ref().map(|leader| leader.user.username.to_string()),
        leader_max: state.leader.as_ref().map(|leader| leader.max_amount.minor_units()),
        bid_count: state.bid_count as i64,
        seq: state.seq as i64,
        winner_id: state.winner.as_ref().map(|winner| winner.id),
        winner_username: state.winner.as_ref().map(|winner| winner.username.to_string()),
        final_price: state.final_price.map(|price| price.minor_units()),
    }
}

/// Whether `recent` is exactly the last `min(seq, RECENT_BIDS)` bids up to `seq`.
fn complete(recent: &VecDeque<SnapshotBid>, seq: u64) -> bool {
    let wanted = seq.min(RECENT_BIDS as u64);
    recent.len() as u64 == wanted && recent.iter().zip(seq + 1 - wanted..).all(|(bid, expected)| bid.seq == expected)
}

/// Brings what is kept of the auction up to `seq` with its new `bids`, if
/// they follow on from it (or make up the last ones by themselves). Whether
/// `known` now holds the auction at `seq`; if not, it holds nothing of it.
fn follow(
    known: &mut HashMap<AuctionId, Known>,
    auction_id: AuctionId,
    bids: &VecDeque<SnapshotBid>,
    seq: u64,
) -> bool {
    let Some(kept) = known.get_mut(&auction_id) else {
        return false;
    };
    if bids.front().is_none_or(|first| first.seq == kept.seq + 1) {
        kept.recent.extend(bids.iter().cloned());
        while kept.recent.len() > RECENT_BIDS {
            kept.recent.pop_front();
        }
    } else {
        kept.recent.clone_from(bids);
    }
    kept.seq = seq;
    if complete(&kept.recent, seq) {
        return true;
    }
    known.remove(&auction_id);
    false
}

impl Snapshots {
    pub fn new(
        client: Client,
        database_id: &str,
        node_id: String,
        leases: Arc<Leases>,
        clock: Arc<dyn Clock>,
        db: Db,
    ) -> Arc<Snapshots> {
        let snapshots = Arc::new(Snapshots {
            client,
            prefix: format!("gavel:{database_id}:snapshot:"),
            node_id,
            leases,
            clock,
            db,
            dirty: Mutex::new(Dirty::default()),
            wake: Notify::new(),
        });
        tokio::spawn(snapshots.clone().write_dirty());
        snapshots
    }

    fn key(&self, auction_id: AuctionId) -> String {
        format!("{}{auction_id}", self.prefix)
    }

    /// Marks the auction of a committed event for a write. Runs in the
    /// auction's actor: no I/O, never waits beyond a short lock.
    pub fn mark(&self, event: &Event, state: &AuctionState) {
        let mut dirty = self.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if dirty.pending.len() >= DIRTY_AUCTIONS && !dirty.pending.contains_key(&state.id) {
            dirty.overflowed = true;
            metrics::counter!(telemetry::SNAPSHOT_WRITES_TOTAL, "outcome" => "dropped").increment(1);
            return;
        }
        let pending = dirty
            .pending
            .entry(state.id)
            .and_modify(|pending| pending.state.clone_from(state))
            .or_insert_with(|| Pending { state: state.clone(), bids: VecDeque::new() });
        if let Event::BidPlaced(bid) = event {
            if pending.bids.len() == RECENT_BIDS {
                pending.bids.pop_front();
            }
            pending.bids.push_back(snapshot_bid(bid));
        }
        drop(dirty);
        self.wake.notify_one();
    }

    /// Writes what is marked, a pipeline every `COALESCE` at most.
    async fn write_dirty(self: Arc<Self>) {
        let mut known: HashMap<AuctionId, Known> = HashMap::new();
        loop {
            self.wake.notified().await;
            tokio::time::sleep(COALESCE).await;
            let Dirty { pending, overflowed } =
                std::mem::take(&mut *self.dirty.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            if overflowed {
                known.clear();
            }
            // Only the owner writes; a shard that moved is the new owner's.
            let mut owned = Vec::with_capacity(pending.len());
            for (auction_id, pending) in pending {
                match self.leases.epoch_of(shard_of(auction_id)) {
                    Some(epoch) => owned.push((auction_id, epoch, pending)),
                    None => {
                        known.remove(&auction_id);
                    }
                }
            }
            // What is kept follows on with the new bids, or is read afresh.
            let unknown: Vec<(AuctionId, &Pending)> = owned
                .iter()
                .filter(|(auction_id, _, pending)| !follow(&mut known, *auction_id, &pending.bids, pending.state.seq))
                .map(|(auction_id, _, pending)| (*auction_id, pending))
                .collect();
            if !unknown.is_empty() {
                self.learn(&mut known, &unknown).await;
            }
            let pipeline = self.client.pipeline();
            let mut count = 0u64;
            for (auction_id, epoch, pending) in owned {
                let Some(kept) = known.get(&auction_id).filter(|kept| kept.seq == pending.state.seq) else {
                    continue;
                };
                let snapshot = AuctionSnapshot {
                    version: EVENTS_VERSION,
                    node: self.node_id.clone(),
                    epoch,
                    written_at_ms: self.clock.now_ms(),
                    title: kept.title.clone(),
                    description: kept.description.clone(),
                    currency: kept.currency.clone(),
                    state: pending.state,
                    recent_bids: kept.recent.iter().rev().cloned().collect(),
                };
                let Ok(bytes) = rmp_serde::to_vec_named(&snapshot) else { continue };
                let expiry = Some(Expiration::PX(KEEP.as_millis() as i64));
                // Queued in the pipeline; sent by `all` below.
                let _: Result<(), _> =
                    pipeline.set(self.key(auction_id), RedisValue::Bytes(bytes.into()), expiry, None, false).await;
                count += 1;
            }
            if count == 0 {
                continue;
            }
            let outcome = match tokio::time::timeout(WRITE_TIMEOUT, pipeline.all::<Vec<RedisValue>>()).await {
                Ok(Ok(_)) => "written",
                Ok(Err(error)) => {
                    tracing::debug!(%error, count, "writing snapshots to Redis failed");
                    "failed"
                }
                Err(_) => "failed",
            };
            metrics::counter!(telemetry::SNAPSHOT_WRITES_TOTAL, "outcome" => outcome).increment(count);
        }
    }

    /// Reads from the store what is not kept of these auctions: their texts
    /// in one query, and their last bids where the new ones do not make
    /// them up (an auction first seen past its tenth bid). An auction not
    /// learnt gets no snapshot this time (counted as failed).
    async fn learn(&self, known: &mut HashMap<AuctionId, Known>, unknown: &[(AuctionId, &Pending)]) {
        let ids: Vec<AuctionId> = unknown.iter().map(|(auction_id, _)| *auction_id).collect();
        let texts = match tokio::time::timeout(WRITE_TIMEOUT, self.db.auction_texts(&ids)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(error)) => {
                warn!(%error, auctions = ids.len(), "reading auctions for their snapshots");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let mut texts: HashMap<AuctionId, (String, String, String)> =
            texts.into_iter().map(|(id, title, description, currency)| (id, (title, description, currency))).collect();
        let mut learnt = 0;
        for (auction_id, pending) in unknown {
            let seq = pending.state.seq;
            let Some((title, description, currency)) = texts.remove(auction_id) else { continue };
            let recent = if complete(&pending.bids, seq) {
                pending.bids.clone()
            } else {
                let read = self.db.bids(*auction_id, seq as i64 + 1, RECENT_BIDS as u32);
                match tokio::time::timeout(WRITE_TIMEOUT, read).await {
                    Ok(Ok(stored)) => stored.iter().rev().map(stored_bid).collect(),
                    Ok(Err(error)) => {
                        warn!(%error, %auction_id, "reading an auction's bids for its snapshot");
                        continue;
                    }
                    Err(_) => continue,
                }
            };
            if !complete(&recent, seq) {
                // The store holds fewer bids than `seq` says: not a state to show.
                warn!(%auction_id, seq, "the store's bids do not match a committed state; no snapshot");
                continue;
            }
            if known.len() >= KNOWN_AUCTIONS
                && let Some(victim) = known.keys().next().copied()
            {
                known.remove(&victim);
            }
            known.insert(*auction_id, Known { title, description, currency, seq, recent });
            learnt += 1;
        }
        let missed = (unknown.len() - learnt) as u64;
        if missed > 0 {
            metrics::counter!(telemetry::SNAPSHOT_WRITES_TOTAL, "outcome" => "failed").increment(missed);
        }
    }

    /// The auction's snapshot, if Redis has one of this version in time.
    pub async fn read(&self, auction_id: AuctionId) -> Option<AuctionSnapshot> {
        let get = self.client.get::<RedisValue, _>(self.key(auction_id));
        let value = tokio::time::timeout(READ_TIMEOUT, get).await.ok()?.ok()?;
        let snapshot: AuctionSnapshot = rmp_serde::from_slice(value.as_bytes()?).ok()?;
        (snapshot.version == EVENTS_VERSION && snapshot.state.id == auction_id).then_some(snapshot)
    }
}

/// An auction as committed, with its last bids (newest first) when asked for.
pub struct Current {
    pub row: AuctionRow,
    pub recent_bids: Vec<BidRow>,
}

/// The auction as committed: from its Redis snapshot when that is the
/// store's latest (`seq` and status match), from the store otherwise.
pub async fn current(
    db: &Db,
    snapshots: Option<&Snapshots>,
    auction_id: AuctionId,
    with_bids: bool,
) -> Result<Option<Current>, sqlx::Error> {
    // The store's version is asked for only when there is a snapshot to
    // check: an auction without one (never bid on, or Redis restarted) costs
    // the store one read, as without Redis.
    if let Some(snapshot) = snapshots.map(|snapshots| snapshots.read(auction_id)) {
        let Some(snapshot) = snapshot.await else {
            return from_store(db, auction_id, with_bids).await;
        };
        let Some((seq, status)) = db.auction_version(auction_id).await? else {
            return Ok(None);
        };
        if snapshot.state.seq as i64 == seq && snapshot.state.status.as_str() == status {
            metrics::counter!(telemetry::SNAPSHOT_READS_TOTAL, "source" => "redis").increment(1);
            let recent_bids = if with_bids {
                snapshot.recent_bids.iter().map(|bid| bid_row(auction_id, bid)).collect()
            } else {
                Vec::new()
            };
            return Ok(Some(Current { row: auction_row(&snapshot), recent_bids }));
        }
    }
    from_store(db, auction_id, with_bids).await
}

async fn from_store(db: &Db, auction_id: AuctionId, with_bids: bool) -> Result<Option<Current>, sqlx::Error> {
    metrics::counter!(telemetry::SNAPSHOT_READS_TOTAL, "source" => "store").increment(1);
    let Some(row) = db.auction(auction_id).await? else {
        return Ok(None);
    };
    let recent_bids = if with_bids { db.bids(auction_id, row.seq + 1, RECENT_BIDS as u32).await? } else { Vec::new() };
    Ok(Some(Current { row, recent_bids }))
}

#[cfg(test)]
mod tests {
    use gavel_actors::UserRef;

    use super::*;

    fn bid(seq: u64) -> SnapshotBid {
        let user = UserRef { id: uuid::Uuid::nil(), username: "bob".into() };
        SnapshotBid {
            seq,
            bidder: user.clone(),
            amount: 100 + seq as i64,
            max_amount: 100 + seq as i64,
            placed_at_ms: 1,
            current_price: 100 + seq as i64,
            leader: user,
            end_at_ms: 2,
        }
    }

    #[test]
    fn recent_bids_are_complete_only_when_they_end_at_seq_without_holes() {
        let of = |seqs: &[u64]| seqs.iter().copied().map(bid).collect::<VecDeque<_>>();
        assert!(complete(&of(&[]), 0));
        assert!(complete(&of(&[1, 2, 3]), 3));
        assert!(!complete(&of(&[1, 2]), 3), "one missing at the end");
        assert!(!complete(&of(&[1, 3]), 3), "a hole");
        assert!(!complete(&of(&[2, 3]), 3), "the first missing");
        assert!(complete(&of(&(3..=12).collect::<Vec<_>>()), 12), "the last ten of twelve");
        assert!(!complete(&of(&(4..=12).collect::<Vec<_>>()), 12), "nine of the last ten");
    }

    #[test]
    fn what_is_kept_follows_new_bids_and_is_dropped_after_a_missed_one() {
        let of = |seqs: std::ops::RangeInclusive<u64>| seqs.map(bid).collect::<VecDeque<_>>();
        let id = uuid::Uuid::now_v7();
        let mut known = HashMap::new();
        assert!(!follow(&mut known, id, &of(1..=1), 1), "nothing kept yet");
        let text = || "t".to_owned();
        known.insert(id, Known { title: text(), description: text(), currency: text(), seq: 3, recent: of(1..=3) });
        assert!(follow(&mut known, id, &of(4..=12), 12));
        assert_eq!(known[&id].recent, of(3..=12), "the last ten");
        assert!(follow(&mut known, id, &VecDeque::new(), 12), "an end or a cancel: no new bid");
        assert!(
            follow(&mut known, id, &of(4..=13), 13),
            "ten new bids (a mark keeps ten) make the last ten by themselves"
        );
        assert_eq!(known[&id].recent, of(4..=13));
        assert!(!follow(&mut known, id, &of(15..=15), 15), "14 was missed");
        assert!(!known.contains_key(&id), "and the auction is read afresh");
    }

    #[test]
    fn a_snapshot_gives_back_the_row_it_was_made_from() {
        let mut state = crate::events::tests::auction();
        let bidder = UserRef { id: uuid::Uuid::now_v7(), username: "bob".into() };
        let command = gavel_actors::Command::PlaceBid(gavel_actors::BidCommand {
            bidder,
            amount: gavel_actors::Money::parse(150).unwrap(),
            max_amount: Some(gavel_actors::Money::parse(400).unwrap()),
        });
        let Event::BidPlaced(placed) = state.apply(command, 10).unwrap() else { panic!("a bid") };
        let snapshot = AuctionSnapshot {
            version: EVENTS_VERSION,
            node: "a".to_owned(),
            epoch: 1,
            written_at_ms: 11,
            title: "Lamp".to_owned(),
            description: "brass".to_owned(),
            currency: "EUR".to_owned(),
            state: state.clone(),
            recent_bids: vec![snapshot_bid(&placed)],
        };
        let bytes = rmp_serde::to_vec_named(&snapshot).unwrap();
        let decoded: AuctionSnapshot = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(decoded, snapshot);
        let row = auction_row(&decoded);
        assert_eq!(row.to_state().unwrap(), state, "the row holds exactly the state");
        assert_eq!((row.title.as_str(), row.currency.as_str(), row.seq), ("Lamp", "EUR", 1));
        let bid = bid_row(state.id, &decoded.recent_bids[0]);
        assert_eq!((bid.seq, bid.amount, bid.max_amount, bid.leader_id), (1, 150, 400, placed.leader.id));
        assert_eq!(stored_bid(&bid), decoded.recent_bids[0], "a stored bid and an event's agree");
    }
}
