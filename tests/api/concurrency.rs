//! Many bidders at one auction at once. Afterwards the history is seq 1..n
//! without gaps, bid_count is the number of 201s, every 201's seq appears once,
//! and the reference model of the rules (written from docs/API.md, shared with
//! the property test), fed the acknowledged bids in seq order, reproduces
//! every 201 and the final state.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::helpers::{Acknowledged, Backend, HasApi, TestApp, User, auction_body, start_storm};
use crate::on_both_backends;
use crate::reference::{Ev, MCmd, Model, St};

on_both_backends!(many_bidders_at_one_auction);

fn millis(timestamp: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(timestamp.as_str().expect("timestamp")).expect("RFC 3339").timestamp_millis()
}

async fn many_bidders_at_one_auction(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let mut bidders = Vec::new();
    for index in 0..12 {
        bidders.push(api.register(&format!("bidder_{index}")).await);
    }
    let auction = api
        .create_auction(
            &seller,
            auction_body(json!({"starting_price": 1_000, "min_increment": 1, "reserve_price": 1_300})),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();

    let acknowledged: Acknowledged = Arc::default();
    let bidder_ids = bidders_ids(&bidders);
    let storm = start_storm(app.address.clone(), bidders, auction_id.clone(), acknowledged.clone(), 40);
    for bidder in storm {
        bidder.await.expect("bidder task");
    }
    let mut acknowledged = acknowledged.lock().unwrap().clone();
    acknowledged.sort_by_key(|record| record["reply"]["seq"].as_u64());
    assert!(acknowledged.len() >= 24, "the storm got some bids in: {}", acknowledged.len());

    let history = api.history(&auction_id).await;
    let final_state = api.auction(&auction_id).await;
    assert_eq!(final_state["bid_count"].as_u64(), Some(acknowledged.len() as u64), "bid_count = number of 201s");
    check_history(&history, &acknowledged);

    check_with_model(&seller, &bidder_ids, &auction, &acknowledged, &final_state);
    app.stop().await;
}

/// The history is 1..n without gaps and is exactly the acknowledged bids
/// (sorted by seq): each 201's seq once, with its bidder and amount.
pub fn check_history(history: &[Value], acknowledged: &[Value]) {
    assert_eq!(history.len(), acknowledged.len(), "every stored bid was acknowledged once");
    for (position, (row, record)) in history.iter().zip(acknowledged).enumerate() {
        let seq = position as u64 + 1;
        assert_eq!(row["seq"].as_u64(), Some(seq), "history is 1..n without gaps");
        assert_eq!(record["reply"]["seq"].as_u64(), Some(seq), "each 201's seq appears exactly once");
        assert_eq!(row["bidder"]["id"], record["request"]["bidder"]);
        assert_eq!(row["amount"], record["request"]["amount"]);
    }
}

pub fn bidders_ids(bidders: &[User]) -> Vec<String> {
    bidders.iter().map(|bidder| bidder.id.clone()).collect()
}

/// Feeds the acknowledged bids (sorted by seq) to the reference model of the
/// rules, for an auction created with `starting_price` 1,000, `min_increment`
/// 1 and `reserve_price` 1,300: every 201 and the final state must be what the
/// model says.
pub fn check_with_model(
    seller: &User,
    bidder_ids: &[String],
    auction: &Value,
    acknowledged: &[Value],
    final_state: &Value,
) {
    // User index 0 is the seller, bidders are 1..: the model's numbering.
    let index_of: HashMap<String, usize> = std::iter::once(seller.id.clone())
        .chain(bidder_ids.iter().cloned())
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let mut model =
        Model::new(0, 1_000, Some(1_300), 1, 0, millis(&auction["start_at"]), millis(&auction["end_at"]), St::Active);
    for record in acknowledged {
        let (request, reply) = (&record["request"], &record["reply"]);
        let command = MCmd::Bid {
            user: index_of[request["bidder"].as_str().unwrap()],
            amount: i128::from(request["amount"].as_i64().unwrap()),
            max: request["max_amount"].as_i64().map(i128::from),
        };
        let placed = match model.apply(command, millis(&reply["placed_at"])) {
            Ok(Ev::Placed(placed)) => placed,
            other => panic!("the model rejects acknowledged bid {reply}: {other:?}"),
        };
        assert_eq!(placed.seq, reply["seq"].as_u64().unwrap());
        assert_eq!(placed.bid_count, reply["bid_count"].as_u64().unwrap());
        assert_eq!(placed.price, i128::from(reply["current_price"].as_i64().unwrap()), "price of {reply}");
        assert_eq!(placed.leading, reply["leading"].as_bool().unwrap(), "leading of {reply}");
        assert_eq!(placed.leader, index_of[reply["leader"]["id"].as_str().unwrap()], "leader of {reply}");
        assert_eq!(placed.bidder_max, i128::from(reply["your_max"].as_i64().unwrap()), "your_max of {reply}");
        assert_eq!(placed.end_at, millis(&reply["end_at"]));
    }
    assert_eq!(model.price, i128::from(final_state["current_price"].as_i64().unwrap()));
    assert_eq!(model.leader.map(|(leader, _)| leader), final_state["leader"]["id"].as_str().map(|id| index_of[id]));
    assert_eq!(model.reserve_met(), final_state["reserve_met"].as_bool().unwrap());
    assert_eq!(model.seq, final_state["seq"].as_u64().unwrap());
}
