//! The auction domain: rules as a pure state machine, and the recent-keys
//! policy for idempotent bids.

pub mod idempotency;
pub mod state;
