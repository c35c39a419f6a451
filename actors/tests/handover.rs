//! The actors against an in-memory store that fences by epoch, on tokio's
//! paused clock: handover, fencing, retries and lease trust, each in a few
//! milliseconds and the same every run. The store is the safety net the real
//! one is (an epoch check inside every commit); the tests check that the
//! actors answer exactly what the store made durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gavel_actors::node::{Node, NodeError, NodeSettings};
use gavel_actors::outcome::{Unavailable, WriteOutcome};
use gavel_actors::ports::{BoxFuture, Clock, DueAuction, LoadedAuction, NoEvents, Store, StoreError, Write};
use gavel_actors::shards::{Leases, ShardLease, shard_of};
use gavel_actors::{AuctionId, AuctionState, BidCommand, Money, Status, Terms, TimestampMs, UserRef};
use tokio::sync::Semaphore;
use uuid::Uuid;

const NOW_MS: TimestampMs = 1_800_000_000_000;
/// Permits of the commit gate: far more than commits in any test.
const GATE_PERMITS: u32 = 1 << 20;

struct FixedClock(AtomicI64);

impl Clock for FixedClock {
    fn now_ms(&self) -> TimestampMs {
        self.0.load(Ordering::Relaxed)
    }
}

/// Auctions, and each shard's current lease epoch, in memory. A commit
/// waits for a permit of `gate` (tests hold commits in flight by taking them
/// all), fails while `failures_left` is above zero, and is refused whole for
/// the shards whose epoch moved on.
struct MemoryStore {
    auctions: Mutex<HashMap<AuctionId, AuctionState>>,
    bids: Mutex<Vec<(AuctionId, u64)>>,
    epochs: Mutex<HashMap<u32, i64>>,
    gate: Semaphore,
    failures_left: AtomicUsize,
    commits: AtomicUsize,
    /// The next commit panics (a bug in the store adapter).
    panic_next: std::sync::atomic::AtomicBool,
    /// Any batch with a bid of this user is refused as invalid (a deleted user).
    invalid_bidder: Mutex<Option<Uuid>>,
    /// A commit with a write of this auction waits for a permit of
    /// `held_gate` (a stalled commit: a row lock, a paused database backend).
    held_auction: Mutex<Option<AuctionId>>,
    held_gate: Semaphore,
    /// The next commit is made, but its answer is lost (a broken connection)
    /// and another node takes over the batch's shards before any retry.
    lose_answer_then_move_leases: std::sync::atomic::AtomicBool,
    /// The name of the thread each commit ran on, in order.
    commit_threads: Mutex<Vec<Option<String>>>,
}

impl MemoryStore {
    fn new() -> Arc<MemoryStore> {
        Arc::new(MemoryStore {
            auctions: Mutex::default(),
            bids: Mutex::default(),
            epochs: Mutex::default(),
            gate: Semaphore::new(GATE_PERMITS as usize),
            failures_left: AtomicUsize::new(0),
            commits: AtomicUsize::new(0),
            panic_next: std::sync::atomic::AtomicBool::new(false),
            invalid_bidder: Mutex::new(None),
            held_auction: Mutex::new(None),
            held_gate: Semaphore::new(0),
            lose_answer_then_move_leases: std::sync::atomic::AtomicBool::new(false),
            commit_threads: Mutex::default(),
        })
    }

    fn stored_seqs(&self, auction_id: AuctionId) -> Vec<u64> {
        self.bids.lock().unwrap().iter().filter(|(id, _)| *id == auction_id).map(|(_, seq)| *seq).collect()
    }
}

impl Store for MemoryStore {
    fn load_auction(&self, id: AuctionId) -> BoxFuture<'_, Result<Option<LoadedAuction>, StoreError>> {
        let found = self.auctions.lock().unwrap().get(&id).cloned();
        Box::pin(async move { Ok(found.map(|state| LoadedAuction { state, recent_keys: Vec::new() })) })
    }

    fn commit<'a>(&'a self, batch: &'a [Write]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.commit_threads.lock().unwrap().push(std::thread::current().name().map(str::to_owned));
            let held = *self.held_auction.lock().unwrap();
            if batch.iter().any(|write| Some(write.auction.id) == held) {
                // One permit lets one held commit through (the permit is used up).
                self.held_gate.acquire().await.expect("gate open").forget();
            }
            let _permit = self.gate.acquire().await.expect("gate open");
            assert!(!self.panic_next.swap(false, Ordering::AcqRel), "a bug in the store adapter");
            if self.failures_left.load(Ordering::Acquire) > 0 {
                self.failures_left.fetch_sub(1, Ordering::AcqRel);
                return Err(StoreError::Unavailable("injected failure".to_owned()));
            }
            let invalid = *self.invalid_bidder.lock().unwrap();
            if batch.iter().any(|write| write.bid.as_ref().is_some_and(|bid| Some(bid.bidder.id) == invalid)) {
                return Err(StoreError::Invalid("foreign key: no such user".to_owned()));
            }
            let epochs = self.epochs.lock().unwrap();
            let mut fenced: Vec<ShardLease> = batch
                .iter()
                .filter(|write| epochs.get(&write.lease.shard) != Some(&write.lease.epoch))
                .map(|write| write.lease)
                .collect();
            if !fenced.is_empty() {
                fenced.sort_by_key(|lease| (lease.shard, lease.epoch));
                fenced.dedup();
                return Err(StoreError::Fenced { leases: fenced });
            }
            drop(epochs);
            for write in batch {
                self.auctions.lock().unwrap().insert(write.auction.id, write.auction.clone());
                if let Some(bid) = &write.bid {
                    self.bids.lock().unwrap().push((write.auction.id, bid.seq));
                }
            }
            self.commits.fetch_add(1, Ordering::AcqRel);
            if self.lose_answer_then_move_leases.swap(false, Ordering::AcqRel) {
                let shards: std::collections::HashSet<u32> = batch.iter().map(|write| write.lease.shard).collect();
                let mut epochs = self.epochs.lock().unwrap();
                for shard in shards {
                    *epochs.entry(shard).or_default() += 1;
                }
                return Err(StoreError::Unavailable("connection reset by peer".to_owned()));
            }
            Ok(())
        })
    }

    fn due_auctions(
        &self,
        horizon_ms: TimestampMs,
        after: Option<DueAuction>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DueAuction>, StoreError>> {
        let mut due: Vec<DueAuction> = self
            .auctions
            .lock()
            .unwrap()
            .values()
            .filter_map(|auction| {
                let at_ms = match auction.status {
                    Status::Scheduled => auction.start_at_ms,
                    Status::Active => auction.end_at_ms,
                    Status::Ended | Status::Cancelled => return None,
                };
                Some(DueAuction { at_ms, id: auction.id })
            })
            .filter(|due| due.at_ms <= horizon_ms && after.is_none_or(|after| *due > after))
            .collect();
        due.sort_unstable();
        due.truncate(limit as usize);
        Box::pin(async move { Ok(due) })
    }
}

struct Harness {
    clock: Arc<FixedClock>,
    store: Arc<MemoryStore>,
    leases: Arc<Leases>,
    node: Arc<Node>,
    auction_id: AuctionId,
    shard: u32,
}

fn user(name: &str) -> UserRef {
    UserRef { id: Uuid::now_v7(), username: name.into() }
}

fn money(minor_units: i64) -> Money {
    Money::parse(minor_units).unwrap()
}

/// An active auction with no bids, starting price 100, increment 10.
fn open_auction(auction_id: AuctionId) -> AuctionState {
    AuctionState {
        id: auction_id,
        seller: user("sally"),
        terms: Terms { starting_price: money(100), reserve_price: None, min_increment: money(10), soft_close_secs: 0 },
        start_at_ms: NOW_MS - 1_000,
        end_at_ms: NOW_MS + 3_600_000,
        status: Status::Active,
        current_price: money(100),
        leader: None,
        bid_count: 0,
        seq: 0,
        winner: None,
        final_price: None,
    }
}

async fn harness() -> Harness {
    harness_with(NodeSettings { call_timeout: Duration::from_secs(5), ..NodeSettings::default() }).await
}

async fn harness_with(settings: NodeSettings) -> Harness {
    let store = MemoryStore::new();
    let auction_id = Uuid::now_v7();
    let shard = shard_of(auction_id);
    store.auctions.lock().unwrap().insert(auction_id, open_auction(auction_id));
    store.epochs.lock().unwrap().insert(shard, 1);
    let leases = Arc::new(Leases::none());
    leases.grant(shard, 1);
    let clock = Arc::new(FixedClock(AtomicI64::new(NOW_MS)));
    let node = Node::start(settings, clock.clone(), store.clone(), Arc::new(NoEvents), leases.clone()).await.unwrap();
    Harness { clock, store, leases, node, auction_id, shard }
}

impl Harness {
    async fn bid(&self, amount: i64) -> Result<WriteOutcome, NodeError> {
        let command = BidCommand { bidder: user("bidder"), amount: money(amount), max_amount: None };
        self.node.place_bid(self.auction_id, command, None).await
    }

    fn spawn_bid(&self, amount: i64) -> tokio::task::JoinHandle<Result<WriteOutcome, NodeError>> {
        let node = self.node.clone();
        let auction_id = self.auction_id;
        tokio::spawn(async move {
            let command = BidCommand { bidder: user("bidder"), amount: money(amount), max_amount: None };
            node.place_bid(auction_id, command, None).await
        })
    }

    /// A second auction, open for bids, under a lease of this node.
    fn another_auction(&self) -> AuctionId {
        let id = Uuid::now_v7();
        self.store.auctions.lock().unwrap().insert(id, open_auction(id));
        self.store.epochs.lock().unwrap().insert(shard_of(id), 1);
        self.leases.grant(shard_of(id), 1);
        id
    }

    fn spawn_bid_on(
        &self,
        auction_id: AuctionId,
        bidder: UserRef,
        amount: i64,
    ) -> tokio::task::JoinHandle<Result<WriteOutcome, NodeError>> {
        let node = self.node.clone();
        tokio::spawn(async move {
            let command = BidCommand { bidder, amount: money(amount), max_amount: None };
            node.place_bid(auction_id, command, None).await
        })
    }

    /// Holds every commit until `release`.
    async fn hold_commits(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.store.gate.acquire_many(GATE_PERMITS).await.unwrap()
    }
}

fn accepted_seq(outcome: &Result<WriteOutcome, NodeError>) -> Option<u64> {
    match outcome {
        Ok(WriteOutcome::Accepted { event: gavel_actors::Event::BidPlaced(placed) }) => Some(placed.seq),
        _ => None,
    }
}

/// Lets every task that can run, run (the clock is paused: this takes no time).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Lets tasks run until `condition` holds, for at most 10 s of the paused
/// clock (an actor's passivation finishes some turns after it is asked for).
async fn settle_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within 10 s");
        settle().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_handed_over_shard_answers_its_writes_in_flight_then_stops() {
    let harness = harness().await;
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));

    let held = harness.hold_commits().await;
    let in_flight = harness.spawn_bid(200);
    settle().await;
    assert_eq!(harness.node.persistence_queue.in_use(), 1, "the bid waits for its commit");

    // Hand over: no more writes for the shard, then wait for what is in flight.
    assert_eq!(harness.leases.revoke(harness.shard), Some(1));
    let node = harness.node.clone();
    let shard = harness.shard;
    let retiring = tokio::spawn(async move { node.retire_shard(ShardLease { shard, epoch: 1 }).await });
    settle().await;
    assert_eq!(
        harness.bid(300).await,
        Err(NodeError::Unavailable(Unavailable::NotOwner { shard })),
        "a handed-over shard takes no new write"
    );
    assert!(!retiring.is_finished(), "retiring waits for the write in flight");

    drop(held);
    assert_eq!(accepted_seq(&in_flight.await.unwrap()), Some(2), "the write in flight is answered: durable");
    retiring.await.unwrap();
    assert_eq!(harness.node.live_auctions(), 0, "the auction's actor stopped");
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2]);
}

/// The node loses a shard and takes it again (a new epoch) while an
/// auction's actor of the lost lease still has a write in flight: the next
/// bid waits for that actor to finish and stop, and is taken by a fresh actor
/// under the lease held now, rather than refused as if the node did not own
/// the shard.
#[tokio::test(start_paused = true)]
async fn a_shard_taken_again_takes_bids_once_the_old_leases_actor_has_finished() {
    let harness = harness().await;
    let held = harness.hold_commits().await;
    let in_flight = harness.spawn_bid(100);
    settle().await;
    // Lost, and retired in the background, as the lease manager does.
    assert_eq!(harness.leases.revoke(harness.shard), Some(1));
    let node = harness.node.clone();
    let lost = ShardLease { shard: harness.shard, epoch: 1 };
    let retiring = tokio::spawn(async move { node.retire_shard(lost).await });
    settle().await;
    // Taken again at the next epoch before the write in flight is settled.
    harness.store.epochs.lock().unwrap().insert(harness.shard, 2);
    harness.leases.grant(harness.shard, 2);
    let next = harness.spawn_bid(200);
    settle().await;
    assert!(!next.is_finished(), "it waits for the old lease's actor");

    drop(held);
    assert_eq!(in_flight.await.unwrap(), Ok(WriteOutcome::Unavailable(Unavailable::WriteRefused)), "fenced");
    assert_eq!(accepted_seq(&next.await.unwrap()), Some(1), "taken under the lease held now");
    retiring.await.unwrap();
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1]);
    assert_eq!(harness.node.live_auctions(), 1, "the fresh actor goes on");
    assert_eq!(accepted_seq(&harness.bid(300).await), Some(2));
}

/// Retiring a lost lease late, after the node took the shard again, leaves
/// the actors of the new lease alone.
#[tokio::test(start_paused = true)]
async fn retiring_a_lost_lease_leaves_the_actors_of_the_shards_new_one() {
    let harness = harness().await;
    harness.store.epochs.lock().unwrap().insert(harness.shard, 2);
    harness.leases.grant(harness.shard, 2);
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));

    harness.node.retire_shard(ShardLease { shard: harness.shard, epoch: 1 }).await;
    settle().await;
    assert_eq!(harness.node.live_auctions(), 1, "the actor under epoch 2 goes on");
    assert_eq!(accepted_seq(&harness.bid(200).await), Some(2));
}

#[tokio::test(start_paused = true)]
async fn writes_under_a_stale_epoch_are_refused_and_never_acknowledged() {
    let harness = harness().await;
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));
    let held = harness.hold_commits().await;
    let first = harness.spawn_bid(200);
    let second = harness.spawn_bid(300);
    settle().await;
    // Another node takes the shard over (its epoch rises) while both wait.
    harness.store.epochs.lock().unwrap().insert(harness.shard, 2);
    drop(held);
    for outcome in [first.await.unwrap(), second.await.unwrap()] {
        assert_eq!(outcome, Ok(WriteOutcome::Unavailable(Unavailable::WriteRefused)), "not accepted");
    }
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1], "nothing of the stale owner was written");
    settle().await;
    assert_eq!(harness.node.live_auctions(), 0, "its state was ahead of the store: the actor stopped");
    assert_eq!(harness.node.persistence_queue.in_use(), 0, "the refused writes freed their queue slots");
    assert_eq!(harness.leases.epoch_of(harness.shard), None, "the node dropped the shard");
    assert_eq!(
        harness.bid(400).await,
        Err(NodeError::Unavailable(Unavailable::NotOwner { shard: harness.shard })),
        "no auction of the shard takes another write"
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_whose_commit_lost_its_answer_before_the_lease_moved_is_answered_unknown_not_refused() {
    let harness = harness().await;
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));
    // The next commit is made but its answer is lost, and another node takes
    // the shard over before the retry, which the store then fences.
    harness.store.lose_answer_then_move_leases.store(true, Ordering::Release);
    let lost = harness.spawn_bid(200);
    settle().await;
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2], "the attempt that lost its answer was made");
    // Applied while the commit waits for its retry: it goes in the next commit.
    let behind = harness.spawn_bid(300);
    settle().await;
    assert_eq!(
        lost.await.unwrap(),
        Ok(WriteOutcome::Unknown),
        "it stands in the store: its bidder must not be told it was not accepted"
    );
    assert_eq!(
        behind.await.unwrap(),
        Ok(WriteOutcome::Unavailable(Unavailable::WriteRefused)),
        "never in an attempt that could have been made: not accepted"
    );
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2]);
    settle().await;
    assert_eq!(harness.node.live_auctions(), 0, "its state was ahead of the store: the actor stopped");
    assert_eq!(harness.node.persistence_queue.in_use(), 0, "every write freed its queue slot");
    assert_eq!(harness.leases.epoch_of(harness.shard), None, "the node dropped the shard");
}

/// Past `max_live_auctions`, each activation passivates an idle actor, the
/// one written to least recently; its auction takes its next bid from the
/// store's state. An actor with a write in flight stays until it is durable.
#[tokio::test(start_paused = true)]
async fn past_the_live_bound_the_actor_written_to_least_recently_makes_room() {
    let settings =
        NodeSettings { max_live_auctions: 2, call_timeout: Duration::from_secs(5), ..NodeSettings::default() };
    let harness = harness_with(settings).await;
    let (first, second, third) = (harness.auction_id, harness.another_auction(), harness.another_auction());
    let bid_on = |auction_id, amount| harness.spawn_bid_on(auction_id, user("bidder"), amount);
    let later = || harness.clock.0.fetch_add(1_000, Ordering::Relaxed);
    assert_eq!(accepted_seq(&bid_on(first, 100).await.unwrap()), Some(1));
    later();
    assert_eq!(accepted_seq(&bid_on(second, 100).await.unwrap()), Some(1));
    later();
    assert_eq!(accepted_seq(&bid_on(third, 100).await.unwrap()), Some(1));
    settle_until("room made", || harness.node.live_auctions() == 2).await;
    assert_eq!(harness.node.live_auctions(), 2);
    assert!(!harness.node.is_live(first), "the actor written to least recently made room");

    later();
    assert_eq!(accepted_seq(&bid_on(first, 200).await.unwrap()), Some(2), "reloaded from the store, it goes on");
    settle_until("room made again", || !harness.node.is_live(second) && harness.node.live_auctions() == 2).await;
    assert_eq!(harness.node.live_auctions(), 2);
    assert!(!harness.node.is_live(second) && harness.node.is_live(third) && harness.node.is_live(first));

    // A write in flight keeps its actor, past the bound if need be.
    let held = harness.hold_commits().await;
    later();
    let in_flight = bid_on(first, 300);
    settle().await;
    later();
    let other = bid_on(third, 200);
    settle().await;
    later();
    let waking = bid_on(second, 200);
    settle().await;
    assert!(harness.node.is_live(first) && harness.node.is_live(third), "both have a write in flight");
    assert_eq!(harness.node.live_auctions(), 3, "the bound is soft: nothing idle to passivate");
    drop(held);
    assert_eq!(accepted_seq(&in_flight.await.unwrap()), Some(3));
    assert_eq!(accepted_seq(&other.await.unwrap()), Some(2));
    assert_eq!(accepted_seq(&waking.await.unwrap()), Some(2));
    assert_eq!(harness.store.stored_seqs(first), vec![1, 2, 3]);
    assert_eq!(harness.node.persistence_queue.in_use(), 0, "nothing waits for a commit");
}

/// An auction actor that fails (killed here; a panic is the same to the
/// node) with writes on their way to the store: its callers hear that the
/// outcome is unknown, where they were once tried again on a fresh actor
/// that had loaded the auction without those writes (applying each twice),
/// and the next actor loads the auction only once those writes are stored.
#[tokio::test(start_paused = true)]
async fn writes_of_a_failed_actor_are_not_applied_twice_and_its_successor_loads_after_them() {
    let harness = harness().await;
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));
    let held = harness.hold_commits().await;
    let first = harness.spawn_bid(200);
    settle().await;
    let second = harness.spawn_bid(300);
    settle().await;
    harness.node.activate(harness.auction_id).await.unwrap().actor.kill();
    settle().await;
    assert_eq!(first.await.unwrap(), Err(NodeError::OutcomeUnknown), "taken, and on its way to the store");
    assert_eq!(second.await.unwrap(), Err(NodeError::OutcomeUnknown));
    let next = harness.spawn_bid(400);
    settle().await;
    assert!(!next.is_finished(), "the next actor waits for the failed one's writes");
    drop(held);
    assert_eq!(accepted_seq(&next.await.unwrap()), Some(4), "loaded with both writes, it goes on from them");
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2, 3, 4], "each write once");
}

#[tokio::test(start_paused = true)]
async fn failed_commits_are_retried_in_order_until_durable() {
    let harness = harness().await;
    harness.store.failures_left.store(3, Ordering::Release);
    let first = harness.spawn_bid(100);
    settle().await;
    let second = harness.spawn_bid(200);
    // Each retry waits its backoff on the paused clock; time moves only when all wait.
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((accepted_seq(&first), accepted_seq(&second)), (Some(1), Some(2)));
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2]);
    assert_eq!(harness.store.failures_left.load(Ordering::Acquire), 0);
}

/// A shutdown whose drain times out (the store hangs) stops the actors with
/// writes still in the persistence actor's hands, in a commit the store may
/// have made (a Postgres `COMMIT` sent, its answer not back): their bidders
/// learn the outcome is unknown, never "not accepted". And once the node
/// shuts down, nothing starts an auction's actor again: a write retried after
/// its actor stopped started one, which wrote to a stopped persistence actor.
#[tokio::test(start_paused = true)]
async fn a_shutdown_that_cannot_drain_answers_outcome_unknown_and_starts_no_actor() {
    let harness = harness().await;
    let held = harness.hold_commits().await;
    let bid = harness.spawn_bid(100);
    settle().await;
    harness.node.shutdown().await;
    let answer = bid.await.unwrap();
    assert!(
        matches!(answer, Ok(WriteOutcome::Unknown) | Err(NodeError::OutcomeUnknown)),
        "a write the store may still make is not called refused: {answer:?}"
    );
    let other = harness.another_auction();
    assert_eq!(
        harness.node.activate(other).await.err(),
        Some(NodeError::Unavailable(Unavailable::ShuttingDown)),
        "no actor starts once the node shuts down"
    );
    assert!(!harness.node.is_live(other));
    drop(held);
}

/// Thousands of auctions ending together: the sweep read the first thousand
/// due and activated those; they stay due until they end, so every sweep
/// after read the same thousand, and the others were activated (their timers
/// run, their `ended` is announced) only as those ended, a sweep or more late.
#[tokio::test(start_paused = true)]
async fn one_sweep_activates_every_due_auction_however_many() {
    let harness = harness().await;
    let mut due = Vec::new();
    for _ in 0..2_500 {
        let id = harness.another_auction();
        harness.store.auctions.lock().unwrap().get_mut(&id).unwrap().end_at_ms = NOW_MS + 1_000;
        due.push(id);
    }
    harness.node.sweep_once().await;
    let live = due.iter().filter(|id| harness.node.is_live(**id)).count();
    assert_eq!(live, due.len(), "every auction due within the horizon is live after one sweep");
    assert!(!harness.node.is_live(harness.auction_id), "an auction not due is left alone");
}

#[tokio::test(start_paused = true)]
async fn leases_past_their_last_renewal_take_no_writes() {
    let harness = harness().await;
    harness.leases.trust_until(tokio::time::Instant::now() + Duration::from_secs(3));
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(
        harness.bid(200).await,
        Err(NodeError::Unavailable(Unavailable::NotOwner { shard: harness.shard })),
        "an unrenewed lease is not written under"
    );
    assert_eq!(harness.node.live_auctions(), 1, "the actor stays: the lease is still this node's");
    harness.leases.trust_until(tokio::time::Instant::now() + Duration::from_secs(3));
    assert_eq!(accepted_seq(&harness.bid(200).await), Some(2), "renewed, it takes writes again");
    assert_eq!(harness.store.commits.load(Ordering::Acquire), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_persistence_actor_fails_the_node_instead_of_hanging_every_bid() {
    let harness = harness().await;
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));
    harness.store.panic_next.store(true, Ordering::Release);
    // The write it held is in no one's hands: its bidder learns the outcome is unknown.
    assert_eq!(harness.bid(200).await, Err(NodeError::OutcomeUnknown));
    assert!(harness.node.persistence_failed(), "the supervisor saw the failure");
    assert!(!harness.node.is_accepting());
    assert_eq!(
        harness.bid(300).await,
        Err(NodeError::Unavailable(Unavailable::PersistenceGone)),
        "later bids are refused at once, not left to time out"
    );
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_write_the_store_refuses_is_refused_alone_and_its_auction_reloads() {
    let harness = harness().await;
    // A second auction, committed in the same batches.
    let other_id = Uuid::now_v7();
    harness.store.auctions.lock().unwrap().insert(other_id, open_auction(other_id));
    harness.store.epochs.lock().unwrap().insert(shard_of(other_id), 1);
    harness.leases.grant(shard_of(other_id), 1);
    let poison = user("deleted");
    *harness.store.invalid_bidder.lock().unwrap() = Some(poison.id);

    let held = harness.hold_commits().await;
    let before = harness.spawn_bid(100);
    settle().await;
    let node = harness.node.clone();
    let (auction_id, poisoned_by) = (harness.auction_id, poison.clone());
    let bad = tokio::spawn(async move {
        let command = BidCommand { bidder: poisoned_by, amount: money(200), max_amount: None };
        node.place_bid(auction_id, command, None).await
    });
    settle().await;
    let after = harness.spawn_bid(300);
    let node = harness.node.clone();
    let elsewhere = tokio::spawn(async move {
        let command = BidCommand { bidder: user("carol"), amount: money(100), max_amount: None };
        node.place_bid(other_id, command, None).await
    });
    settle().await;
    drop(held);

    assert_eq!(accepted_seq(&before.await.unwrap()), Some(1), "the write before it is committed");
    assert_eq!(bad.await.unwrap(), Ok(WriteOutcome::Unavailable(Unavailable::WriteInvalid)));
    assert_eq!(
        after.await.unwrap(),
        Ok(WriteOutcome::Unavailable(Unavailable::WriteInvalid)),
        "a write applied on top of the refused one is refused with it"
    );
    assert_eq!(accepted_seq(&elsewhere.await.unwrap()), Some(1), "another auction's write in the batch is committed");
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1]);
    assert_eq!(harness.store.stored_seqs(other_id), vec![1]);
    // The auction reloads from the store and goes on from what is durable.
    settle().await;
    assert_eq!(accepted_seq(&harness.bid(400).await), Some(2));
    assert_eq!(harness.node.persistence_queue.in_use(), 0, "every refused write freed its slot");
    assert!(!harness.node.commits_failing());
}

#[tokio::test(start_paused = true)]
async fn a_full_auction_mailbox_answers_at_once_and_takes_nothing() {
    let store = MemoryStore::new();
    let auction_id = Uuid::now_v7();
    store.auctions.lock().unwrap().insert(auction_id, open_auction(auction_id));
    store.epochs.lock().unwrap().insert(shard_of(auction_id), 1);
    let leases = Arc::new(Leases::none());
    leases.grant(shard_of(auction_id), 1);
    let settings = NodeSettings { auction_mailbox_capacity: 1, ..NodeSettings::default() };
    let clock = Arc::new(FixedClock(AtomicI64::new(NOW_MS)));
    let node = Node::start(settings, clock, store.clone(), Arc::new(NoEvents), leases).await.unwrap();
    node.activate(auction_id).await.unwrap();
    // Ten bids at once: the first takes the only mailbox place; the others
    // find it taken before the actor has run, and are refused without waiting.
    let bids: Vec<_> = (0..10)
        .map(|index| {
            let node = node.clone();
            tokio::spawn(async move {
                let command = BidCommand { bidder: user("bidder"), amount: money(100 + index * 10), max_amount: None };
                node.place_bid(auction_id, command, None).await
            })
        })
        .collect();
    let mut saturated = 0;
    let mut accepted = 0;
    for bid in bids {
        match bid.await.unwrap() {
            Err(NodeError::Unavailable(Unavailable::Saturated)) => saturated += 1,
            outcome if accepted_seq(&outcome).is_some() => accepted += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((accepted, saturated), (1, 9), "one admitted, nine refused at once");
    assert_eq!(store.stored_seqs(auction_id), vec![1], "a refused bid changed nothing");
}

/// Real time here, so the auction's own end timer (an hour away) cannot fire:
/// only the check the actor makes before every write can end it.
#[tokio::test]
async fn a_bid_just_after_the_end_is_refused_even_when_the_timer_is_late() {
    let harness = harness().await;
    assert_eq!(accepted_seq(&harness.bid(100).await), Some(1));
    let end_at_ms = harness.store.auctions.lock().unwrap()[&harness.auction_id].end_at_ms;
    harness.clock.0.store(end_at_ms + 1, Ordering::Release);
    let late = harness.bid(200).await;
    assert_eq!(
        late,
        Ok(WriteOutcome::Rejected(gavel_actors::Rejection::AuctionNotActive { status: Status::Ended })),
        "the end is applied before the bid"
    );
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1]);
    let stored = harness.store.auctions.lock().unwrap()[&harness.auction_id].clone();
    assert_eq!(stored.status, Status::Ended, "the end itself was written");
}

/// Settings with hedged commits: a second commit starts beside one that has
/// taken 10 ms.
fn hedging() -> NodeSettings {
    let mut settings = NodeSettings { call_timeout: Duration::from_secs(5), ..NodeSettings::default() };
    settings.persistence.hedge_after = Some(Duration::from_millis(10));
    settings
}

#[tokio::test(start_paused = true)]
async fn a_stalled_commit_holds_back_only_its_own_auction_and_keeps_its_order() {
    let harness = harness_with(hedging()).await;
    let other_id = harness.another_auction();
    *harness.store.held_auction.lock().unwrap() = Some(harness.auction_id);

    let first = harness.spawn_bid(100);
    settle().await;
    let second = harness.spawn_bid(200);
    settle().await;
    let elsewhere = harness.spawn_bid_on(other_id, user("carol"), 100);
    // Past `hedge_after` on the paused clock: the held commit is overdue.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(elsewhere.is_finished(), "the other auction's write is committed beside the held commit");
    assert_eq!(accepted_seq(&elsewhere.await.unwrap()), Some(1));
    assert_eq!(harness.store.stored_seqs(other_id), vec![1]);
    assert!(!first.is_finished() && !second.is_finished());
    assert_eq!(harness.store.stored_seqs(harness.auction_id), Vec::<u64>::new());

    *harness.store.held_auction.lock().unwrap() = None;
    harness.store.held_gate.add_permits(GATE_PERMITS as usize);
    assert_eq!(accepted_seq(&first.await.unwrap()), Some(1));
    assert_eq!(accepted_seq(&second.await.unwrap()), Some(2));
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2], "in the order applied");
    assert_eq!(harness.node.persistence_queue.in_use(), 0);
}

/// A batch can hold writes under two epochs of one shard: of an auction
/// whose actor began under the lease the node lost, and of one whose actor
/// began under the lease it took again since. Only the first are refused; the
/// others commit, and the lease taken again stays.
#[tokio::test(start_paused = true)]
async fn only_the_writes_under_a_lost_epoch_are_refused_not_those_under_the_shards_new_one() {
    let mut settings = NodeSettings { call_timeout: Duration::from_secs(5), ..NodeSettings::default() };
    settings.persistence.batch_delay = Duration::from_millis(5);
    let harness = harness_with(settings).await;
    let sibling = loop {
        let id = Uuid::now_v7();
        if shard_of(id) == harness.shard {
            break id;
        }
    };
    harness.store.auctions.lock().unwrap().insert(sibling, open_auction(sibling));
    let queued = |writes: usize| {
        let queue = &harness.node.persistence_queue;
        move || queue.in_use() == writes
    };

    // Applied under epoch 1, and waiting for its batch.
    let under_lost = harness.spawn_bid(100);
    yield_until("the first write queued", queued(1)).await;
    // The shard moves on to epoch 2, and this node takes it again.
    harness.store.epochs.lock().unwrap().insert(harness.shard, 2);
    harness.leases.grant(harness.shard, 2);
    let under_new = harness.spawn_bid_on(sibling, user("carol"), 100);
    yield_until("the second write queued in the same batch", queued(2)).await;

    assert_eq!(under_lost.await.unwrap(), Ok(WriteOutcome::Unavailable(Unavailable::WriteRefused)));
    assert_eq!(accepted_seq(&under_new.await.unwrap()), Some(1), "committed under the lease held now");
    assert_eq!(harness.store.stored_seqs(sibling), vec![1]);
    assert_eq!(harness.store.stored_seqs(harness.auction_id), Vec::<u64>::new());
    assert_eq!(harness.leases.epoch_of(harness.shard), Some(2), "the lease taken again is kept");
    assert_eq!(harness.store.commits.load(Ordering::Acquire), 1, "one commit: the refused batch retried without them");
}

/// Lets tasks run without the paused clock moving, until `condition` holds.
async fn yield_until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what}: not within 10,000 turns");
}

/// A commit left to finish on its own with writes queued past the batch's
/// bound: those of other auctions commit beside it at once, not when the
/// stalled commit ends or another write happens to arrive.
#[tokio::test(start_paused = true)]
async fn writes_left_queued_by_a_stalled_commit_commit_beside_it() {
    let mut settings = hedging();
    settings.persistence.max_batch_writes = 2;
    settings.persistence.batch_delay = Duration::from_millis(1);
    let harness = harness_with(settings).await;
    let other_id = harness.another_auction();
    *harness.store.held_auction.lock().unwrap() = Some(other_id);

    // One commit of both auctions' first bids, held past `hedge_after`.
    let first = harness.spawn_bid(100);
    let other_first = harness.spawn_bid_on(other_id, user("carol"), 100);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!first.is_finished() && !other_first.is_finished(), "the first commit is held");
    // Queued behind it: two bids of the first auction, then one of the other.
    let second = harness.spawn_bid(200);
    settle().await;
    let third = harness.spawn_bid(300);
    settle().await;
    let other_second = harness.spawn_bid_on(other_id, user("dave"), 200);
    settle().await;

    // The first commit ends; the next takes the first auction's two bids
    // (the batch's bound) and is held in turn, leaving the other's queued.
    *harness.store.held_auction.lock().unwrap() = Some(harness.auction_id);
    harness.store.held_gate.add_permits(1);
    assert_eq!(accepted_seq(&first.await.unwrap()), Some(1));
    assert_eq!(accepted_seq(&other_first.await.unwrap()), Some(1));
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(other_second.is_finished(), "the other auction's queued bid committed beside the held commit");
    assert_eq!(accepted_seq(&other_second.await.unwrap()), Some(2));
    assert_eq!(harness.store.stored_seqs(other_id), vec![1, 2]);
    assert!(!second.is_finished() && !third.is_finished(), "the held commit's bids wait for it");

    *harness.store.held_auction.lock().unwrap() = None;
    harness.store.held_gate.add_permits(GATE_PERMITS as usize);
    assert_eq!(accepted_seq(&second.await.unwrap()), Some(2));
    assert_eq!(accepted_seq(&third.await.unwrap()), Some(3));
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2, 3], "in the order applied");
    settle().await;
    assert_eq!(harness.node.persistence_queue.in_use(), 0);
}

/// While a commit left to finish on its own fails and is retried, the node
/// says commits are failing, though a hedge beside it commits; once it
/// commits, no more.
#[tokio::test(start_paused = true)]
async fn commits_are_failing_while_any_commit_retries_though_a_hedge_commits() {
    let harness = harness_with(hedging()).await;
    let other_id = harness.another_auction();
    *harness.store.held_auction.lock().unwrap() = Some(harness.auction_id);
    let retried = harness.spawn_bid(100);
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Its first attempt fails; the next waits out its backoff.
    harness.store.failures_left.store(1, Ordering::Release);
    *harness.store.held_auction.lock().unwrap() = None;
    harness.store.held_gate.add_permits(1);
    yield_until("the held commit failed", || harness.store.failures_left.load(Ordering::Acquire) == 0).await;
    assert!(harness.node.commits_failing());

    let beside = harness.spawn_bid_on(other_id, user("carol"), 100);
    yield_until("the hedge committed", || beside.is_finished()).await;
    assert_eq!(accepted_seq(&beside.await.unwrap()), Some(1));
    assert!(!retried.is_finished(), "the failed commit waits for its retry");
    assert!(harness.node.commits_failing(), "one commit is still failing");

    assert_eq!(accepted_seq(&retried.await.unwrap()), Some(1), "its retry commits");
    assert!(!harness.node.commits_failing());
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1]);
}

/// A commit that failed and then ends without committing (its lease moved
/// on meanwhile) no longer counts as failing: `/ready` does not stay "commits
/// are failing" until some later commit succeeds.
#[tokio::test(start_paused = true)]
async fn a_failed_commit_that_ends_fenced_no_longer_counts_as_failing() {
    let harness = harness().await;
    let held = harness.hold_commits().await;
    let write = harness.spawn_bid(100);
    settle().await;
    harness.store.failures_left.store(1, Ordering::Release);
    harness.store.epochs.lock().unwrap().insert(harness.shard, 2);
    drop(held);
    let outcome = write.await.unwrap();
    assert_eq!(accepted_seq(&outcome), None, "not accepted: {outcome:?}");
    assert_eq!(harness.store.failures_left.load(Ordering::Acquire), 0, "the first attempt failed");
    assert!(!harness.node.commits_failing());
}

/// A write refused in the held commit refuses its auction's later write too,
/// though that one waited outside it, while the hedge commits the rest.
#[tokio::test(start_paused = true)]
async fn a_write_refused_in_a_stalled_commit_refuses_its_auctions_later_writes_too() {
    let harness = harness_with(hedging()).await;
    let other_id = harness.another_auction();
    let poison = user("deleted");
    *harness.store.invalid_bidder.lock().unwrap() = Some(poison.id);
    *harness.store.held_auction.lock().unwrap() = Some(harness.auction_id);

    let bad = harness.spawn_bid_on(harness.auction_id, poison, 100);
    settle().await;
    let after = harness.spawn_bid(200);
    settle().await;
    let elsewhere = harness.spawn_bid_on(other_id, user("carol"), 100);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(accepted_seq(&elsewhere.await.unwrap()), Some(1));

    *harness.store.held_auction.lock().unwrap() = None;
    harness.store.held_gate.add_permits(GATE_PERMITS as usize);
    assert_eq!(bad.await.unwrap(), Ok(WriteOutcome::Unavailable(Unavailable::WriteInvalid)));
    assert_eq!(
        after.await.unwrap(),
        Ok(WriteOutcome::Unavailable(Unavailable::WriteInvalid)),
        "applied on top of the refused write, so refused with it"
    );
    assert_eq!(harness.store.stored_seqs(harness.auction_id), Vec::<u64>::new());
    assert_eq!(harness.store.stored_seqs(other_id), vec![1]);
    settle().await;
    assert_eq!(harness.node.persistence_queue.in_use(), 0, "every refused write freed its slot");
}

/// Shutting down while a commit that overran `hedge_after` is still held:
/// the drain waits for it, so the write it carries is durable and answered
/// before the node stops.
#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_a_commit_left_to_finish_on_its_own() {
    let harness = harness_with(hedging()).await;
    *harness.store.held_auction.lock().unwrap() = Some(harness.auction_id);
    let held = harness.spawn_bid(100);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let node = harness.node.clone();
    let shutdown = tokio::spawn(async move { node.shutdown().await });
    settle().await;
    assert!(!shutdown.is_finished(), "the drain waits for the held commit");

    harness.store.held_gate.add_permits(GATE_PERMITS as usize);
    shutdown.await.unwrap();
    assert_eq!(accepted_seq(&held.await.unwrap()), Some(1));
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1]);
}

/// With a thread of its own (`PersistenceSettings::own_thread`, as on
/// Postgres) the persistence actor commits there, a bid is answered only after
/// its commit, in the order applied, and the node's shutdown drains it. By
/// default the commits run where the node's tasks do.
#[tokio::test]
async fn on_a_thread_of_its_own_the_persistence_actor_commits_there_and_answers_after_each_commit() {
    let mut settings = NodeSettings { call_timeout: Duration::from_secs(5), ..NodeSettings::default() };
    settings.persistence.own_thread = true;
    let harness = harness_with(settings).await;

    let held = harness.hold_commits().await;
    let first = harness.spawn_bid(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while harness.store.commit_threads.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the write reaches a commit within 10 s");
        tokio::task::yield_now().await;
    }
    assert!(!first.is_finished(), "not answered while its commit is held");
    assert!(harness.store.stored_seqs(harness.auction_id).is_empty());
    drop(held);
    assert_eq!(accepted_seq(&first.await.unwrap()), Some(1));
    assert_eq!(accepted_seq(&harness.bid(110).await), Some(2));
    assert_eq!(accepted_seq(&harness.bid(120).await), Some(3));
    assert_eq!(harness.store.stored_seqs(harness.auction_id), vec![1, 2, 3], "in the order applied");
    let threads = harness.store.commit_threads.lock().unwrap().clone();
    assert!(threads.iter().all(|name| name.as_deref() == Some("gavel-commit")), "commit threads: {threads:?}");
    harness.node.shutdown().await;
    assert_eq!(harness.node.persistence_queue.in_use(), 0);

    let default = harness_with(NodeSettings { call_timeout: Duration::from_secs(5), ..NodeSettings::default() }).await;
    assert_eq!(accepted_seq(&default.bid(100).await), Some(1));
    let threads = default.store.commit_threads.lock().unwrap().clone();
    assert_eq!(threads, vec![std::thread::current().name().map(str::to_owned)], "on the test's own runtime");
}

/// A write's future holds the call on a running actor and no more: starting
/// an actor (the store's read, the actor's spawn) is boxed, since every layer
/// above a bid (handler, routing, span) moves the future whole, and a bid
/// nearly always finds its actor running. Inline, that path made the future
/// 3,576 bytes; boxed, 1,408.
#[tokio::test(start_paused = true)]
async fn a_write_future_is_small_and_starting_an_actor_is_boxed() {
    let harness = harness().await;
    let command = BidCommand { bidder: user("bidder"), amount: money(100), max_amount: None };
    let first = harness.node.place_bid(harness.auction_id, command, None);
    let size = std::mem::size_of_val(&first);
    assert!(size <= 2_048, "a write's future takes {size} bytes");
    assert!(!harness.node.is_live(harness.auction_id));
    assert_eq!(accepted_seq(&first.await), Some(1), "the first write starts the actor, through the box");
    assert!(harness.node.is_live(harness.auction_id));
    assert_eq!(accepted_seq(&harness.bid(200).await), Some(2), "the next finds it running");
}
