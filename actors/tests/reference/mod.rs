//! A reference model of the auction rules, for tests.
//!
//! `Model` is a second, deliberately plain implementation of the bidding
//! rules, transcribed straight from docs/API.md ("Placing a bid", "Bidding
//! rules" 1-7, and cancel in "Auctions") with `i128` arithmetic and user
//! indices (`usize`) instead of `Money` and `UserRef`. It shares no code with
//! `AuctionState` (actors/src/auction/state.rs) and depends on nothing but std
//! and `MAX_AMOUNT_MINOR`, so that it can be included as a module from more
//! than one test crate: the property test in actors/tests/rules_model.rs
//! (`mod reference;`), which compares it with `AuctionState` step by step,
//! and the server's integration tests in tests/api/ (through
//! `#[path = "../../actors/tests/reference/mod.rs"] mod reference;`), which
//! check the replies of the running server against it. Each includer uses
//! only part of it, hence the `dead_code` allowance.

#![allow(dead_code)]

use gavel_actors::money::MAX_AMOUNT_MINOR;

/// The largest amount, in minor units.
pub const MAX: i128 = MAX_AMOUNT_MINOR as i128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum St {
    Scheduled,
    Active,
    Ended,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rej {
    NotActive(St),
    SellerCannotBid,
    TooLow { min_bid: i128, current_price: i128 },
    AlreadyLeading,
    InvalidAmount,
    Forbidden,
    HasBids,
    NotDue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub seq: u64,
    pub bidder: usize,
    pub amount: i128,
    pub bidder_max: i128,
    pub placed_at: i64,
    pub price: i128,
    pub leader: usize,
    pub leader_max: i128,
    pub leading: bool,
    pub bid_count: u64,
    pub end_at: i64,
    pub extended: bool,
    pub reserve_met: bool,
    pub outbid: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Placed(Placed),
    Started { seq: u64 },
    Ended { seq: u64, winner: Option<usize>, final_price: Option<i128>, reserve_met: bool },
    Cancelled { seq: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MCmd {
    Bid { user: usize, amount: i128, max: Option<i128> },
    Start,
    End,
    Cancel { user: usize },
}

/// How often each rule and answer was reached, to check the generators.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub first_bid: u64,
    pub challenger_wins: u64,
    pub challenger_wins_at_own_amount: u64,
    pub challenger_loses: u64,
    pub tie: u64,
    pub leader_raises: u64,
    pub reserve_lift: u64,
    pub extended: u64,
    pub started: u64,
    pub ended_with_winner: u64,
    pub ended_reserve_not_met: u64,
    pub ended_without_bids: u64,
    pub cancelled: u64,
    pub not_active: u64,
    pub seller_cannot_bid: u64,
    pub too_low: u64,
    pub already_leading: u64,
    pub invalid_amount: u64,
    pub forbidden: u64,
    pub has_bids: u64,
    pub not_due: u64,
}

#[derive(Clone, Debug)]
pub struct Model {
    // Terms.
    /// The seller's user index: the only one who may cancel, and who may not bid.
    pub seller: usize,
    pub start_price: i128,
    pub reserve: Option<i128>,
    pub inc: i128,
    pub soft_ms: i64,
    pub start_at: i64,
    // State.
    pub status: St,
    pub end_at: i64,
    pub price: i128,
    /// The leader and their maximum `M`.
    pub leader: Option<(usize, i128)>,
    pub bid_count: u64,
    pub seq: u64,
    pub winner: Option<usize>,
    pub final_price: Option<i128>,
}

impl Model {
    /// A new auction, `Scheduled` or `Active`, at its starting price with no
    /// bids. Times are in ms since the epoch.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seller: usize,
        start_price: i128,
        reserve: Option<i128>,
        inc: i128,
        soft_close_secs: u32,
        start_at: i64,
        end_at: i64,
        status: St,
    ) -> Model {
        assert!(matches!(status, St::Scheduled | St::Active), "a new auction is scheduled or active, not {status:?}");
        Model {
            seller,
            start_price,
            reserve,
            inc,
            soft_ms: i64::from(soft_close_secs) * 1000,
            start_at,
            status,
            end_at,
            price: start_price,
            leader: None,
            bid_count: 0,
            seq: 0,
            winner: None,
            final_price: None,
        }
    }

    pub fn reserve_met(&self) -> bool {
        // Rule 4: `P >= R`, always true without a reserve.
        self.reserve.is_none_or(|r| self.price >= r)
    }

    pub fn min_bid(&self) -> i128 {
        if self.leader.is_some() {
            self.price + self.inc // rule 2
        } else {
            self.start_price // rule 1
        }
    }

    /// What the actor applies on its own at `now`.
    pub fn due(&self, now: i64) -> Option<MCmd> {
        if self.status == St::Scheduled && now >= self.start_at {
            Some(MCmd::Start)
        } else if self.status == St::Active && now >= self.end_at {
            Some(MCmd::End)
        } else {
            None
        }
    }

    /// Applies one command at `now`: the event, or the rejection (which leaves
    /// the model unchanged).
    pub fn apply(&mut self, cmd: MCmd, now: i64) -> Result<Ev, Rej> {
        self.apply_counting(cmd, now, &mut Stats::default())
    }

    /// [`Model::apply`], also counting in `stats` which rule or answer was
    /// reached.
    pub fn apply_counting(&mut self, cmd: MCmd, now: i64, stats: &mut Stats) -> Result<Ev, Rej> {
        let result = match cmd {
            MCmd::Bid { user, amount, max } => self.bid(user, amount, max, now, stats),
            MCmd::Start => self.start(now, stats),
            MCmd::End => self.end(now, stats),
            MCmd::Cancel { user } => self.cancel(user, stats),
        };
        if let Err(rej) = &result {
            let counter = match rej {
                Rej::NotActive(_) => &mut stats.not_active,
                Rej::SellerCannotBid => &mut stats.seller_cannot_bid,
                Rej::TooLow { .. } => &mut stats.too_low,
                Rej::AlreadyLeading => &mut stats.already_leading,
                Rej::InvalidAmount => &mut stats.invalid_amount,
                Rej::Forbidden => &mut stats.forbidden,
                Rej::HasBids => &mut stats.has_bids,
                Rej::NotDue => &mut stats.not_due,
            };
            *counter += 1;
        }
        result
    }

    fn bid(&mut self, user: usize, amount: i128, max: Option<i128>, now: i64, stats: &mut Stats) -> Result<Ev, Rej> {
        if self.status != St::Active {
            return Err(Rej::NotActive(self.status));
        }
        if user == self.seller {
            return Err(Rej::SellerCannotBid);
        }
        if let Some(max) = max
            && max < amount
        {
            return Err(Rej::InvalidAmount);
        }
        let m = match max {
            Some(max) if max > amount => max,
            _ => amount,
        };
        let too_low = Rej::TooLow { min_bid: self.min_bid(), current_price: self.price };
        let old_price = self.price;
        let old_leader = self.leader;

        let (mut price, new_leader) = match self.leader {
            // Rule 1.
            None => {
                if amount < self.start_price {
                    return Err(too_low);
                }
                stats.first_bid += 1;
                (amount, (user, m))
            }
            // Rule 3.
            Some((leader, leader_max)) if leader == user => {
                if m <= leader_max {
                    return Err(Rej::AlreadyLeading);
                }
                stats.leader_raises += 1;
                (self.price, (user, m))
            }
            // Rule 2.
            Some((leader, leader_max)) => {
                if amount < self.price + self.inc {
                    return Err(too_low);
                }
                if m > leader_max {
                    stats.challenger_wins += 1;
                    let p = amount.max(m.min(leader_max + self.inc));
                    if p == amount {
                        stats.challenger_wins_at_own_amount += 1;
                    }
                    (p, (user, m))
                } else {
                    if m == leader_max {
                        stats.tie += 1;
                    }
                    stats.challenger_loses += 1;
                    (leader_max.min(m + self.inc), (leader, leader_max))
                }
            }
        };
        // Rule 4.
        if let Some(r) = self.reserve
            && new_leader.1 >= r
            && price < r
        {
            stats.reserve_lift += 1;
            price = r;
        }
        // Properties the rules imply on their own.
        assert!(price >= old_price, "price fell: {old_price} -> {price}");
        assert!(new_leader.1 >= price, "leader max below price");
        assert!((1..=MAX).contains(&price), "price out of range");

        self.price = price;
        self.leader = Some(new_leader);
        // Rule 5.
        self.seq += 1;
        self.bid_count += 1;
        // Rule 6.
        let extended = self.end_at - now < self.soft_ms;
        if extended {
            stats.extended += 1;
            self.end_at = now + self.soft_ms;
        }
        let outbid = match old_leader {
            Some((previous, _)) if previous != new_leader.0 => Some(previous),
            _ => None,
        };
        Ok(Ev::Placed(Placed {
            seq: self.seq,
            bidder: user,
            amount,
            bidder_max: m,
            placed_at: now,
            price: self.price,
            leader: new_leader.0,
            leader_max: new_leader.1,
            leading: new_leader.0 == user,
            bid_count: self.bid_count,
            end_at: self.end_at,
            extended,
            reserve_met: self.reserve_met(),
            outbid,
        }))
    }

    fn start(&mut self, now: i64, stats: &mut Stats) -> Result<Ev, Rej> {
        if self.status != St::Scheduled {
            return Err(Rej::NotActive(self.status));
        }
        if now < self.start_at {
            return Err(Rej::NotDue);
        }
        stats.started += 1;
        self.status = St::Active;
        Ok(Ev::Started { seq: self.seq })
    }

    /// Rule 7.
    fn end(&mut self, now: i64, stats: &mut Stats) -> Result<Ev, Rej> {
        if self.status != St::Active {
            return Err(Rej::NotActive(self.status));
        }
        if now < self.end_at {
            return Err(Rej::NotDue);
        }
        self.status = St::Ended;
        let reserve_met = self.reserve_met();
        match self.leader {
            Some((leader, _)) if reserve_met => {
                stats.ended_with_winner += 1;
                self.winner = Some(leader);
                self.final_price = Some(self.price);
            }
            Some(_) => stats.ended_reserve_not_met += 1,
            None => stats.ended_without_bids += 1,
        }
        Ok(Ev::Ended { seq: self.seq, winner: self.winner, final_price: self.final_price, reserve_met })
    }

    fn cancel(&mut self, user: usize, stats: &mut Stats) -> Result<Ev, Rej> {
        if user != self.seller {
            return Err(Rej::Forbidden);
        }
        if matches!(self.status, St::Ended | St::Cancelled) {
            return Err(Rej::NotActive(self.status));
        }
        if self.bid_count > 0 {
            return Err(Rej::HasBids);
        }
        stats.cancelled += 1;
        self.status = St::Cancelled;
        Ok(Ev::Cancelled { seq: self.seq })
    }
}
