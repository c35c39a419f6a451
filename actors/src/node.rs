//! The node: everything one gavel process runs on the actor side. It finds or
//! activates the actor of an auction (the registry), bounds admission to each
//! auction's mailbox, starts the persistence actor, sweeps for auctions whose
//! start or end is due, and shuts down in order (stop taking work, commit what
//! is in flight, stop the actors).
//!
//! Callers (the HTTP and WebSocket edges) use `place_bid`, `cancel` and
//! `live_auctions`; every call to an actor has a time limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef, ActorStatus, MessagingErr, rpc::CallResult};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::auction::state::{AuctionId, AuctionState, BidCommand, UserId};
use crate::auction_actor::{AuctionActor, AuctionArgs, AuctionHandle, AuctionMsg, KeyedRequest, WriteOutcome};
use crate::persistence::{PersistenceActor, PersistenceMsg, PersistenceSettings};
use crate::ports::{Clock, EventSink, LoadedAuction, SHARD_COUNT, ShardLease, Store, shard_of};

#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Bid and cancel messages waiting in one auction's mailbox.
    pub auction_mailbox_capacity: usize,
    /// Writes accepted but not yet durable, across all auctions.
    pub persistence_queue_capacity: usize,
    pub persistence: PersistenceSettings,
    pub recent_keys_per_auction: usize,
    pub idle_after: Duration,
    pub idle_after_final: Duration,
    pub idle_check_interval: Duration,
    /// How long a caller waits for an actor's answer. Longer than a commit's
    /// retries usually take, so a bidder gets the real outcome.
    pub call_timeout: Duration,
    pub load_timeout: Duration,
    /// The sweeper activates auctions whose start or end falls within this horizon.
    pub sweep_interval: Duration,
    pub sweep_horizon: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            auction_mailbox_capacity: 4096,
            persistence_queue_capacity: 16_384,
            persistence: PersistenceSettings::default(),
            recent_keys_per_auction: 10_000,
            idle_after: Duration::from_secs(300),
            idle_after_final: Duration::from_secs(10),
            idle_check_interval: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(5),
            sweep_interval: Duration::from_millis(500),
            sweep_horizon: Duration::from_secs(2),
        }
    }
}

/// Counts one call in `gavel_actor_mailbox_depth` while it lives.
struct AdmissionGauge<'a>(&'a metrics::Gauge);

impl AdmissionGauge<'_> {
    fn new(gauge: &metrics::Gauge) -> AdmissionGauge<'_> {
        gauge.increment(1.0);
        AdmissionGauge(gauge)
    }
}

impl Drop for AdmissionGauge<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Why a call could not be made (as opposed to a rule's rejection).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("auction not found")]
    NotFound,
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    /// The write was handed over but its outcome did not come in time.
    #[error("outcome unknown")]
    OutcomeUnknown,
}

/// The shard leases this node holds, by shard: the epoch, or 0 when not held.
pub struct Leases {
    epochs: Vec<std::sync::atomic::AtomicI64>,
}

impl Leases {
    pub fn none() -> Self {
        Leases { epochs: (0..SHARD_COUNT).map(|_| std::sync::atomic::AtomicI64::new(0)).collect() }
    }

    pub fn grant(&self, shard: u32, epoch: i64) {
        assert!(epoch > 0, "epochs start at 1");
        self.epochs[shard as usize].store(epoch, Ordering::Release);
    }

    pub fn lease_for(&self, shard: u32) -> Option<ShardLease> {
        let epoch = self.epochs[shard as usize].load(Ordering::Acquire);
        (epoch > 0).then_some(ShardLease { shard, epoch })
    }

    pub fn all_held(&self) -> bool {
        self.epochs.iter().all(|epoch| epoch.load(Ordering::Acquire) > 0)
    }
}

pub struct Node {
    pub settings: NodeSettings,
    pub clock: Arc<dyn Clock>,
    pub store: Arc<dyn Store>,
    pub events: Arc<dyn EventSink>,
    pub leases: Arc<Leases>,
    pub persistence: ActorRef<PersistenceMsg>,
    pub persistence_queue: Arc<Admission>,
    live: Mutex<HashMap<AuctionId, Arc<OnceCell<AuctionHandle>>>>,
    accepting: AtomicBool,
    /// `gavel_actor_mailbox_depth`, registered once: the bid path only adds to it.
    mailbox_depth: metrics::Gauge,
}

enum CallFailure {
    /// The actor stopped before handling the message (passivated): try a fresh one.
    Gone,
    Timeout,
}

impl Node {
    pub async fn start(
        settings: NodeSettings,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
        events: Arc<dyn EventSink>,
        leases: Arc<Leases>,
    ) -> Result<Arc<Node>, ractor::SpawnErr> {
        let persistence_queue = Arc::new(Admission::new(settings.persistence_queue_capacity));
        let persistence_actor = PersistenceActor {
            store: store.clone(),
            queue: persistence_queue.clone(),
            settings: settings.persistence.clone(),
        };
        let (persistence, _) = Actor::spawn(None, persistence_actor, ()).await?;
        Ok(Arc::new(Node {
            settings,
            clock,
            store,
            events,
            leases,
            persistence,
            persistence_queue,
            live: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            mailbox_depth: metrics::gauge!(crate::metrics_names::ACTOR_MAILBOX_DEPTH),
        }))
    }

    pub async fn place_bid(
        self: &Arc<Self>,
        auction_id: AuctionId,
        command: BidCommand,
        key: Option<KeyedRequest>,
    ) -> Result<WriteOutcome, NodeError> {
        let span = tracing::Span::current();
        self.call_write(auction_id, |reply| AuctionMsg::Bid {
            command: command.clone(),
            key: key.clone(),
            reply,
            span: span.clone(),
        })
        .await
    }

    pub async fn cancel(
        self: &Arc<Self>,
        auction_id: AuctionId,
        by: UserId,
        key: Option<KeyedRequest>,
    ) -> Result<WriteOutcome, NodeError> {
        self.call_write(auction_id, |reply| AuctionMsg::Cancel { by, key: key.clone(), reply }).await
    }

    pub fn live_auctions(&self) -> usize {
        self.live.lock().expect("registry lock").len()
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    async fn call_write<F>(self: &Arc<Self>, auction_id: AuctionId, message: F) -> Result<WriteOutcome, NodeError>
    where
        F: Fn(ractor::RpcReplyPort<WriteOutcome>) -> AuctionMsg,
    {
        if !self.is_accepting() {
            return Err(NodeError::Unavailable("node is shutting down"));
        }
        // A passivating actor may stop with our message unread; the message had
        // no effect then, so one retry on a fresh actor is safe.
        for _attempt in 0..3 {
            let handle = self.activate(auction_id).await?;
            if handle.mailbox.fetch_add(1, Ordering::AcqRel) >= self.settings.auction_mailbox_capacity {
                handle.mailbox.fetch_sub(1, Ordering::AcqRel);
                return Err(NodeError::Unavailable("auction is saturated"));
            }
            let answered = {
                // Counted until answered, or until the caller gives up and drops this.
                let _in_use = AdmissionGauge::new(&self.mailbox_depth);
                self.call(&handle, &message).await
            };
            match answered {
                Ok(outcome) => return Ok(outcome),
                Err(CallFailure::Gone) => {
                    self.forget(auction_id, &handle.actor);
                    continue;
                }
                Err(CallFailure::Timeout) => return Err(NodeError::OutcomeUnknown),
            }
        }
        Err(NodeError::Unavailable("auction actor keeps stopping"))
    }

    async fn call<F>(&self, handle: &AuctionHandle, message: &F) -> Result<WriteOutcome, CallFailure>
    where
        F: Fn(ractor::RpcReplyPort<WriteOutcome>) -> AuctionMsg,
    {
        match handle.actor.call(message, Some(self.settings.call_timeout)).await {
            Ok(CallResult::Success(outcome)) => Ok(outcome),
            Ok(CallResult::Timeout) => Err(CallFailure::Timeout),
            // The reply port was dropped unanswered. If the actor stopped, the
            // message was dropped unread and had no effect: try a fresh actor.
            // If it still runs, something else went wrong; the write may stand.
            Ok(CallResult::SenderError) => {
                if matches!(handle.actor.get_status(), ActorStatus::Stopping | ActorStatus::Stopped) {
                    Err(CallFailure::Gone)
                } else {
                    Err(CallFailure::Timeout)
                }
            }
            Err(MessagingErr::SendErr(_) | MessagingErr::ChannelClosed | MessagingErr::InvalidActorType) => {
                handle.mailbox.fetch_sub(1, Ordering::AcqRel);
                Err(CallFailure::Gone)
            }
        }
    }

    fn live_handle(&self, auction_id: AuctionId) -> Option<AuctionHandle> {
        let live = self.live.lock().expect("registry lock");
        live.get(&auction_id).and_then(|cell| cell.get().cloned())
    }

    /// Finds the auction's actor or starts one from the store.
    pub async fn activate(self: &Arc<Self>, auction_id: AuctionId) -> Result<AuctionHandle, NodeError> {
        self.activate_with(auction_id, None).await
    }

    /// Starts the actor of an auction this node has just created, from the
    /// state it wrote (no read), unless one runs already: an auction that is
    /// open from its creation is likely to be bid on soon.
    pub async fn start_created(self: &Arc<Self>, state: AuctionState) {
        if !self.is_accepting() {
            return;
        }
        let auction_id = state.id;
        let loaded = LoadedAuction { state, recent_keys: Vec::new() };
        if let Err(error) = self.activate_with(auction_id, Some(loaded)).await {
            debug!(%auction_id, %error, "not started at creation; the first bid activates it");
        }
    }

    /// `activate`, starting a new actor from `preloaded` instead of the store when given.
    async fn activate_with(
        self: &Arc<Self>,
        auction_id: AuctionId,
        mut preloaded: Option<LoadedAuction>,
    ) -> Result<AuctionHandle, NodeError> {
        loop {
            let cell = {
                let mut live = self.live.lock().expect("registry lock");
                live.entry(auction_id).or_default().clone()
            };
            let handle = cell.get_or_try_init(|| self.spawn_actor(auction_id, preloaded.take())).await;
            match handle {
                Ok(handle) if handle.actor.get_status() == ActorStatus::Stopped => {
                    self.forget(auction_id, &handle.actor);
                }
                Ok(handle) => return Ok(handle.clone()),
                Err(error) => {
                    let mut live = self.live.lock().expect("registry lock");
                    if live
                        .get(&auction_id)
                        .is_some_and(|existing| Arc::ptr_eq(existing, &cell) && existing.get().is_none())
                    {
                        live.remove(&auction_id);
                    }
                    return Err(error);
                }
            }
        }
    }

    async fn spawn_actor(
        self: &Arc<Self>,
        auction_id: AuctionId,
        preloaded: Option<LoadedAuction>,
    ) -> Result<AuctionHandle, NodeError> {
        let shard = shard_of(auction_id);
        let Some(lease) = self.leases.lease_for(shard) else {
            return Err(NodeError::Unavailable("shard not owned by this node"));
        };
        let loaded = match preloaded {
            Some(loaded) => loaded,
            None => self.load(auction_id).await?,
        };
        let mailbox = Arc::new(AtomicUsize::new(0));
        let args = AuctionArgs { loaded, lease, mailbox: mailbox.clone() };
        let actor = AuctionActor { node: self.clone() };
        match Actor::spawn(None, actor, args).await {
            Ok((actor, _)) => Ok(AuctionHandle { actor, mailbox }),
            Err(error) => {
                warn!(%auction_id, %error, "spawning auction actor failed");
                Err(NodeError::Unavailable("auction actor failed to start"))
            }
        }
    }

    async fn load(&self, auction_id: AuctionId) -> Result<LoadedAuction, NodeError> {
        match tokio::time::timeout(self.settings.load_timeout, self.store.load_auction(auction_id)).await {
            Ok(Ok(Some(loaded))) => Ok(loaded),
            Ok(Ok(None)) => Err(NodeError::NotFound),
            Ok(Err(error)) => {
                warn!(%auction_id, %error, "loading auction failed");
                Err(NodeError::Unavailable("store unavailable"))
            }
            Err(_) => Err(NodeError::Unavailable("store timed out")),
        }
    }

    /// Removes the registry entry of `actor` (and only of that actor).
    pub(crate) fn forget(&self, auction_id: AuctionId, actor: &ActorRef<AuctionMsg>) {
        let mut live = self.live.lock().expect("registry lock");
        let is_this_actor = live
            .get(&auction_id)
            .and_then(|cell| cell.get())
            .is_some_and(|handle| handle.actor.get_id() == actor.get_id());
        if is_this_actor {
            live.remove(&auction_id);
        }
    }

    /// Activates every auction whose start or end is due within the horizon, so
    /// its timer runs; at start-up this is what closes auctions that ended while
    /// the node was down. Runs until the node shuts down.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(node.settings.sweep_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while node.is_accepting() {
                interval.tick().await;
                node.sweep_once().await;
            }
        })
    }

    pub async fn sweep_once(self: &Arc<Self>) {
        let horizon_ms = self.clock.now_ms() + self.settings.sweep_horizon.as_millis() as i64;
        let due = tokio::time::timeout(self.settings.load_timeout, self.store.due_auctions(horizon_ms, 1000)).await;
        let ids = match due {
            Ok(Ok(ids)) => ids,
            Ok(Err(error)) => {
                warn!(%error, "sweep for due auctions failed");
                return;
            }
            Err(_) => {
                warn!("sweep for due auctions timed out");
                return;
            }
        };
        for auction_id in ids {
            if self.live_handle(auction_id).is_some() {
                continue;
            }
            match self.activate(auction_id).await {
                Ok(_) => debug!(%auction_id, "activated due auction"),
                Err(error) => warn!(%auction_id, %error, "activating due auction failed"),
            }
        }
    }

    /// Stops taking writes, commits everything handed over, stops every actor.
    /// Call after the edges have stopped taking requests and answered theirs.
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::Release);
        let handles: Vec<AuctionHandle> = {
            let live = self.live.lock().expect("registry lock");
            live.values().filter_map(|cell| cell.get().cloned()).collect()
        };
        // Let each auction finish the messages it already has, then drain persistence.
        for handle in &handles {
            let _ = handle.actor.call(AuctionMsg::Committed, Some(self.settings.call_timeout)).await;
        }
        let drained = self.persistence.call(PersistenceMsg::Drain, Some(self.settings.call_timeout)).await;
        if !matches!(drained, Ok(CallResult::Success(()))) {
            warn!("persistence did not drain in time");
        }
        // Durable notifications are queued behind the drain; give actors their turn.
        for handle in &handles {
            let _ = handle.actor.call(AuctionMsg::Committed, Some(self.settings.call_timeout)).await;
            handle.actor.stop(Some("shutdown".to_owned()));
        }
        self.persistence.stop(Some("shutdown".to_owned()));
        info!(auctions = handles.len(), "node stopped");
    }
}
