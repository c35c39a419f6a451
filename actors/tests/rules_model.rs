//! Model-based property test of the auction rules.
//!
//! `Model` (in reference/mod.rs, shared with the server's integration tests)
//! is a second, deliberately plain implementation of the bidding rules,
//! transcribed straight from docs/API.md ("Placing a bid", "Bidding rules"
//! 1-7, and cancel in "Auctions") with `i128` arithmetic and user indices
//! instead of `Money` and `UserRef`. It shares no code with `AuctionState`.
//! Long random command sequences are fed to both, and after every step the
//! reply (every field of the event, or the exact rejection) and the whole
//! observable state must agree.
//!
//! Time is driven the way the auction actor drives it: before a bid or a
//! cancel, every lifecycle command that is due is applied first (so a bid never
//! lands after `end_at`); explicit `Start`/`End` commands are also sent at
//! arbitrary times to cover their "not due" and "not active" answers.

mod reference;

use gavel_actors::money::MAX_AMOUNT_MINOR;
use gavel_actors::{AuctionState, BidCommand, BidPlaced, Command, Event, Money, Rejection, Status, Terms, UserRef};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use reference::{Ev, MAX, MCmd, Model, Placed, Rej, St, Stats};
use uuid::Uuid;

/// User 0 is the seller; users 1..=3 bid.
const SELLER: usize = 0;
const USERS: usize = 4;
/// "now" at the first step, in ms since the epoch.
const T0: i64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------
// Scenarios: terms, and steps whose amounts are resolved against the state.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Base {
    Price,
    MinBid,
    LeaderMax,
    Reserve,
    StartPrice,
}

/// An amount, mostly near an interesting point of the state at the time.
#[derive(Clone, Copy, Debug)]
enum Amount {
    Near { base: Base, incs: i64, units: i64 },
    Abs(i64),
}

#[derive(Clone, Copy, Debug)]
enum Max {
    None,
    Of(Amount),
    /// Relative to the bid's own amount; may fall below it.
    FromAmount {
        incs: i64,
        units: i64,
    },
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Bid {
        user: usize,
        amount: Amount,
        max: Max,
    },
    Cancel {
        user: usize,
    },
    Start,
    End,
    /// The actor's timer: apply whatever is due.
    Tick,
}

#[derive(Clone, Copy, Debug)]
struct Step {
    dt_ms: i64,
    op: Op,
}

#[derive(Clone, Copy, Debug)]
enum ReserveSpec {
    None,
    Near { incs: i64, units: i64 },
    Abs(i64),
}

#[derive(Clone, Copy, Debug)]
struct Setup {
    start_price: i64,
    inc: i64,
    reserve: ReserveSpec,
    soft_close_secs: u32,
    begin_active: bool,
    start_offset_ms: i64,
    duration_ms: i64,
    /// Bidders who never jump to the reserve or to arbitrary amounts, so that
    /// auctions also end with the reserve unmet.
    timid: bool,
}

fn clamp(value: i128) -> i128 {
    value.clamp(1, MAX)
}

fn resolve(model: &Model, timid: bool, amount: Amount) -> i128 {
    match amount {
        Amount::Abs(v) if timid => clamp(model.min_bid() + i128::from(v % 3) * model.inc),
        Amount::Abs(v) => i128::from(v),
        Amount::Near { base, incs, units } => {
            let base = match base {
                Base::Reserve | Base::LeaderMax if timid => model.min_bid(),
                Base::Price => model.price,
                Base::MinBid => model.min_bid(),
                Base::LeaderMax => model.leader.map_or(model.price, |(_, m)| m),
                Base::Reserve => model.reserve.unwrap_or(model.price),
                Base::StartPrice => model.start_price,
            };
            clamp(base + i128::from(incs) * model.inc + i128::from(units))
        }
    }
}

fn resolve_max(model: &Model, timid: bool, amount: i128, max: Max) -> Option<i128> {
    match max {
        Max::None => None,
        Max::Of(spec) => Some(resolve(model, timid, spec)),
        Max::FromAmount { incs, units } => Some(clamp(amount + i128::from(incs) * model.inc + i128::from(units))),
    }
}

fn money_strategy() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => 1..=MAX_AMOUNT_MINOR,
        1 => Just(1i64),
        1 => Just(MAX_AMOUNT_MINOR),
        1 => (MAX_AMOUNT_MINOR - 3)..=MAX_AMOUNT_MINOR,
    ]
}

fn amount_strategy() -> impl Strategy<Value = Amount> {
    let base = prop_oneof![
        2 => Just(Base::Price),
        4 => Just(Base::MinBid),
        3 => Just(Base::LeaderMax),
        1 => Just(Base::Reserve),
        1 => Just(Base::StartPrice),
    ];
    prop_oneof![
        20 => (base, -2i64..=3, -2i64..=2)
            .prop_map(|(base, incs, units)| Amount::Near { base, incs, units }),
        1 => money_strategy().prop_map(Amount::Abs),
    ]
}

fn max_strategy() -> impl Strategy<Value = Max> {
    prop_oneof![
        5 => Just(Max::None),
        3 => amount_strategy().prop_map(Max::Of),
        3 => (-1i64..=4, -2i64..=2).prop_map(|(incs, units)| Max::FromAmount { incs, units }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let dt_ms = prop_oneof![
        20 => Just(0i64),
        40 => 1i64..=200,
        16 => 0i64..=1_000,
        1 => 0i64..=20_000,
    ];
    let bidder = prop_oneof![1 => Just(SELLER), 10 => 1..USERS];
    let canceller = prop_oneof![3 => Just(SELLER), 1 => 1..USERS];
    let op = prop_oneof![
        24 => (bidder, amount_strategy(), max_strategy())
            .prop_map(|(user, amount, max)| Op::Bid { user, amount, max }),
        1 => canceller.prop_map(|user| Op::Cancel { user }),
        2 => Just(Op::Start),
        2 => Just(Op::End),
        3 => Just(Op::Tick),
    ];
    (dt_ms, op).prop_map(|(dt_ms, op)| Step { dt_ms, op })
}

fn setup_strategy() -> impl Strategy<Value = Setup> {
    let start_price = prop_oneof![8 => 1i64..=20_000, 1 => money_strategy()];
    let inc = prop_oneof![8 => 1i64..=1_000, 1 => money_strategy()];
    let reserve = prop_oneof![
        3 => Just(ReserveSpec::None),
        3 => (-2i64..=8, -2i64..=2).prop_map(|(incs, units)| ReserveSpec::Near { incs, units }),
        2 => (20i64..=500, -2i64..=2).prop_map(|(incs, units)| ReserveSpec::Near { incs, units }),
        1 => money_strategy().prop_map(ReserveSpec::Abs),
    ];
    let soft_close_secs = prop_oneof![1 => Just(0u32), 2 => 1u32..=5];
    (
        start_price,
        inc,
        reserve,
        soft_close_secs,
        any::<bool>(),
        -3_000i64..=2_000,
        prop_oneof![1 => 1i64..=2_000, 4 => 2_000i64..=90_000],
        prop::bool::weighted(0.25),
    )
        .prop_map(
            |(start_price, inc, reserve, soft_close_secs, begin_active, start_offset_ms, duration_ms, timid)| Setup {
                start_price,
                inc,
                reserve,
                soft_close_secs,
                begin_active,
                start_offset_ms,
                duration_ms,
                timid,
            },
        )
}

fn scenario_strategy() -> impl Strategy<Value = (Setup, Vec<Step>)> {
    (setup_strategy(), proptest::collection::vec(step_strategy(), 1..200))
}

// ---------------------------------------------------------------------------
// The harness: both sides, compared after every step.
// ---------------------------------------------------------------------------

fn users() -> Vec<UserRef> {
    (0..USERS)
        .map(|i| UserRef { id: Uuid::from_u128(0x1000 + i as u128), username: format!("user{i}").into() })
        .collect()
}

fn money(minor: i128) -> Money {
    Money::parse(i64::try_from(minor).unwrap()).expect("generated amounts are in range")
}

fn minor(m: Money) -> i128 {
    i128::from(m.minor_units())
}

/// Index of a user in `users`, or `usize::MAX` for anybody (or any name) else.
fn who(users: &[UserRef], user: &UserRef) -> usize {
    users.iter().position(|u| u == user).unwrap_or(usize::MAX)
}

fn st(status: Status) -> St {
    match status {
        Status::Scheduled => St::Scheduled,
        Status::Active => St::Active,
        Status::Ended => St::Ended,
        Status::Cancelled => St::Cancelled,
    }
}

fn rej(r: &Rejection) -> Rej {
    match r {
        Rejection::AuctionNotActive { status } => Rej::NotActive(st(*status)),
        Rejection::SellerCannotBid => Rej::SellerCannotBid,
        Rejection::BidTooLow { min_bid, current_price } => {
            Rej::TooLow { min_bid: minor(*min_bid), current_price: minor(*current_price) }
        }
        Rejection::AlreadyLeading => Rej::AlreadyLeading,
        Rejection::InvalidAmount => Rej::InvalidAmount,
        Rejection::Forbidden => Rej::Forbidden,
        Rejection::AuctionHasBids => Rej::HasBids,
        Rejection::NotDue => Rej::NotDue,
    }
}

fn placed(users: &[UserRef], p: &BidPlaced) -> Placed {
    Placed {
        seq: p.seq,
        bidder: who(users, &p.bidder),
        amount: minor(p.amount),
        bidder_max: minor(p.bidder_max),
        placed_at: p.placed_at_ms,
        price: minor(p.current_price),
        leader: who(users, &p.leader),
        leader_max: minor(p.leader_max),
        leading: p.leading,
        bid_count: p.bid_count,
        end_at: p.end_at_ms,
        extended: p.extended,
        reserve_met: p.reserve_met,
        outbid: p.outbid.as_ref().map(|u| who(users, u)),
    }
}

fn ev(users: &[UserRef], e: &Event) -> Ev {
    match e {
        Event::BidPlaced(p) => Ev::Placed(placed(users, p)),
        Event::Started { seq } => Ev::Started { seq: *seq },
        Event::Ended { seq, winner, final_price, reserve_met } => Ev::Ended {
            seq: *seq,
            winner: winner.as_ref().map(|u| who(users, u)),
            final_price: final_price.map(minor),
            reserve_met: *reserve_met,
        },
        Event::Cancelled { seq } => Ev::Cancelled { seq: *seq },
    }
}

fn cmd(users: &[UserRef], c: MCmd) -> Command {
    match c {
        MCmd::Bid { user, amount, max } => Command::PlaceBid(BidCommand {
            bidder: users[user].clone(),
            amount: money(amount),
            max_amount: max.map(money),
        }),
        MCmd::Start => Command::Start,
        MCmd::End => Command::End,
        MCmd::Cancel { user } => Command::Cancel { by: users[user].id },
    }
}

/// The observable state of the real auction, in the model's terms.
#[derive(Debug, PartialEq, Eq)]
struct View {
    status: St,
    price: i128,
    leader: Option<(usize, i128)>,
    bid_count: u64,
    seq: u64,
    start_at: i64,
    end_at: i64,
    winner: Option<usize>,
    final_price: Option<i128>,
    reserve_met: bool,
    min_bid: i128,
}

fn view_real(users: &[UserRef], s: &AuctionState) -> View {
    View {
        status: st(s.status),
        price: minor(s.current_price),
        leader: s.leader.as_ref().map(|l| (who(users, &l.user), minor(l.max_amount))),
        bid_count: s.bid_count,
        seq: s.seq,
        start_at: s.start_at_ms,
        end_at: s.end_at_ms,
        winner: s.winner.as_ref().map(|u| who(users, u)),
        final_price: s.final_price.map(minor),
        reserve_met: s.reserve_met(),
        min_bid: minor(s.min_bid()),
    }
}

fn view_model(m: &Model) -> View {
    View {
        status: m.status,
        price: m.price,
        leader: m.leader,
        bid_count: m.bid_count,
        seq: m.seq,
        start_at: m.start_at,
        end_at: m.end_at,
        winner: m.winner,
        final_price: m.final_price,
        reserve_met: m.reserve_met(),
        min_bid: m.min_bid(),
    }
}

struct Harness {
    setup: Setup,
    users: Vec<UserRef>,
    real: AuctionState,
    initial: AuctionState,
    model: Model,
    stats: Stats,
    /// What happened so far, printed when a step disagrees.
    log: Vec<String>,
}

impl Harness {
    fn new(setup: &Setup) -> Harness {
        let users = users();
        let start_price = i128::from(setup.start_price);
        let inc = i128::from(setup.inc);
        let reserve = match setup.reserve {
            ReserveSpec::None => None,
            ReserveSpec::Near { incs, units } => Some(clamp(start_price + i128::from(incs) * inc + i128::from(units))),
            ReserveSpec::Abs(v) => Some(i128::from(v)),
        };
        let start_at = if setup.begin_active { T0 - setup.start_offset_ms.abs() } else { T0 + setup.start_offset_ms };
        let end_at = start_at + setup.duration_ms;
        let status = if setup.begin_active { St::Active } else { St::Scheduled };
        let model = Model::new(SELLER, start_price, reserve, inc, setup.soft_close_secs, start_at, end_at, status);
        let real = AuctionState {
            id: Uuid::from_u128(0xA0C7),
            seller: users[SELLER].clone(),
            terms: Terms {
                starting_price: money(start_price),
                reserve_price: reserve.map(money),
                min_increment: money(inc),
                soft_close_secs: setup.soft_close_secs,
            },
            start_at_ms: start_at,
            end_at_ms: end_at,
            status: if setup.begin_active { Status::Active } else { Status::Scheduled },
            current_price: money(start_price),
            leader: None,
            bid_count: 0,
            seq: 0,
            winner: None,
            final_price: None,
        };
        Harness {
            setup: *setup,
            users,
            initial: real.clone(),
            real,
            model,
            stats: Stats::default(),
            log: vec![format!("setup {setup:?}")],
        }
    }

    fn context(&self) -> String {
        self.log.join("\n")
    }

    fn check_state(&self, now: i64) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            view_real(&self.users, &self.real),
            view_model(&self.model),
            "state (left: AuctionState, right: model) after:\n{}",
            self.context()
        );
        // What never changes.
        prop_assert_eq!(&self.real.id, &self.initial.id);
        prop_assert_eq!(&self.real.seller, &self.initial.seller);
        prop_assert_eq!(&self.real.terms, &self.initial.terms);
        // Lifecycle scheduling.
        let due = self.model.due(now).map(|c| cmd(&self.users, c));
        prop_assert_eq!(self.real.due(now), due, "due at {}:\n{}", now, self.context());
        let deadline = match self.model.status {
            St::Scheduled => Some(self.model.start_at),
            St::Active => Some(self.model.end_at),
            St::Ended | St::Cancelled => None,
        };
        prop_assert_eq!(self.real.next_deadline(), deadline);
        Ok(())
    }

    /// Sends one command to both sides and compares the replies and states.
    fn exec(&mut self, c: MCmd, now: i64) -> Result<Result<Ev, Rej>, TestCaseError> {
        self.log.push(format!("t={now}: {c:?}"));
        let before = self.real.clone();
        let got = self.real.apply(cmd(&self.users, c), now);
        let want = self.model.apply_counting(c, now, &mut self.stats);
        let got_view = match &got {
            Ok(e) => Ok(ev(&self.users, e)),
            Err(r) => Err(rej(r)),
        };
        self.log.push(format!("    -> {want:?}"));
        prop_assert_eq!(
            &got_view,
            &want,
            "reply (left: AuctionState, right: model) to the last command of:\n{}",
            self.context()
        );
        if got.is_err() {
            prop_assert_eq!(&self.real, &before, "a rejection changed the state");
        }
        self.check_state(now)?;
        Ok(want)
    }

    /// What the actor does before every write and on every timer tick.
    fn apply_due(&mut self, now: i64) -> Result<(), TestCaseError> {
        let mut rounds = 0;
        while let Some(c) = self.model.due(now) {
            let reply = self.exec(c, now)?;
            prop_assert!(reply.is_ok(), "a due command was rejected: {:?}", reply);
            rounds += 1;
            prop_assert!(rounds <= 2, "lifecycle does not settle");
        }
        Ok(())
    }

    fn step(&mut self, now: i64, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Tick => self.apply_due(now),
            Op::Start => self.exec(MCmd::Start, now).map(drop),
            Op::End => self.exec(MCmd::End, now).map(drop),
            Op::Cancel { user } => {
                self.apply_due(now)?;
                self.exec(MCmd::Cancel { user }, now).map(drop)
            }
            Op::Bid { user, amount, max } => {
                self.apply_due(now)?;
                let timid = self.setup.timid;
                let amount = resolve(&self.model, timid, amount);
                let max = resolve_max(&self.model, timid, amount, max);
                self.exec(MCmd::Bid { user, amount, max }, now).map(drop)
            }
        }
    }
}

fn run(setup: &Setup, steps: &[Step]) -> Result<Stats, TestCaseError> {
    let mut harness = Harness::new(setup);
    let mut now = T0;
    harness.check_state(now)?;
    for step in steps {
        now += step.dt_ms;
        harness.step(now, step.op)?;
    }
    Ok(harness.stats)
}

proptest! {
    #![proptest_config(Config {
        cases: 512,
        // No regression files next to the sources: a failure prints its case.
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn state_machine_follows_the_api_rules((setup, steps) in scenario_strategy()) {
        run(&setup, &steps)?;
    }
}

/// The generators reach every rule and every answer, so the property above
/// is not vacuous.
#[test]
fn generators_reach_every_rule_and_answer() {
    let config = Config { failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let strategy = scenario_strategy();
    let mut total = Stats::default();
    for _ in 0..256 {
        let (setup, steps) = strategy.new_tree(&mut runner).unwrap().current();
        let stats = run(&setup, &steps).unwrap();
        let add = |a: &mut u64, b: u64| *a += b;
        add(&mut total.first_bid, stats.first_bid);
        add(&mut total.challenger_wins, stats.challenger_wins);
        add(&mut total.challenger_wins_at_own_amount, stats.challenger_wins_at_own_amount);
        add(&mut total.challenger_loses, stats.challenger_loses);
        add(&mut total.tie, stats.tie);
        add(&mut total.leader_raises, stats.leader_raises);
        add(&mut total.reserve_lift, stats.reserve_lift);
        add(&mut total.extended, stats.extended);
        add(&mut total.started, stats.started);
        add(&mut total.ended_with_winner, stats.ended_with_winner);
        add(&mut total.ended_reserve_not_met, stats.ended_reserve_not_met);
        add(&mut total.ended_without_bids, stats.ended_without_bids);
        add(&mut total.cancelled, stats.cancelled);
        add(&mut total.not_active, stats.not_active);
        add(&mut total.seller_cannot_bid, stats.seller_cannot_bid);
        add(&mut total.too_low, stats.too_low);
        add(&mut total.already_leading, stats.already_leading);
        add(&mut total.invalid_amount, stats.invalid_amount);
        add(&mut total.forbidden, stats.forbidden);
        add(&mut total.has_bids, stats.has_bids);
        add(&mut total.not_due, stats.not_due);
    }
    println!("{total:#?}");
    let Stats {
        first_bid,
        challenger_wins,
        challenger_wins_at_own_amount,
        challenger_loses,
        tie,
        leader_raises,
        reserve_lift,
        extended,
        started,
        ended_with_winner,
        ended_reserve_not_met,
        ended_without_bids,
        cancelled,
        not_active,
        seller_cannot_bid,
        too_low,
        already_leading,
        invalid_amount,
        forbidden,
        has_bids,
        not_due,
    } = total;
    for (name, count) in [
        ("first_bid", first_bid),
        ("challenger_wins", challenger_wins),
        ("challenger_wins_at_own_amount", challenger_wins_at_own_amount),
        ("challenger_loses", challenger_loses),
        ("tie", tie),
        ("leader_raises", leader_raises),
        ("reserve_lift", reserve_lift),
        ("extended", extended),
        ("started", started),
        ("ended_with_winner", ended_with_winner),
        ("ended_reserve_not_met", ended_reserve_not_met),
        ("ended_without_bids", ended_without_bids),
        ("cancelled", cancelled),
        ("not_active", not_active),
        ("seller_cannot_bid", seller_cannot_bid),
        ("too_low", too_low),
        ("already_leading", already_leading),
        ("invalid_amount", invalid_amount),
        ("forbidden", forbidden),
        ("has_bids", has_bids),
        ("not_due", not_due),
    ] {
        assert!(count >= 10, "{name} reached only {count} times");
    }
}

// ---------------------------------------------------------------------------
// Worked examples, through the same harness (so both sides are checked), with
// the expected numbers written out from API.md by hand.
// ---------------------------------------------------------------------------

fn active(start_price: i64, inc: i64, reserve: Option<i64>, soft_close_secs: u32) -> Harness {
    Harness::new(&Setup {
        start_price,
        inc,
        reserve: reserve.map_or(ReserveSpec::None, ReserveSpec::Abs),
        soft_close_secs,
        begin_active: true,
        start_offset_ms: 0,
        duration_ms: 60_000,
        timid: false,
    })
}

fn bid_at(h: &mut Harness, now: i64, user: usize, amount: i128, max: Option<i128>) -> Result<Ev, Rej> {
    h.apply_due(now).unwrap();
    h.exec(MCmd::Bid { user, amount, max }, now).unwrap()
}

fn price_after(reply: &Result<Ev, Rej>) -> (i128, usize, bool) {
    match reply {
        Ok(Ev::Placed(p)) => (p.price, p.leader, p.leading),
        other => panic!("expected an accepted bid, got {other:?}"),
    }
}

#[test]
fn proxy_bidding_walkthrough() {
    let mut h = active(10_000, 500, None, 0);
    // Rule 1: the first bid leads at its amount.
    assert_eq!(price_after(&bid_at(&mut h, T0, 1, 10_000, Some(20_000))), (10_000, 1, true));
    // Rule 2, m <= M: P = min(M, m + inc).
    assert_eq!(price_after(&bid_at(&mut h, T0, 2, 12_000, None)), (12_500, 1, false));
    // Tie: the earlier bid keeps the lead, P = M.
    assert_eq!(price_after(&bid_at(&mut h, T0, 2, 20_000, None)), (20_000, 1, false));
    // Below P + inc.
    assert_eq!(
        bid_at(&mut h, T0, 3, 20_499, Some(90_000)),
        Err(Rej::TooLow { min_bid: 20_500, current_price: 20_000 })
    );
    // Rule 2, m > M: P = max(amount, min(m, M + inc)).
    assert_eq!(price_after(&bid_at(&mut h, T0, 3, 20_500, Some(90_000))), (20_500, 3, true));
    // Rule 3: the leader must raise the maximum; the price stays.
    assert_eq!(bid_at(&mut h, T0, 3, 30_000, Some(90_000)), Err(Rej::AlreadyLeading));
    assert_eq!(price_after(&bid_at(&mut h, T0, 3, 1, Some(90_001))), (20_500, 3, true));
    // A challenger whose maximum is just one above the leader's.
    assert_eq!(price_after(&bid_at(&mut h, T0, 1, 21_000, Some(90_002))), (90_002, 1, true));
    assert_eq!(h.model.bid_count, 6);
}

#[test]
fn reserve_and_end() {
    let mut h = active(10_000, 500, Some(15_000), 0);
    assert_eq!(price_after(&bid_at(&mut h, T0, 1, 10_000, Some(12_000))), (10_000, 1, true));
    // Rule 4 on a challenger whose maximum covers the reserve.
    assert_eq!(price_after(&bid_at(&mut h, T0, 2, 10_500, Some(15_000))), (15_000, 2, true));
    // Cancel after a bid; non-seller first.
    assert_eq!(h.exec(MCmd::Cancel { user: 2 }, T0).unwrap(), Err(Rej::Forbidden));
    assert_eq!(h.exec(MCmd::Cancel { user: SELLER }, T0).unwrap(), Err(Rej::HasBids));
    assert_eq!(h.exec(MCmd::End, T0 + 59_999).unwrap(), Err(Rej::NotDue));
    // Rule 7.
    assert_eq!(
        h.exec(MCmd::End, T0 + 60_000).unwrap(),
        Ok(Ev::Ended { seq: 2, winner: Some(2), final_price: Some(15_000), reserve_met: true })
    );
    assert_eq!(bid_at(&mut h, T0 + 60_001, 1, 99_999, None), Err(Rej::NotActive(St::Ended)));
    assert_eq!(h.exec(MCmd::Cancel { user: SELLER }, T0 + 60_001).unwrap(), Err(Rej::NotActive(St::Ended)));
}

#[test]
fn soft_close_keeps_extending_until_quiet() {
    let mut h = active(100, 10, None, 5);
    let end = T0 + 60_000;
    // More than 5 s before the end: no extension.
    let Ok(Ev::Placed(p)) = bid_at(&mut h, end - 5_000, 1, 100, None) else { panic!() };
    assert!(!p.extended);
    assert_eq!(p.end_at, end);
    // Less than 5 s before: the end moves to placed_at + 5 s, repeatedly.
    let Ok(Ev::Placed(p)) = bid_at(&mut h, end - 4_999, 2, 110, None) else { panic!() };
    assert!(p.extended);
    assert_eq!(p.end_at, end + 1);
    let Ok(Ev::Placed(p)) = bid_at(&mut h, end, 1, 120, None) else { panic!() };
    assert_eq!((p.extended, p.end_at), (true, end + 5_000));
    // Once quiet, the auction ends at the moved end, before any later bid.
    assert_eq!(bid_at(&mut h, end + 5_000, 2, 500, None), Err(Rej::NotActive(St::Ended)));
    assert_eq!(h.model.winner, Some(1));
    assert_eq!(h.model.final_price, Some(120));
}

#[test]
fn rejection_order_and_lifecycle() {
    let mut h = Harness::new(&Setup {
        start_price: 1_000,
        inc: 100,
        reserve: ReserveSpec::None,
        soft_close_secs: 0,
        begin_active: false,
        start_offset_ms: 1_000,
        duration_ms: 10_000,
        timid: false,
    });
    // Scheduled: nothing may bid, Start is not yet due.
    assert_eq!(
        h.exec(MCmd::Bid { user: SELLER, amount: 5, max: Some(1) }, T0).unwrap(),
        Err(Rej::NotActive(St::Scheduled))
    );
    assert_eq!(h.exec(MCmd::Start, T0 + 999).unwrap(), Err(Rej::NotDue));
    assert_eq!(h.exec(MCmd::End, T0 + 999).unwrap(), Err(Rej::NotActive(St::Scheduled)));
    assert_eq!(h.exec(MCmd::Start, T0 + 1_000).unwrap(), Ok(Ev::Started { seq: 0 }));
    // Active: seller before amounts, max < amount before "too low".
    assert_eq!(
        h.exec(MCmd::Bid { user: SELLER, amount: 5, max: Some(1) }, T0 + 1_000).unwrap(),
        Err(Rej::SellerCannotBid)
    );
    assert_eq!(h.exec(MCmd::Bid { user: 1, amount: 5, max: Some(1) }, T0 + 1_000).unwrap(), Err(Rej::InvalidAmount));
    assert_eq!(
        h.exec(MCmd::Bid { user: 1, amount: 999, max: Some(5_000) }, T0 + 1_000).unwrap(),
        Err(Rej::TooLow { min_bid: 1_000, current_price: 1_000 })
    );
    // Cancelled before any bid: seller only; then nothing is active any more.
    assert_eq!(h.exec(MCmd::Cancel { user: 1 }, T0 + 2_000).unwrap(), Err(Rej::Forbidden));
    assert_eq!(h.exec(MCmd::Cancel { user: SELLER }, T0 + 2_000).unwrap(), Ok(Ev::Cancelled { seq: 0 }));
    assert_eq!(h.exec(MCmd::Start, T0 + 2_000).unwrap(), Err(Rej::NotActive(St::Cancelled)));
    assert_eq!(h.exec(MCmd::End, T0 + 20_000).unwrap(), Err(Rej::NotActive(St::Cancelled)));
    assert_eq!(h.model.due(T0 + 20_000), None);
}
