//! One actor per live auction. It owns the auction's state and applies every
//! command to it in mailbox order, so bids on one auction are serialised with
//! no lock. It never waits on I/O: an accepted command becomes a write handed
//! to the persistence actor, and the bidder's reply waits in `pending` until the
//! persistence actor says the write is durable. Rejections are answered at once.
//!
//! The actor also runs the auction's clock: a timer for the next start or end
//! (soft close moves it), and an idle check that passivates the actor when
//! nothing has happened for a while (the store holds everything it knew).
//!
//! It writes under the lease its shard had when it started. Before taking a
//! write it checks that the node still holds that lease (one atomic read): a
//! node that handed the shard over, or lost it, answers `NotOwner` and the
//! actor retires: it finishes what it has in flight, then stops. The store's
//! epoch check inside every commit is what makes this safe; this check only
//! makes it prompt.
//!
//! The actor knows nothing of the node that hosts it: it gets an
//! `AuctionEnv` (settings, clock, sinks, the persistence actor, the leases and a
//! `Directory` told when it stops).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{debug, info, warn};

use crate::admission::Admission;
use crate::auction::idempotency::{IdempotencyKey, Lookup, RecentKeys};
use crate::auction::state::{AuctionId, AuctionState, BidCommand, Command, Event, TimestampMs, UserId};
pub use crate::outcome::{KeyedRequest, Unavailable, WriteOutcome};
use crate::persistence::{PersistenceMsg, Refusal, WriteOrigin};
use crate::ports::{Clock, EventSink, KeyRecord, LoadedAuction, Write};
use crate::shards::{Leases, ShardLease};

/// What an auction actor needs of its settings.
#[derive(Clone, Debug)]
pub struct AuctionSettings {
    pub recent_keys_per_auction: usize,
    pub idle_after: Duration,
    pub idle_after_final: Duration,
    pub idle_check_interval: Duration,
}

/// Told when an auction actor has stopped, so whoever finds actors by auction
/// forgets this one (and only this one).
pub trait Directory: Send + Sync + 'static {
    fn stopped(&self, auction_id: AuctionId, actor: ractor::ActorId);
}

/// Everything an auction actor uses besides its own state; shared by all of them.
pub struct AuctionEnv {
    pub settings: AuctionSettings,
    pub clock: Arc<dyn Clock>,
    pub events: Arc<dyn EventSink>,
    pub persistence: ActorRef<PersistenceMsg>,
    /// Slots of the persistence queue, reserved before a write is sent.
    pub persistence_queue: Arc<Admission>,
    pub leases: Arc<Leases>,
    pub directory: Arc<dyn Directory>,
    /// Sends each actor its `Tick` when its auction should start or end.
    pub timers: Arc<crate::timers::Timers<AuctionMsg>>,
}

pub enum AuctionMsg {
    Bid {
        command: BidCommand,
        key: Option<KeyedRequest>,
        reply: RpcReplyPort<WriteOutcome>,
        /// The bid's trace span (request → actor → commit → fan-out).
        span: tracing::Span,
    },
    Cancel {
        by: UserId,
        key: Option<KeyedRequest>,
        reply: RpcReplyPort<WriteOutcome>,
    },
    /// The persistence actor made writes up to and including this one durable.
    Durable {
        through_write_no: u64,
    },
    /// The persistence actor refused writes from this one on (lease lost, or
    /// the store refuses the write itself).
    WriteRefused {
        from_write_no: u64,
        why: Refusal,
    },
    /// The committed state, as readers and new watchers should see it.
    Committed(RpcReplyPort<AuctionState>),
    /// Take no more writes; answer once every write in flight is durable or
    /// refused, then stop (the shard is being handed over or was lost).
    Retire(RpcReplyPort<()>),
    Tick {
        generation: u64,
    },
    IdleCheck,
    /// Stop if idle (nothing in flight or queued), whenever it last took a
    /// write: the node has too many live actors, and of those it sampled this
    /// one was written to least recently (`NodeSettings::max_live_auctions`).
    MakeRoom,
}

/// What callers hold: the actor and what the node reads of it without asking.
#[derive(Clone)]
pub struct AuctionHandle {
    pub actor: ActorRef<AuctionMsg>,
    pub activity: Arc<Activity>,
    /// The lease the actor writes under, from its start to its end.
    pub lease: ShardLease,
}

/// What the node reads of an auction actor without asking it (shared by the
/// actor and its handle): its admission counter, and how recently it was
/// written to, to choose which actor makes room when too many are live.
#[derive(Debug, Default)]
pub struct Activity {
    /// Bid and cancel messages sent but not yet handled.
    pub queued: AtomicUsize,
    /// When it last took a bid or a cancel, or started (the node's clock).
    pub last_write_ms: AtomicI64,
    /// Set as it stops in order (`post_stop`): a call it then drops was never
    /// read. An actor that stopped without it (a panic, a kill) may have taken
    /// a write it never answered.
    pub stopped_in_order: AtomicBool,
}

pub struct AuctionActor {
    pub env: Arc<AuctionEnv>,
}

pub struct AuctionArgs {
    pub loaded: LoadedAuction,
    pub lease: ShardLease,
    pub activity: Arc<Activity>,
}

enum KeyState {
    /// Accepted, not yet durable: duplicates wait here for the same answer.
    /// Never evicted from the cache (a duplicate must find it); the persistence
    /// queue bounds how many there are.
    Waiting(Vec<RpcReplyPort<WriteOutcome>>),
    /// Boxed: an outcome holds a whole event (168 bytes), and the keys' map
    /// has room for more entries than it holds (most live auctions keep one
    /// key, in a map of four slots).
    Done(Box<WriteOutcome>),
}

impl KeyState {
    fn is_in_flight(&self) -> bool {
        matches!(self, KeyState::Waiting(_))
    }
}

/// Who a write answers: the reply port, and the bid's trace span when traced.
struct Origin<Reply> {
    reply: Reply,
    span: Option<tracing::Span>,
}

struct PendingWrite {
    write_no: u64,
    event: Event,
    state: AuctionState,
    reply: Option<RpcReplyPort<WriteOutcome>>,
    key: Option<IdempotencyKey>,
    /// The span of the bid that caused it, when traced (none for cancels and
    /// lifecycle writes).
    span: Option<tracing::Span>,
}

pub struct AuctionActorState {
    /// Everything applied, durable or not.
    auction: AuctionState,
    /// What the store holds: `auction` minus the pending writes.
    committed: AuctionState,
    lease: ShardLease,
    pending: VecDeque<PendingWrite>,
    next_write_no: u64,
    recent_keys: RecentKeys<KeyState>,
    activity: Arc<Activity>,
    /// How the persistence actor tells this actor about its writes.
    origin: Arc<dyn WriteOrigin>,
    /// Set once the actor takes no more writes: who waits for it to finish.
    retiring: Option<Vec<RpcReplyPort<()>>>,
    timer: Option<(u64, TimestampMs, crate::timers::TimerKey)>,
    timer_generation: u64,
}

/// Stops an idle actor while its auction stays open (the next write
/// reloads it); `reason` is the stop's and the metric's (`idle` or `room`).
fn passivate(myself: &ActorRef<AuctionMsg>, state: &AuctionActorState, reason: &'static str) {
    debug!(auction_id = %state.auction.id, reason, "passivating");
    metrics::counter!(crate::metrics_names::PASSIVATIONS_TOTAL, "reason" => reason).increment(1);
    myself.stop(Some(reason.to_owned()));
}

impl AuctionActorState {
    /// Nothing in flight, nothing queued: stopping it loses nothing, and the
    /// next write reloads the auction from the store.
    fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.activity.queued.load(Ordering::Acquire) == 0
    }
}

impl Actor for AuctionActor {
    type Msg = AuctionMsg;
    type State = AuctionActorState;
    type Arguments = AuctionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: AuctionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let settings = &self.env.settings;
        let mut recent_keys = RecentKeys::new(settings.recent_keys_per_auction);
        for stored in args.loaded.recent_keys {
            let key = IdempotencyKey { user_id: stored.record.user_id, key: stored.record.key };
            recent_keys.insert(
                key,
                stored.record.fingerprint,
                KeyState::Done(Box::new(WriteOutcome::Replay { seq: stored.seq })),
                KeyState::is_in_flight,
            );
        }
        let now = self.env.clock.now_ms();
        let mut state = AuctionActorState {
            committed: args.loaded.state.clone(),
            auction: args.loaded.state,
            lease: args.lease,
            pending: VecDeque::new(),
            next_write_no: 1,
            recent_keys,
            activity: args.activity,
            origin: Arc::new(myself.clone()),
            retiring: None,
            timer: None,
            timer_generation: 0,
        };
        state.activity.last_write_ms.store(now, Ordering::Relaxed);
        self.schedule_timer(&myself, &mut state, now);
        metrics::gauge!(crate::metrics_names::LIVE_AUCTIONS).increment(1.0);
        debug!(auction_id = %state.auction.id, status = state.auction.status.as_str(), "auction activated");
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        state.activity.stopped_in_order.store(true, Ordering::Release);
        if let Some((_, _, timer)) = state.timer.take() {
            self.env.timers.cancel(timer);
        }
        self.env.directory.stopped(state.auction.id, myself.get_id());
        // Writes handed to the store and not yet answered: the persistence
        // actor may still commit them (a shutdown whose drain timed out).
        for pending in state.pending.drain(..) {
            if let Some(reply) = pending.reply {
                let _ = reply.send(WriteOutcome::Unknown);
            }
        }
        for waiter in state.retiring.take().unwrap_or_default() {
            let _ = waiter.send(());
        }
        metrics::gauge!(crate::metrics_names::LIVE_AUCTIONS).decrement(1.0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = self.env.clock.now_ms();
        match message {
            AuctionMsg::Bid { command, key, reply, span } => {
                state.activity.queued.fetch_sub(1, Ordering::AcqRel);
                state.activity.last_write_ms.store(now, Ordering::Relaxed);
                let span = (!span.is_disabled()).then_some(span);
                self.handle_write(&myself, state, Command::PlaceBid(command), key, Origin { reply, span }, now);
            }
            AuctionMsg::Cancel { by, key, reply } => {
                state.activity.queued.fetch_sub(1, Ordering::AcqRel);
                state.activity.last_write_ms.store(now, Ordering::Relaxed);
                self.handle_write(&myself, state, Command::Cancel { by }, key, Origin { reply, span: None }, now);
            }
            AuctionMsg::Durable { through_write_no } => {
                self.release_durable(state, through_write_no);
                finish_retiring(&myself, state);
            }
            AuctionMsg::WriteRefused { from_write_no, why } => {
                warn!(auction_id = %state.auction.id, from_write_no, ?why, "writes refused, stopping the auction actor");
                let refused = |reason| WriteOutcome::Unavailable(reason);
                match why {
                    Refusal::Fenced => {
                        self.fail_pending_with(state, from_write_no, |_| refused(Unavailable::WriteRefused));
                    }
                    // Those the lost attempt carried may stand; the later ones were not made.
                    Refusal::FencedAfterLostAnswer { through_write_no } => {
                        self.fail_pending_with(state, from_write_no, |write_no| {
                            if write_no <= through_write_no {
                                WriteOutcome::Unknown
                            } else {
                                refused(Unavailable::WriteRefused)
                            }
                        });
                    }
                    Refusal::Invalid => {
                        self.fail_pending_with(state, from_write_no, |_| refused(Unavailable::WriteInvalid));
                    }
                    // The write's key went to another write first: the documented
                    // 422 for it; the writes applied on top of it are not accepted.
                    Refusal::KeyReused => self.fail_pending_with(state, from_write_no, |write_no| {
                        if write_no == from_write_no {
                            WriteOutcome::KeyReused
                        } else {
                            refused(Unavailable::WriteInvalid)
                        }
                    }),
                }
                // Its state is ahead of the store now: it must not take another write.
                state.retiring.get_or_insert_with(Vec::new);
                finish_retiring(&myself, state);
            }
            AuctionMsg::Committed(reply) => {
                let _ = reply.send(state.committed.clone());
            }
            AuctionMsg::Retire(reply) => {
                debug!(auction_id = %state.auction.id, pending = state.pending.len(), "retiring");
                state.retiring.get_or_insert_with(Vec::new).push(reply);
                finish_retiring(&myself, state);
            }
            AuctionMsg::Tick { generation } => {
                if state.retiring.is_some() || self.env.leases.epoch_of(state.lease.shard) != Some(state.lease.epoch) {
                    // The shard's next owner runs the auction's clock.
                    state.retiring.get_or_insert_with(Vec::new);
                    finish_retiring(&myself, state);
                } else if state.timer.as_ref().is_some_and(|(current, _, _)| *current == generation) {
                    state.timer = None;
                    self.apply_due(&myself, state, now);
                    self.schedule_timer(&myself, state, now);
                }
            }
            AuctionMsg::IdleCheck => {
                let idle_after = if state.auction.status.is_final() {
                    self.env.settings.idle_after_final
                } else {
                    self.env.settings.idle_after
                };
                let idle_ms = now - state.activity.last_write_ms.load(Ordering::Relaxed);
                if state.is_idle() && idle_ms >= idle_after.as_millis() as i64 {
                    passivate(&myself, state, "idle");
                }
            }
            AuctionMsg::MakeRoom => {
                if state.is_idle() && state.retiring.is_none() {
                    passivate(&myself, state, "room");
                }
            }
        }
        Ok(())
    }
}

impl AuctionActor {
    fn handle_write(
        &self,
        myself: &ActorRef<AuctionMsg>,
        state: &mut AuctionActorState,
        command: Command,
        key: Option<KeyedRequest>,
        origin: Origin<RpcReplyPort<WriteOutcome>>,
        now: TimestampMs,
    ) {
        let Origin { reply, span } = origin;
        if state.retiring.is_some() || !self.env.leases.still_holds(state.lease) {
            let _ = reply.send(WriteOutcome::Unavailable(Unavailable::NotOwner { shard: state.lease.shard }));
            if self.env.leases.epoch_of(state.lease.shard) != Some(state.lease.epoch) {
                state.retiring.get_or_insert_with(Vec::new);
                finish_retiring(myself, state);
            }
            return;
        }
        if let Some(keyed) = &key {
            match state.recent_keys.lookup(&keyed.key, keyed.fingerprint) {
                Lookup::Miss => {}
                Lookup::Mismatch => {
                    let _ = reply.send(WriteOutcome::KeyReused);
                    return;
                }
                Lookup::Hit(KeyState::Done(outcome)) => {
                    let _ = reply.send(WriteOutcome::clone(outcome));
                    return;
                }
                Lookup::Hit(KeyState::Waiting(waiters)) => {
                    waiters.push(reply);
                    return;
                }
            }
        }
        // Lifecycle first: a bid never lands after the end, even if a timer is late.
        self.apply_due(myself, state, now);
        if !self.env.persistence_queue.try_acquire() {
            // Not applied, so nothing to undo; not remembered under the key either.
            let _ = reply.send(WriteOutcome::Unavailable(Unavailable::QueueFull));
            return;
        }
        match state.auction.apply(command, now) {
            Err(rejection) => {
                self.env.persistence_queue.release(1);
                let outcome = WriteOutcome::Rejected(rejection);
                if let Some(keyed) = key {
                    state.recent_keys.insert(
                        keyed.key,
                        keyed.fingerprint,
                        KeyState::Done(Box::new(outcome.clone())),
                        KeyState::is_in_flight,
                    );
                }
                let _ = reply.send(outcome);
            }
            Ok(event) => {
                let key_record = key.map(|keyed| {
                    let record = KeyRecord {
                        user_id: keyed.key.user_id,
                        key: keyed.key.key.clone(),
                        fingerprint: keyed.fingerprint,
                    };
                    state.recent_keys.insert(
                        keyed.key.clone(),
                        keyed.fingerprint,
                        KeyState::Waiting(Vec::new()),
                        KeyState::is_in_flight,
                    );
                    (keyed.key, record)
                });
                self.send_write(myself, state, event, Origin { reply: Some(reply), span }, key_record, now);
                self.schedule_timer(myself, state, now);
            }
        }
    }

    /// Applies whatever start or end is due; their writes take a queue slot
    /// even past capacity, since an auction's end must not be refused.
    fn apply_due(&self, myself: &ActorRef<AuctionMsg>, state: &mut AuctionActorState, now: TimestampMs) {
        while let Some(command) = state.auction.due(now) {
            let event = match state.auction.apply(command, now) {
                Ok(event) => event,
                Err(rejection) => {
                    debug_assert!(false, "a due command was rejected: {rejection:?}");
                    return;
                }
            };
            info!(auction_id = %state.auction.id, status = state.auction.status.as_str(), "auction lifecycle");
            self.env.persistence_queue.acquire_unconditionally();
            self.send_write(myself, state, event, Origin { reply: None, span: None }, None, now);
        }
    }

    fn send_write(
        &self,
        myself: &ActorRef<AuctionMsg>,
        state: &mut AuctionActorState,
        event: Event,
        origin: Origin<Option<RpcReplyPort<WriteOutcome>>>,
        key: Option<(IdempotencyKey, KeyRecord)>,
        now: TimestampMs,
    ) {
        let Origin { reply, span } = origin;
        let (key, key_record) = key.unzip();
        let write_no = state.next_write_no;
        state.next_write_no += 1;
        let bid = match &event {
            Event::BidPlaced(placed) => Some(placed.clone()),
            _ => None,
        };
        if let (Some(placed), Some(span)) = (&bid, &span) {
            span.record("seq", placed.seq);
            span.in_scope(|| debug!(seq = placed.seq, "bid applied, waiting for commit"));
        }
        let write = Write { lease: state.lease, at_ms: now, auction: state.auction.clone(), bid, key: key_record };
        let message =
            PersistenceMsg::Write { write: Box::new(write), from: state.origin.clone(), write_no, span: span.clone() };
        state.pending.push_back(PendingWrite { write_no, event, state: state.auction.clone(), reply, key, span });
        if self.env.persistence.cast(message).is_err() {
            // Without a persistence actor nothing can become durable: stop, so the
            // next request reloads from the store.
            warn!(auction_id = %state.auction.id, "persistence actor gone, stopping");
            self.env.persistence_queue.release(1);
            self.fail_pending_with(state, write_no, |_| WriteOutcome::Unavailable(Unavailable::PersistenceGone));
            myself.stop(Some("persistence gone".to_owned()));
        }
    }

    /// Answers bidders and publishes events for every write now durable, in order.
    fn release_durable(&self, state: &mut AuctionActorState, through_write_no: u64) {
        while state.pending.front().is_some_and(|pending| pending.write_no <= through_write_no) {
            let pending = state.pending.pop_front().expect("checked non-empty");
            let _entered = pending.span.as_ref().map(tracing::Span::enter);
            if pending.span.is_some() {
                debug!(seq = pending.state.seq, "durable; answering and publishing");
            }
            state.committed = pending.state.clone();
            self.env.events.publish(&pending.event, &pending.state);
            let outcome = WriteOutcome::Accepted { event: pending.event };
            if let Some(key) = pending.key
                && let Some(key_state) = state.recent_keys.get_mut(&key)
            {
                let waiters = match std::mem::replace(key_state, KeyState::Done(Box::new(outcome.clone()))) {
                    KeyState::Waiting(waiters) => waiters,
                    KeyState::Done(_) => Vec::new(),
                };
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
            }
            if let Some(reply) = pending.reply {
                let _ = reply.send(outcome);
            }
        }
        if state.pending.is_empty() && state.pending.capacity() > 0 {
            // A write is some 540 bytes and the buffer keeps room for four:
            // an auction that waits for its next bid holds none of it.
            state.pending = VecDeque::new();
        }
    }

    /// Answers every pending write from `from_write_no` on with
    /// `outcome_of(its write_no)`: not accepted, or not known to be; the
    /// actor stops afterwards, since its state is ahead of the store.
    fn fail_pending_with(
        &self,
        state: &mut AuctionActorState,
        from_write_no: u64,
        outcome_of: impl Fn(u64) -> WriteOutcome,
    ) {
        state.pending.retain_mut(|pending| {
            if pending.write_no < from_write_no {
                return true;
            }
            let outcome = outcome_of(pending.write_no);
            if let Some(reply) = pending.reply.take() {
                let _ = reply.send(outcome.clone());
            }
            // Not written, or not known to be: a retry with this key must be
            // decided anew from the store (by the next owner), and duplicates
            // waiting on it get the same answer.
            if let Some(key) = &pending.key
                && let Some(KeyState::Waiting(waiters)) = state.recent_keys.remove(key)
            {
                for waiter in waiters {
                    let _ = waiter.send(outcome.clone());
                }
            }
            false
        });
    }

    fn schedule_timer(&self, myself: &ActorRef<AuctionMsg>, state: &mut AuctionActorState, now: TimestampMs) {
        let Some(deadline) = state.auction.next_deadline() else {
            if let Some((_, _, timer)) = state.timer.take() {
                self.env.timers.cancel(timer);
            }
            return;
        };
        if state.timer.as_ref().is_some_and(|(_, scheduled, _)| *scheduled == deadline) {
            return;
        }
        if let Some((_, _, timer)) = state.timer.take() {
            self.env.timers.cancel(timer);
        }
        state.timer_generation += 1;
        let generation = state.timer_generation;
        let delay = Duration::from_millis(u64::try_from(deadline - now).unwrap_or(0));
        let at = tokio::time::Instant::now() + delay;
        let timer = self.env.timers.schedule(at, myself.clone(), generation);
        state.timer = Some((generation, deadline, timer));
    }
}

/// Stops a retiring actor once nothing it took is still in flight, and tells
/// whoever waits for it.
fn finish_retiring(myself: &ActorRef<AuctionMsg>, state: &mut AuctionActorState) {
    if state.retiring.is_none() || !state.pending.is_empty() {
        return;
    }
    for waiter in state.retiring.take().unwrap_or_default() {
        let _ = waiter.send(());
    }
    state.retiring = Some(Vec::new());
    myself.stop(Some("retired".to_owned()));
}

impl WriteOrigin for ActorRef<AuctionMsg> {
    fn actor_id(&self) -> ractor::ActorId {
        self.get_id()
    }

    fn durable(&self, through_write_no: u64) {
        // An actor that is gone has nobody left to answer; its writes are durable anyway.
        let _ = self.cast(AuctionMsg::Durable { through_write_no });
    }

    fn refused(&self, from_write_no: u64, why: Refusal) {
        let _ = self.cast(AuctionMsg::WriteRefused { from_write_no, why });
    }
}
