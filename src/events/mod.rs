//! One pipeline for committed events. The auction actor publishes each event
//! once it is durable; from there it goes to this node's read cache
//! (invalidation) and WebSocket hub, and, in a cluster with Redis, to the
//! other nodes (`redis.rs`), which feed it into the same path: cache, hub,
//! batching, compression. A node never shows an auction's events out of
//! order: events from other nodes are checked against the last version seen
//! (`Sequencer`); a repeat is dropped, and a gap makes the watchers of that
//! auction take a fresh snapshot (from the store) instead.

pub mod redis;
pub mod snapshots;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gavel_actors::ports::EventSink;
use gavel_actors::{AuctionId, AuctionState, Event, Status};

/// Where an auction's sequence of events stands: the `seq` and how far its
/// lifecycle has gone. Every event moves it forward (a bid raises `seq`; start,
/// end and cancel raise the stage at the same `seq`), so a subscriber drops any
/// event not past what it has already been shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub seq: u64,
    pub stage: u8,
}

impl Version {
    pub fn of(seq: u64, status: Status) -> Version {
        let stage = match status {
            Status::Scheduled => 0,
            Status::Active => 1,
            Status::Ended | Status::Cancelled => 2,
        };
        Version { seq, stage }
    }
}

/// The watchers on this node, as events from other nodes reach them: the
/// WebSocket hub (`ws::Hub`) implements it. A trait here so that this module
/// needs nothing of `ws`.
pub trait Watchers: EventSink {
    /// Makes every subscriber of the auction take a fresh snapshot, and a
    /// later resume take one too (events from another node were missed).
    fn resync(&self, auction_id: AuctionId);
    /// `resync` for every auction that `which` picks.
    fn resync_where(&self, which: &dyn Fn(AuctionId) -> bool);
    /// The auction's owner says its last event, a while ago, brought it to
    /// `head`: the subscribers shown less take a fresh snapshot (after the
    /// events already on their way to them).
    fn check_head(&self, auction_id: AuctionId, head: Version);
    /// This node's watchers, by auction, of every auction that has some.
    fn local_viewers(&self) -> Vec<(AuctionId, u64)>;
    /// Where the watchers of the other nodes are counted.
    fn set_remote_viewers(&self, remote: Arc<dyn RemoteViewers>);
}

/// Watchers of an auction on the other nodes of a cluster.
pub trait RemoteViewers: Send + Sync + 'static {
    fn count(&self, auction_id: AuctionId) -> u64;
}

/// Hands every event to each sink in turn.
pub struct Tee(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Tee {
    fn publish(&self, event: &Event, state: &AuctionState) {
        for sink in &self.0 {
            sink.publish(event, state);
        }
    }
}

/// Where an event from another node stands against the last one seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one (or the first seen of its auction): show it.
    Next,
    /// Seen already: drop it.
    Repeat,
    /// Something was missed in between: resynchronise.
    Gap,
}

/// The version of each auction's last event from another node. Bounded: past
/// `capacity` auctions it starts over (the next event of each is taken as it
/// comes, and the watchers' own version filters still drop repeats).
pub struct Sequencer {
    last: Mutex<HashMap<AuctionId, Version>>,
    capacity: usize,
}

impl Sequencer {
    pub fn new(capacity: usize) -> Sequencer {
        Sequencer { last: Mutex::new(HashMap::new()), capacity }
    }

    /// Records `event` (of the auction in `state`) and says how it follows the last one.
    pub fn arrive(&self, event: &Event, state: &AuctionState) -> Arrival {
        let version = Version::of(state.seq, state.status);
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.len() >= self.capacity && !last.contains_key(&state.id) {
            last.clear();
        }
        let Some(previous) = last.get(&state.id).copied() else {
            last.insert(state.id, version);
            return Arrival::Next;
        };
        if version <= previous {
            return Arrival::Repeat;
        }
        last.insert(state.id, version);
        // A bid raises seq by one; a start, end or cancel keeps seq and moves the stage.
        let follows = match event {
            Event::BidPlaced(_) => version.seq == previous.seq + 1 && version.stage == previous.stage,
            _ => version.seq == previous.seq,
        };
        if follows { Arrival::Next } else { Arrival::Gap }
    }

    /// Forgets the auction when its last version is behind `head` (its owner
    /// says it went further: events were missed); whether it was.
    pub fn forget_if_behind(&self, auction_id: AuctionId, head: Version) -> bool {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let behind = last.get(&auction_id).is_some_and(|version| *version < head);
        if behind {
            last.remove(&auction_id);
        }
        behind
    }

    /// Forgets every auction (events may have been missed: the watchers resync).
    pub fn clear(&self) {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc as StdArc;

    use gavel_actors::{BidCommand, Command, Money, Status, Terms, UserRef};
    use uuid::Uuid;

    use super::*;

    /// An active auction with no bids (start 100, increment 1, no reserve).
    pub(crate) fn auction() -> AuctionState {
        AuctionState {
            id: Uuid::now_v7(),
            seller: UserRef { id: Uuid::now_v7(), username: StdArc::from("sally") },
            terms: Terms {
                starting_price: Money::parse(100).unwrap(),
                reserve_price: None,
                min_increment: Money::parse(1).unwrap(),
                soft_close_secs: 0,
            },
            start_at_ms: 0,
            end_at_ms: 1_000,
            status: Status::Active,
            current_price: Money::parse(100).unwrap(),
            leader: None,
            bid_count: 0,
            seq: 0,
            winner: None,
            final_price: None,
        }
    }

    /// A bid of `amount` by a new bidder: the event and the auction after it.
    pub(crate) fn bid(state: &mut AuctionState, amount: i64) -> (Event, AuctionState) {
        let bidder = UserRef { id: Uuid::now_v7(), username: StdArc::from("bob") };
        let command = Command::PlaceBid(BidCommand { bidder, amount: Money::parse(amount).unwrap(), max_amount: None });
        let event = state.apply(command, 10).unwrap();
        (event, state.clone())
    }

    #[test]
    fn in_order_repeats_and_gaps() {
        let sequencer = Sequencer::new(16);
        let mut state = auction();
        let first = bid(&mut state, 100);
        let second = bid(&mut state, 101);
        let third = bid(&mut state, 102);
        assert_eq!(sequencer.arrive(&first.0, &first.1), Arrival::Next, "the first seen is taken as it comes");
        assert_eq!(sequencer.arrive(&second.0, &second.1), Arrival::Next);
        assert_eq!(sequencer.arrive(&second.0, &second.1), Arrival::Repeat);
        assert_eq!(sequencer.arrive(&first.0, &first.1), Arrival::Repeat, "late and old");
        let fourth = bid(&mut state, 103);
        assert_eq!(sequencer.arrive(&fourth.0, &fourth.1), Arrival::Gap, "the third was missed");
        assert_eq!(sequencer.arrive(&third.0, &third.1), Arrival::Repeat, "after a gap the older one is stale");
        let ended = state.apply(Command::End, 1_000).unwrap();
        assert_eq!(sequencer.arrive(&ended, &state), Arrival::Next, "the end keeps seq and moves the stage");
        assert_eq!(sequencer.arrive(&ended, &state), Arrival::Repeat);
    }

    /// A head past the last event seen: the auction is forgotten, so its next
    /// event is taken as it comes (the watchers took a snapshot at the head).
    #[test]
    fn a_head_ahead_forgets_the_auction_and_one_at_hand_changes_nothing() {
        let sequencer = Sequencer::new(16);
        let mut state = auction();
        let first = bid(&mut state, 100);
        assert_eq!(sequencer.arrive(&first.0, &first.1), Arrival::Next);
        assert!(!sequencer.forget_if_behind(state.id, Version { seq: 1, stage: 1 }), "at hand");
        let _lost = bid(&mut state, 101);
        assert!(sequencer.forget_if_behind(state.id, Version { seq: 2, stage: 1 }), "seq 2 was missed");
        let third = bid(&mut state, 102);
        assert_eq!(sequencer.arrive(&third.0, &third.1), Arrival::Next, "not a second gap");
    }

    #[test]
    fn bounded_and_cleared() {
        let sequencer = Sequencer::new(2);
        for _ in 0..10 {
            let mut state = auction();
            let (event, state) = bid(&mut state, 100);
            assert_eq!(sequencer.arrive(&event, &state), Arrival::Next);
        }
        assert!(sequencer.last.lock().unwrap().len() <= 2);
        sequencer.clear();
        assert!(sequencer.last.lock().unwrap().is_empty());
    }
}
