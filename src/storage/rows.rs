//! Rows as the queries return them, and their conversion to the domain.

use gavel_actors::{AuctionState, Leader, Money, Status, Terms, UserRef};
use uuid::Uuid;

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub username: String,
    pub password_hash: String,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AuctionRow {
    pub id: Uuid,
    pub seller_id: Uuid,
    pub seller_username: String,
    pub title: String,
    pub description: String,
    pub currency: String,
    pub starting_price: i64,
    pub reserve_price: Option<i64>,
    pub min_increment: i64,
    pub soft_close_secs: i32,
    pub start_at_ms: i64,
    pub end_at_ms: i64,
    pub status: String,
    pub current_price: i64,
    pub leader_id: Option<Uuid>,
    pub leader_username: Option<String>,
    pub leader_max: Option<i64>,
    pub bid_count: i64,
    pub seq: i64,
    pub winner_id: Option<Uuid>,
    pub winner_username: Option<String>,
    pub final_price: Option<i64>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MyBidRow {
    #[sqlx(flatten)]
    pub auction: AuctionRow,
    pub your_max: i64,
    pub your_bid_count: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct BidRow {
    pub auction_id: Uuid,
    pub seq: i64,
    pub bidder_id: Uuid,
    pub bidder_username: String,
    pub amount: i64,
    pub max_amount: i64,
    pub placed_at_ms: i64,
    pub current_price: i64,
    pub leader_id: Uuid,
    pub leader_username: String,
    pub end_at_ms: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct KeyRow {
    pub fingerprint: i64,
    pub kind: String,
    pub auction_id: Uuid,
    pub seq: Option<i64>,
    /// The first answer's body (creates and cancels), once recorded.
    pub response: Option<String>,
}

/// The name shown for a user whose row is gone (deleted behind the node's
/// back): the auction still names them as leader or winner by id.
pub const DELETED_USER: &str = "(deleted user)";

fn user(id: Option<Uuid>, username: Option<String>) -> Option<UserRef> {
    Some(UserRef { id: id?, username: username.as_deref().unwrap_or(DELETED_USER).into() })
}

impl AuctionRow {
    pub fn status(&self) -> Status {
        Status::parse(&self.status).unwrap_or(Status::Cancelled)
    }

    pub fn leader(&self) -> Option<UserRef> {
        user(self.leader_id, self.leader_username.clone())
    }

    pub fn winner(&self) -> Option<UserRef> {
        user(self.winner_id, self.winner_username.clone())
    }

    pub fn reserve_met(&self) -> bool {
        self.reserve_price.is_none_or(|reserve| self.current_price >= reserve)
    }

    /// The state the auction's actor starts from. Fails only on a row the
    /// server could not have written (a corrupted or hand-edited database).
    pub fn to_state(&self) -> Result<AuctionState, String> {
        let money = |value: i64, what: &str| Money::parse(value).map_err(|_| format!("{what} out of range: {value}"));
        let leader = match (self.leader(), self.leader_max) {
            (Some(user), Some(max)) => Some(Leader { user, max_amount: money(max, "leader_max")? }),
            (None, None) => None,
            _ => return Err("leader without maximum".to_owned()),
        };
        Ok(AuctionState {
            id: self.id,
            seller: UserRef { id: self.seller_id, username: self.seller_username.as_str().into() },
            terms: Terms {
                starting_price: money(self.starting_price, "starting_price")?,
                reserve_price: self.reserve_price.map(|reserve| money(reserve, "reserve_price")).transpose()?,
                min_increment: money(self.min_increment, "min_increment")?,
                soft_close_secs: u32::try_from(self.soft_close_secs).map_err(|_| "soft_close_secs".to_owned())?,
            },
            start_at_ms: self.start_at_ms,
            end_at_ms: self.end_at_ms,
            status: Status::parse(&self.status).ok_or_else(|| format!("unknown status {}", self.status))?,
            current_price: money(self.current_price, "current_price")?,
            leader,
            bid_count: self.bid_count as u64,
            seq: self.seq as u64,
            winner: self.winner(),
            final_price: self.final_price.map(|price| money(price, "final_price")).transpose()?,
        })
    }
}
