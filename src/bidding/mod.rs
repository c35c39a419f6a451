//! The bid service: every bid and cancel, whichever edge received it (REST,
//! WebSocket, or another node forwarding it), goes through here. In order:
//! the idempotency key is held for the request (refused when one in flight
//! holds it for another) and looked up in the store (a retry gets the first
//! answer), the per-user rate limit is charged (per node), and the write goes
//! to the auction's owner: this node's auction actor when this node holds the
//! shard, else the owning node over the cluster's internal endpoint, whose
//! answer is returned unchanged. The requests and answers are plain data
//! (`wire.rs`) with no HTTP in them; the edges are thin adapters.

pub mod keys;
pub mod users;
pub mod wire;

use std::sync::Arc;

use gavel_actors::auction::idempotency::IdempotencyKey;
use gavel_actors::node::{Node, NodeError};
use gavel_actors::outcome::{KeyedRequest, WriteOutcome};
use gavel_actors::ports::{Clock, shard_of};
use gavel_actors::{BidCommand, Event, Money, UserRef};
use tracing::Instrument;

use crate::cluster::{Cluster, ForwardError, Route};
use crate::ratelimit::RateLimiter;
use crate::storage::{BidRow, Db};
use keys::KeyCheck;
pub use wire::{BidReceipt, BidRequest, CancelRequest, Unavailable, WriteDone, WriteFailure, WriteRequest};

/// An answer, and the node that decided it (`Gavel-Owner`): `None` for this
/// node (no allocation on the local bid path), else the owner that answered.
pub struct Decided<T> {
    pub decided_by: Option<String>,
    pub result: Result<T, WriteFailure>,
}

pub struct Bidding {
    pub node: Arc<Node>,
    pub db: Db,
    pub cluster: Arc<Cluster>,
    pub rate_limiter: RateLimiter,
    pub clock: Arc<dyn Clock>,
    pub users: users::KnownUsers,
    pub keys_in_flight: Arc<keys::KeysInFlight>,
}

impl Bidding {
    /// Places a bid. Runs in a `bid` span (auction, bidder, then seq and
    /// outcome) that the auction's actor and the commit carry on.
    ///
    /// A keyed bid runs to its end in a task of its own, whether or not its
    /// caller waits (a client that went away): the bid goes on in its auction
    /// anyway, and its key must stay held until then (`KeysInFlight`).
    pub async fn place(self: &Arc<Self>, request: BidRequest) -> Decided<BidReceipt> {
        let span = tracing::debug_span!(
            "bid",
            auction_id = %request.auction_id,
            bidder = %request.bidder_id,
            seq = tracing::field::Empty,
            outcome = tracing::field::Empty
        );
        let decided = if request.key.is_none() {
            self.place_in_span(request).instrument(span.clone()).await
        } else {
            let bidding = self.clone();
            let placing = async move { bidding.place_in_span(request).await }.instrument(span.clone());
            // Boxed: rare next to unkeyed bids.
            Box::pin(self.to_the_end(placing)).await
        };
        match &decided.result {
            Ok(receipt) => {
                span.record("seq", receipt.seq);
                span.record("outcome", "accepted");
            }
            Err(failure) => {
                span.record("outcome", failure.code());
            }
        }
        decided
    }

    /// `Unauthenticated` when the user a token names no longer exists.
    async fn check_user(&self, user_id: uuid::Uuid) -> Result<(), WriteFailure> {
        if self.users.is_fresh(user_id) {
            return Ok(());
        }
        // Boxed, as the rare paths below: a bidder is nearly always known.
        match Box::pin(self.users.exists(&self.db, user_id)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(WriteFailure::Unauthenticated),
            Err(error) => {
                tracing::warn!(%error, %user_id, "cannot check that the user exists; trusting the token");
                Ok(())
            }
        }
    }

    async fn place_in_span(&self, request: BidRequest) -> Decided<BidReceipt> {
        if let Err(failure) = self.check_user(request.bidder_id).await {
            return self.here(Err(failure));
        }
        // The key is held until the bid is answered (see `KeysInFlight`).
        let (held, checked) = match request.key.as_deref() {
            None => (None, Ok(KeyCheck::Fresh)),
            Some(key) => {
                let fingerprint = keys::bid_fingerprint(request.auction_id, request.amount, request.max_amount);
                // Boxed: a store read's future is large, and most bids carry no key.
                Box::pin(self.hold_and_check(request.bidder_id, key, fingerprint, "bid")).await
            }
        };
        match checked {
            Ok(KeyCheck::Fresh) => {}
            Ok(KeyCheck::Reused) => return self.here(Err(WriteFailure::KeyReused)),
            Ok(KeyCheck::Replay(stored)) => {
                // Boxed, as the rare paths below: a store read's future is large.
                let replayed = Box::pin(self.replay(stored.auction_id, stored.seq.unwrap_or(0) as u64)).await;
                return self.here(replayed);
            }
            Err(error) => return self.here(Err(storage_failure("read idempotency key", error))),
        }
        // A replay above is the first request's answer, not a new bid: not
        // counted; nor is a copy of a charged request still in flight (its
        // auction answers it with the first's answer; see `KeyHeld`).
        if !held.as_ref().is_some_and(|held| held.rides_on_a_charged_copy()) {
            if let Err(retry_after_secs) = self.rate_limiter.check(request.bidder_id, self.clock.now_ms()) {
                return self.here(Err(WriteFailure::RateLimited { retry_after_secs }));
            }
            if let Some(held) = &held {
                held.charged();
            }
        }
        let decided = self.route(WriteRequest::Bid(request)).await;
        Decided {
            decided_by: decided.decided_by,
            result: decided.result.and_then(|done| match done {
                WriteDone::Bid(receipt) => Ok(receipt),
                WriteDone::Cancelled => Err(WriteFailure::Unavailable(Unavailable::Storage)),
            }),
        }
    }

    /// Cancels an auction for its seller; a keyed cancel, as a keyed bid, in
    /// a task of its own (see `place`).
    pub async fn cancel(self: &Arc<Self>, request: CancelRequest) -> Decided<()> {
        if request.key.is_none() {
            return self.cancel_here_or_there(request).await;
        }
        let bidding = self.clone();
        self.to_the_end(async move { bidding.cancel_here_or_there(request).await }).await
    }

    /// Runs a keyed write in a task of its own, which finishes it (and lets
    /// its key go) whether or not this caller is still waiting.
    async fn to_the_end<T: Send + 'static>(
        &self,
        write: impl Future<Output = Decided<T>> + Send + 'static,
    ) -> Decided<T> {
        match tokio::spawn(write).await {
            Ok(decided) => decided,
            Err(error) => {
                tracing::error!(%error, "a keyed write's task failed");
                self.here(Err(WriteFailure::OutcomeUnknown))
            }
        }
    }

    async fn cancel_here_or_there(&self, request: CancelRequest) -> Decided<()> {
        if let Err(failure) = self.check_user(request.by).await {
            return self.here(Err(failure));
        }
        let fingerprint = keys::cancel_fingerprint(request.auction_id);
        // The key is held until the cancel is answered (see `KeysInFlight`).
        let (_held, checked) = match request.key.as_deref() {
            None => (None, Ok(KeyCheck::Fresh)),
            Some(key) => self.hold_and_check(request.by, key, fingerprint, "cancel").await,
        };
        match checked {
            Ok(KeyCheck::Fresh) => {}
            Ok(KeyCheck::Reused) => return self.here(Err(WriteFailure::KeyReused)),
            Ok(KeyCheck::Replay(_)) => return self.here(Ok(())),
            Err(error) => return self.here(Err(storage_failure("read idempotency key", error))),
        }
        let decided = self.route(WriteRequest::Cancel(request)).await;
        Decided { decided_by: decided.decided_by, result: decided.result.map(|_| ()) }
    }

    /// Holds `key` for this request and looks it up in the store: `Reused`
    /// when a request in flight holds it for another write, unless the store
    /// has this very request under it (a retry: `Replay`).
    /// The hold is boxed: it lives across the write, in a future every layer
    /// above moves whole.
    async fn hold_and_check(
        &self,
        user_id: uuid::Uuid,
        key: &str,
        fingerprint: u64,
        kind: &str,
    ) -> (Option<Box<keys::KeyHeld>>, Result<KeyCheck, sqlx::Error>) {
        let held = self.keys_in_flight.hold(user_id, key, fingerprint).map(Box::new);
        let checked = keys::check(&self.db, user_id, Some(key), fingerprint, kind).await;
        match (held, checked) {
            // Held for another request: this one may still be the retry of
            // one made before under the key, which the store answers.
            (None, Ok(KeyCheck::Fresh)) => (None, Ok(KeyCheck::Reused)),
            (held, checked) => (held, checked),
        }
    }

    fn here<T>(&self, result: Result<T, WriteFailure>) -> Decided<T> {
        Decided { decided_by: None, result }
    }

    /// Sends the write to its auction's owner. When the owner is not where
    /// this node thought (it answers "not owner", or cannot be reached), the
    /// shard's lease is read again from the store and the write tried once more.
    async fn route(&self, request: WriteRequest) -> Decided<WriteDone> {
        let shard = shard_of(request.auction_id());
        let mut refreshed = false;
        loop {
            let decided = match self.cluster.route(shard) {
                Route::Local => self.here(self.decide_here(request.clone()).await),
                Route::Remote { owner, url } => match Box::pin(self.cluster.forward(&url, &request)).await {
                    Ok(reply) => Decided { decided_by: Some(reply.owner), result: reply.result },
                    Err(ForwardError::TimedOut) => self.here(Err(WriteFailure::OutcomeUnknown)),
                    Err(ForwardError::Unreachable(reason)) => {
                        tracing::debug!(shard, %owner, %reason, "owner unreachable");
                        self.here(Err(WriteFailure::Unavailable(Unavailable::OwnerUnreachable { shard })))
                    }
                },
                Route::Nobody => self.here(Err(WriteFailure::Unavailable(Unavailable::ShardMoving { shard }))),
            };
            let misdirected = matches!(
                decided.result,
                Err(WriteFailure::Unavailable(
                    Unavailable::Node(gavel_actors::outcome::Unavailable::NotOwner { .. })
                        | Unavailable::OwnerUnreachable { .. }
                        | Unavailable::ShardMoving { .. }
                ))
            );
            if !misdirected || refreshed {
                return decided;
            }
            refreshed = true;
            Box::pin(self.cluster.refresh(shard)).await;
        }
    }

    /// Decides a write another node forwarded here (see `decide_here`), its
    /// key held meanwhile, as the node it entered at holds it: one key sent
    /// at once to two auctions of this node, through this node and another,
    /// meets here (`422` for the second), not in the store, where the write
    /// refused would take other bidders' writes on its auction with it. A
    /// keyed write runs to its end in a task of its own, as on that node.
    pub async fn decide_forwarded(self: &Arc<Self>, request: WriteRequest) -> Result<WriteDone, WriteFailure> {
        let keyed = match &request {
            WriteRequest::Bid(bid) => bid.key.as_deref().map(|key| {
                (bid.bidder_id, key, keys::bid_fingerprint(bid.auction_id, bid.amount, bid.max_amount), "bid")
            }),
            WriteRequest::Cancel(cancel) => {
                cancel.key.as_deref().map(|key| (cancel.by, key, keys::cancel_fingerprint(cancel.auction_id), "cancel"))
            }
        };
        let Some((user_id, key, fingerprint, kind)) = keyed else {
            return self.decide_here(request).await;
        };
        // As where it entered: held, then looked up (a write made meanwhile
        // under the key, maybe this very one, is in the store by now).
        let (held, checked) = self.hold_and_check(user_id, key, fingerprint, kind).await;
        match checked {
            Ok(KeyCheck::Fresh) => {}
            Ok(KeyCheck::Reused) => return Err(WriteFailure::KeyReused),
            Ok(KeyCheck::Replay(stored)) => {
                return match request {
                    WriteRequest::Bid(_) => Box::pin(self.replay(stored.auction_id, stored.seq.unwrap_or(0) as u64))
                        .await
                        .map(WriteDone::Bid),
                    WriteRequest::Cancel(_) => Ok(WriteDone::Cancelled),
                };
            }
            Err(error) => return Err(storage_failure("read idempotency key", error)),
        }
        let bidding = self.clone();
        let deciding = async move {
            let decided = bidding.decide_here(request).await;
            drop(held);
            bidding.here(decided)
        };
        self.to_the_end(deciding).await.result
    }

    /// Decides a write on this node, which must own its auction (else
    /// `NotOwner`): what the owner runs for writes forwarded to it.
    pub async fn decide_here(&self, request: WriteRequest) -> Result<WriteDone, WriteFailure> {
        match request {
            WriteRequest::Bid(bid) => self.bid_here(bid).await.map(WriteDone::Bid),
            WriteRequest::Cancel(cancel) => self.cancel_here(cancel).await.map(|()| WriteDone::Cancelled),
        }
    }

    async fn bid_here(&self, request: BidRequest) -> Result<BidReceipt, WriteFailure> {
        let amount = Money::parse(request.amount).map_err(|_| WriteFailure::InvalidAmount)?;
        let max_amount = request.max_amount.map(Money::parse).transpose().map_err(|_| WriteFailure::InvalidAmount)?;
        if max_amount.is_some_and(|max| max < amount) {
            return Err(WriteFailure::InvalidAmount);
        }
        let command = BidCommand {
            bidder: UserRef { id: request.bidder_id, username: request.bidder_username.as_str().into() },
            amount,
            max_amount,
        };
        let keyed = request.key.map(|key| KeyedRequest {
            key: IdempotencyKey { user_id: request.bidder_id, key },
            fingerprint: keys::bid_fingerprint(request.auction_id, request.amount, request.max_amount),
        });
        let outcome = self.node.place_bid(request.auction_id, command, keyed).await.map_err(node_failure)?;
        match outcome {
            WriteOutcome::Accepted { event: Event::BidPlaced(placed) } => Ok(BidReceipt {
                auction_id: request.auction_id,
                leading: placed.leading,
                current_price: placed.current_price.minor_units(),
                leader_id: placed.leader.id,
                leader_username: placed.leader.username.to_string(),
                your_max: placed.bidder_max.minor_units(),
                seq: placed.seq,
                bid_count: placed.bid_count,
                end_at_ms: placed.end_at_ms,
                placed_at_ms: placed.placed_at_ms,
            }),
            WriteOutcome::Accepted { .. } => Err(WriteFailure::Unavailable(Unavailable::Storage)),
            WriteOutcome::Replay { seq } => Box::pin(self.replay(request.auction_id, seq)).await,
            WriteOutcome::Rejected(rejection) => Err(WriteFailure::Rejected(rejection)),
            WriteOutcome::KeyReused => Err(WriteFailure::KeyReused),
            WriteOutcome::Unavailable(reason) => Err(WriteFailure::Unavailable(Unavailable::Node(reason))),
            WriteOutcome::Unknown => Err(WriteFailure::OutcomeUnknown),
        }
    }

    async fn cancel_here(&self, request: CancelRequest) -> Result<(), WriteFailure> {
        let keyed = request.key.map(|key| KeyedRequest {
            key: IdempotencyKey { user_id: request.by, key },
            fingerprint: keys::cancel_fingerprint(request.auction_id),
        });
        let outcome = self.node.cancel(request.auction_id, request.by, keyed).await.map_err(node_failure)?;
        match outcome {
            WriteOutcome::Accepted { .. } | WriteOutcome::Replay { .. } => Ok(()),
            WriteOutcome::Rejected(rejection) => Err(WriteFailure::Rejected(rejection)),
            WriteOutcome::KeyReused => Err(WriteFailure::KeyReused),
            WriteOutcome::Unavailable(reason) => Err(WriteFailure::Unavailable(Unavailable::Node(reason))),
            WriteOutcome::Unknown => Err(WriteFailure::OutcomeUnknown),
        }
    }

    /// The answer a bid got the first time, read back from the store.
    async fn replay(&self, auction_id: uuid::Uuid, seq: u64) -> Result<BidReceipt, WriteFailure> {
        match self.db.bid(auction_id, seq).await {
            Ok(Some(row)) => Ok(receipt_of_row(&row)),
            // Committed, so readable; a reader lagging behind the writer is the only way here.
            Ok(None) => Err(WriteFailure::Unavailable(Unavailable::Storage)),
            Err(error) => Err(storage_failure("read replayed bid", error)),
        }
    }
}

/// The receipt of a stored bid (an idempotent replay).
fn receipt_of_row(row: &BidRow) -> BidReceipt {
    BidReceipt {
        auction_id: row.auction_id,
        leading: row.leader_id == row.bidder_id,
        current_price: row.current_price,
        leader_id: row.leader_id,
        leader_username: row.leader_username.clone(),
        your_max: row.max_amount,
        seq: row.seq as u64,
        bid_count: row.seq as u64,
        end_at_ms: row.end_at_ms,
        placed_at_ms: row.placed_at_ms,
    }
}

fn node_failure(error: NodeError) -> WriteFailure {
    match error {
        NodeError::NotFound => WriteFailure::AuctionNotFound,
        NodeError::Unavailable(reason) => WriteFailure::Unavailable(Unavailable::Node(reason)),
        NodeError::OutcomeUnknown => WriteFailure::OutcomeUnknown,
    }
}

fn storage_failure(context: &str, error: sqlx::Error) -> WriteFailure {
    tracing::error!(%error, context, "storage failure");
    WriteFailure::Unavailable(Unavailable::Storage)
}
