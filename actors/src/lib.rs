//! `gavel-actors`: the auction domain as pure code (money, rules, state machine:
//! no I/O, no clock) and the ractor actors that host it. Dependencies point
//! inward: this crate knows nothing of HTTP or SQL; it defines the small ports
//! it needs (`Store`, `Clock`) and the server implements them.

pub mod auction;
pub mod money;

pub use auction::state::{
    AuctionId, AuctionState, BidCommand, BidPlaced, Command, Event, Leader, Rejection, Status, Terms, TimestampMs,
    UserId, UserRef,
};
pub use money::Money;
pub mod admission;
pub mod auction_actor;
pub mod metrics_names;
pub mod node;
pub mod outcome;
pub mod persistence;
pub mod ports;
pub mod registry;
pub mod runtime;
pub mod shards;
pub mod timers;
