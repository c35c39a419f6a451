//! What a write asked of an auction actor comes to, and why a node could not
//! take one. Typed, so that the edges (HTTP, WebSocket, node-to-node
//! forwarding) map each case to its answer instead of matching on strings, and
//! serialisable, so that an owner's answer crosses nodes unchanged.

use serde::{Deserialize, Serialize};

use crate::auction::idempotency::IdempotencyKey;
use crate::auction::state::{Event, Rejection};

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
    Unavailable(Unavailable),
    /// Handed to the store, but whether it was made cannot be known here: the
    /// answer to its commit was lost, and before a retry could tell, the
    /// auction's shard moved to another node. It may stand; a retry with its
    /// idempotency key learns the outcome from the store (through the new owner).
    Unknown,
}

/// Why a write was not taken. Every case means "not accepted": nothing of the
/// write is or will become durable, so the client may retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Unavailable {
    #[error("the node is shutting down")]
    ShuttingDown,
    /// This node holds no trusted lease on the auction's shard (never had it,
    /// handed it over, or could not renew it in time).
    #[error("shard {shard} is not held by this node")]
    NotOwner { shard: u32 },
    #[error("the auction is saturated")]
    Saturated,
    #[error("the persistence queue is full")]
    QueueFull,
    #[error("the store is unavailable")]
    StoreUnavailable,
    #[error("the store timed out")]
    StoreTimedOut,
    /// The store refused the write: the shard's lease moved to another owner.
    #[error("the write was refused: the shard's lease moved on")]
    WriteRefused,
    /// The store refused this write (or one before it of the same auction,
    /// which it depended on) as invalid; the auction reloads from the store.
    #[error("the store refused the write as invalid")]
    WriteInvalid,
    /// No longer sent (a write handed to the store is answered `Unknown`
    /// when its actor stops first); decoded from nodes of earlier releases.
    #[error("the auction stopped before its write was committed")]
    StoppedBeforeCommit,
    #[error("the auction actor failed to start")]
    ActorFailedToStart,
    #[error("the auction actor keeps stopping")]
    ActorKeepsStopping,
    #[error("the persistence actor is gone")]
    PersistenceGone,
}

/// An idempotency key with the fingerprint of the request that carries it.
#[derive(Clone, Debug)]
pub struct KeyedRequest {
    pub key: IdempotencyKey,
    pub fingerprint: u64,
}
