//! The requests and answers of the bid service, which are also what crosses
//! between nodes: a node that does not own an auction forwards the request to
//! the owner (`POST /internal/v1/writes`, MessagePack via rmp-serde) and relays
//! the owner's answer unchanged. Every type here is part of that wire format:
//! change one only together with `WIRE_VERSION`.

use gavel_actors::Rejection;
use gavel_actors::outcome::Unavailable as NodeUnavailable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of the node-to-node format; a node refuses any other (400).
pub const WIRE_VERSION: u16 = 1;

/// A bid, as validated at the edge that received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BidRequest {
    pub auction_id: Uuid,
    pub bidder_id: Uuid,
    pub bidder_username: String,
    /// Minor units, `1..=10^13` (checked again by the owner).
    pub amount: i64,
    pub max_amount: Option<i64>,
    /// The `Idempotency-Key` (REST) or `request_id` (WebSocket).
    pub key: Option<String>,
}

/// A seller's cancel of their auction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub auction_id: Uuid,
    pub by: Uuid,
    pub key: Option<String>,
}

/// A write that the auction's actor decides, wherever it was received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteRequest {
    Bid(BidRequest),
    Cancel(CancelRequest),
}

impl WriteRequest {
    pub fn auction_id(&self) -> Uuid {
        match self {
            WriteRequest::Bid(bid) => bid.auction_id,
            WriteRequest::Cancel(cancel) => cancel.auction_id,
        }
    }
}

/// An accepted, durable bid: everything the `201` body says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BidReceipt {
    pub auction_id: Uuid,
    pub leading: bool,
    pub current_price: i64,
    pub leader_id: Uuid,
    pub leader_username: String,
    pub your_max: i64,
    pub seq: u64,
    pub bid_count: u64,
    pub end_at_ms: i64,
    pub placed_at_ms: i64,
}

/// What a write that was taken came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteDone {
    Bid(BidReceipt),
    Cancelled,
}

/// Why a write was not taken, or not known to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteFailure {
    /// The user the token names does not exist (any more).
    Unauthenticated,
    AuctionNotFound,
    /// The rules refused it; nothing changed.
    Rejected(Rejection),
    /// An amount outside `1..=10^13`, or `max_amount < amount`.
    InvalidAmount,
    /// The idempotency key was used before for a different request.
    KeyReused,
    RateLimited {
        retry_after_secs: u64,
    },
    /// Not accepted; retrying is safe.
    Unavailable(Unavailable),
    /// Handed to the auction but not confirmed: not in time, or not at all
    /// (its commit's answer was lost, then its shard moved). It may yet be
    /// accepted, or stand. Retrying with the same idempotency key is safe.
    OutcomeUnknown,
}

impl WriteFailure {
    /// The error code of docs/API.md this failure is answered with.
    pub fn code(&self) -> &'static str {
        match self {
            WriteFailure::Unauthenticated => "UNAUTHENTICATED",
            WriteFailure::AuctionNotFound => "AUCTION_NOT_FOUND",
            WriteFailure::Rejected(rejection) => match rejection {
                Rejection::AuctionNotActive { .. } => "AUCTION_NOT_ACTIVE",
                Rejection::SellerCannotBid => "SELLER_CANNOT_BID",
                Rejection::BidTooLow { .. } => "BID_TOO_LOW",
                Rejection::AlreadyLeading => "ALREADY_LEADING",
                Rejection::InvalidAmount => "INVALID_AMOUNT",
                Rejection::Forbidden => "FORBIDDEN",
                Rejection::AuctionHasBids => "AUCTION_HAS_BIDS",
                Rejection::NotDue => "UNAVAILABLE",
            },
            WriteFailure::InvalidAmount => "INVALID_AMOUNT",
            WriteFailure::KeyReused => "IDEMPOTENCY_KEY_REUSED",
            WriteFailure::RateLimited { .. } => "RATE_LIMITED",
            WriteFailure::Unavailable(_) | WriteFailure::OutcomeUnknown => "UNAVAILABLE",
        }
    }
}

/// Why a write was not accepted: the owner's own reasons, or the cluster's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Unavailable {
    #[error("{0}")]
    Node(NodeUnavailable),
    /// No node holds the auction's shard right now: it is moving.
    #[error("shard {shard} is moving between nodes")]
    ShardMoving { shard: u32 },
    /// The shard's owner could not be reached (or stopped answering).
    #[error("the owner of shard {shard} cannot be reached")]
    OwnerUnreachable { shard: u32 },
    /// The store could not be read (idempotency keys, a replayed answer).
    #[error("storage unavailable")]
    Storage,
}

/// A write sent to the owner of its auction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarded {
    pub version: u16,
    /// The node that received the write from a client.
    pub from_node: String,
    pub request: WriteRequest,
}

/// The owner's answer to a forwarded write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedReply {
    pub version: u16,
    /// The node that decided it.
    pub owner: String,
    pub result: Result<WriteDone, WriteFailure>,
}

#[cfg(test)]
mod tests {
    use gavel_actors::{Money, Status};

    use super::*;

    #[test]
    fn every_answer_survives_messagepack() {
        let results = vec![
            Ok(WriteDone::Bid(BidReceipt {
                auction_id: Uuid::now_v7(),
                leading: true,
                current_price: 12_500,
                leader_id: Uuid::now_v7(),
                leader_username: "alice".to_owned(),
                your_max: 20_000,
                seq: 7,
                bid_count: 7,
                end_at_ms: 1_800_000_000_000,
                placed_at_ms: 1_799_999_999_000,
            })),
            Ok(WriteDone::Cancelled),
            Err(WriteFailure::Rejected(Rejection::BidTooLow {
                min_bid: Money::parse(500).unwrap(),
                current_price: Money::parse(400).unwrap(),
            })),
            Err(WriteFailure::Rejected(Rejection::AuctionNotActive { status: Status::Ended })),
            Err(WriteFailure::Unavailable(Unavailable::Node(NodeUnavailable::NotOwner { shard: 3 }))),
            Err(WriteFailure::Unavailable(Unavailable::OwnerUnreachable { shard: 9 })),
            Err(WriteFailure::RateLimited { retry_after_secs: 2 }),
            Err(WriteFailure::OutcomeUnknown),
        ];
        for result in results {
            let reply = ForwardedReply { version: WIRE_VERSION, owner: "node-a".to_owned(), result };
            let bytes = rmp_serde::to_vec_named(&reply).unwrap();
            let back: ForwardedReply = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back, reply);
        }
        let forwarded = Forwarded {
            version: WIRE_VERSION,
            from_node: "node-b".to_owned(),
            request: WriteRequest::Bid(BidRequest {
                auction_id: Uuid::now_v7(),
                bidder_id: Uuid::now_v7(),
                bidder_username: "bob".to_owned(),
                amount: 10_000,
                max_amount: Some(20_000),
                key: Some("k-1".to_owned()),
            }),
        };
        let bytes = rmp_serde::to_vec_named(&forwarded).unwrap();
        assert_eq!(rmp_serde::from_slice::<Forwarded>(&bytes).unwrap(), forwarded);
    }
}
