//! The REST API of docs/API.md, endpoint by endpoint.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, HasApi, TestApp, auction_body};
use crate::on_both_backends;

on_both_backends!(
    accounts,
    auction_lifecycle_and_reads,
    listing_pages_ending_soonest_first,
    cancel_rules,
    idempotent_writes,
    replays_of_a_create_and_a_cancel_return_the_first_body
);

async fn accounts(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let alice = api.register("alice").await;
    let (status, body) =
        api.post("/api/v1/auth/register", None, json!({"username": "alice", "password": "another-pass"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("USERNAME_TAKEN")));
    let (status, body) =
        api.post("/api/v1/auth/login", None, json!({"username": "alice", "password": "wrong-password"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("INVALID_CREDENTIALS")));
    let (status, body) =
        api.post("/api/v1/auth/login", None, json!({"username": "nobody", "password": "wrong-password"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("INVALID_CREDENTIALS")));
    let (status, login) =
        api.post("/api/v1/auth/login", None, json!({"username": "alice", "password": "password-123"})).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user"]["id"], json!(alice.id));
    let (status, me) = api.get("/api/v1/users/me", login["token"].as_str()).await;
    assert_eq!((status, me), (StatusCode::OK, json!({"id": alice.id, "username": alice.username})));
    app.stop().await;
}

async fn auction_lifecycle_and_reads(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let bob = api.register("bob").await;
    let carol = api.register("carol").await;
    let auction = api.create_auction(&seller, auction_body(json!({"reserve_price": 20_000, "duration_secs": 2}))).await;
    let id = auction["id"].as_str().unwrap();
    assert_eq!(auction["status"], "active");
    assert_eq!(auction["reserve_price"], 20_000, "the seller sees the reserve");
    assert_eq!(auction["current_price"], 10_000);
    let public = api.auction(id).await;
    assert!(public.get("reserve_price").is_none(), "others never see the reserve: {public}");
    assert_eq!(public["reserve_met"], false);

    let (status, body) = api.get(&format!("/api/v1/auctions/{id}/bids/highest"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("NO_BIDS")));

    let (status, first) = api.bid(&bob, id, 10_000, Some(15_000)).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (first["leading"].as_bool(), first["current_price"].as_i64(), first["seq"].as_i64()),
        (Some(true), Some(10_000), Some(1))
    );
    assert_eq!(first["your_max"], 15_000);
    // Carol bids under Bob's maximum: recorded, raises the price, Bob keeps the lead.
    let (status, second) = api.bid(&carol, id, 12_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!((second["leading"].as_bool(), second["current_price"].as_i64()), (Some(false), Some(12_500)));
    assert_eq!(second["leader"]["username"], "bob");
    // Carol's maximum beats Bob's and covers the reserve: the price jumps to it.
    let (status, third) = api.bid(&carol, id, 15_500, Some(25_000)).await;
    assert_eq!(status, StatusCode::CREATED, "{third}");
    assert_eq!((third["leading"].as_bool(), third["current_price"].as_i64()), (Some(true), Some(20_000)));

    let (status, body) = api.bid(&bob, id, 20_000, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("BID_TOO_LOW")));
    assert_eq!(
        (body["error"]["min_bid"].as_i64(), body["error"]["current_price"].as_i64()),
        (Some(20_500), Some(20_000))
    );
    let (status, body) = api.bid(&carol, id, 20_500, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("ALREADY_LEADING")));
    let (status, body) = api.bid(&seller, id, 30_000, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("SELLER_CANNOT_BID")));

    let history = api.history(id).await;
    let seqs: Vec<i64> = history.iter().map(|bid| bid["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(history[1]["amount"], 12_000);
    assert_eq!(history[1]["current_price"], 12_500);
    assert_eq!(history[1]["leader"]["username"], "bob");
    assert!(history.iter().all(|bid| bid.get("max_amount").is_none()), "maximums stay secret");
    let (status, page) = api.get(&format!("/api/v1/auctions/{id}/bids?limit=2"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["next_before_seq"], 2);
    let (_, older) = api.get(&format!("/api/v1/auctions/{id}/bids?limit=2&before_seq=2"), None).await;
    assert_eq!(older["items"][0]["seq"], 1);
    assert_eq!(older["next_before_seq"], json!(null));

    let (status, highest) = api.get(&format!("/api/v1/auctions/{id}/bids/highest"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (highest["leader"]["username"].as_str(), highest["current_price"].as_i64(), highest["seq"].as_i64()),
        (Some("carol"), Some(20_000), Some(3))
    );

    let (status, mine) = api.get("/api/v1/users/me/bids", Some(&bob.token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mine["items"][0]["id"], json!(id));
    assert_eq!(mine["items"][0]["leading"], false);
    assert_eq!(
        (mine["items"][0]["your_max"].as_i64(), mine["items"][0]["your_bid_count"].as_i64()),
        (Some(15_000), Some(1))
    );
    let (_, mine) = api.get("/api/v1/users/me/bids", Some(&carol.token)).await;
    assert_eq!(mine["items"][0]["leading"], true);
    assert_eq!(
        (mine["items"][0]["your_max"].as_i64(), mine["items"][0]["your_bid_count"].as_i64()),
        (Some(25_000), Some(2))
    );

    // The auction ends on its own timer with Carol as the winner at the reserve.
    let ended = crate::helpers::eventually(std::time::Duration::from_secs(10), "the auction to end", || async {
        let auction = api.auction(id).await;
        (auction["status"] == "ended").then_some(auction)
    })
    .await;
    assert_eq!(ended["winner"]["username"], "carol");
    assert_eq!(ended["final_price"], 20_000);
    assert_eq!(ended["bid_count"], 3);
    let (status, body) = api.bid(&bob, id, 50_000, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str(), body["error"]["status"].as_str()),
        (StatusCode::CONFLICT, Some("AUCTION_NOT_ACTIVE"), Some("ended"))
    );
    app.stop().await;
}

async fn listing_pages_ending_soonest_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let mut expected = Vec::new();
    for duration_secs in [500, 100, 300, 200, 400] {
        let auction = api.create_auction(&seller, auction_body(json!({"duration_secs": duration_secs}))).await;
        expected.push((duration_secs, auction["id"].as_str().unwrap().to_owned()));
    }
    let future_start = chrono::Utc::now() + chrono::Duration::hours(1);
    api.create_auction(&seller, auction_body(json!({"start_at": future_start.to_rfc3339(), "duration_secs": null, "end_at": (future_start + chrono::Duration::hours(1)).to_rfc3339()}))).await;
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("/api/v1/auctions?limit=2&cursor={cursor}"),
            None => "/api/v1/auctions?limit=2".to_owned(),
        };
        let (status, page) = api.get(&query, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, expected, "active auctions, ending soonest first, each once");
    let (_, scheduled) = api.get("/api/v1/auctions?status=scheduled", None).await;
    assert_eq!(scheduled["items"].as_array().unwrap().len(), 1);
    assert_eq!(scheduled["items"][0]["status"], "scheduled");
    app.stop().await;
}

async fn cancel_rules(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let bob = api.register("bob").await;
    let with_bid = api.create_auction(&seller, auction_body(json!({}))).await;
    let with_bid = with_bid["id"].as_str().unwrap();
    let quiet = api.create_auction(&seller, auction_body(json!({}))).await;
    let quiet = quiet["id"].as_str().unwrap();
    assert_eq!(api.bid(&bob, with_bid, 10_000, None).await.0, StatusCode::CREATED);

    let (status, body) = api.post(&format!("/api/v1/auctions/{quiet}/cancel"), Some(&bob.token), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
    let (status, body) = api.post(&format!("/api/v1/auctions/{with_bid}/cancel"), Some(&seller.token), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("AUCTION_HAS_BIDS")));
    // A cancel takes no body: `{}` above, `null` (what `JSON.stringify(null)` sends) here.
    let (status, body) = api.post(&format!("/api/v1/auctions/{quiet}/cancel"), Some(&seller.token), Value::Null).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{body}");
    let (status, body) = api.post(&format!("/api/v1/auctions/{quiet}/cancel"), Some(&seller.token), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("AUCTION_NOT_ACTIVE")));
    let (status, body) = api.bid(&bob, quiet, 10_000, None).await;
    assert_eq!((status, body["error"]["status"].as_str()), (StatusCode::CONFLICT, Some("cancelled")));
    assert_eq!(api.auction(quiet).await["status"], "cancelled");
    let missing = uuid::Uuid::now_v7();
    let (status, body) = api.post(&format!("/api/v1/auctions/{missing}/cancel"), Some(&seller.token), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("AUCTION_NOT_FOUND")));
    app.stop().await;
}

async fn idempotent_writes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let bob = api.register("bob").await;
    let keyed = |path: String, token: String, key: &'static str, body: serde_json::Value| {
        let request = app.client.post(app.url(&path)).bearer_auth(token).header("Idempotency-Key", key).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let create = || keyed("/api/v1/auctions".to_owned(), seller.token.clone(), "create-1", auction_body(json!({})));
    let (status, first) = create().await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = create().await;
    assert_eq!((status, &again["id"]), (StatusCode::CREATED, &first["id"]), "a retried create makes no second auction");
    let id = first["id"].as_str().unwrap().to_owned();

    let bid_path = format!("/api/v1/auctions/{id}/bids");
    let bid = |amount: i64| keyed(bid_path.clone(), bob.token.clone(), "bid-1", json!({"amount": amount}));
    // Concurrent retries of one keyed bid: one bid, the same answer for all.
    let answers = futures_join_all((0..8).map(|_| bid(10_000))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
        assert_eq!(body, &answers[0].1);
    }
    assert_eq!(api.auction(&id).await["bid_count"], 1);
    let (status, body) = bid(12_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("IDEMPOTENCY_KEY_REUSED"))
    );
    // A new node on the same store has none of the actor's memory: the store answers.
    let first_answer = answers[0].1.clone();
    let backend = app.backend;
    let database_url = app.database_url.clone();
    let kept_dir = app.stop_keeping_data().await;
    let data_dir = kept_dir.path().to_path_buf();
    let restarted = TestApp::spawn_with(
        backend,
        |config| {
            config.data_dir = data_dir.clone();
            config.database_url = database_url.clone();
        },
        Default::default(),
    )
    .await;
    let response = restarted
        .client
        .post(restarted.url(&format!("/api/v1/auctions/{id}/bids")))
        .bearer_auth(&bob.token)
        .header("Idempotency-Key", "bid-1")
        .json(&json!({"amount": 10_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap(), first_answer);
    assert_eq!(restarted.api().auction(&id).await["bid_count"], 1);
    drop(kept_dir);
    restarted.stop().await;
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("task"));
    }
    outputs
}

/// A retry of a create or a cancel with its Idempotency-Key gets the first
/// answer again, byte for byte, not the auction as it is by then.
async fn replays_of_a_create_and_a_cancel_return_the_first_body(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let bob = api.register("bob").await;
    let keyed = |path: &str, key: &str, body: Option<serde_json::Value>| {
        let mut request = app.client.post(app.url(path)).bearer_auth(&seller.token).header("Idempotency-Key", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    let (status, created) = keyed("/api/v1/auctions", "create-1", Some(auction_body(json!({})))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(api.bid(&bob, &id, 10_000, None).await.0, StatusCode::CREATED);
    let (status, again) = keyed("/api/v1/auctions", "create-1", Some(auction_body(json!({})))).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &created), "the first body, though a bid came since");

    let other = api.create_auction(&seller, auction_body(json!({}))).await;
    let cancel = format!("/api/v1/auctions/{}/cancel", other["id"].as_str().unwrap());
    let (status, cancelled) = keyed(&cancel, "cancel-1", None).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let (status, again) = keyed(&cancel, "cancel-1", None).await;
    assert_eq!((status, &again), (StatusCode::OK, &cancelled), "the first body, its server_time included");

    // Retries sent while the first is in flight answer alike too, each
    // round on a new key: eight creates at once, then eight cancels.
    async fn one_body(sent: Vec<tokio::task::JoinHandle<(StatusCode, String)>>, expected: StatusCode) -> String {
        let mut bodies = Vec::new();
        for answer in sent {
            let (status, body) = answer.await.unwrap();
            assert_eq!(status, expected, "{body}");
            bodies.push(body);
        }
        assert!(bodies.iter().all(|body| *body == bodies[0]), "sent at once, answered apart: {bodies:#?}");
        bodies.swap_remove(0)
    }
    for round in 0..5 {
        let key = format!("create-at-once-{round}");
        let creates = (0..8).map(|_| tokio::spawn(keyed("/api/v1/auctions", &key, Some(auction_body(json!({}))))));
        let created = one_body(creates.collect(), StatusCode::CREATED).await;
        let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"].as_str().unwrap().to_owned();
        let (cancel, key) = (format!("/api/v1/auctions/{id}/cancel"), format!("cancel-at-once-{round}"));
        one_body((0..8).map(|_| tokio::spawn(keyed(&cancel, &key, None))).collect(), StatusCode::OK).await;
    }
    app.stop().await;
}

/// Every layer above a bid (the handler, the routing, the span) moves the
/// future of the layer below it, so the paths a bid rarely takes are boxed:
/// a store read for a user the node has not seen lately, and for an
/// idempotency key. Each is taken here and still answers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bid_future_is_small_and_its_store_reads_are_boxed() {
    use gavel::bidding::{BidRequest, WriteFailure};
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, bidders, auction_id) = app.api().scene(&["alice"], serde_json::json!({})).await;
    let alice = &bidders[0];
    let request = |amount: i64, bidder_id: &str, key: Option<&str>| BidRequest {
        auction_id: auction_id.parse().expect("auction id"),
        bidder_id: bidder_id.parse().expect("user id"),
        bidder_username: alice.username.clone(),
        amount,
        max_amount: None,
        key: key.map(str::to_owned),
    };

    // Alice registered on this node: known, no store read.
    let place = app.bidding.place(request(10_000, &alice.id, None));
    let size = std::mem::size_of_val(&place);
    assert!(size <= 2_048, "a bid's future is {size} bytes");
    let first = place.await.result.expect("the first bid is accepted");
    assert_eq!(first.seq, 1);

    // A user the node has not seen: read from the store (there is none).
    let stranger = uuid::Uuid::now_v7().to_string();
    let refused = app.bidding.place(request(10_500, &stranger, None)).await.result;
    assert!(matches!(refused, Err(WriteFailure::Unauthenticated)), "{refused:?}");

    // A key: looked up in the store first, then the same answer for its retry.
    let keyed = app.bidding.place(request(11_000, &alice.id, Some("bid-2"))).await.result.expect("keyed bid");
    let again = app.bidding.place(request(11_000, &alice.id, Some("bid-2"))).await.result.expect("its retry");
    assert_eq!((keyed.seq, again.seq), (2, 2));

    // While another request under that key is in flight (held here as it
    // would be), the retry of the one made before is still answered as it
    // was, and a new request under the key is refused.
    let alice_id: uuid::Uuid = alice.id.parse().unwrap();
    let in_flight = app.bidding.keys_in_flight.hold(alice_id, "bid-2", 42).expect("held for another request");
    let retried = app.bidding.place(request(11_000, &alice.id, Some("bid-2"))).await.result;
    assert_eq!(retried.expect("the retry is the first answer").seq, 2);
    let reused = app.bidding.place(request(12_000, &alice.id, Some("bid-2"))).await.result;
    assert!(matches!(reused, Err(WriteFailure::KeyReused)), "{reused:?}");
    drop(in_flight);
    app.stop().await;
}
