//! The node: everything one gavel process runs on the actor side. It finds or
//! activates the actor of an auction (the registry), bounds admission to each
//! auction's mailbox, starts the persistence actor, sweeps for auctions whose
//! start or end is due, and shuts down in order (stop taking work, commit what
//! is in flight, stop the actors).
//!
//! Callers (the HTTP and WebSocket edges) use `place_bid`, `cancel` and
//! `live_auctions`; every call to an actor has a time limit. Whoever manages
//! the shard leases (the cluster, or a single node's start-up) grants them in
//! `leases` and calls `retire_shard` when one is handed over or lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, MessagingErr, SupervisionEvent, rpc::CallResult};
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::auction::state::{AuctionId, AuctionState, BidCommand, UserId};
use crate::auction_actor::{
    Activity, AuctionActor, AuctionArgs, AuctionEnv, AuctionHandle, AuctionMsg, AuctionSettings, KeyedRequest,
    Unavailable, WriteOutcome,
};
use crate::persistence::{PersistenceActor, PersistenceMsg, PersistenceSettings};
use crate::ports::{Clock, EventSink, LoadedAuction, Store};
use crate::registry::Registry;
use crate::runtime::OwnedRuntime;
use crate::shards::{Leases, SHARD_COUNT, ShardLease, shard_of};

#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Bid and cancel messages waiting in one auction's mailbox.
    pub auction_mailbox_capacity: usize,
    /// Writes accepted but not yet durable, across all auctions.
    pub persistence_queue_capacity: usize,
    pub persistence: PersistenceSettings,
    /// Idempotency keys an auction's actor remembers, beyond those of its
    /// writes in flight (never forgotten): what a retry that looked in the
    /// store before the first was committed finds there, and rejections (not
    /// stored). As many as gavel's store adapter loads at an activation
    /// (`storage::RECENT_KEYS_LOADED`); an older retry finds its key in the
    /// store first.
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
    /// Live auction actors past which each activation asks an idle one to
    /// passivate (of a few sampled, the one written to least recently): the
    /// bound on the memory live auctions take. Soft: an actor with writes in
    /// flight stays, and the count may pass the bound by the activations
    /// under way.
    pub max_live_auctions: usize,
}

impl NodeSettings {
    pub fn auction(&self) -> AuctionSettings {
        AuctionSettings {
            recent_keys_per_auction: self.recent_keys_per_auction,
            idle_after: self.idle_after,
            idle_after_final: self.idle_after_final,
            idle_check_interval: self.idle_check_interval,
        }
    }
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            auction_mailbox_capacity: 4096,
            persistence_queue_capacity: 16_384,
            persistence: PersistenceSettings::default(),
            recent_keys_per_auction: 1_000,
            idle_after: Duration::from_secs(300),
            idle_after_final: Duration::from_secs(10),
            idle_check_interval: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(5),
            sweep_interval: Duration::from_millis(500),
            sweep_horizon: Duration::from_secs(2),
            // Some 10 KB each: about 400 MB of live auctions.
            max_live_auctions: 40_000,
        }
    }
}

/// A due auction's activation, run in a task of its own.
type Activation = Result<(AuctionId, Result<AuctionHandle, NodeError>), tokio::task::JoinError>;

fn log_activation(done: Option<Activation>) {
    match done {
        Some(Ok((auction_id, Ok(_)))) => debug!(%auction_id, "activated due auction"),
        Some(Ok((auction_id, Err(error)))) => warn!(%auction_id, %error, "activating due auction failed"),
        Some(Err(error)) => warn!(%error, "activating a due auction panicked"),
        None => {}
    }
}

/// Due auctions a sweep reads at a time.
const SWEEP_PAGE: u32 = 1_000;
/// Due auctions a sweep loads at once.
const SWEEP_ACTIVATIONS_AT_ONCE: usize = 16;

/// Live actors `make_room` compares to choose the one to passivate.
const ROOM_SAMPLE: usize = 16;

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
    Unavailable(Unavailable),
    /// The write was handed over but its outcome did not come in time.
    #[error("outcome unknown")]
    OutcomeUnknown,
}

pub struct Node {
    pub settings: NodeSettings,
    pub clock: Arc<dyn Clock>,
    pub store: Arc<dyn Store>,
    pub leases: Arc<Leases>,
    pub persistence: ActorRef<PersistenceMsg>,
    pub persistence_queue: Arc<Admission>,
    registry: Arc<Registry>,
    env: Arc<AuctionEnv>,
    accepting: AtomicBool,
    /// Set by the persistence actor's supervisor if it fails: nothing can
    /// become durable any more, so the node takes no writes and is not ready.
    persistence_failed: Arc<AtomicBool>,
    /// How many commits are failing and being retried.
    commits_failing: Arc<AtomicUsize>,
    supervisor: ActorRef<()>,
    /// Where the persistence actor runs when it has a thread of its own
    /// (`PersistenceSettings::own_thread`, `commit_runtime`); stopped with the node.
    _commit_runtime: Option<OwnedRuntime>,
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
        let commits_failing = Arc::new(AtomicUsize::new(0));
        let persistence_actor = PersistenceActor {
            store: store.clone(),
            queue: persistence_queue.clone(),
            settings: settings.persistence.clone(),
            leases: leases.clone(),
            failing: commits_failing.clone(),
        };
        let persistence_failed = Arc::new(AtomicBool::new(false));
        let supervisor_actor = PersistenceSupervisor { failed: persistence_failed.clone() };
        let (supervisor, _) = Actor::spawn(None, supervisor_actor, ()).await?;
        let commit_runtime = if settings.persistence.own_thread {
            Some(commit_runtime().map_err(|error| ractor::SpawnErr::StartupFailed(error.into()))?)
        } else {
            None
        };
        let spawn = Actor::spawn_linked(None, persistence_actor, (), supervisor.get_cell());
        let (persistence, _) = match &commit_runtime {
            Some(runtime) => {
                runtime.spawn(spawn).await.map_err(|error| ractor::SpawnErr::StartupFailed(error.into()))??
            }
            None => spawn.await?,
        };
        let registry = Arc::new(Registry::default());
        let env = Arc::new(AuctionEnv {
            settings: settings.auction(),
            clock: clock.clone(),
            events,
            persistence: persistence.clone(),
            persistence_queue: persistence_queue.clone(),
            leases: leases.clone(),
            directory: registry.clone(),
            timers: crate::timers::Timers::start(|generation| AuctionMsg::Tick { generation }),
        });
        let node = Arc::new(Node {
            settings,
            clock,
            store,
            leases,
            persistence,
            persistence_queue,
            registry,
            env,
            accepting: AtomicBool::new(true),
            persistence_failed,
            commits_failing,
            supervisor,
            _commit_runtime: commit_runtime,
            mailbox_depth: metrics::gauge!(crate::metrics_names::ACTOR_MAILBOX_DEPTH),
        });
        Node::spawn_idle_checks(Arc::downgrade(&node));
        Ok(node)
    }

    /// Every `idle_check_interval`, asks each live actor whether it has been
    /// idle long enough to passivate. One task for the node rather than a
    /// timer task per actor: an idle actor then costs no task of its own. The
    /// shards take turns over the interval, so the questions come spread out,
    /// not as one burst to every actor at once.
    fn spawn_idle_checks(node: std::sync::Weak<Node>) {
        let Some(interval) = node.upgrade().map(|node| node.settings.idle_check_interval) else {
            return;
        };
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval((interval / SHARD_COUNT).max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            for shard in (0..SHARD_COUNT).cycle() {
                ticks.tick().await;
                let Some(node) = node.upgrade().filter(|node| node.is_accepting()) else {
                    return;
                };
                for handle in node.registry.handles_of_shard(shard) {
                    let _ = handle.actor.cast(AuctionMsg::IdleCheck);
                }
            }
        });
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
        self.registry.len()
    }

    /// The leases the live actors write under.
    pub fn live_leases(&self) -> std::collections::HashSet<ShardLease> {
        self.registry.handles().iter().map(|handle| handle.lease).collect()
    }

    /// Whether the auction has an actor on this node now.
    pub fn is_live(&self, auction_id: AuctionId) -> bool {
        self.registry.live_handle(auction_id).is_some()
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire) && !self.persistence_failed()
    }

    /// Whether a commit is failing right now (the store is unreachable or
    /// refusing) and being retried: its writes wait, and `/ready` says so.
    pub fn commits_failing(&self) -> bool {
        self.commits_failing.load(Ordering::Acquire) > 0
    }

    /// Whether the persistence actor failed (a bug): the node can make nothing
    /// durable until it is restarted.
    pub fn persistence_failed(&self) -> bool {
        self.persistence_failed.load(Ordering::Acquire)
    }

    async fn call_write<F>(self: &Arc<Self>, auction_id: AuctionId, message: F) -> Result<WriteOutcome, NodeError>
    where
        F: Fn(ractor::RpcReplyPort<WriteOutcome>) -> AuctionMsg,
    {
        if self.persistence_failed() {
            return Err(NodeError::Unavailable(Unavailable::PersistenceGone));
        }
        if !self.is_accepting() {
            return Err(NodeError::Unavailable(Unavailable::ShuttingDown));
        }
        let shard = shard_of(auction_id);
        // A passivating actor may stop with our message unread; the message had
        // no effect then, so one retry on a fresh actor is safe. Retiring an
        // actor of an older lease (below) is not an attempt: it happens once
        // per lease the node took again, and the lease is read each time.
        let mut attempts = 0;
        while attempts < 3 {
            let Some(lease) = self.leases.lease_for(shard) else {
                return Err(NodeError::Unavailable(Unavailable::NotOwner { shard }));
            };
            let handle = match self.registry.live_handle(auction_id) {
                Some(handle) if handle.actor.get_status() != ActorStatus::Stopped => handle,
                // Starting an actor (the store's read, the actor's spawn) is
                // rare next to a call on a running one, and its future is
                // large: boxed, a write's own future stays small, and every
                // layer above a bid (handler, routing, span) moves it whole.
                _ => Box::pin(self.activate(auction_id)).await?,
            };
            if handle.lease.epoch < lease.epoch {
                // An actor of a lease the node lost and has taken again since:
                // it takes no more writes. Once it has finished those in flight
                // and stopped, the auction starts afresh under the lease held now.
                Box::pin(self.retire(&handle)).await?;
                self.registry.forget(auction_id, handle.actor.get_id());
                continue;
            }
            attempts += 1;
            if handle.activity.queued.fetch_add(1, Ordering::AcqRel) >= self.settings.auction_mailbox_capacity {
                handle.activity.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(NodeError::Unavailable(Unavailable::Saturated));
            }
            let answered = {
                // Counted until answered, or until the caller gives up and drops this.
                let _in_use = AdmissionGauge::new(&self.mailbox_depth);
                self.call(&handle, &message).await
            };
            match answered {
                Ok(outcome) => return Ok(outcome),
                Err(CallFailure::Gone) => {
                    self.registry.forget(auction_id, handle.actor.get_id());
                    continue;
                }
                Err(CallFailure::Timeout) => return Err(NodeError::OutcomeUnknown),
            }
        }
        Err(NodeError::Unavailable(Unavailable::ActorKeepsStopping))
    }

    async fn call<F>(&self, handle: &AuctionHandle, message: &F) -> Result<WriteOutcome, CallFailure>
    where
        F: Fn(ractor::RpcReplyPort<WriteOutcome>) -> AuctionMsg,
    {
        // Boxed: the call's future (the message, its timer, the reply port) is
        // most of a bid's, and every layer above it moves what it holds.
        match Box::pin(handle.actor.call(message, Some(self.settings.call_timeout))).await {
            Ok(CallResult::Success(outcome)) => Ok(outcome),
            Ok(CallResult::Timeout) => Err(CallFailure::Timeout),
            // The reply port was dropped unanswered. If the actor stopped in
            // order, the message was dropped unread and had no effect: try a
            // fresh actor. If it failed (a panic), it may have taken the write
            // and sent it to the store; if it still runs, something else went
            // wrong: either way the write may stand.
            Ok(CallResult::SenderError) => {
                if handle.activity.stopped_in_order.load(Ordering::Acquire) {
                    Err(CallFailure::Gone)
                } else {
                    Err(CallFailure::Timeout)
                }
            }
            Err(MessagingErr::SendErr(_) | MessagingErr::ChannelClosed | MessagingErr::InvalidActorType) => {
                handle.activity.queued.fetch_sub(1, Ordering::AcqRel);
                Err(CallFailure::Gone)
            }
        }
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
            let slot = self.registry.slot(auction_id);
            let handle = slot.get_or_try_init(|| self.spawn_actor(auction_id, preloaded.take())).await;
            match handle {
                Ok(handle) if handle.actor.get_status() == ActorStatus::Stopped => {
                    if !handle.activity.stopped_in_order.load(Ordering::Acquire) {
                        // It failed: what it sent the store goes first, so the
                        // next actor loads a state that holds it.
                        self.settle_writes_of(handle.actor.get_id()).await?;
                    }
                    self.registry.forget(auction_id, handle.actor.get_id());
                }
                Ok(handle) => return Ok(handle.clone()),
                Err(error) => {
                    self.registry.remove_unfilled(auction_id, &slot);
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
        // Shutting down, it would start after the shutdown took the actors to stop.
        if !self.is_accepting() {
            return Err(NodeError::Unavailable(Unavailable::ShuttingDown));
        }
        let shard = shard_of(auction_id);
        let Some(lease) = self.leases.lease_for(shard) else {
            return Err(NodeError::Unavailable(Unavailable::NotOwner { shard }));
        };
        let loaded = match preloaded {
            Some(loaded) => loaded,
            None => self.load(auction_id).await?,
        };
        self.make_room(auction_id);
        let activity = Arc::new(Activity::default());
        let args = AuctionArgs { loaded, lease, activity: activity.clone() };
        let actor = AuctionActor { env: self.env.clone() };
        match Actor::spawn(None, actor, args).await {
            Ok((actor, _)) => Ok(AuctionHandle { actor, activity, lease }),
            Err(error) => {
                warn!(%auction_id, %error, "spawning auction actor failed");
                Err(NodeError::Unavailable(Unavailable::ActorFailedToStart))
            }
        }
    }

    /// With `max_live_auctions` live (counting the one about to start), asks
    /// the idle actor written to least recently, of a few sampled from the
    /// shards `auction_id` leads to, to passivate. Sampling, not a full order
    /// of every actor by use, so that a bid costs one clock store and an
    /// activation a few lookups; an actor with writes in flight or queued
    /// declines, and the next activation tries others.
    fn make_room(&self, auction_id: AuctionId) {
        if self.registry.len() <= self.settings.max_live_auctions {
            return;
        }
        let victim = self
            .registry
            .sample(auction_id.as_u128() as u64, ROOM_SAMPLE)
            .into_iter()
            .filter(|handle| handle.activity.queued.load(Ordering::Acquire) == 0)
            .min_by_key(|handle| handle.activity.last_write_ms.load(Ordering::Relaxed));
        if let Some(victim) = victim {
            let _ = victim.actor.cast(AuctionMsg::MakeRoom);
        }
    }

    /// Waits until the persistence actor holds none of the writes `actor`
    /// sent, each committed or refused: `actor` stopped without finishing (a
    /// panic), and its auction's state must not be loaded again before then
    /// (a write still on its way would come after the new actor's, under
    /// the same `seq`).
    async fn settle_writes_of(&self, actor: ractor::ActorId) -> Result<(), NodeError> {
        let settled = self
            .persistence
            .call(|reply| PersistenceMsg::Settled { actor, reply }, Some(self.settings.call_timeout))
            .await;
        match settled {
            Ok(CallResult::Success(())) => Ok(()),
            Ok(CallResult::Timeout) => Err(NodeError::Unavailable(Unavailable::StoreTimedOut)),
            _ => Err(NodeError::Unavailable(Unavailable::PersistenceGone)),
        }
    }

    async fn load(&self, auction_id: AuctionId) -> Result<LoadedAuction, NodeError> {
        match tokio::time::timeout(self.settings.load_timeout, self.store.load_auction(auction_id)).await {
            Ok(Ok(Some(loaded))) => Ok(loaded),
            Ok(Ok(None)) => Err(NodeError::NotFound),
            Ok(Err(error)) => {
                warn!(%auction_id, %error, "loading auction failed");
                Err(NodeError::Unavailable(Unavailable::StoreUnavailable))
            }
            Err(_) => Err(NodeError::Unavailable(Unavailable::StoreTimedOut)),
        }
    }

    /// Tells `handle`'s actor to take no more writes, and waits (at most
    /// `call_timeout` each) until it has answered or refused what it had in
    /// flight, and until it has stopped.
    /// Refused `StoreTimedOut` when it does not (its writes wait for a commit);
    /// the write that asked has not been sent anywhere.
    async fn retire(&self, handle: &AuctionHandle) -> Result<(), NodeError> {
        let timeout = self.settings.call_timeout;
        let timed_out = NodeError::Unavailable(Unavailable::StoreTimedOut);
        // Answered once its writes in flight are; an actor stopped already drops it unread.
        if let Ok(CallResult::Timeout) = handle.actor.call(AuctionMsg::Retire, Some(timeout)).await {
            return Err(timed_out);
        }
        handle.actor.wait(Some(timeout)).await.map_err(|_| timed_out)
    }

    /// Tells every actor writing under `lease` to take no more writes, and
    /// waits (at most `call_timeout`) until each has answered or refused what
    /// it had in flight and stopped. Call after the lease was revoked in
    /// `leases`. Actors of the shard under another epoch (the node took it
    /// again since) go on.
    pub async fn retire_shard(&self, lease: ShardLease) {
        let shard = lease.shard;
        let handles: Vec<AuctionHandle> =
            self.registry.handles_of_shard(shard).into_iter().filter(|handle| handle.lease == lease).collect();
        if handles.is_empty() {
            return;
        }
        let timeout = self.settings.call_timeout;
        let calls: Vec<_> = handles
            .iter()
            .map(|handle| {
                let actor = handle.actor.clone();
                tokio::spawn(async move { actor.call(AuctionMsg::Retire, Some(timeout)).await })
            })
            .collect();
        let mut unfinished = 0;
        for call in calls {
            if !matches!(call.await, Ok(Ok(CallResult::Success(())))) {
                unfinished += 1;
            }
        }
        if unfinished > 0 {
            warn!(shard, unfinished, "some auctions did not retire in time; the store's epoch check fences them");
        }
        debug!(shard, auctions = handles.len(), "shard retired");
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

    /// Activates every due auction of this node's shards not live yet, the
    /// earliest due first, reading them a page at a time. (One page of the
    /// first thousand would do only while fewer are due: the auctions it
    /// activated stay due until they end, and would fill every page after.)
    pub async fn sweep_once(self: &Arc<Self>) {
        let horizon_ms = self.clock.now_ms() + self.settings.sweep_horizon.as_millis() as i64;
        let mut after = None;
        while self.is_accepting() {
            let page = self.store.due_auctions(horizon_ms, after, SWEEP_PAGE);
            let due = match tokio::time::timeout(self.settings.load_timeout, page).await {
                Ok(Ok(due)) => due,
                Ok(Err(error)) => {
                    warn!(%error, "sweep for due auctions failed");
                    return;
                }
                Err(_) => {
                    warn!("sweep for due auctions timed out");
                    return;
                }
            };
            after = due.last().copied();
            // Each due auction is its shard owner's to run; the others skip it.
            let to_activate = due.iter().map(|due| due.id).filter(|&auction_id| {
                self.leases.lease_for(shard_of(auction_id)).is_some() && self.registry.live_handle(auction_id).is_none()
            });
            let mut loading = tokio::task::JoinSet::new();
            for auction_id in to_activate {
                if loading.len() >= SWEEP_ACTIVATIONS_AT_ONCE {
                    log_activation(loading.join_next().await);
                }
                let node = self.clone();
                loading.spawn(async move { (auction_id, node.activate(auction_id).await) });
            }
            while let Some(done) = loading.join_next().await {
                log_activation(Some(done));
            }
            if due.len() < SWEEP_PAGE as usize {
                return;
            }
        }
    }

    /// Stops taking writes, commits everything handed over, stops every actor.
    /// Call after the edges have stopped taking requests and answered theirs.
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::Release);
        // No auction starts or ends from here on (the next owner's sweep does
        // it): an end applied after the drain could commit unannounced.
        self.env.timers.stop();
        let handles = self.registry.handles();
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
        self.supervisor.stop(Some("shutdown".to_owned()));
        info!(auctions = handles.len(), "node stopped");
    }
}

/// The persistence actor's own thread: a runtime of one worker
/// (`PersistenceSettings::own_thread`). Its commits' sockets are registered
/// with it, so a commit's answer wakes this thread, which tells the auction
/// actors (on the node's workers) and sends the next batch without waiting
/// for a worker. Dropped with the node: the thread stops (after
/// `Node::shutdown`, nothing is left on it).
fn commit_runtime() -> std::io::Result<OwnedRuntime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gavel-commit")
        .enable_all()
        .build()?;
    Ok(OwnedRuntime::new(runtime))
}

/// Supervises the persistence actor. A failure (a panic: a bug) cannot be
/// mended by a restart in place: the writes of the batch it held are in no
/// one's hands, and their auctions wait for an answer that will not come. So
/// it fails the node instead: no more writes, `/ready` says why, and the
/// process is for its supervisor (systemd, compose, Kubernetes) to restart;
/// every acknowledged bid is in the store, and a restart reloads from it.
struct PersistenceSupervisor {
    failed: Arc<AtomicBool>,
}

impl Actor for PersistenceSupervisor {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<()>, _args: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, error) = event {
            tracing::error!(%error, "the persistence actor failed; this node takes no more writes");
            self.failed.store(true, Ordering::Release);
        }
        Ok(())
    }
}
