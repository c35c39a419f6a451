//! The persistence actor: group commit. Auction actors hand it their writes in
//! the order they applied them; it gathers the writes of every auction that
//! queued up while the previous commit ran (optionally waiting `batch_delay`
//! for more, and never more than `max_batch_writes`), commits each batch in one store
//! transaction, and only then tells each auction actor how far its writes are
//! durable, so that bidders are answered and watchers told after commit.
//!
//! Guarantees:
//! - Writes of one auction commit in the order they were sent; a batch never
//!   commits partly (one transaction), so the store always holds a prefix of
//!   what each auction actor applied.
//! - A failed commit is retried, in order, with backoff, forever: nothing is
//!   dropped or reordered. While it retries, the bounded queue fills and new
//!   writes are refused at admission (503) instead of piling up.
//! - A batch the store refuses as invalid (a constraint, a value it does not
//!   take: retrying cannot help) is split in halves, in order, until the write
//!   at fault is alone. That write, and the later writes of its auction (they
//!   were applied on top of it), are refused; its auction actor answers them
//!   503 and stops, so the auction reloads from the store. Every other write
//!   is committed: one bad write never stops the others.
//! - Writes under a stale lease (shard and epoch) are the other exception:
//!   they are not retried, their auctions are told to stop, and the lease is
//!   dropped from the node's leases if it is still the one held (no auction
//!   under it takes another write; the lease manager finds out who owns the
//!   shard now). The batch's other writes are retried. The refused writes
//!   were not made, unless an earlier attempt at the same commit lost its answer: it
//!   may have committed before the lease moved, and their auctions are told
//!   so (`Refusal::FencedAfterLostAnswer`) instead of "not made".
//!
//! One commit is in flight at a time, run by the actor itself, except as a
//! hedge (`hedge_after`, on a store that can run two transactions at once):
//! a commit still running after that long (a lock, a paused CPU under its
//! database backend) is left to finish in a task of its own, and the actor
//! commits the next writes of every auction not in it beside it. An
//! auction's writes still go one commit at a time, in order: those of an
//! auction with a commit in flight wait for it, so a failed or refused
//! commit holds back exactly its own auctions' later writes, as above.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};

/// Who sent a write, and how to tell them how it went: the auction actor
/// behind it (implemented in `auction_actor.rs`; this actor needs no more).
pub trait WriteOrigin: Send + Sync + 'static {
    fn actor_id(&self) -> ActorId;
    /// Writes up to and including `through_write_no` are durable.
    fn durable(&self, through_write_no: u64);
    /// Writes from `from_write_no` on were refused and will not be made.
    fn refused(&self, from_write_no: u64, why: Refusal);
}

/// Why writes were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The shard's lease moved to another node: the writes were not made.
    Fenced,
    /// The shard's lease moved to another node after an attempt at this
    /// commit whose answer was lost (a timeout, a broken connection). That
    /// attempt may have committed before the lease moved (a takeover waits
    /// for a commit holding the lease rows), so the writes it carried, up to
    /// `through_write_no`, may stand; the later ones were not made.
    FencedAfterLostAnswer { through_write_no: u64 },
    /// The store refuses the write itself (a constraint, a value it does not take).
    Invalid,
    /// Its idempotency key was stored for another write (sent at once elsewhere).
    KeyReused,
}

type Origin = (Arc<dyn WriteOrigin>, u64);

/// What a commit came to.
enum Committed {
    All,
    /// Every write was fenced.
    Nothing,
    /// Refused as it is; why, and the store's words.
    Invalid(Refusal, String),
}

/// Auctions whose writes were refused as invalid, remembered at most this many.
const REFUSED_AUCTIONS_KEPT: usize = 4_096;
use tracing::{debug, error, warn};

use crate::admission::Admission;
use crate::metrics_names as names;
use crate::ports::{Store, StoreError, Write};
use crate::shards::{Leases, ShardLease};
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct PersistenceSettings {
    /// How long the first write of a batch waits for company. Zero: the batch
    /// is what is queued when the first write is handled, which under load is
    /// everything that arrived while the previous commit ran (the commit time is
    /// the batching window), and under light load a single write that commits
    /// at once.
    pub batch_delay: Duration,
    pub max_batch_writes: usize,
    /// One commit attempt's time limit.
    pub commit_timeout: Duration,
    pub max_backoff: Duration,
    /// When the commit in flight has taken this long, a second one starts
    /// beside it with the queued writes of auctions not in the first, so one
    /// stalled commit does not hold up every auction. `None`: one commit at a
    /// time (a store with one writer gains nothing from a second).
    pub hedge_after: Option<Duration>,
    /// Run the actor, and so every commit, on a thread of its own rather
    /// than on the node's runtime workers: the answer of a commit is taken,
    /// its bidders' auctions told and the next batch sent the moment it
    /// arrives, instead of when the one worker of a small machine gets round
    /// to it, after the requests queued there. A store may then run its
    /// commit on that thread without awaiting (gavel's SQLite store does;
    /// nothing else runs there). See `node::commit_runtime`.
    pub own_thread: bool,
}

impl Default for PersistenceSettings {
    fn default() -> Self {
        PersistenceSettings {
            batch_delay: Duration::ZERO,
            max_batch_writes: 1024,
            commit_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(1),
            hedge_after: None,
            own_thread: false,
        }
    }
}

pub enum PersistenceMsg {
    /// `write_no` numbers the writes of one auction actor, from 1 without gaps.
    Write {
        write: Box<Write>,
        from: Arc<dyn WriteOrigin>,
        write_no: u64,
        /// The trace span of the bid behind the write, when traced; the commit links to it.
        span: Option<tracing::Span>,
    },
    Flush,
    /// Commits everything sent before it, then answers (graceful shutdown).
    Drain(RpcReplyPort<()>),
    /// Answers once no write of this auction actor is queued or being
    /// committed (each is committed or refused): the actor stopped without
    /// finishing (a panic), and its auction must not be loaded again before
    /// the store holds what it sent.
    Settled {
        actor: ActorId,
        reply: RpcReplyPort<()>,
    },
    /// A commit left to finish in a task of its own (`hedge_after`) finished:
    /// its writes are durable, or refused and their auctions told. `refused`
    /// lists the auctions whose writes the store refused as invalid, from
    /// which write on.
    Committed {
        commit: u64,
        refused: Vec<(ActorId, u64)>,
    },
    /// A commit's task failed (a panic: a bug).
    CommitFailed(String),
}

/// The group commit. Cloned into each commit, which may finish in a task of
/// its own (every field is shared).
#[derive(Clone)]
pub struct PersistenceActor {
    pub store: Arc<dyn Store>,
    /// Slots reserved by auction actors for each write; freed after commit.
    pub queue: Arc<Admission>,
    pub settings: PersistenceSettings,
    /// The node's leases: a lease under which the store refused writes is
    /// dropped from them at once (if still held), so none of its auctions
    /// takes another write.
    pub leases: Arc<Leases>,
    /// How many commits are failing and being retried (`/ready` says so while
    /// any is: a hedge that commits does not make another's retries good).
    pub failing: Arc<AtomicUsize>,
}

/// A commit that overran `hedge_after`, finishing in a task of its own.
struct InFlight {
    commit: u64,
    /// tokio's clock, which tests can pause and move.
    started: tokio::time::Instant,
    /// Its auction actors: their queued writes wait for it.
    auctions: HashSet<ActorId>,
}

pub struct PersistenceState {
    /// Auction actors with a write refused as invalid, and from which write
    /// on: their later writes, still on the way here, are refused too.
    refused: HashMap<ActorId, u64>,
    /// Writes not yet in a commit, in the order they came.
    writes: Vec<Write>,
    origins: Vec<Origin>,
    spans: Vec<tracing::Span>,
    /// Commits left to finish in a task of their own (see `commit_next`):
    /// at most one, and then the actor may run a second beside it.
    in_flight: Vec<InFlight>,
    detached_commits: u64,
    flush_scheduled: bool,
    drains: Vec<RpcReplyPort<()>>,
    /// `Settled` calls waiting for the writes of their actor.
    settling: Vec<(ActorId, RpcReplyPort<()>)>,
}

impl Actor for PersistenceActor {
    type Msg = PersistenceMsg;
    type State = PersistenceState;
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, _args: ()) -> Result<Self::State, ActorProcessingErr> {
        Ok(PersistenceState {
            refused: HashMap::new(),
            writes: Vec::new(),
            origins: Vec::new(),
            spans: Vec::new(),
            in_flight: Vec::new(),
            detached_commits: 0,
            flush_scheduled: false,
            drains: Vec::new(),
            settling: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PersistenceMsg::Write { write, from, write_no, span } => {
                // A write whose auction has a commit in flight cannot go before it ends.
                let may_go = self.may_start(state) && !state.has_commit_in_flight(from.actor_id());
                state.writes.push(*write);
                state.origins.push((from, write_no));
                if let Some(span) = span {
                    state.spans.push(span);
                }
                if state.writes.len() >= self.settings.max_batch_writes && may_go {
                    self.commit_next(&myself, state).await;
                } else if !state.flush_scheduled && may_go {
                    state.flush_scheduled = true;
                    if self.settings.batch_delay.is_zero() || !state.in_flight.is_empty() {
                        // The flush queues behind every write already in the mailbox:
                        // the batch is whatever arrived while the last commit ran.
                        let _ = myself.send_message(PersistenceMsg::Flush);
                    } else {
                        myself.send_after(self.settings.batch_delay, || PersistenceMsg::Flush);
                    }
                }
            }
            PersistenceMsg::Flush => {
                state.flush_scheduled = false;
                self.commit_next(&myself, state).await;
            }
            PersistenceMsg::Drain(reply) => {
                state.drains.push(reply);
                self.commit_next(&myself, state).await;
            }
            PersistenceMsg::Settled { actor, reply } => state.settling.push((actor, reply)),
            PersistenceMsg::Committed { commit, refused } => {
                state.in_flight.retain(|in_flight| in_flight.commit != commit);
                for (actor, from_write_no) in refused {
                    state.refuse(actor, from_write_no);
                }
                // What queued behind it goes now: it has waited a commit already.
                self.commit_next(&myself, state).await;
            }
            PersistenceMsg::CommitFailed(reason) => {
                return Err(format!("a commit's task failed: {reason}").into());
            }
        }
        if !state.drains.is_empty() && state.in_flight.is_empty() && state.writes.is_empty() {
            for reply in state.drains.drain(..) {
                let _ = reply.send(());
            }
        }
        if !state.settling.is_empty() {
            let settling = std::mem::take(&mut state.settling);
            for (actor, reply) in settling {
                if state.holds_writes_of(actor) {
                    state.settling.push((actor, reply));
                } else {
                    let _ = reply.send(());
                }
            }
        }
        Ok(())
    }
}

impl PersistenceState {
    fn refuse(&mut self, actor: ActorId, from_write_no: u64) {
        if self.refused.len() >= REFUSED_AUCTIONS_KEPT {
            // Their actors stopped long ago; what they sent has arrived since.
            self.refused.clear();
        }
        self.refused.insert(actor, from_write_no);
    }

    /// Whether a write of `actor` is queued or in a commit left to finish on
    /// its own (between messages, the actor runs no commit itself).
    fn holds_writes_of(&self, actor: ActorId) -> bool {
        self.origins.iter().any(|(origin, _)| origin.actor_id() == actor) || self.has_commit_in_flight(actor)
    }

    fn has_commit_in_flight(&self, actor: ActorId) -> bool {
        self.in_flight.iter().any(|in_flight| in_flight.auctions.contains(&actor))
    }
}

impl PersistenceActor {
    /// Whether a commit may start now: none is in flight, or (hedging) the
    /// one in flight on its own has taken `hedge_after` already.
    fn may_start(&self, state: &PersistenceState) -> bool {
        match (state.in_flight.as_slice(), self.settings.hedge_after) {
            ([], _) => true,
            ([only], Some(after)) => only.started.elapsed() >= after,
            _ => false,
        }
    }

    /// Commits the queued writes of every auction with no commit in flight
    /// (at most `max_batch_writes`, in the order they came), when a commit
    /// may start. A later write of an auction never commits before an
    /// earlier one: while an auction has a commit in flight, its queued
    /// writes wait for it.
    ///
    /// The commit runs here, in the actor, so a normal commit costs no hop to
    /// another task and back. With hedging, a commit still running after
    /// `hedge_after` is left to finish in a task of its own (it reports
    /// `Committed`), and the actor goes back to its mailbox: the next writes
    /// of other auctions commit beside it.
    async fn commit_next(&self, myself: &ActorRef<PersistenceMsg>, state: &mut PersistenceState) {
        if state.writes.is_empty() || !self.may_start(state) {
            return;
        }
        let (writes, origins) = self.take_batch(state);
        let (writes, origins) = drop_refused(&self.queue, writes, origins, &state.refused);
        if writes.is_empty() {
            return;
        }
        let hedge = !state.in_flight.is_empty();
        if hedge {
            metrics::counter!(names::COMMIT_HEDGES_TOTAL).increment(1);
            debug!(writes = writes.len(), "the commit in flight is overdue; committing other auctions beside it");
        }
        let commit_span = tracing::debug_span!("commit", writes = writes.len(), hedge);
        for span in state.spans.drain(..) {
            commit_span.follows_from(&span);
        }
        // Known before the writes go into the commit, in case it is left to finish on its own.
        let auctions: Vec<ActorId> = match self.settings.hedge_after {
            Some(_) if !hedge => origins.iter().map(|(actor, _)| actor.actor_id()).collect(),
            _ => Vec::new(),
        };
        let committer = self.clone();
        let mut commit =
            Box::pin(async move { committer.commit_writes(writes, origins).await }.instrument(commit_span));
        let refused = match self.settings.hedge_after {
            Some(after) if !hedge => {
                let started = tokio::time::Instant::now();
                tokio::select! {
                    biased;
                    refused = &mut commit => refused,
                    () = tokio::time::sleep(after) => {
                        state.detached_commits += 1;
                        let id = state.detached_commits;
                        state.in_flight.push(InFlight { commit: id, started, auctions: auctions.into_iter().collect() });
                        let task = tokio::spawn(commit);
                        let myself = myself.clone();
                        tokio::spawn(async move {
                            let done = match task.await {
                                Ok(refused) => PersistenceMsg::Committed { commit: id, refused },
                                Err(error) => PersistenceMsg::CommitFailed(error.to_string()),
                            };
                            let _ = myself.send_message(done);
                        });
                        // Its refusals come with `Committed`; what it left queued
                        // (past the batch's bound) goes beside it, below.
                        Vec::new()
                    }
                }
            }
            _ => commit.await,
        };
        for (actor, from_write_no) in refused {
            state.refuse(actor, from_write_no);
        }
        if !state.writes.is_empty() && !state.flush_scheduled {
            // Left over (past the batch's bound, or behind a commit in flight).
            state.flush_scheduled = true;
            let _ = myself.send_message(PersistenceMsg::Flush);
        }
    }

    /// Takes the next batch out of the queued writes.
    fn take_batch(&self, state: &mut PersistenceState) -> (Vec<Write>, Vec<Origin>) {
        let max = self.settings.max_batch_writes;
        if state.in_flight.is_empty() && state.writes.len() <= max {
            return (std::mem::take(&mut state.writes), std::mem::take(&mut state.origins));
        }
        let mut taken = (Vec::new(), Vec::new());
        let mut kept = (Vec::new(), Vec::new());
        let in_flight = &state.in_flight;
        for (write, origin) in state.writes.drain(..).zip(state.origins.drain(..)) {
            let actor = origin.0.actor_id();
            let waits = taken.0.len() >= max || in_flight.iter().any(|commit| commit.auctions.contains(&actor));
            let side = if waits { &mut kept } else { &mut taken };
            side.0.push(write);
            side.1.push(origin);
        }
        (state.writes, state.origins) = kept;
        taken
    }

    /// Commits a batch: normally in one transaction. One the store refuses as
    /// invalid is split in halves, in order, until the write at fault is alone:
    /// it and the later writes of its auction (they were applied on top of it)
    /// are refused, every other write is committed. Returns the auctions
    /// refused so, and from which write on.
    async fn commit_writes(&self, writes: Vec<Write>, origins: Vec<Origin>) -> Vec<(ActorId, u64)> {
        metrics::histogram!(names::COMMIT_BATCH_SIZE).record(writes.len() as f64);
        let mut refused: HashMap<ActorId, u64> = HashMap::new();
        let mut parts: VecDeque<(Vec<Write>, Vec<Origin>)> = VecDeque::from([(writes, origins)]);
        while let Some((writes, origins)) = parts.pop_front() {
            let (mut writes, mut origins) = drop_refused(&self.queue, writes, origins, &refused);
            if writes.is_empty() {
                continue;
            }
            match self.commit_retrying(&mut writes, &mut origins).await {
                Committed::All => {
                    self.queue.release(writes.len());
                    notify_durable(&origins);
                }
                Committed::Nothing => {}
                Committed::Invalid(why, reason) if writes.len() == 1 => {
                    let (actor, write_no) = origins.pop().expect("one write, one origin");
                    error!(
                        auction_id = %writes[0].auction.id,
                        write_no,
                        error = %reason,
                        "the store refuses this write; refusing it and the auction's later writes"
                    );
                    metrics::counter!(names::WRITES_REFUSED_TOTAL).increment(1);
                    self.queue.release(1);
                    refused.insert(actor.actor_id(), write_no);
                    actor.refused(write_no, why);
                }
                Committed::Invalid(..) => {
                    let second_writes = writes.split_off(writes.len() / 2);
                    let second_origins = origins.split_off(origins.len() / 2);
                    parts.push_front((second_writes, second_origins));
                    parts.push_front((writes, origins));
                }
            }
        }
        refused.into_iter().collect()
    }

    /// Commits `writes`, retrying in order while the store is unavailable and
    /// taking out the writes under fenced leases.
    async fn commit_retrying(&self, writes: &mut Vec<Write>, origins: &mut Vec<Origin>) -> Committed {
        let mut backoff = Duration::from_millis(5);
        let mut attempt: u32 = 0;
        // Whether an attempt failed without a verdict: it may have committed all the same.
        let mut answer_lost = false;
        // Counted among the failing commits from its first failure until it ends, however it ends.
        let mut failing = Failing { count: &self.failing, counted: false };
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = tokio::time::timeout(self.settings.commit_timeout, self.store.commit(writes))
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("commit timed out".to_owned())));
            match result {
                Ok(()) => {
                    metrics::histogram!(names::COMMIT_LATENCY_SECONDS).record(started.elapsed().as_secs_f64());
                    debug!(writes = writes.len(), attempt, "batch committed");
                    return Committed::All;
                }
                Err(StoreError::Fenced { leases }) => {
                    warn!(?leases, "lease lost, refusing the writes under it");
                    let (kept_writes, kept_origins) =
                        self.refuse_fenced(std::mem::take(writes), std::mem::take(origins), &leases, answer_lost);
                    *writes = kept_writes;
                    *origins = kept_origins;
                    if writes.is_empty() {
                        return Committed::Nothing;
                    }
                }
                Err(StoreError::Invalid(reason)) => {
                    metrics::counter!(names::COMMIT_FAILURES_TOTAL).increment(1);
                    warn!(writes = writes.len(), error = %reason, "the store refuses the batch as invalid");
                    return Committed::Invalid(Refusal::Invalid, reason);
                }
                Err(StoreError::KeyReused) => {
                    debug!(writes = writes.len(), "an idempotency key of the batch was used for another write");
                    return Committed::Invalid(Refusal::KeyReused, "idempotency key reused".to_owned());
                }
                Err(StoreError::Unavailable(reason)) => {
                    answer_lost = true;
                    failing.count_in();
                    metrics::counter!(names::COMMIT_FAILURES_TOTAL).increment(1);
                    warn!(attempt, writes = writes.len(), error = %reason, "commit failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.settings.max_backoff);
                }
            }
        }
    }

    /// Takes out the writes under fenced leases, tells their auctions, and
    /// returns the rest (an auction actor writes under one lease, so all its
    /// writes go or none). `answer_lost`: an earlier attempt at these writes
    /// failed without a verdict, so they may stand.
    fn refuse_fenced(
        &self,
        writes: Vec<Write>,
        origins: Vec<Origin>,
        fenced: &[ShardLease],
        answer_lost: bool,
    ) -> (Vec<Write>, Vec<Origin>) {
        let mut kept_writes = Vec::with_capacity(writes.len());
        let mut kept_origins = Vec::with_capacity(origins.len());
        // Per auction: its first and last write among the refused.
        let mut refused_range: HashMap<ActorId, (Arc<dyn WriteOrigin>, u64, u64)> = HashMap::new();
        let mut refused = 0;
        for (write, (actor, write_no)) in writes.into_iter().zip(origins) {
            if fenced.contains(&write.lease) {
                refused += 1;
                if self.leases.epoch_of(write.lease.shard) == Some(write.lease.epoch) {
                    self.leases.revoke(write.lease.shard);
                }
                refused_range.entry(actor.actor_id()).or_insert((actor, write_no, write_no)).2 = write_no;
            } else {
                kept_writes.push(write);
                kept_origins.push((actor, write_no));
            }
        }
        self.queue.release(refused);
        for (actor, from_write_no, through_write_no) in refused_range.into_values() {
            let why = if answer_lost { Refusal::FencedAfterLostAnswer { through_write_no } } else { Refusal::Fenced };
            actor.refused(from_write_no, why);
        }
        (kept_writes, kept_origins)
    }
}

/// A commit among `count` while it fails and is retried: counted in at its
/// first failure, out when it ends (or is dropped midway).
struct Failing<'a> {
    count: &'a AtomicUsize,
    counted: bool,
}

impl Failing<'_> {
    fn count_in(&mut self) {
        if !self.counted {
            self.counted = true;
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Takes out the writes of auctions that had a write refused as invalid
/// (from that write on: they were applied on top of it), freeing their slots.
fn drop_refused(
    queue: &Admission,
    writes: Vec<Write>,
    origins: Vec<Origin>,
    refused: &HashMap<ActorId, u64>,
) -> (Vec<Write>, Vec<Origin>) {
    if refused.is_empty() {
        return (writes, origins);
    }
    let mut kept = (Vec::with_capacity(writes.len()), Vec::with_capacity(origins.len()));
    let mut dropped = 0;
    for (write, (actor, write_no)) in writes.into_iter().zip(origins) {
        if refused.get(&actor.actor_id()).is_some_and(|from| write_no >= *from) {
            dropped += 1;
        } else {
            kept.0.push(write);
            kept.1.push((actor, write_no));
        }
    }
    queue.release(dropped);
    kept
}

/// Tells each auction actor, once, the last of its writes in this batch.
fn notify_durable(origins: &[Origin]) {
    let mut last_by_actor: Vec<(&dyn WriteOrigin, u64)> = Vec::new();
    let mut index_by_actor: HashMap<ActorId, usize> = HashMap::new();
    for (actor, write_no) in origins {
        match index_by_actor.get(&actor.actor_id()) {
            Some(&index) => last_by_actor[index].1 = *write_no,
            None => {
                index_by_actor.insert(actor.actor_id(), last_by_actor.len());
                last_by_actor.push((actor.as_ref(), *write_no));
            }
        }
    }
    for (actor, through_write_no) in last_by_actor {
        actor.durable(through_write_no);
    }
}
