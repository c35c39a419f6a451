//! One actor per live auction. It owns the auction's state and applies every
//! command to it in mailbox order, so bids on one auction are serialised with
//! no lock. It never waits on I/O: an accepted command becomes a write handed
//! to the persistence actor, and the bidder's reply waits in `pending` until the
//! persistence actor says the write is durable. Rejections are answered at once.
//!
//! The actor also runs the auction's clock: a timer for the next start or end
//! (soft close moves it), and an idle check that passivates the actor when
//! nothing has happened for a while (the store holds everything it knew).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{debug, info, warn};

use crate::auction::idempotency::{IdempotencyKey, Lookup, RecentKeys};
use crate::auction::state::{AuctionState, BidCommand, Command, Event, Rejection, TimestampMs, UserId};
use crate::node::Node;
use crate::persistence::PersistenceMsg;
use crate::ports::{KeyRecord, LoadedAuction, ShardLease, Write};

/// The answer to a bid or a cancel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Durable: the event the command caused.
    Accepted {
        event: Event,
    },
    /// An earlier request with this idempotency key was accepted as `seq`; its
    /// reply is read back from the store.
    Replay {
        seq: u64,
    },
    Rejected(Rejection),
    /// The idempotency key was used before for a different request.
    KeyReused,
    /// Not accepted: the node cannot make it durable now.
    Unavailable {
        reason: &'static str,
    },
}

/// An idempotency key with the fingerprint of the request that carries it.
#[derive(Clone, Debug)]
pub struct KeyedRequest {
    pub key: IdempotencyKey,
    pub fingerprint: u64,
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
    /// The persistence actor refused writes from this one on (lease lost).
    WriteRefused {
        from_write_no: u64,
    },
    /// The committed state, as readers and new watchers should see it.
    Committed(RpcReplyPort<AuctionState>),
    Tick {
        generation: u64,
    },
    IdleCheck,
}

/// What callers hold: the actor and its admission counter.
#[derive(Clone)]
pub struct AuctionHandle {
    pub actor: ActorRef<AuctionMsg>,
    /// Bid and cancel messages sent but not yet handled.
    pub mailbox: Arc<AtomicUsize>,
}

pub struct AuctionActor {
    pub node: Arc<Node>,
}

pub struct AuctionArgs {
    pub loaded: LoadedAuction,
    pub lease: ShardLease,
    pub mailbox: Arc<AtomicUsize>,
}

enum KeyState {
    /// Accepted, not yet durable: duplicates wait here for the same answer.
    /// Never evicted from the cache (a duplicate must find it); the persistence
    /// queue bounds how many there are.
    Waiting(Vec<RpcReplyPort<WriteOutcome>>),
    Done(WriteOutcome),
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
    mailbox: Arc<AtomicUsize>,
    timer: Option<(u64, TimestampMs, JoinHandle<()>)>,
    timer_generation: u64,
    idle_check: Option<JoinHandle<()>>,
    last_activity_ms: TimestampMs,
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
        let settings = &self.node.settings;
        let mut recent_keys = RecentKeys::new(settings.recent_keys_per_auction);
        for stored in args.loaded.recent_keys {
            let key = IdempotencyKey { user_id: stored.record.user_id, key: stored.record.key };
            recent_keys.insert(
                key,
                stored.record.fingerprint,
                KeyState::Done(WriteOutcome::Replay { seq: stored.seq }),
                KeyState::is_in_flight,
            );
        }
        let idle_check = myself.send_interval(settings.idle_check_interval, || AuctionMsg::IdleCheck);
        let now = self.node.clock.now_ms();
        let mut state = AuctionActorState {
            committed: args.loaded.state.clone(),
            auction: args.loaded.state,
            lease: args.lease,
            pending: VecDeque::new(),
            next_write_no: 1,
            recent_keys,
            mailbox: args.mailbox,
            timer: None,
            timer_generation: 0,
            idle_check: Some(idle_check),
            last_activity_ms: now,
        };
        self.schedule_timer(&myself, &mut state, now);
        metrics::gauge!(crate::metrics_names::LIVE_AUCTIONS).increment(1.0);
        debug!(auction_id = %state.auction.id, status = state.auction.status.as_str(), "auction activated");
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some((_, _, timer)) = state.timer.take() {
            timer.abort();
        }
        if let Some(idle_check) = state.idle_check.take() {
            idle_check.abort();
        }
        self.node.forget(state.auction.id, &myself);
        for pending in state.pending.drain(..) {
            if let Some(reply) = pending.reply {
                let _ = reply.send(WriteOutcome::Unavailable { reason: "auction stopped before commit" });
            }
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
        let now = self.node.clock.now_ms();
        match message {
            AuctionMsg::Bid { command, key, reply, span } => {
                state.mailbox.fetch_sub(1, Ordering::AcqRel);
                state.last_activity_ms = now;
                let span = (!span.is_disabled()).then_some(span);
                self.handle_write(&myself, state, Command::PlaceBid(command), key, Origin { reply, span }, now);
            }
            AuctionMsg::Cancel { by, key, reply } => {
                state.mailbox.fetch_sub(1, Ordering::AcqRel);
                state.last_activity_ms = now;
                self.handle_write(&myself, state, Command::Cancel { by }, key, Origin { reply, span: None }, now);
            }
            AuctionMsg::Durable { through_write_no } => self.release_durable(state, through_write_no),
            AuctionMsg::WriteRefused { from_write_no } => {
                warn!(auction_id = %state.auction.id, from_write_no, "writes refused, stopping the auction actor");
                self.fail_pending(state, from_write_no);
                myself.stop(Some("lease lost".to_owned()));
            }
            AuctionMsg::Committed(reply) => {
                let _ = reply.send(state.committed.clone());
            }
            AuctionMsg::Tick { generation } => {
                if state.timer.as_ref().is_some_and(|(current, _, _)| *current == generation) {
                    state.timer = None;
                    self.apply_due(&myself, state, now);
                    self.schedule_timer(&myself, state, now);
                }
            }
            AuctionMsg::IdleCheck => {
                let idle_after = if state.auction.status.is_final() {
                    self.node.settings.idle_after_final
                } else {
                    self.node.settings.idle_after
                };
                let idle_ms = now - state.last_activity_ms;
                let nothing_waiting = state.pending.is_empty() && state.mailbox.load(Ordering::Acquire) == 0;
                if nothing_waiting && idle_ms >= idle_after.as_millis() as i64 {
                    debug!(auction_id = %state.auction.id, idle_ms, "passivating idle auction");
                    myself.stop(Some("idle".to_owned()));
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
        if let Some(keyed) = &key {
            match state.recent_keys.lookup(&keyed.key, keyed.fingerprint) {
                Lookup::Miss => {}
                Lookup::Mismatch => {
                    let _ = reply.send(WriteOutcome::KeyReused);
                    return;
                }
                Lookup::Hit(KeyState::Done(outcome)) => {
                    let _ = reply.send(outcome.clone());
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
        if !self.node.persistence_queue.try_acquire() {
            // Not applied, so nothing to undo; not remembered under the key either.
            let _ = reply.send(WriteOutcome::Unavailable { reason: "persistence queue full" });
            return;
        }
        match state.auction.apply(command, now) {
            Err(rejection) => {
                self.node.persistence_queue.release(1);
                let outcome = WriteOutcome::Rejected(rejection);
                if let Some(keyed) = key {
                    state.recent_keys.insert(
                        keyed.key,
                        keyed.fingerprint,
                        KeyState::Done(outcome.clone()),
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
            self.node.persistence_queue.acquire_unconditionally();
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
            PersistenceMsg::Write { write: Box::new(write), from: myself.clone(), write_no, span: span.clone() };
        state.pending.push_back(PendingWrite { write_no, event, state: state.auction.clone(), reply, key, span });
        if self.node.persistence.cast(message).is_err() {
            // Without a persistence actor nothing can become durable: stop, so the
            // next request reloads from the store.
            warn!(auction_id = %state.auction.id, "persistence actor gone, stopping");
            self.node.persistence_queue.release(1);
            self.fail_pending(state, write_no);
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
            self.node.events.publish(&pending.event, &pending.state);
            let outcome = WriteOutcome::Accepted { event: pending.event };
            if let Some(key) = pending.key
                && let Some(key_state) = state.recent_keys.get_mut(&key)
            {
                let waiters = match std::mem::replace(key_state, KeyState::Done(outcome.clone())) {
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
    }

    /// Answers 503 to every pending write from `from_write_no` on; the actor
    /// stops afterwards, since its state is ahead of the store.
    fn fail_pending(&self, state: &mut AuctionActorState, from_write_no: u64) {
        state.pending.retain_mut(|pending| {
            if pending.write_no < from_write_no {
                return true;
            }
            if let Some(reply) = pending.reply.take() {
                let _ = reply.send(WriteOutcome::Unavailable { reason: "write refused" });
            }
            false
        });
    }

    fn schedule_timer(&self, myself: &ActorRef<AuctionMsg>, state: &mut AuctionActorState, now: TimestampMs) {
        let Some(deadline) = state.auction.next_deadline() else {
            if let Some((_, _, timer)) = state.timer.take() {
                timer.abort();
            }
            return;
        };
        if state.timer.as_ref().is_some_and(|(_, scheduled, _)| *scheduled == deadline) {
            return;
        }
        if let Some((_, _, timer)) = state.timer.take() {
            timer.abort();
        }
        state.timer_generation += 1;
        let generation = state.timer_generation;
        let delay = Duration::from_millis(u64::try_from(deadline - now).unwrap_or(0));
        let actor = myself.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = actor.cast(AuctionMsg::Tick { generation });
        });
        state.timer = Some((generation, deadline, timer));
    }
}
