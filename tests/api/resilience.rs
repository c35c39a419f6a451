//! What happens when things go wrong: the database goes away, the lease moves,
//! queues fill, bidders flood, auctions go idle.

use std::time::Duration;

use gavel_actors::node::NodeSettings;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Connection;

use crate::helpers::{Backend, HasApi, LossyProxy, TestApp, auction_body, eventually, postgres_base_url};
use crate::on_both_backends;

on_both_backends!(
    a_stale_lease_epoch_is_refused_inside_the_commit,
    idle_auctions_passivate_and_come_back,
    live_auctions_stay_within_their_bound_and_each_takes_its_next_bid,
    a_batch_committed_twice_counts_its_bids_once,
    an_auction_open_from_creation_has_its_actor_started,
    a_deleted_users_bids_are_refused_and_never_stop_other_writes,
    one_key_sent_at_once_to_many_auctions_places_one_bid,
    a_key_sent_at_once_to_many_auctions_never_costs_another_bidder_their_bid
);

async fn admin(sql: String) {
    let mut connection = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_base_url())).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut connection).await.unwrap();
}

fn database_name(url: &str) -> String {
    url.rsplit('/').next().unwrap().to_owned()
}

/// While Postgres refuses the node, rejections are still answered at once (they
/// cost no database work), a valid bid waits while its commit is retried, and a
/// full persistence queue answers 503 at once. When Postgres is back, the
/// waiting bid is committed and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_retries_in_order_and_rejections_need_no_database() {
    let settings = NodeSettings { persistence_queue_capacity: 1, ..NodeSettings::default() };
    let app = TestApp::spawn_with(Backend::Postgres, |_| {}, settings).await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob", "carol"], json!({})).await;
    let (bob, carol) = (&bidders[0], &bidders[1]);
    assert_eq!(api.bid(bob, &id, 10_000, None).await.0, StatusCode::CREATED);
    let mut watcher = crate::ws_client::WsClient::connect(&app.address, None).await;
    watcher.subscribe(&id).await;

    let url = app.database_url.clone().unwrap();
    let name = database_name(&url);
    admin(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
    admin(format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")).await;

    // Rejections: no database needed, answered at once.
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let (status, body) = api.bid(carol, &id, 10_100, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("BID_TOO_LOW")));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // A valid bid takes the only queue slot and waits for its commit...
    let waiting = {
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/auctions/{id}/bids"));
        let token = carol.token.clone();
        tokio::spawn(async move {
            let response = client.post(url).bearer_auth(token).json(&json!({"amount": 11_000})).send().await.unwrap();
            let status = response.status();
            (status, response.json::<serde_json::Value>().await.unwrap())
        })
    };
    eventually(Duration::from_secs(10), "the bid to wait in the persistence queue", || {
        let in_use = app.node.persistence_queue.in_use();
        async move { (in_use == 1).then_some(()) }
    })
    .await;
    // ...so the next valid bid finds the queue full: 503 at once, not accepted.
    let (status, body) = api.bid(bob, &id, 12_000, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("UNAVAILABLE")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a bid is not acknowledged before it is durable");
    let shown = watcher.drain().await;
    assert!(shown.iter().all(|message| message["type"] != "bid"), "no event before it is durable: {shown:?}");
    // Meanwhile the node says it is not ready, and why; the failures are counted.
    let (status, ready) = api.get("/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert!(ready["error"]["message"].as_str().unwrap().contains("commits are failing"), "{ready}");
    assert!(crate::helpers::metric(&app, "gavel_commit_failures_total").await >= 1.0);

    admin(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    let (status, placed) =
        tokio::time::timeout(Duration::from_secs(20), waiting).await.expect("committed after recovery").unwrap();
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    assert_eq!(placed["seq"], 2);
    let event = watcher.next_of("bid").await;
    assert_eq!(event["seq"], 2, "the event comes once the bid is durable");
    let history = api.history(&id).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["amount"], 11_000);
    assert_eq!(api.auction(&id).await["current_price"], 11_000);
    eventually(Duration::from_secs(10), "the node to be ready again", || async {
        (api.get("/ready", None).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    app.stop().await;
}

/// The seam for the cluster: a write under a lease epoch that is no longer the
/// shard's is refused inside the transaction and never acknowledged.
async fn a_stale_lease_epoch_is_refused_inside_the_commit(backend: Backend) {
    // Another owner takes every shard; or the same node id does (a restarted
    // process, or two nodes that share an id): the epoch alone moves on.
    for takeover in [
        "UPDATE shard_leases SET owner = 'someone-else', epoch = epoch + 1",
        "UPDATE shard_leases SET epoch = epoch + 1",
    ] {
        let app = TestApp::spawn(backend).await;
        let api = app.api();
        let (_seller, bidders, id) = api.scene(&["bob"], json!({})).await;
        let bob = &bidders[0];
        assert_eq!(api.bid(bob, &id, 10_000, None).await.0, StatusCode::CREATED);
        match backend {
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(app.database_url.as_deref().unwrap()).await.unwrap();
                sqlx::query(takeover).execute(&mut connection).await.unwrap();
            }
            Backend::Sqlite => {
                let path = app.data_dir.path().join("gavel.db");
                let mut connection =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
                sqlx::query(takeover).execute(&mut connection).await.unwrap();
            }
        }
        let (status, body) = api.bid(bob, &id, 20_000, Some(30_000)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("UNAVAILABLE")),
            "{takeover}: {body}"
        );
        let history = api.history(&id).await;
        assert_eq!(history.len(), 1, "{takeover}: the refused bid was not written");
        let after = api.auction(&id).await;
        assert_eq!((after["bid_count"].as_i64(), after["current_price"].as_i64()), (Some(1), Some(10_000)));
        app.stop().await;
    }
}

/// Postgres makes a commit but its answer is lost on the network, and another
/// node takes the shard over before the node's retry: the retry is fenced,
/// yet the bid stands (the takeover waited for the commit that held the lease
/// rows). Its bidder must hear "outcome unknown, retry with the key", not the
/// 503 that means "not accepted".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bid_whose_commit_answer_was_lost_before_the_shard_moved_is_answered_outcome_unknown() {
    let direct = crate::helpers::fresh_postgres_database().await;
    let base = postgres_base_url();
    let upstream = base.trim_start_matches("postgres://").rsplit('@').next().unwrap().to_owned();
    let proxy = LossyProxy::start(&upstream).await;
    let through_proxy = direct.replacen(&upstream, &proxy.address.to_string(), 1);
    let app = TestApp::spawn_with(
        Backend::Postgres,
        |config| config.database_url = Some(through_proxy),
        NodeSettings::default(),
    )
    .await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob"], json!({})).await;
    let bob = &bidders[0];
    assert_eq!(api.bid(bob, &id, 10_000, None).await.0, StatusCode::CREATED);

    // Without an idempotency key and by a user it has just seen, the bid's
    // first statement on the database is its commit.
    proxy.lose_answers();
    let bid = {
        let (client, token) = (app.client.clone(), bob.token.clone());
        let url = app.url(&format!("/api/v1/auctions/{id}/bids"));
        tokio::spawn(async move {
            let response = client.post(url).bearer_auth(token).json(&json!({"amount": 11_000})).send().await.unwrap();
            (response.status(), response.json::<serde_json::Value>().await.unwrap())
        })
    };
    let store = sqlx::PgPool::connect(&direct).await.unwrap();
    let auction_id: uuid::Uuid = id.parse().unwrap();
    let second_bid = || {
        let store = store.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>("SELECT seq, amount FROM bids WHERE auction_id = $1 AND seq = 2")
                .bind(auction_id)
                .fetch_optional(&store)
                .await
                .unwrap()
        }
    };
    eventually(Duration::from_secs(10), "the bid's commit to be made in Postgres", second_bid).await;
    let an_hour_on = chrono::Utc::now().timestamp_millis() + 3_600_000;
    sqlx::query("UPDATE shard_leases SET owner = 'another-node', epoch = epoch + 1, expires_at_ms = $1")
        .bind(an_hour_on)
        .execute(&store)
        .await
        .unwrap();
    proxy.cut_lossy();

    let (status, body) = tokio::time::timeout(Duration::from_secs(30), bid).await.expect("answered").unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["outcome"], "unknown", "the bid stands: not a plain 'not accepted' {body}");
    assert_eq!(second_bid().await, Some((2, 11_000)), "it stands in the store");
    app.stop().await;
}

/// The persistence actor re-runs a batch whose commit's outcome it could not
/// learn (a timeout after the commit went through). The second run must leave
/// the rows the first one left: no bid twice, and each bidder's participation
/// (what /users/me/bids shows) counts the batch's bids once.
async fn a_batch_committed_twice_counts_its_bids_once(backend: Backend) {
    use gavel_actors::ports::{Write, shard_of};
    use gavel_actors::{BidCommand, Command, Event, Money, UserRef};

    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob", "carol"], json!({})).await;
    let (bob, carol) = (&bidders[0], &bidders[1]);
    assert_eq!(api.bid(bob, &id, 10_000, None).await.0, StatusCode::CREATED);

    let auction_id: uuid::Uuid = id.parse().unwrap();
    let mut state = app.node.store.load_auction(auction_id).await.unwrap().unwrap().state;
    let lease = app.node.leases.lease_for(shard_of(auction_id)).unwrap();
    let user =
        |user: &crate::helpers::User| UserRef { id: user.id.parse().unwrap(), username: user.username.as_str().into() };
    let now = chrono::Utc::now().timestamp_millis();
    let mut batch = Vec::new();
    for (bidder, amount) in [(carol, 11_000), (bob, 12_000), (carol, 13_000)] {
        let command = BidCommand { bidder: user(bidder), amount: Money::parse(amount).unwrap(), max_amount: None };
        let Ok(Event::BidPlaced(placed)) = state.apply(Command::PlaceBid(command), now) else {
            panic!("the bid of {amount} is valid");
        };
        batch.push(Write { lease, at_ms: now, auction: state.clone(), bid: Some(placed), key: None });
    }
    app.node.store.commit(&batch).await.unwrap();
    app.node.store.commit(&batch).await.unwrap();

    let seqs: Vec<i64> = api.history(&id).await.iter().map(|bid| bid["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    for (bidder, max, count) in [(bob, 12_000, 2), (carol, 13_000, 2)] {
        let (status, mine) = api.get("/api/v1/users/me/bids", Some(&bidder.token)).await;
        assert_eq!(status, StatusCode::OK);
        let item = &mine["items"][0];
        assert_eq!(
            (item["your_max"].as_i64(), item["your_bid_count"].as_i64(), item["bid_count"].as_i64()),
            (Some(max), Some(count), Some(4)),
            "{}: {mine}",
            bidder.username
        );
    }
    app.stop().await;
}

/// The node that creates an auction open from the start starts its actor from
/// the state it wrote (its first bid then needs no read); a scheduled one waits
/// for the sweeper or its first request.
async fn an_auction_open_from_creation_has_its_actor_started(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    assert_eq!(app.node.live_auctions(), 0);
    let (seller, bidders, id) = api.scene(&["bob"], json!({})).await;
    assert_eq!(app.node.live_auctions(), 1, "started at creation");
    let (status, placed) = api.bid(&bidders[0], &id, 10_000, None).await;
    assert_eq!((status, placed["seq"].as_i64()), (StatusCode::CREATED, Some(1)), "{placed}");
    assert_eq!(app.node.live_auctions(), 1, "the same actor took the bid");

    let start_at = chrono::Utc::now() + chrono::Duration::hours(1);
    let end_at = start_at + chrono::Duration::hours(1);
    let later = json!({"start_at": start_at.to_rfc3339(), "duration_secs": null, "end_at": end_at.to_rfc3339()});
    api.create_auction(&seller, crate::helpers::auction_body(later)).await;
    assert_eq!(app.node.live_auctions(), 1, "a scheduled auction is not started at creation");
    app.stop().await;
}

/// SQLite's WAL is copied back into the database and reused while commits
/// keep coming: a thousand commits leave it at a few MiB, not growing with
/// every page they wrote (25 MiB here when it is never checkpointed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_stays_bounded_under_a_stream_of_commits() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob", "carol"], json!({"min_increment": 1})).await;
    for round in 0..1_000 {
        let (status, body) = api.bid(&bidders[round % 2], &id, 10_000 + round as i64, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let wal = std::fs::metadata(app.data_dir.path().join("gavel.db-wal")).map(|meta| meta.len()).unwrap_or(0);
    assert!(wal < 8 << 20, "the WAL grew to {wal} bytes");
    app.stop().await;
}

async fn idle_auctions_passivate_and_come_back(backend: Backend) {
    let settings = NodeSettings {
        idle_after: Duration::from_millis(300),
        idle_check_interval: Duration::from_millis(100),
        ..NodeSettings::default()
    };
    let app = TestApp::spawn_with(backend, |_| {}, settings).await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob", "carol"], json!({})).await;
    let (bob, carol) = (&bidders[0], &bidders[1]);
    assert_eq!(api.bid(bob, &id, 10_000, Some(20_000)).await.0, StatusCode::CREATED);
    assert_eq!(app.node.live_auctions(), 1);
    eventually(Duration::from_secs(10), "the idle auction to passivate", || {
        let live = app.node.live_auctions();
        async move { (live == 0).then_some(()) }
    })
    .await;
    // Reactivated from the store: Bob's secret maximum survived, seq goes on.
    let (status, placed) = api.bid(carol, &id, 15_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    assert_eq!(
        (placed["seq"].as_i64(), placed["leading"].as_bool(), placed["current_price"].as_i64()),
        (Some(2), Some(false), Some(15_500))
    );
    app.stop().await;
}

/// `--max-live-auctions`: past it, activations passivate idle actors, so the
/// node keeps at most that many (plus a few starting), while every auction
/// stays open and each takes its next bid from the stored state.
async fn live_auctions_stay_within_their_bound_and_each_takes_its_next_bid(backend: Backend) {
    let app = TestApp::spawn_with(backend, |config| config.max_live_auctions = 2, NodeSettings::default()).await;
    let api = app.api();
    let (seller, bidders, first) = api.scene(&["bob", "carol"], json!({})).await;
    let (bob, carol) = (&bidders[0], &bidders[1]);
    let mut auctions = vec![first];
    for _ in 0..4 {
        auctions.push(api.create_auction(&seller, auction_body(json!({}))).await["id"].as_str().unwrap().to_owned());
    }
    for id in &auctions {
        assert_eq!(api.bid(bob, id, 10_000, Some(20_000)).await.0, StatusCode::CREATED);
    }
    eventually(Duration::from_secs(10), "the live actors to be back within the bound", || {
        let live = app.node.live_auctions();
        async move { (live <= 2).then_some(()) }
    })
    .await;
    assert!(crate::helpers::metric(&app, "gavel_passivations_total{reason=\"room\"}").await >= 3.0);
    // Each reloaded from the store where needed: Bob's secret maximum kept, seq goes on.
    for id in &auctions {
        let (status, placed) = api.bid(carol, id, 15_000, None).await;
        assert_eq!(status, StatusCode::CREATED, "{placed}");
        assert_eq!(
            (placed["seq"].as_i64(), placed["leading"].as_bool(), placed["current_price"].as_i64()),
            (Some(2), Some(false), Some(15_500))
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidders_over_their_rate_get_429_with_retry_after() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.bid_rate_per_user = 2, NodeSettings::default()).await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob", "erin"], json!({})).await;
    let (bob, erin) = (&bidders[0], &bidders[1]);
    assert_eq!(api.bid(erin, &id, 40_000, None).await.0, StatusCode::CREATED);
    // A burst of twice the rate passes (whatever the rules say of each bid: these
    // are too low, answered without touching the disk, so the burst is quick
    // however slow the machine's commits are)...
    for amount in [10_000, 20_000, 30_000, 39_000] {
        let (status, body) = api.bid(bob, &id, amount, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("BID_TOO_LOW")), "{body}");
    }
    // ...the next is refused, with Retry-After, and changes nothing.
    let response = app
        .client
        .post(app.url(&format!("/api/v1/auctions/{id}/bids")))
        .bearer_auth(&bob.token)
        .json(&json!({"amount": 50_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED");
    let after = api.auction(&id).await;
    assert_eq!(after["bid_count"], 1, "only erin's bid; the refused one is not there");
    // A retry of an accepted bid with its Idempotency-Key is the first answer,
    // not a new bid: it is not refused for the rate.
    let carol = api.register("carol").await;
    let keyed = |amount: i64| {
        app.client
            .post(app.url(&format!("/api/v1/auctions/{id}/bids")))
            .bearer_auth(&carol.token)
            .header("Idempotency-Key", "carol-1")
            .json(&json!({"amount": amount}))
            .send()
    };
    let first = keyed(45_000).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: serde_json::Value = first.json().await.unwrap();
    for _ in 0..6 {
        let again = keyed(45_000).await.unwrap();
        assert_eq!(again.status(), StatusCode::CREATED, "replays are not rate limited");
        assert_eq!(again.json::<serde_json::Value>().await.unwrap(), first);
    }
    // Another user is not affected.
    let dave = api.register("dave").await;
    assert_eq!(api.bid(&dave, &id, 50_000, None).await.0, StatusCode::CREATED);
    app.stop().await;
}

/// Copies of a keyed bid sent while the first is in flight (each commit
/// waits a second for company here) are the first request again, not new
/// bids: up to four ride on the first's charge to the rate (past those, a
/// copy is charged as a bid: `bidding::keys`' tests), and every copy gets
/// the first's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_bid_sent_again_while_in_flight_is_not_charged_to_the_rate() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        |config| {
            // Bursts of two.
            config.bid_rate_per_user = 1;
            config.commit_delay_us = 1_000_000;
        },
        NodeSettings::default(),
    )
    .await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["frank"], json!({})).await;
    let send = || {
        let request = app
            .client
            .post(app.url(&format!("/api/v1/auctions/{id}/bids")))
            .bearer_auth(&bidders[0].token)
            .header("Idempotency-Key", "frank-1")
            .json(&json!({"amount": 10_000}));
        tokio::spawn(async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<serde_json::Value>().await.unwrap())
        })
    };
    let first = send();
    eventually(Duration::from_secs(5), "the first bid to wait for its commit", || {
        let queued = app.node.persistence_queue.in_use();
        async move { (queued == 1).then_some(()) }
    })
    .await;
    let copies: Vec<_> = (0..4).map(|_| send()).collect();
    let first = first.await.unwrap();
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    for copy in copies {
        assert_eq!(copy.await.unwrap(), first, "a copy gets the first's answer");
    }
    assert_eq!(api.auction(&id).await["bid_count"], 1);

    app.stop().await;
}

/// A keyed bid whose caller goes away while its commit waits (a second here)
/// keeps its key held until its auction answers: another request under the
/// key, on another auction, is refused at once, while the first bid is still
/// in flight, rather than taken by that auction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_bid_whose_caller_went_away_keeps_its_key_until_it_is_answered() {
    use gavel::bidding::{BidRequest, WriteFailure};
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.commit_delay_us = 1_000_000, NodeSettings::default())
            .await;
    let api = app.api();
    let (seller, bidders, first_auction) = api.scene(&["frank"], json!({})).await;
    let other_auction = api.create_auction(&seller, auction_body(json!({}))).await["id"].as_str().unwrap().to_owned();
    let frank = &bidders[0];
    let request = |auction_id: &str| BidRequest {
        auction_id: auction_id.parse().unwrap(),
        bidder_id: frank.id.parse().unwrap(),
        bidder_username: frank.username.clone(),
        amount: 10_000,
        max_amount: None,
        key: Some("frank-1".to_owned()),
    };
    let bidding = app.bidding.clone();
    let first = request(&first_auction);
    let caller = tokio::spawn(async move { bidding.place(first).await });
    eventually(Duration::from_secs(5), "the first bid to wait for its commit", || {
        let queued = app.node.persistence_queue.in_use();
        async move { (queued == 1).then_some(()) }
    })
    .await;
    caller.abort();
    assert!(caller.await.is_err_and(|error| error.is_cancelled()), "its caller went away");

    let reused = app.bidding.place(request(&other_auction)).await.result;
    assert!(matches!(reused, Err(WriteFailure::KeyReused)), "{reused:?}");
    assert_eq!(app.node.persistence_queue.in_use(), 1, "refused while the first bid is still in flight");
    eventually(Duration::from_secs(5), "the first bid to be committed", || {
        let queued = app.node.persistence_queue.in_use();
        async move { (queued == 0).then_some(()) }
    })
    .await;
    assert_eq!(api.history(&first_auction).await.len(), 1);
    assert_eq!(api.history(&other_auction).await.len(), 0);
    app.stop().await;
}

/// Two databases sharing one JWT secret (a reset database, or two
/// deployments): a token names a user of its own database only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_database_is_refused() {
    let secret = "a shared secret that is long enough to be accepted";
    let with_secret =
        |config: &mut gavel::Config| config.jwt_secret = Some(gavel::auth::Secret::new(secret.to_owned()));
    let first = TestApp::spawn_with(Backend::Sqlite, with_secret, NodeSettings::default()).await;
    let second = TestApp::spawn_with(Backend::Sqlite, with_secret, NodeSettings::default()).await;
    let alice = first.api().register("alice").await;
    let (status, _) = first.api().get("/api/v1/users/me", Some(&alice.token)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = second.api().get("/api/v1/users/me", Some(&alice.token)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("UNAUTHENTICATED")));
    first.stop().await;
    second.stop().await;
}

/// At the connection cap, a new connection waits for a free slot instead of
/// being served beyond the limit; when a connection closes, it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.max_connections = Some(2), NodeSettings::default()).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let first = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&address).await.unwrap();
    let waiting = tokio::spawn({
        let client = crate::helpers::client();
        let url = app.url("/health");
        async move { client.get(url).send().await.map(|response| response.status()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third connection is not served while two are open");
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served once a slot frees");
    assert_eq!(status.unwrap().unwrap(), StatusCode::OK);
    app.stop().await;
}

/// A user deleted from the database behind the node's back (an operator, a
/// restore) still holds a valid token. Their bid is refused with 401; and a
/// bid that slips through (the node still took them to exist) and that the
/// store refuses is refused alone, without stopping any other write.
async fn a_deleted_users_bids_are_refused_and_never_stop_other_writes(backend: Backend) {
    let first = TestApp::spawn(backend).await;
    let (_seller, bidders, id) = first.api().scene(&["bob", "dave", "eve"], json!({})).await;
    // A restart: the node knows none of its users from their registration any more.
    let database_url = first.database_url.clone();
    let data_dir = first.stop_keeping_data().await;
    let path = data_dir.path().to_path_buf();
    let app = TestApp::spawn_with(
        backend,
        move |config| {
            config.data_dir = path;
            config.database_url = database_url;
        },
        NodeSettings::default(),
    )
    .await;
    let api = app.api();
    let (bob, dave, eve) = (&bidders[0], &bidders[1], &bidders[2]);
    // Eve's bid makes the node look her up (and know her for a while); Dave never bid.
    assert_eq!(api.bid(eve, &id, 10_000, None).await.0, StatusCode::CREATED);
    for user in [dave, eve] {
        let user_id: uuid::Uuid = user.id.parse().unwrap();
        match backend {
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(app.database_url.as_deref().unwrap()).await.unwrap();
                sqlx::query("DELETE FROM users WHERE id = $1").bind(user_id).execute(&mut connection).await.unwrap();
            }
            Backend::Sqlite => {
                let path = data_dir.path().join("gavel.db");
                let mut connection =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
                // Her bids still point at her: a restore does not ask the foreign keys.
                sqlx::query("PRAGMA foreign_keys = OFF").execute(&mut connection).await.unwrap();
                sqlx::query("DELETE FROM users WHERE id = $1").bind(user_id).execute(&mut connection).await.unwrap();
            }
        }
    }
    let (status, body) = api.bid(dave, &id, 20_000, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("UNAUTHENTICATED")), "{body}");

    // Eve is still known to the node: her bid reaches the store, which (on
    // SQLite) refuses it for its foreign key. It alone is refused.
    let (status, body) = api.bid(eve, &id, 30_000, None).await;
    if backend == Backend::Sqlite {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("refused the write"), "{body}");
    }
    // Nothing else waits for it: the next bids commit at once, on this auction and others.
    let (status, body) = api.bid(bob, &id, 40_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (sam, carol) = (api.register("sam").await, api.register("carol").await);
    let other = api.create_auction(&sam, auction_body(json!({}))).await;
    assert_eq!(api.bid(&carol, other["id"].as_str().unwrap(), 10_000, None).await.0, StatusCode::CREATED);
    let (status, ready) = api.get("/ready", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    // The auction is what was acknowledged: Eve's first bid, (on Postgres, which
    // has no foreign key there, her second,) then Bob's.
    let auction = api.auction(&id).await;
    let acknowledged = if backend == Backend::Sqlite { 2 } else { 3 };
    assert_eq!(
        (auction["bid_count"].as_i64(), auction["seq"].as_i64()),
        (Some(acknowledged), Some(acknowledged)),
        "{auction}"
    );
    assert_eq!(
        (auction["current_price"].as_i64(), auction["leader"]["username"].as_str()),
        (Some(40_000), Some("bob"))
    );
    app.stop().await;
}

/// The resident memory of this process in KiB (`VmRSS`, or the peak `VmHWM`).
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A burst of logins hashes at most one password per core at once (each
/// argon2 check takes about 19 MiB: unbounded, 48 at once took about 1 GiB),
/// and a login for a name that does not exist takes as long as a wrong
/// password for one that does (the time of the answer tells nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_checks_are_bounded_and_unknown_names_cost_the_same() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.api().register("alice").await;
    let before_kib = memory_kib("VmRSS");
    let logins: Vec<_> = (0..48)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url("/api/v1/auth/login"));
            tokio::spawn(async move {
                let body = json!({"username": "alice", "password": "not-her-password"});
                client.post(url).json(&body).send().await.unwrap().status()
            })
        })
        .collect();
    for login in logins {
        let status = login.await.unwrap();
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::SERVICE_UNAVAILABLE,
            "a wrong password is 401 (or 503 when too many wait): {status}"
        );
    }
    let grew_mib = memory_kib("VmHWM").saturating_sub(before_kib) / 1024;
    assert!(grew_mib < 400, "the burst's peak memory grew by {grew_mib} MiB");

    let median_ms = |username: &'static str| {
        let (client, url) = (app.client.clone(), app.url("/api/v1/auth/login"));
        async move {
            let mut times = Vec::new();
            for _ in 0..5 {
                let started = std::time::Instant::now();
                let body = json!({"username": username, "password": "not-the-password"});
                let status = client.post(&url).json(&body).send().await.unwrap().status();
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            times[2]
        }
    };
    let (known, unknown) = (median_ms("alice").await, median_ms("nobody_here").await);
    assert!(unknown >= known * 0.3, "an unknown name answered in {unknown:.1} ms, a known one in {known:.1} ms");
    app.stop().await;
}

/// One Idempotency-Key fired at once at ten auctions: exactly one bid takes
/// effect, the nine others are `422 IDEMPOTENCY_KEY_REUSED`, and retrying any
/// of them gives the same answer again.
async fn one_key_sent_at_once_to_many_auctions_places_one_bid(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let bob = api.register("bob").await;
    let mut auctions = Vec::new();
    for _ in 0..10 {
        auctions.push(api.create_auction(&seller, auction_body(json!({}))).await["id"].as_str().unwrap().to_owned());
    }
    let send = |auction_id: String| {
        let (client, url, token) =
            (app.client.clone(), app.url(&format!("/api/v1/auctions/{auction_id}/bids")), bob.token.clone());
        async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "one-key")
                .json(&json!({"amount": 10_000}))
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let answers: Vec<_> = auctions.iter().map(|id| tokio::spawn(send(id.clone()))).collect();
    let mut first = Vec::new();
    for answer in answers {
        first.push(answer.await.unwrap());
    }
    let created: Vec<usize> = (0..10).filter(|index| first[*index].0 == StatusCode::CREATED).collect();
    assert_eq!(created.len(), 1, "exactly one bid took effect: {first:?}");
    for (index, (status, body)) in first.iter().enumerate() {
        if index != created[0] {
            assert_eq!(
                (*status, body["error"]["code"].as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, Some("IDEMPOTENCY_KEY_REUSED")),
                "{body}"
            );
        }
    }
    let mut stored = 0;
    for id in &auctions {
        stored += api.history(id).await.len();
    }
    assert_eq!(stored, 1, "one bid is stored across the ten auctions");
    for (index, id) in auctions.iter().enumerate() {
        let (status, body) = send(id.clone()).await;
        assert_eq!((status, &body), (first[index].0, &first[index].1), "a retry gets the first answer again");
    }
    app.stop().await;
}

/// One bidder's key fired at once at five auctions while another bidder bids
/// on the same five, twenty times over: the other bidder's bids are decided
/// by the rules alone (never `503` because one of the first bidder's, taken
/// by its auction, was then refused by the store for its key), at most one
/// of the keyed bids takes effect each time, and every auction's history
/// holds exactly its `201`s.
async fn a_key_sent_at_once_to_many_auctions_never_costs_another_bidder_their_bid(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let (mallory, alice) = (api.register("mallory").await, api.register("alice").await);
    let send = |auction_id: &str, token: &str, key: Option<String>, amount: i64| {
        let url = app.url(&format!("/api/v1/auctions/{auction_id}/bids"));
        crate::helpers::bid_request(&app.client, url, token, key, amount)
    };
    for round in 0..20 {
        let mut auctions = Vec::new();
        for _ in 0..5 {
            auctions
                .push(api.create_auction(&seller, auction_body(json!({}))).await["id"].as_str().unwrap().to_owned());
        }
        let mut keyed = Vec::new();
        let mut others = Vec::new();
        for id in &auctions {
            keyed.push(tokio::spawn(send(id, &mallory.token, Some(format!("key-{round}")), 10_000)));
            others.push(tokio::spawn(send(id, &alice.token, None, 20_000)));
        }
        let created = crate::helpers::check_keyed_round(round, keyed, others).await;
        let mut stored = 0;
        for id in &auctions {
            stored += api.history(id).await.len();
        }
        assert_eq!(stored, created, "round {round}: the histories hold exactly the 201s");
    }
    app.stop().await;
}

/// Registering and signing in hash a password, the node's dearest work: one
/// client address gets so many tries a minute, and one username so many,
/// whatever the answers (`429 RATE_LIMITED` with `Retry-After` then).
/// `X-Forwarded-For` counts only where the node is told to trust it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_ins_are_limited_per_client_address_and_per_username() {
    async fn attempt(
        app: &TestApp,
        path: &str,
        username: &str,
        forwarded_for: Option<&str>,
    ) -> (StatusCode, Option<u64>) {
        // Registrations set one password, sign-ins try another.
        let password = if path.ends_with("register") { "right-password-1" } else { "wrong-password-1" };
        let mut request = app.client.post(app.url(path)).json(&json!({"username": username, "password": password}));
        if let Some(address) = forwarded_for {
            request = request.header("X-Forwarded-For", address);
        }
        let response = request.send().await.unwrap();
        let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().parse().unwrap());
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
        }
        (status, retry_after)
    }
    const LOGIN: &str = "/api/v1/auth/login";
    let limited = |trust: bool| {
        move |config: &mut gavel::config::Config| {
            config.sign_ins_per_address = 6;
            config.sign_ins_per_username = 3;
            config.trust_forwarded_for = trust;
        }
    };

    // One username: three tries a minute, then 429 (a right password too).
    let app = TestApp::spawn_with(Backend::Sqlite, limited(false), NodeSettings::default()).await;
    assert_eq!(attempt(&app, "/api/v1/auth/register", "ann", None).await.0, StatusCode::CREATED);
    for _ in 0..2 {
        assert_eq!(attempt(&app, LOGIN, "ann", None).await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, retry_after) = attempt(&app, LOGIN, "ANN", None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "usernames are counted case-folded");
    assert!(retry_after.is_some_and(|secs| (1..=20).contains(&secs)), "{retry_after:?}");
    // One address: six tries a minute whatever the names (three used above,
    // the refused one too), and a forged X-Forwarded-For changes nothing.
    for name in ["bob", "cat"] {
        assert_eq!(
            attempt(&app, LOGIN, name, Some(&format!("10.0.0.{}", name.len()))).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(attempt(&app, LOGIN, "dan", Some("10.9.9.9")).await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(attempt(&app, "/api/v1/auth/register", "eve", None).await.0, StatusCode::TOO_MANY_REQUESTS);
    app.stop().await;

    // Behind a trusted balancer, each client address (the last one it appended) has its own tries.
    let app = TestApp::spawn_with(Backend::Sqlite, limited(true), NodeSettings::default()).await;
    for index in 0..8 {
        let forwarded = format!("1.2.3.4, 10.0.0.{index}");
        assert_eq!(attempt(&app, LOGIN, &format!("user{index}"), Some(&forwarded)).await.0, StatusCode::UNAUTHORIZED);
    }
    for index in 0..6 {
        let status = attempt(&app, LOGIN, &format!("other{index}"), Some("1.2.3.4, 10.0.0.100")).await.0;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(attempt(&app, LOGIN, "other6", Some("5.6.7.8, 10.0.0.100")).await.0, StatusCode::TOO_MANY_REQUESTS);
    app.stop().await;
}

/// Lease renewals (every 400 ms with a 2 s lease) and group commits lock the
/// same lease rows, the renewal all of the node's, a commit those its batch
/// names. Taken in one order by both, they never wait for each other in a
/// circle: Postgres, which counts every deadlock it breaks (each one a
/// second's stall), counts none under a load of bids across many shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewals_and_commits_never_deadlock() {
    let database_url = crate::helpers::fresh_postgres_database().await;
    let data_dir = tempfile::tempdir().unwrap();
    let flags = ["--lease-secs".to_owned(), "2".to_owned()];
    let port = crate::helpers::free_port();
    let server = crate::helpers::ServerProcess::start_with(data_dir.path(), Some(&database_url), port, &flags).await;
    let api = server.api();
    let seller = api.register("seller").await;
    let mut auctions = Vec::new();
    for _ in 0..64 {
        let auction = api.create_auction(&seller, auction_body(json!({"starting_price": 1, "min_increment": 1}))).await;
        auctions.push(auction["id"].as_str().unwrap().to_owned());
    }
    let mut bidders = Vec::new();
    for index in 0..16 {
        bidders.push(api.register(&format!("bidder{index}")).await);
    }
    // Every bidder bids on auction after auction (the batches name many
    // shards) for eight seconds: some twenty renewals.
    let auctions = std::sync::Arc::new(auctions);
    let prices: std::sync::Arc<Vec<std::sync::atomic::AtomicI64>> =
        std::sync::Arc::new((0..64).map(|_| std::sync::atomic::AtomicI64::new(1)).collect());
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let mut storm = Vec::new();
    for (index, bidder) in bidders.into_iter().enumerate() {
        let (auctions, prices, address) = (auctions.clone(), prices.clone(), server.address.clone());
        storm.push(tokio::spawn(async move {
            let client = crate::helpers::client();
            let mut accepted = 0;
            let mut next = index;
            while std::time::Instant::now() < until {
                next = (next + 7) % auctions.len();
                let amount = prices[next].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let response = client
                    .post(format!("{address}/api/v1/auctions/{}/bids", auctions[next]))
                    .bearer_auth(&bidder.token)
                    .json(&json!({"amount": amount}))
                    .send()
                    .await
                    .unwrap();
                assert!(matches!(response.status().as_u16(), 201 | 409), "{}", response.status());
                accepted += usize::from(response.status() == StatusCode::CREATED);
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for bidder in storm {
        accepted += bidder.await.unwrap();
    }
    assert!(accepted > 100, "the load got through: {accepted} bids");
    // The node's connections close, and with them their statistics are in.
    server.terminate().await;
    let mut connection = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let deadlocks: i64 =
        sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert_eq!(deadlocks, 0, "Postgres broke deadlocks between the node's statements");
}

/// Each password hash takes 19 MiB for a moment (Argon2's memory cost). The
/// process gives that memory back afterwards: forty registrations, four at a
/// time, leave the node near its idle size (glibc kept every hash's block
/// before, and the node stood at some 380 MiB after them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hashing_memory_is_given_back() {
    fn resident_mib(pid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    }
    let data_dir = tempfile::tempdir().unwrap();
    let server =
        crate::helpers::ServerProcess::start_with(data_dir.path(), None, crate::helpers::free_port(), &[]).await;
    let idle = resident_mib(server.pid());
    for round in 0..10 {
        let registrations: Vec<_> = (0..4)
            .map(|index| {
                let (client, url) = (server.client.clone(), format!("{}/api/v1/auth/register", server.address));
                let body = json!({"username": format!("user{round}x{index}"), "password": "password-123"});
                tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() })
            })
            .collect();
        for registration in registrations {
            assert_eq!(registration.await.unwrap(), StatusCode::CREATED);
        }
    }
    let after = resident_mib(server.pid());
    assert!(after < idle + 80, "resident memory went from {idle} MiB to {after} MiB after 40 password hashes");
    server.terminate().await;
}

/// A lease renewal changes only the expiry: a commit on that shard goes on
/// while one holds the row. A takeover changes owner and epoch: a commit
/// waits for it, and then refuses its writes (the lease moved), so no bid is
/// acknowledged under a lease that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewal_does_not_hold_up_commits_and_a_takeover_fences_them() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob", "carol"], json!({})).await;
    let shard = gavel_actors::ports::shard_of(id.parse().unwrap()) as i32;
    let url = app.database_url.clone().expect("Postgres");

    // Runs a statement about the auction's lease row on `connection`.
    async fn on_lease_row(connection: &mut sqlx::PgConnection, sql: &str, shard: i32) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).bind(shard).execute(connection).await.unwrap();
    }

    // A renewal's locks, held open while a bid is placed.
    let mut renewal = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut renewal).await.unwrap();
    on_lease_row(&mut renewal, "SELECT shard FROM shard_leases WHERE shard = $1 FOR NO KEY UPDATE", shard).await;
    on_lease_row(&mut renewal, "UPDATE shard_leases SET expires_at_ms = expires_at_ms + 1 WHERE shard = $1", shard)
        .await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), api.bid(&bidders[0], &id, 10_000, None))
        .await
        .expect("a bid is answered while a renewal holds its lease row");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    sqlx::query("COMMIT").execute(&mut renewal).await.unwrap();

    // A takeover's lock, held open: the next bid's commit waits for it, and
    // once the lease has moved, its write is refused.
    let mut takeover = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut takeover).await.unwrap();
    on_lease_row(&mut takeover, "SELECT shard FROM shard_leases WHERE shard = $1 FOR UPDATE", shard).await;
    let move_the_lease = async {
        let watcher = sqlx::PgPool::connect(&url).await.unwrap();
        eventually(Duration::from_secs(10), "the commit to wait for the takeover's lock", || {
            let watcher = watcher.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&watcher)
                .await
                .unwrap();
                (waiting > 0).then_some(())
            }
        })
        .await;
        on_lease_row(
            &mut takeover,
            "UPDATE shard_leases SET owner = 'elsewhere', epoch = epoch + 1 WHERE shard = $1",
            shard,
        )
        .await;
        sqlx::query("COMMIT").execute(&mut takeover).await.unwrap();
    };
    let ((status, body), ()) = tokio::join!(api.bid(&bidders[1], &id, 11_000, None), move_the_lease);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not acknowledged under a lease that moved: {body}");
    let seqs: Vec<i64> = api.history(&id).await.iter().map(|bid| bid["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1], "only the first bid is in the store");
    app.stop().await;
}

/// A commit held up on Postgres (here by another client's transaction that
/// inserted the row of one auction's next bid and neither commits nor rolls
/// back: the commit's insert of that bid waits to learn whether the key is
/// taken) holds up only its own auction: once it has taken
/// `--commit-hedge-after-ms`, a second commit takes the other auctions' bids
/// and they are answered. The held auction's next bid waits behind its first,
/// and both land, in order, once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_commit_holds_up_only_its_own_auction() {
    let app =
        TestApp::spawn_with(Backend::Postgres, |config| config.commit_hedge_after_ms = 20, NodeSettings::default())
            .await;
    let api = app.api();
    let (seller, bidders, held) = api.scene(&["bob", "carol"], json!({})).await;
    let (bob, carol) = (&bidders[0], &bidders[1]);
    let other = api.create_auction(&seller, auction_body(json!({}))).await["id"].as_str().unwrap().to_owned();
    for id in [&held, &other] {
        assert_eq!(api.bid(bob, id, 10_000, None).await.0, StatusCode::CREATED);
    }

    let url = app.database_url.clone().expect("Postgres");
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(
        "INSERT INTO bids (auction_id, seq, bidder_id, amount, max_amount, placed_at_ms, current_price, leader_id, \
         end_at_ms) SELECT auction_id, seq + 1, bidder_id, amount, max_amount, placed_at_ms, current_price, \
         leader_id, end_at_ms FROM bids WHERE auction_id = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(held.parse::<uuid::Uuid>().unwrap())
    .execute(&mut holder)
    .await
    .unwrap();
    let bid_in_background = |bidder: &crate::helpers::User, amount: i64| {
        let (client, token) = (app.client.clone(), bidder.token.clone());
        let url = app.url(&format!("/api/v1/auctions/{held}/bids"));
        tokio::spawn(async move {
            let response = client.post(url).bearer_auth(token).json(&json!({"amount": amount})).send().await.unwrap();
            response.status()
        })
    };
    let first = bid_in_background(carol, 11_000);
    let watcher = sqlx::PgPool::connect(&url).await.unwrap();
    eventually(Duration::from_secs(10), "the held auction's commit to wait for the lock", || {
        let watcher = watcher.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&watcher)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;
    let second = bid_in_background(bob, 12_000);
    eventually(Duration::from_secs(3), "the held auction's second bid to be queued", || {
        let queued = app.node.persistence_queue.in_use();
        async move { (queued == 2).then_some(()) }
    })
    .await;

    // Well inside the commit's own time limit (5 s), so the held commit is still waiting.
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), api.bid(carol, &other, 11_000, None))
        .await
        .expect("the other auction's bid is answered while the held commit waits");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(!first.is_finished() && !second.is_finished(), "the held auction's bids wait for its commit");
    assert!(crate::helpers::metric(&app, "gavel_commit_hedges_total").await >= 1.0);

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    assert_eq!(second.await.unwrap(), StatusCode::CREATED);
    let amounts = |history: Vec<serde_json::Value>| -> Vec<(i64, i64)> {
        history.iter().map(|bid| (bid["seq"].as_i64().unwrap(), bid["amount"].as_i64().unwrap())).collect()
    };
    assert_eq!(amounts(api.history(&held).await), vec![(1, 10_000), (2, 11_000), (3, 12_000)]);
    assert_eq!(amounts(api.history(&other).await), vec![(1, 10_000), (2, 11_000)]);
    app.stop().await;
}
