//! What the API returns, shaped exactly as docs/API.md writes it. Every view is
//! built from committed data only: a row of the store, or an event the
//! persistence actor has made durable.

use gavel_actors::{TimestampMs, UserRef};

use crate::bidding::BidReceipt;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::storage::{AuctionRow, BidRow, MyBidRow};

/// RFC 3339, UTC, milliseconds: `2026-11-22T10:00:00.000Z`.
pub fn timestamp(ms: TimestampMs) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, ToSchema, PartialEq, Eq)]
pub struct UserView {
    pub id: Uuid,
    pub username: String,
}

impl From<&UserRef> for UserView {
    fn from(user: &UserRef) -> UserView {
        UserView { id: user.id, username: user.username.to_string() }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuthView {
    pub user: UserView,
    pub token: String,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct AuctionView {
    pub id: Uuid,
    pub seller: UserView,
    pub title: String,
    pub description: String,
    /// ISO 4217 code; every amount is in its minor units.
    pub currency: String,
    pub starting_price: i64,
    /// Only in the seller's own view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserve_price: Option<i64>,
    pub reserve_met: bool,
    pub min_increment: i64,
    pub soft_close_secs: i32,
    pub start_at: String,
    pub end_at: String,
    #[schema(example = "active")]
    pub status: String,
    pub current_price: i64,
    pub leader: Option<UserView>,
    pub bid_count: i64,
    pub seq: i64,
    pub winner: Option<UserView>,
    pub final_price: Option<i64>,
    pub server_time: String,
}

impl AuctionView {
    /// `viewer` decides whether the reserve price is shown (seller only).
    pub fn from_row(row: &AuctionRow, viewer: Option<Uuid>, now_ms: TimestampMs) -> AuctionView {
        AuctionView {
            id: row.id,
            seller: UserView { id: row.seller_id, username: row.seller_username.clone() },
            title: row.title.clone(),
            description: row.description.clone(),
            currency: row.currency.clone(),
            starting_price: row.starting_price,
            reserve_price: if viewer == Some(row.seller_id) { row.reserve_price } else { None },
            reserve_met: row.reserve_met(),
            min_increment: row.min_increment,
            soft_close_secs: row.soft_close_secs,
            start_at: timestamp(row.start_at_ms),
            end_at: timestamp(row.end_at_ms),
            status: row.status.clone(),
            current_price: row.current_price,
            leader: row.leader().as_ref().map(UserView::from),
            bid_count: row.bid_count,
            seq: row.seq,
            winner: row.winner().as_ref().map(UserView::from),
            final_price: row.final_price,
            server_time: timestamp(now_ms),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuctionPage {
    pub items: Vec<AuctionView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// The 201 answer to an accepted, durable bid.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq, Eq)]
pub struct BidResultView {
    pub auction_id: Uuid,
    pub accepted: bool,
    pub leading: bool,
    pub current_price: i64,
    pub leader: UserView,
    /// The bidder's own effective maximum.
    pub your_max: i64,
    pub seq: i64,
    pub bid_count: i64,
    pub end_at: String,
    pub placed_at: String,
}

impl From<&BidReceipt> for BidResultView {
    fn from(receipt: &BidReceipt) -> BidResultView {
        BidResultView {
            auction_id: receipt.auction_id,
            accepted: true,
            leading: receipt.leading,
            current_price: receipt.current_price,
            leader: UserView { id: receipt.leader_id, username: receipt.leader_username.clone() },
            your_max: receipt.your_max,
            seq: receipt.seq as i64,
            bid_count: receipt.bid_count as i64,
            end_at: timestamp(receipt.end_at_ms),
            placed_at: timestamp(receipt.placed_at_ms),
        }
    }
}

/// One accepted bid in the history.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BidView {
    pub seq: i64,
    pub bidder: UserView,
    pub amount: i64,
    pub placed_at: String,
    /// The auction's price right after this bid.
    pub current_price: i64,
    /// The leader right after this bid.
    pub leader: UserView,
}

impl From<&BidRow> for BidView {
    fn from(row: &BidRow) -> BidView {
        BidView {
            seq: row.seq,
            bidder: UserView { id: row.bidder_id, username: row.bidder_username.clone() },
            amount: row.amount,
            placed_at: timestamp(row.placed_at_ms),
            current_price: row.current_price,
            leader: UserView { id: row.leader_id, username: row.leader_username.clone() },
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct BidPage {
    pub items: Vec<BidView>,
    /// Pass as `before_seq` for older bids; null when there are none.
    pub next_before_seq: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct HighestBidView {
    pub auction_id: Uuid,
    pub leader: UserView,
    pub current_price: i64,
    pub seq: i64,
    pub placed_at: String,
}

/// An auction the caller has bid on.
#[derive(Serialize, ToSchema)]
pub struct MyBidView {
    #[serde(flatten)]
    pub auction: AuctionView,
    pub leading: bool,
    /// The highest maximum the caller has named on this auction.
    pub your_max: i64,
    pub your_bid_count: i64,
}

impl MyBidView {
    pub fn from_row(row: &MyBidRow, viewer: Uuid, now_ms: TimestampMs) -> MyBidView {
        MyBidView {
            auction: AuctionView::from_row(&row.auction, Some(viewer), now_ms),
            leading: row.auction.leader_id == Some(viewer),
            your_max: row.your_max,
            your_bid_count: row.your_bid_count,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct MyBidsPage {
    pub items: Vec<MyBidView>,
}

#[derive(Serialize, ToSchema)]
pub struct StatusView {
    #[schema(example = "ok")]
    pub status: String,
    /// Parts that are down without stopping the node (`redis`: events of
    /// other nodes' auctions do not reach watchers here until it is back).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}
