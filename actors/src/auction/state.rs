//! The auction as a deterministic state machine: `AuctionState::apply(cmd, now)`
//! either returns the one event the command caused (and has changed the state
//! accordingly) or a `Rejection` (and has changed nothing). No I/O, no clock:
//! the caller hands in `now`, so the same commands at the same times always give
//! the same results. These are the bidding rules of docs/API.md, numbered as
//! there.

use std::sync::Arc;

use crate::money::Money;
use uuid::Uuid;

pub type UserId = Uuid;
pub type AuctionId = Uuid;

/// Milliseconds since the Unix epoch, UTC. The only notion of time the rules know.
pub type TimestampMs = i64;

/// A user as auctions show them: the id and the name. The name is shared, so
/// the many copies a bid makes (state, event, write, reply) cost no allocation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserRef {
    pub id: UserId,
    pub username: Arc<str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Scheduled,
    Active,
    Ended,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Active => "active",
            Status::Ended => "ended",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "scheduled" => Some(Status::Scheduled),
            "active" => Some(Status::Active),
            "ended" => Some(Status::Ended),
            "cancelled" => Some(Status::Cancelled),
            _ => None,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Ended | Status::Cancelled)
    }
}

/// What the seller fixed when creating the auction; never changes afterwards.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Terms {
    pub starting_price: Money,
    pub reserve_price: Option<Money>,
    pub min_increment: Money,
    pub soft_close_secs: u32,
}

/// The current leader and their secret proxy maximum `M`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leader {
    pub user: UserRef,
    pub max_amount: Money,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuctionState {
    pub id: AuctionId,
    pub seller: UserRef,
    pub terms: Terms,
    pub start_at_ms: TimestampMs,
    pub end_at_ms: TimestampMs,
    pub status: Status,
    /// `P`: the starting price until the first bid.
    pub current_price: Money,
    pub leader: Option<Leader>,
    pub bid_count: u64,
    /// Rises by one with every accepted bid (rule 5): the per-auction total order.
    pub seq: u64,
    pub winner: Option<UserRef>,
    pub final_price: Option<Money>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BidCommand {
    pub bidder: UserRef,
    pub amount: Money,
    pub max_amount: Option<Money>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    PlaceBid(BidCommand),
    /// Opens a scheduled auction once `start_at` has come.
    Start,
    /// Closes an active auction once `end_at` has come.
    End,
    Cancel {
        by: UserId,
    },
}

/// One accepted bid, with the auction as it stands right after it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BidPlaced {
    pub seq: u64,
    pub bidder: UserRef,
    pub amount: Money,
    /// The bidder's effective maximum: `max(amount, max_amount)`.
    pub bidder_max: Money,
    pub placed_at_ms: TimestampMs,
    pub current_price: Money,
    pub leader: UserRef,
    pub leader_max: Money,
    /// Whether the bidder leads after this bid.
    pub leading: bool,
    pub bid_count: u64,
    pub end_at_ms: TimestampMs,
    /// True when soft close moved `end_at` (rule 6).
    pub extended: bool,
    pub reserve_met: bool,
    /// The leader before this bid, if it was somebody else who lost the lead now.
    pub outbid: Option<UserRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Event {
    BidPlaced(BidPlaced),
    Started { seq: u64 },
    Ended { seq: u64, winner: Option<UserRef>, final_price: Option<Money>, reserve_met: bool },
    Cancelled { seq: u64 },
}

/// Why a command changed nothing. These are answers, not failures.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Rejection {
    AuctionNotActive {
        status: Status,
    },
    SellerCannotBid,
    BidTooLow {
        min_bid: Money,
        current_price: Money,
    },
    AlreadyLeading,
    /// `max_amount < amount`.
    InvalidAmount,
    /// Cancel by anyone but the seller.
    Forbidden,
    AuctionHasBids,
    /// `Start`/`End` before their time: nothing is due.
    NotDue,
}

impl AuctionState {
    /// `reserve_met` is `P ≥ R`, and always true without a reserve (rule 4).
    pub fn reserve_met(&self) -> bool {
        match self.terms.reserve_price {
            None => true,
            Some(reserve) => self.current_price >= reserve,
        }
    }

    /// The lowest amount a new challenger may bid now (rules 1 and 2).
    pub fn min_bid(&self) -> Money {
        match &self.leader {
            None => self.terms.starting_price,
            Some(_) => self
                .current_price
                .checked_add(self.terms.min_increment)
                .expect("price and increment are both bounded amounts"),
        }
    }

    /// The lifecycle command that is due at `now`, if any: the actor's timer
    /// and every incoming message ask this first, so an auction never takes a
    /// bid after its end even when a timer fires late.
    pub fn due(&self, now: TimestampMs) -> Option<Command> {
        match self.status {
            Status::Scheduled if now >= self.start_at_ms => Some(Command::Start),
            Status::Active if now >= self.end_at_ms => Some(Command::End),
            _ => None,
        }
    }

    /// When the next lifecycle command falls due, for the actor's timer.
    pub fn next_deadline(&self) -> Option<TimestampMs> {
        match self.status {
            Status::Scheduled => Some(self.start_at_ms),
            Status::Active => Some(self.end_at_ms),
            Status::Ended | Status::Cancelled => None,
        }
    }

    pub fn apply(&mut self, command: Command, now: TimestampMs) -> Result<Event, Rejection> {
        let event = match command {
            Command::PlaceBid(bid) => self.place_bid(bid, now).map(Event::BidPlaced),
            Command::Start => self.start(now),
            Command::End => self.end(now),
            Command::Cancel { by } => self.cancel(by),
        }?;
        self.check_invariants();
        Ok(event)
    }

    fn place_bid(&mut self, bid: BidCommand, now: TimestampMs) -> Result<BidPlaced, Rejection> {
        if self.status != Status::Active {
            return Err(Rejection::AuctionNotActive { status: self.status });
        }
        if bid.bidder.id == self.seller.id {
            return Err(Rejection::SellerCannotBid);
        }
        if bid.max_amount.is_some_and(|max_amount| max_amount < bid.amount) {
            return Err(Rejection::InvalidAmount);
        }
        let bidder_max = bid.max_amount.map_or(bid.amount, |max| max.max(bid.amount));
        let increment = self.terms.min_increment;
        let previous_leader = self.leader.clone();

        let (new_price, new_leader) = match &previous_leader {
            // Rule 1: the first bid needs the starting price and leads at its amount.
            None => {
                if bid.amount < self.terms.starting_price {
                    return Err(self.too_low());
                }
                let leader = Leader { user: bid.bidder.clone(), max_amount: bidder_max };
                (bid.amount, leader)
            }
            // Rule 3: the leader may only raise their own maximum.
            Some(leader) if leader.user.id == bid.bidder.id => {
                if bidder_max <= leader.max_amount {
                    return Err(Rejection::AlreadyLeading);
                }
                let raised = Leader { user: leader.user.clone(), max_amount: bidder_max };
                (self.current_price, raised)
            }
            // Rule 2: a challenger needs P + inc and wins only with a higher maximum.
            Some(leader) => {
                if bid.amount < self.min_bid() {
                    return Err(self.too_low());
                }
                let leader_max = leader.max_amount;
                if bidder_max > leader_max {
                    let capped = bidder_max.min(leader_max.checked_add(increment).expect("bounded"));
                    let price = bid.amount.max(capped);
                    (price, Leader { user: bid.bidder.clone(), max_amount: bidder_max })
                } else {
                    // Ties go to the earlier bid: the leader keeps the lead.
                    let price = leader_max.min(bidder_max.checked_add(increment).expect("bounded"));
                    (price, leader.clone())
                }
            }
        };

        // Rule 4: a leader whose maximum covers the reserve pays at least the reserve.
        let new_price = match self.terms.reserve_price {
            Some(reserve) if new_leader.max_amount >= reserve && new_price < reserve => reserve,
            _ => new_price,
        };

        debug_assert!(new_price >= self.current_price, "the price never falls");
        self.current_price = new_price;
        let leading = new_leader.user.id == bid.bidder.id;
        let outbid = match previous_leader {
            Some(previous) if previous.user.id != new_leader.user.id => Some(previous.user),
            _ => None,
        };
        let leader_after = new_leader.user.clone();
        let leader_max_after = new_leader.max_amount;
        self.leader = Some(new_leader);
        // Rule 5.
        self.seq += 1;
        self.bid_count += 1;
        // Rule 6: a bid less than `soft_close_secs` before the end moves the end.
        let soft_close_ms = i64::from(self.terms.soft_close_secs) * 1000;
        let extended = soft_close_ms > 0 && self.end_at_ms - now < soft_close_ms;
        if extended {
            self.end_at_ms = now + soft_close_ms;
        }

        Ok(BidPlaced {
            seq: self.seq,
            bidder: bid.bidder,
            amount: bid.amount,
            bidder_max,
            placed_at_ms: now,
            current_price: self.current_price,
            leader: leader_after,
            leader_max: leader_max_after,
            leading,
            bid_count: self.bid_count,
            end_at_ms: self.end_at_ms,
            extended,
            reserve_met: self.reserve_met(),
            outbid,
        })
    }

    fn too_low(&self) -> Rejection {
        Rejection::BidTooLow { min_bid: self.min_bid(), current_price: self.current_price }
    }

    fn start(&mut self, now: TimestampMs) -> Result<Event, Rejection> {
        if self.status != Status::Scheduled {
            return Err(Rejection::AuctionNotActive { status: self.status });
        }
        if now < self.start_at_ms {
            return Err(Rejection::NotDue);
        }
        self.status = Status::Active;
        Ok(Event::Started { seq: self.seq })
    }

    /// Rule 7: the leader wins if the reserve is met; the price is final.
    fn end(&mut self, now: TimestampMs) -> Result<Event, Rejection> {
        if self.status != Status::Active {
            return Err(Rejection::AuctionNotActive { status: self.status });
        }
        if now < self.end_at_ms {
            return Err(Rejection::NotDue);
        }
        let reserve_met = self.reserve_met();
        self.status = Status::Ended;
        self.winner = match &self.leader {
            Some(leader) if reserve_met => Some(leader.user.clone()),
            _ => None,
        };
        self.final_price = self.winner.as_ref().map(|_| self.current_price);
        Ok(Event::Ended { seq: self.seq, winner: self.winner.clone(), final_price: self.final_price, reserve_met })
    }

    fn cancel(&mut self, by: UserId) -> Result<Event, Rejection> {
        if by != self.seller.id {
            return Err(Rejection::Forbidden);
        }
        if self.status.is_final() {
            return Err(Rejection::AuctionNotActive { status: self.status });
        }
        if self.bid_count > 0 {
            return Err(Rejection::AuctionHasBids);
        }
        self.status = Status::Cancelled;
        Ok(Event::Cancelled { seq: self.seq })
    }

    fn check_invariants(&self) {
        debug_assert_eq!(self.seq, self.bid_count, "seq counts accepted bids");
        if let Some(leader) = &self.leader {
            debug_assert!(leader.max_amount >= self.current_price, "the leader's maximum covers the price");
            debug_assert!(leader.user.id != self.seller.id, "the seller never leads");
        } else {
            debug_assert_eq!(self.current_price, self.terms.starting_price);
            debug_assert_eq!(self.bid_count, 0);
        }
        debug_assert!(self.winner.is_none() || self.status == Status::Ended);
        debug_assert_eq!(self.winner.is_some(), self.final_price.is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(minor: i64) -> Money {
        Money::parse(minor).unwrap()
    }

    fn user(n: u128) -> UserRef {
        UserRef { id: Uuid::from_u128(n), username: format!("user{n}").into() }
    }

    fn auction(reserve: Option<i64>, soft_close_secs: u32) -> AuctionState {
        AuctionState {
            id: Uuid::from_u128(99),
            seller: user(1),
            terms: Terms {
                starting_price: money(10_000),
                reserve_price: reserve.map(money),
                min_increment: money(500),
                soft_close_secs,
            },
            start_at_ms: 1_000,
            end_at_ms: 100_000,
            status: Status::Active,
            current_price: money(10_000),
            leader: None,
            bid_count: 0,
            seq: 0,
            winner: None,
            final_price: None,
        }
    }

    fn bid(
        state: &mut AuctionState,
        who: u128,
        amount: i64,
        max: Option<i64>,
        now: i64,
    ) -> Result<BidPlaced, Rejection> {
        let command =
            Command::PlaceBid(BidCommand { bidder: user(who), amount: money(amount), max_amount: max.map(money) });
        match state.apply(command, now)? {
            Event::BidPlaced(placed) => Ok(placed),
            other => panic!("unexpected event {other:?}"),
        }
    }

    #[test]
    fn first_bid_needs_the_starting_price_and_leads_at_its_amount() {
        let mut state = auction(None, 0);
        assert_eq!(
            bid(&mut state, 2, 9_999, None, 2_000),
            Err(Rejection::BidTooLow { min_bid: money(10_000), current_price: money(10_000) })
        );
        let placed = bid(&mut state, 2, 10_000, Some(20_000), 2_000).unwrap();
        assert!(placed.leading);
        assert_eq!(placed.current_price, money(10_000));
        assert_eq!(placed.seq, 1);
    }

    #[test]
    fn proxy_maximum_defends_the_lead_and_ties_go_to_the_earlier_bid() {
        let mut state = auction(None, 0);
        bid(&mut state, 2, 10_000, Some(20_000), 2_000).unwrap();
        let challenger = bid(&mut state, 3, 15_000, None, 2_001).unwrap();
        assert!(!challenger.leading);
        assert_eq!(challenger.current_price, money(15_500));
        let tie = bid(&mut state, 3, 20_000, None, 2_002).unwrap();
        assert!(!tie.leading, "ties go to the earlier bid");
        assert_eq!(tie.current_price, money(20_000));
        let winner = bid(&mut state, 3, 20_500, Some(30_000), 2_003).unwrap();
        assert!(winner.leading);
        assert_eq!(winner.current_price, money(20_500));
        assert_eq!(winner.outbid, Some(user(2)));
    }

    #[test]
    fn challenger_with_higher_maximum_pays_one_increment_over_the_old_maximum() {
        let mut state = auction(None, 0);
        bid(&mut state, 2, 10_000, Some(12_000), 2_000).unwrap();
        let placed = bid(&mut state, 3, 10_500, Some(50_000), 2_001).unwrap();
        assert!(placed.leading);
        assert_eq!(placed.current_price, money(12_500));
    }

    #[test]
    fn leader_may_only_raise_their_maximum() {
        let mut state = auction(None, 0);
        bid(&mut state, 2, 10_000, Some(12_000), 2_000).unwrap();
        assert_eq!(bid(&mut state, 2, 11_000, None, 2_001), Err(Rejection::AlreadyLeading));
        let raised = bid(&mut state, 2, 11_000, Some(13_000), 2_002).unwrap();
        assert_eq!(raised.current_price, money(10_000));
        assert_eq!(state.leader.as_ref().unwrap().max_amount, money(13_000));
    }

    #[test]
    fn reserve_lifts_the_price_when_the_leaders_maximum_covers_it() {
        let mut state = auction(Some(15_000), 0);
        let placed = bid(&mut state, 2, 10_000, Some(12_000), 2_000).unwrap();
        assert!(!placed.reserve_met);
        let placed = bid(&mut state, 2, 10_000, Some(16_000), 2_001).unwrap();
        assert_eq!(placed.current_price, money(15_000));
        assert!(placed.reserve_met);
    }

    #[test]
    fn soft_close_moves_the_end() {
        let mut state = auction(None, 30);
        let placed = bid(&mut state, 2, 10_000, None, 80_000).unwrap();
        assert!(placed.extended);
        assert_eq!(placed.end_at_ms, 110_000);
        let placed = bid(&mut state, 3, 10_500, None, 50_000).unwrap();
        assert!(!placed.extended);
    }

    #[test]
    fn ending_names_a_winner_only_when_the_reserve_is_met() {
        let mut state = auction(Some(50_000), 0);
        bid(&mut state, 2, 10_000, None, 2_000).unwrap();
        assert_eq!(state.apply(Command::End, 99_999), Err(Rejection::NotDue));
        assert_eq!(state.due(100_000), Some(Command::End));
        let ended = state.apply(Command::End, 100_000).unwrap();
        assert_eq!(ended, Event::Ended { seq: 1, winner: None, final_price: None, reserve_met: false });
        assert_eq!(
            bid(&mut state, 3, 60_000, None, 100_001),
            Err(Rejection::AuctionNotActive { status: Status::Ended })
        );
    }

    #[test]
    fn cancel_is_for_the_seller_before_any_bid() {
        let mut state = auction(None, 0);
        assert_eq!(state.apply(Command::Cancel { by: user(2).id }, 2_000), Err(Rejection::Forbidden));
        let mut with_bid = state.clone();
        bid(&mut with_bid, 2, 10_000, None, 2_000).unwrap();
        assert_eq!(with_bid.apply(Command::Cancel { by: user(1).id }, 2_000), Err(Rejection::AuctionHasBids));
        assert_eq!(state.apply(Command::Cancel { by: user(1).id }, 2_000), Ok(Event::Cancelled { seq: 0 }));
        assert_eq!(
            state.apply(Command::Cancel { by: user(1).id }, 2_000),
            Err(Rejection::AuctionNotActive { status: Status::Cancelled })
        );
    }

    #[test]
    fn seller_cannot_bid_and_rejections_change_nothing() {
        let mut state = auction(None, 0);
        let before = state.clone();
        assert_eq!(bid(&mut state, 1, 10_000, None, 2_000), Err(Rejection::SellerCannotBid));
        assert_eq!(bid(&mut state, 2, 10_000, Some(9_000), 2_000), Err(Rejection::InvalidAmount));
        assert_eq!(state, before);
    }
}
