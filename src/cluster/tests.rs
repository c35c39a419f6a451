//! The lease manager against an in-memory lease store whose clock the test
//! moves: joining, handing over, taking over a dead node's shards and a
//! paused node finding out it lost them, each tick run by hand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gavel_actors::node::{Node, NodeSettings};
use gavel_actors::ports::{
    BoxFuture, Clock, DueAuction, LoadedAuction, NoEvents, SHARD_COUNT, ShardLease, Store, StoreError, Write,
};
use gavel_actors::shards::Leases;
use gavel_actors::{AuctionId, AuctionState, BidCommand, Money, TimestampMs, UserRef};

use super::{Cluster, ClusterRows, ClusterSettings, LeaseRow, LeaseStore, LeaseStoreError, MemberRow, ShardOwner};
use crate::auth::Secret;
use crate::read_cache::ReadCache;

const LEASE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Tables {
    members: HashMap<String, MemberRow>,
    leases: HashMap<u32, LeaseRow>,
}

/// `storage/leases.rs`'s rules, in memory, on a clock the test moves. Each
/// call answers after `round_trip` (zero unless a test sets it; on tokio's
/// clock, which a test may pause).
struct MemoryLeases {
    now_ms: AtomicI64,
    tables: Mutex<Tables>,
    round_trip: Mutex<Duration>,
    owner_reads: AtomicUsize,
    /// What happened, in order: each lease a `leave` released ("released 7").
    log: Arc<Mutex<Vec<String>>>,
}

impl MemoryLeases {
    fn new() -> Arc<MemoryLeases> {
        let leases = (0..SHARD_COUNT)
            .map(|shard| (shard, LeaseRow { shard: shard as i32, owner: String::new(), epoch: 0, expires_at_ms: 0 }))
            .collect();
        Arc::new(MemoryLeases {
            now_ms: AtomicI64::new(1_000_000),
            tables: Mutex::new(Tables { members: HashMap::new(), leases }),
            round_trip: Mutex::new(Duration::ZERO),
            owner_reads: AtomicUsize::new(0),
            log: Arc::default(),
        })
    }

    fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(by.as_millis() as i64, Ordering::AcqRel);
    }

    fn now(&self) -> i64 {
        self.now_ms.load(Ordering::Acquire)
    }

    fn owned_by(&self, node: &str) -> usize {
        let now = self.now();
        self.tables.lock().unwrap().leases.values().filter(|row| row.owner == node && row.expires_at_ms > now).count()
    }

    fn epoch(&self, shard: u32) -> i64 {
        self.tables.lock().unwrap().leases[&shard].epoch
    }

    /// The answer to a call, after one round trip.
    fn answer<T: Send + 'static>(&self, value: T) -> BoxFuture<'static, Result<T, LeaseStoreError>> {
        let round_trip = *self.round_trip.lock().unwrap();
        Box::pin(async move {
            if !round_trip.is_zero() {
                tokio::time::sleep(round_trip).await;
            }
            Ok(value)
        })
    }
}

impl LeaseStore for MemoryLeases {
    fn heartbeat<'a>(
        &'a self,
        node_id: &'a str,
        advertise_url: &'a str,
    ) -> BoxFuture<'a, Result<i64, LeaseStoreError>> {
        let now = self.now();
        let member =
            MemberRow { node_id: node_id.to_owned(), advertise_url: advertise_url.to_owned(), last_seen_ms: now };
        self.tables.lock().unwrap().members.insert(node_id.to_owned(), member);
        self.answer(now)
    }

    fn read(&self) -> BoxFuture<'_, Result<ClusterRows, LeaseStoreError>> {
        let tables = self.tables.lock().unwrap();
        let mut leases: Vec<LeaseRow> = tables.leases.values().cloned().collect();
        leases.sort_by_key(|row| row.shard);
        self.answer(ClusterRows { now_ms: self.now(), members: tables.members.values().cloned().collect(), leases })
    }

    fn renew<'a>(
        &'a self,
        node_id: &'a str,
        held: &'a [ShardLease],
        lease_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<u32>, LeaseStoreError>> {
        let now = self.now();
        let mut tables = self.tables.lock().unwrap();
        let mut renewed = Vec::new();
        for lease in held {
            let row = tables.leases.get_mut(&lease.shard).unwrap();
            if row.owner == node_id && row.epoch == lease.epoch {
                row.expires_at_ms = now + lease_ms;
                renewed.push(lease.shard);
            }
        }
        self.answer(renewed)
    }

    fn take<'a>(
        &'a self,
        node_id: &'a str,
        shards: &'a [u32],
        lease_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<ShardLease>, LeaseStoreError>> {
        let now = self.now();
        let mut tables = self.tables.lock().unwrap();
        let mut taken = Vec::new();
        for shard in shards {
            let row = tables.leases.get_mut(shard).unwrap();
            if row.owner == node_id || row.owner.is_empty() || row.expires_at_ms <= now {
                row.owner = node_id.to_owned();
                row.epoch += 1;
                row.expires_at_ms = now + lease_ms;
                taken.push(ShardLease { shard: *shard, epoch: row.epoch });
            }
        }
        self.answer(taken)
    }

    fn release<'a>(&'a self, node_id: &'a str, lease: ShardLease) -> BoxFuture<'a, Result<bool, LeaseStoreError>> {
        let mut tables = self.tables.lock().unwrap();
        let row = tables.leases.get_mut(&lease.shard).unwrap();
        let held = row.owner == node_id && row.epoch == lease.epoch;
        if held {
            row.expires_at_ms = 0;
        }
        self.answer(held)
    }

    /// Takes effect at the end of its round trip, as a transaction commits
    /// at its end.
    fn leave<'a>(&'a self, node_id: &'a str) -> BoxFuture<'a, Result<Vec<u32>, LeaseStoreError>> {
        let round_trip = *self.round_trip.lock().unwrap();
        Box::pin(async move {
            if !round_trip.is_zero() {
                tokio::time::sleep(round_trip).await;
            }
            let mut tables = self.tables.lock().unwrap();
            tables.members.remove(node_id);
            let mut released = Vec::new();
            for (shard, row) in tables.leases.iter_mut() {
                if row.owner == node_id && row.expires_at_ms > 0 {
                    row.expires_at_ms = 0;
                    released.push(*shard);
                    self.log.lock().unwrap().push(format!("released {shard}"));
                }
            }
            Ok(released)
        })
    }

    fn owner_of(&self, shard: u32) -> BoxFuture<'_, Result<Option<ShardOwner>, LeaseStoreError>> {
        self.owner_reads.fetch_add(1, Ordering::AcqRel);
        let tables = self.tables.lock().unwrap();
        let lease = tables.leases[&shard].clone();
        let owner = tables.members.get(&lease.owner).cloned();
        self.answer(Some(ShardOwner { now_ms: self.now(), lease, owner }))
    }
}

/// The auctions' store of these nodes: none at all (they only hold leases),
/// or one auction open for bids whose commits panic (a bug in the store's
/// adapter: the node's persistence actor fails at its first write) or wait
/// for a permit of a gate, then say so in a log.
struct Auctions {
    open: Option<AuctionState>,
    commits: Commits,
}

enum Commits {
    Panic,
    Held { gate: Arc<tokio::sync::Semaphore>, log: Arc<Mutex<Vec<String>>> },
}

impl Auctions {
    fn none() -> Arc<Auctions> {
        Arc::new(Auctions { open: None, commits: Commits::Panic })
    }
}

impl Store for Auctions {
    fn load_auction(&self, id: AuctionId) -> BoxFuture<'_, Result<Option<LoadedAuction>, StoreError>> {
        let found = self
            .open
            .as_ref()
            .filter(|auction| auction.id == id)
            .map(|auction| LoadedAuction { state: auction.clone(), recent_keys: Vec::new() });
        Box::pin(async move { Ok(found) })
    }

    fn commit<'a>(&'a self, _batch: &'a [Write]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match &self.commits {
                Commits::Panic => panic!("a bug in the store adapter"),
                Commits::Held { gate, log } => {
                    gate.acquire().await.expect("gate open").forget();
                    log.lock().unwrap().push("committed".to_owned());
                    Ok(())
                }
            }
        })
    }

    fn due_auctions(
        &self,
        _horizon_ms: TimestampMs,
        _after: Option<DueAuction>,
        _limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DueAuction>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

struct FixedClock;

impl Clock for FixedClock {
    fn now_ms(&self) -> TimestampMs {
        0
    }
}

async fn node(name: &str, store: &Arc<MemoryLeases>) -> Arc<Cluster> {
    node_on(name, store, Auctions::none()).await
}

async fn node_on(name: &str, store: &Arc<MemoryLeases>, auctions: Arc<dyn Store>) -> Arc<Cluster> {
    let leases = Arc::new(Leases::none());
    let node =
        Node::start(NodeSettings::default(), Arc::new(FixedClock), auctions, Arc::new(NoEvents), leases).await.unwrap();
    let settings = ClusterSettings {
        node_id: name.to_owned(),
        // Nobody listens there: waking a peer fails at once, as it may.
        advertise_url: "http://127.0.0.1:9".to_owned(),
        lease: LEASE,
        tick: ClusterSettings::tick_for(LEASE),
        forward_timeout: Duration::from_secs(1),
        secret: Secret::new("x".repeat(32)),
    };
    let store: Arc<dyn LeaseStore> = store.clone();
    Cluster::new(settings, Some(store), node, Arc::new(ReadCache::new(16))).unwrap()
}

/// Runs a tick, then waits (two seconds at most) until the handovers it
/// started (tasks) have released their leases: the store then shows the node
/// owning exactly what it holds.
async fn tick(cluster: &Arc<Cluster>, store: &MemoryLeases) {
    cluster.tick().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while store.owned_by(&cluster.settings.node_id) != cluster.node.leases.held_count() {
        assert!(std::time::Instant::now() < deadline, "a handover did not release its lease in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn join_handover_takeover_and_a_paused_node_waking_up() {
    let store = MemoryLeases::new();
    let a = node("node-a", &store).await;
    tick(&a, &store).await;
    assert_eq!(a.node.leases.held_count(), 256, "alone, a node owns every shard");
    assert_eq!(store.owned_by("node-a"), 256);

    // B joins: it takes nothing that A still holds...
    let b = node("node-b", &store).await;
    tick(&b, &store).await;
    assert_eq!(b.node.leases.held_count(), 0, "A's leases have not expired");
    // ...until A, seeing B, hands B's share over (released at once), and B takes it.
    tick(&a, &store).await;
    assert_eq!(a.node.leases.held_count(), 128, "A keeps its share");
    tick(&b, &store).await;
    assert_eq!((store.owned_by("node-a"), store.owned_by("node-b")), (128, 128));
    assert_eq!(b.node.leases.held_count(), 128);
    let moved = (0..SHARD_COUNT).find(|shard| b.node.leases.epoch_of(*shard).is_some()).unwrap();
    assert_eq!(store.epoch(moved), 2, "every change of owner raises the epoch");

    // A stops ticking (dead, or paused). Before its leases expire, B takes nothing of A's.
    store.advance(LEASE / 2);
    tick(&b, &store).await;
    assert_eq!(b.node.leases.held_count(), 128);
    // Past them, B is alone: it takes A's shards, raising their epochs.
    store.advance(LEASE);
    tick(&b, &store).await;
    assert_eq!(b.node.leases.held_count(), 256);
    assert_eq!(store.owned_by("node-b"), 256);

    // A wakes: its renewal finds every lease taken over, and it forgets them.
    tick(&a, &store).await;
    assert_eq!(a.node.leases.held_count(), 0, "a node that lost its leases stops writing under them");
    // A is live again: B hands it its share back, and A takes it.
    tick(&b, &store).await;
    tick(&a, &store).await;
    assert_eq!((store.owned_by("node-a"), store.owned_by("node-b")), (128, 128));

    // B leaves: its shards are released at once, and A takes them on its next tick.
    b.leave().await;
    tick(&a, &store).await;
    assert_eq!(store.owned_by("node-a"), 256, "a leaving node's shards move without waiting for expiry");
}

/// A node leaving under load hands every shard over within a few round trips
/// of its lease store, however many shards it holds: with a round trip per
/// lease, a loaded node took ten seconds to let its shards go.
#[tokio::test(start_paused = true)]
async fn leaving_releases_every_lease_in_one_round_trip() {
    let store = MemoryLeases::new();
    let a = node("node-a", &store).await;
    tick(&a, &store).await;
    let b = node("node-b", &store).await;
    tick(&b, &store).await;
    assert_eq!(a.node.leases.held_count(), 256);

    *store.round_trip.lock().unwrap() = Duration::from_millis(100);
    let started = tokio::time::Instant::now();
    a.leave().await;
    let took = started.elapsed();
    assert!(took <= Duration::from_millis(300), "leaving took {took:?} at 100 ms per round trip");
    assert_eq!(a.node.leases.held_count(), 0, "a leaving node stops writing under its leases");
    assert_eq!(store.owned_by("node-a"), 0, "every lease released");

    *store.round_trip.lock().unwrap() = Duration::ZERO;
    tick(&b, &store).await;
    assert_eq!(store.owned_by("node-b"), 256, "the other node takes them at once");
}

/// A shutdown cuts the lease manager short wherever it is. Cut after the
/// store took the node's shards but before the node heard back, the node
/// holds none of them, yet the store has them as its own: leaving released
/// only the leases the node knew of, and the others waited for expiry (a
/// lease length) before another node could take them.
#[tokio::test(start_paused = true)]
async fn leaving_releases_the_leases_of_a_take_cut_short() {
    let store = MemoryLeases::new();
    let a = node("node-a", &store).await;
    *store.round_trip.lock().unwrap() = Duration::from_millis(100);
    let ticking = {
        let a = a.clone();
        tokio::spawn(async move { a.tick().await })
    };
    while store.owned_by("node-a") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ticking.abort();
    assert!(ticking.await.unwrap_err().is_cancelled(), "the tick was cut short before its take answered");
    assert_eq!(a.node.leases.held_count(), 0, "the node never heard of the leases it took");

    a.leave().await;
    assert_eq!(store.owned_by("node-a"), 0, "every lease the store has as the node's is released");
    *store.round_trip.lock().unwrap() = Duration::ZERO;
    another_node_takes_every_shard(&store).await;
}

/// A node joining now takes every shard at its first tick.
async fn another_node_takes_every_shard(store: &Arc<MemoryLeases>) {
    let b = node("node-b", store).await;
    tick(&b, store).await;
    assert_eq!(store.owned_by("node-b"), 256, "another node takes every shard at once");
}

/// A node whose persistence actor failed takes no more writes. It went on
/// renewing its leases all the same, so its shards took no writes anywhere
/// (and their auctions never closed) until someone restarted it. It now
/// leaves at its next tick, and another node takes its shards at once.
#[tokio::test(start_paused = true)]
async fn a_node_whose_persistence_failed_leaves_and_its_shards_move() {
    let store = MemoryLeases::new();
    let auction = crate::events::tests::auction();
    let a =
        node_on("node-a", &store, Arc::new(Auctions { open: Some(auction.clone()), commits: Commits::Panic })).await;
    let _manager = a.join().await.unwrap().expect("a cluster node runs a lease manager");
    assert_eq!(store.owned_by("node-a"), 256);

    let bidder = UserRef { id: uuid::Uuid::now_v7(), username: Arc::from("bob") };
    let command = BidCommand { bidder, amount: Money::parse(100).unwrap(), max_amount: None };
    assert!(a.node.place_bid(auction.id, command, None).await.is_err(), "its commit panicked");
    let deadline = tokio::time::Instant::now() + LEASE;
    while !a.node.persistence_failed() || store.owned_by("node-a") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "node A still holds {} shards", store.owned_by("node-a"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    another_node_takes_every_shard(&store).await;
}

/// SIGTERM while a tick of the node's own hands shards over: those leases
/// were revoked already, so stepping down waited for none of their writes,
/// and its `leave` released them while a write was still in flight (another
/// node could take the shard, and the write was then refused). Stepping down
/// now waits for the writes of every live actor, whatever its lease.
#[tokio::test(start_paused = true)]
async fn stepping_down_waits_for_the_writes_of_shards_a_tick_is_handing_over() {
    let store = MemoryLeases::new();
    // An auction of a shard that moves to node B once B joins.
    let desired = super::assign(&["node-a".to_owned(), "node-b".to_owned()]);
    let mut auction = crate::events::tests::auction();
    while desired[gavel_actors::ports::shard_of(auction.id) as usize] != Some(1) {
        auction = crate::events::tests::auction();
    }
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let commits = Commits::Held { gate: gate.clone(), log: store.log.clone() };
    let a = node_on("node-a", &store, Arc::new(Auctions { open: Some(auction.clone()), commits })).await;
    tick(&a, &store).await;
    let bidder = UserRef { id: uuid::Uuid::now_v7(), username: Arc::from("bob") };
    let command = BidCommand { bidder, amount: Money::parse(100).unwrap(), max_amount: None };
    let bid = {
        let a = a.clone();
        tokio::spawn(async move { a.node.place_bid(auction.id, command, None).await })
    };
    while a.node.live_auctions() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // B joins; A's tick starts handing B's share over, the auction's shard with it.
    let b = node("node-b", &store).await;
    tick(&b, &store).await;
    a.tick().await.unwrap();
    let stepping_down = {
        let a = a.clone();
        tokio::spawn(async move { a.step_down().await })
    };
    // Stepping down cannot end before the write is answered; the write's
    // commit goes through only now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.add_permits(1);
    stepping_down.await.unwrap();
    assert!(bid.await.unwrap().is_ok(), "the write in flight was answered");
    let log = store.log.lock().unwrap().clone();
    let shard = gavel_actors::ports::shard_of(auction.id);
    let committed = log.iter().position(|line| line == "committed").expect("the write was committed");
    let released = log.iter().position(|line| *line == format!("released {shard}"));
    assert!(released.is_none_or(|released| released > committed), "its lease went after its write: {log:?}");
}

/// `leave` runs once. A second call while the first is under way (the
/// lease manager leaving for a failed persistence actor, then SIGTERM)
/// returned at once, and the app then stopped the manager, cutting the first
/// short before it released anything. A later call now waits for the first.
#[tokio::test(start_paused = true)]
async fn a_second_leave_waits_for_the_first_to_end() {
    let store = MemoryLeases::new();
    let a = node("node-a", &store).await;
    tick(&a, &store).await;
    *store.round_trip.lock().unwrap() = Duration::from_millis(100);
    let first = {
        let a = a.clone();
        tokio::spawn(async move { a.leave().await })
    };
    // The first call has begun (it stops the ticks first).
    while !a.stopping.load(Ordering::Acquire) {
        tokio::task::yield_now().await;
    }
    a.leave().await;
    first.abort();
    assert_eq!(store.owned_by("node-a"), 0, "every lease released when the second call returns");
}

/// While a shard moves, every write to it asks for its owner again: the
/// requests that ask at once share a read begun after they asked, instead of
/// each reading (a hundred at once, at 50 ms a round trip: the first one's
/// read, then one for the other 99, which asked while it ran).
#[tokio::test(start_paused = true)]
async fn writes_that_ask_for_a_shards_owner_at_once_share_one_read() {
    let store = MemoryLeases::new();
    let a = node("node-a", &store).await;
    tick(&a, &store).await;
    *store.round_trip.lock().unwrap() = Duration::from_millis(50);
    let asking: Vec<_> = (0..100)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.refresh(7).await })
        })
        .collect();
    for ask in asking {
        ask.await.unwrap();
    }
    assert_eq!(store.owner_reads.load(Ordering::Acquire), 2, "two reads for a hundred at once");
    a.refresh(7).await;
    assert_eq!(store.owner_reads.load(Ordering::Acquire), 3, "a later ask reads again");

    // A read whose caller goes away midway answers nobody: a request that
    // asked before it began and waited for it reads for itself.
    let spawn_refresh = |give_up_after: Duration| {
        let a = a.clone();
        tokio::spawn(async move { tokio::time::timeout(give_up_after, a.refresh(7)).await.is_ok() })
    };
    let running = spawn_refresh(Duration::from_secs(1));
    let gives_up = spawn_refresh(Duration::from_millis(60));
    let waits = spawn_refresh(Duration::from_secs(1));
    assert!(running.await.unwrap(), "the read running when the others asked");
    assert!(!gives_up.await.unwrap(), "the next one's caller goes away 10 ms into its read");
    assert!(waits.await.unwrap());
    assert_eq!(store.owner_reads.load(Ordering::Acquire), 6, "the one that waited read for itself");
}

/// An owner (or a proxy before it) answering a forwarded write with a 5xx may
/// have decided it: its edge's time limit, an answer it could not encode.
/// Taken for "not delivered", the write was sent again after a refresh, and
/// an unkeyed bid could stand twice. A 5xx is now "outcome unknown"; a 4xx
/// (a refusal before deciding: secret, version, size) is still "not delivered".
#[tokio::test]
async fn a_5xx_from_the_owner_is_an_unknown_outcome_and_a_4xx_is_not_delivered() {
    use axum::http::StatusCode;

    let store = MemoryLeases::new();
    let a = node("node-a", &store).await;
    let request = crate::bidding::wire::WriteRequest::Cancel(crate::bidding::wire::CancelRequest {
        auction_id: uuid::Uuid::now_v7(),
        by: uuid::Uuid::now_v7(),
        key: None,
    });
    for (status, unknown) in [(StatusCode::SERVICE_UNAVAILABLE, true), (StatusCode::INTERNAL_SERVER_ERROR, true)]
        .into_iter()
        .chain([(StatusCode::UNAUTHORIZED, false), (StatusCode::BAD_REQUEST, false)])
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let owner =
            axum::Router::new().route("/internal/v1/writes", axum::routing::post(move || async move { status }));
        let server = tokio::spawn(async move { axum::serve(listener, owner).await });
        let result = a.forward(&url, &request).await;
        server.abort();
        match result {
            Err(super::ForwardError::TimedOut) => assert!(unknown, "{status}: not delivered, yet called unknown"),
            Err(super::ForwardError::Unreachable(_)) => assert!(!unknown, "{status}: maybe decided, yet sent again"),
            Ok(_) => panic!("{status}: no answer to relay"),
        }
    }
}
