//! The real binary, killed and restarted: nothing acknowledged is ever lost,
//! and auctions open and close on time across restarts.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::labelled_metric;
use crate::helpers::{
    Acknowledged, Api, Backend, HasApi, ServerProcess, User, auction_body, eventually, free_port,
    fresh_postgres_database, start_storm,
};
use crate::on_both_backends;

on_both_backends!(
    sigkill_mid_storm_loses_no_acknowledged_bid,
    auctions_close_and_open_across_a_restart,
    every_kind_of_change_is_stored_across_a_kill,
    sigterm_answers_in_flight_bids,
    sigterm_answers_every_bid_it_holds_on_its_own_connection
);

struct Storage {
    data_dir: tempfile::TempDir,
    database_url: Option<String>,
}

impl Storage {
    async fn new(backend: Backend) -> Storage {
        let database_url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres_database().await),
        };
        Storage { data_dir: tempfile::tempdir().unwrap(), database_url }
    }

    async fn start(&self, port: u16) -> ServerProcess {
        ServerProcess::start(self.data_dir.path(), self.database_url.as_deref(), port).await
    }
}

/// The history agrees with itself and with the auction: seq 1..n, each row
/// the price and leader the auction ended up with.
async fn check_consistent(api: &Api<'_>, auction_id: &str) -> Vec<Value> {
    let history = api.history(auction_id).await;
    for (index, bid) in history.iter().enumerate() {
        assert_eq!(bid["seq"].as_i64(), Some(index as i64 + 1), "history has no gaps");
    }
    let auction = api.auction(auction_id).await;
    assert_eq!(auction["bid_count"].as_u64(), Some(history.len() as u64));
    assert_eq!(auction["seq"].as_u64(), Some(history.len() as u64));
    if let Some(last) = history.last() {
        assert_eq!(auction["current_price"], last["current_price"], "auction price is its last bid's");
        assert_eq!(auction["leader"], last["leader"], "auction leader is its last bid's");
    }
    history
}

async fn setup_auction(api: &Api<'_>, bidders: usize) -> (User, Vec<User>, String) {
    let names: Vec<String> = (0..bidders).map(|index| format!("bidder_{index}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    api.scene(&names, json!({"starting_price": 1_000, "min_increment": 1})).await
}

async fn sigkill_mid_storm_loses_no_acknowledged_bid(backend: Backend) {
    let storage = Storage::new(backend).await;
    let port = free_port();
    let server = storage.start(port).await;
    let (_seller, bidders, auction_id) = setup_auction(&server.api(), 16).await;
    let acknowledged: Acknowledged = Arc::default();
    let storm = start_storm(server.address.clone(), bidders, auction_id.clone(), acknowledged.clone(), usize::MAX);
    eventually(Duration::from_secs(60), "200 acknowledged bids", || {
        let count = acknowledged.lock().unwrap().len();
        async move { (count >= 200).then_some(()) }
    })
    .await;
    server.kill_hard().await;
    for bidder in storm {
        bidder.await.expect("bidder task");
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let server = storage.start(port).await;
    let history = check_consistent(&server.api(), &auction_id).await;
    for record in &acknowledged {
        let reply = &record["reply"];
        let seq = reply["seq"].as_u64().unwrap() as usize;
        let row = history.get(seq - 1).unwrap_or_else(|| panic!("acknowledged seq {seq} is missing after the crash"));
        assert_eq!(row["bidder"]["id"], record["request"]["bidder"], "seq {seq} is the acknowledged bidder's");
        assert_eq!(row["current_price"], reply["current_price"], "seq {seq} unchanged");
        assert_eq!(row["leader"], reply["leader"], "seq {seq} unchanged");
        assert_eq!(row["placed_at"], reply["placed_at"], "seq {seq} unchanged");
    }
    let mut seqs: Vec<u64> = acknowledged.iter().map(|record| record["reply"]["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), acknowledged.len(), "no seq was acknowledged twice");
    server.terminate().await;
}

async fn auctions_close_and_open_across_a_restart(backend: Backend) {
    let storage = Storage::new(backend).await;
    let port = free_port();
    let server = storage.start(port).await;
    let api = server.api();
    let seller = api.register("seller").await;
    let bob = api.register("bob").await;
    let now = chrono::Utc::now();
    let ending = api.create_auction(&seller, auction_body(json!({"duration_secs": 3}))).await;
    let ending_id = ending["id"].as_str().unwrap().to_owned();
    let start_at = now + chrono::Duration::seconds(3);
    let opening = api
        .create_auction(&seller, auction_body(json!({"duration_secs": null, "start_at": start_at.to_rfc3339(), "end_at": (start_at + chrono::Duration::hours(1)).to_rfc3339()})))
        .await;
    let opening_id = opening["id"].as_str().unwrap().to_owned();
    assert_eq!(opening["status"], "scheduled");
    let (status, bid) = api.bid(&bob, &ending_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{bid}");
    server.kill_hard().await;

    // Both deadlines pass while the node is down.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let server = storage.start(port).await;
    let restarted_at = std::time::Instant::now();
    let api = server.api();
    let ended = eventually(Duration::from_secs(5), "the auction to end after the restart", || async {
        let auction = api.auction(&ending_id).await;
        (auction["status"] == "ended").then_some(auction)
    })
    .await;
    assert_eq!(ended["winner"]["username"], "bob");
    assert_eq!(ended["final_price"], 10_000);
    eventually(Duration::from_secs(5), "the scheduled auction to open after the restart", || async {
        (api.auction(&opening_id).await["status"] == "active").then_some(())
    })
    .await;
    assert!(restarted_at.elapsed() < Duration::from_secs(5));
    let (status, _) = api.bid(&bob, &opening_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "the opened auction takes bids");
    server.terminate().await;
}

/// The active auctions' ids and ends, as listed (ending soonest first).
async fn active_listing(api: &Api<'_>) -> Vec<(String, Value)> {
    let (status, listing) = api.get("/api/v1/auctions?status=active", None).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    let items = listing["items"].as_array().unwrap();
    items.iter().map(|item| (item["id"].as_str().unwrap().to_owned(), item["end_at"].clone())).collect()
}

/// Every kind of change a commit writes is in the store after a hard kill: a
/// bid's price and leader, the later end a soft close gave its auction, and a
/// cancellation; listings, which scan the store's indexes on status and end,
/// see the new end and status before and after. On SQLite the database file
/// has the small pages that keep a commit of many auctions cheap.
async fn every_kind_of_change_is_stored_across_a_kill(backend: Backend) {
    let storage = Storage::new(backend).await;
    let port = free_port();
    let server = storage.start(port).await;
    let api = server.api();
    let seller = api.register("seller").await;
    let ann = api.register("ann").await;
    // Ends in 30 s; a bid in its last 120 s moves the end 120 s past the bid.
    let extending = api
        .create_auction(
            &seller,
            auction_body(json!({"starting_price": 1_000, "duration_secs": 30, "soft_close_secs": 120})),
        )
        .await;
    let extending_id = extending["id"].as_str().unwrap().to_owned();
    let plain = api.create_auction(&seller, auction_body(json!({"starting_price": 1_000, "duration_secs": 60}))).await;
    let plain_id = plain["id"].as_str().unwrap().to_owned();
    let cancelled = api.create_auction(&seller, auction_body(json!({"duration_secs": 90}))).await;
    let cancelled_id = cancelled["id"].as_str().unwrap().to_owned();
    assert_eq!(
        active_listing(&api).await.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
        [extending_id.clone(), plain_id.clone(), cancelled_id.clone()],
        "ending soonest first"
    );

    let (status, extended) = api.bid(&ann, &extending_id, 1_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{extended}");
    assert_ne!(extended["end_at"], extending["end_at"], "the soft close moved the end");
    let (status, bid) = api.bid(&ann, &plain_id, 1_500, None).await;
    assert_eq!(status, StatusCode::CREATED, "{bid}");
    assert_eq!(bid["end_at"], plain["end_at"], "outside any soft close");
    let (status, reply) =
        api.post(&format!("/api/v1/auctions/{cancelled_id}/cancel"), Some(&seller.token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let expected =
        vec![(plain_id.clone(), plain["end_at"].clone()), (extending_id.clone(), extended["end_at"].clone())];
    assert_eq!(
        active_listing(&api).await,
        expected,
        "the listing has the new end and leaves the cancelled auction out"
    );
    server.kill_hard().await;

    if backend == Backend::Sqlite {
        let header = std::fs::read(storage.data_dir.path().join("gavel.db")).unwrap();
        assert_eq!(u16::from_be_bytes([header[16], header[17]]), 1024, "page size");
    }
    let server = storage.start(port).await;
    let api = server.api();
    let stored = api.auction(&extending_id).await;
    assert_eq!(stored["end_at"], extended["end_at"]);
    assert_eq!(stored["status"], "active");
    assert_eq!((&stored["current_price"], &stored["bid_count"]), (&extended["current_price"], &json!(1)));
    assert_eq!(stored["leader"]["username"], "ann");
    let stored = api.auction(&plain_id).await;
    assert_eq!((&stored["end_at"], &stored["current_price"]), (&plain["end_at"], &bid["current_price"]));
    assert_eq!(api.auction(&cancelled_id).await["status"], "cancelled");
    assert_eq!(active_listing(&api).await, expected);
    server.terminate().await;
}

/// On SQLite the node copies committed pages from the WAL back to the
/// database file beside the commits, not only inside the commit that fills
/// the WAL (100,000 pages, some 100 MiB): a few bids are in the database file itself within a
/// deadline, as a copy of the file without its WAL shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_checkpoints_run_beside_the_commits() {
    use sqlx::Connection;
    let storage = Storage::new(Backend::Sqlite).await;
    let server = storage.start(free_port()).await;
    let api = server.api();
    let (_seller, bidders, auction_id) =
        api.scene(&["ann"], json!({"starting_price": 1_000, "min_increment": 1})).await;
    for amount in 1_000..1_005 {
        let (status, body) = api.bid(&bidders[0], &auction_id, amount, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let copies = tempfile::tempdir().unwrap();
    let mut attempt = 0;
    eventually(Duration::from_secs(10), "the bids in the database file", || {
        attempt += 1;
        let copy = copies.path().join(format!("attempt-{attempt}.db"));
        let copied = std::fs::copy(storage.data_dir.path().join("gavel.db"), &copy);
        async move {
            copied.ok()?;
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&copy);
            let mut connection = sqlx::SqliteConnection::connect_with(&options).await.ok()?;
            let bids: i64 = sqlx::query_scalar("SELECT count(*) FROM bids").fetch_one(&mut connection).await.ok()?;
            (bids == 5).then_some(())
        }
    })
    .await;
    server.terminate().await;
}

async fn sigterm_answers_in_flight_bids(backend: Backend) {
    let storage = Storage::new(backend).await;
    let port = free_port();
    let server = storage.start(port).await;
    let (_seller, bidders, auction_id) = setup_auction(&server.api(), 8).await;
    let acknowledged: Acknowledged = Arc::default();
    let storm = start_storm(server.address.clone(), bidders, auction_id.clone(), acknowledged.clone(), usize::MAX);
    eventually(Duration::from_secs(60), "50 acknowledged bids", || {
        let count = acknowledged.lock().unwrap().len();
        async move { (count >= 50).then_some(()) }
    })
    .await;
    let exit = server.terminate().await;
    assert!(exit.success(), "graceful exit, got {exit:?}");
    for bidder in storm {
        bidder.await.expect("bidder task");
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let server = storage.start(port).await;
    let history = check_consistent(&server.api(), &auction_id).await;
    assert!(history.len() >= acknowledged.len());
    for record in &acknowledged {
        let seq = record["reply"]["seq"].as_u64().unwrap() as usize;
        assert_eq!(history[seq - 1]["current_price"], record["reply"]["current_price"]);
    }
    server.terminate().await;
}

/// Bids the node holds when SIGTERM comes (each on a connection of its own,
/// all waiting for one group commit that a long commit delay keeps open) are
/// every one committed and answered `201`: none is cut off by a reset or a
/// closed connection, and every one is in the store after a restart.
async fn sigterm_answers_every_bid_it_holds_on_its_own_connection(backend: Backend) {
    const BIDS: usize = 8;
    let storage = Storage::new(backend).await;
    let port = free_port();
    let flags = ["--commit-delay-us".to_owned(), "2000000".to_owned()];
    let server =
        ServerProcess::start_with(storage.data_dir.path(), storage.database_url.as_deref(), port, &flags).await;
    let api = server.api();
    let seller = api.register("seller").await;
    let mut bids = Vec::new();
    for index in 0..BIDS {
        let bidder = api.register(&format!("bidder_{index}")).await;
        let auction = api.create_auction(&seller, auction_body(json!({"starting_price": 1_000}))).await;
        bids.push((bidder, auction["id"].as_str().unwrap().to_owned()));
    }
    // No connection reuse: each bid has its own, so none can race a keep-alive close.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(30)).build().unwrap();
    let in_flight: Vec<_> = bids
        .iter()
        .enumerate()
        .map(|(index, (bidder, auction_id))| {
            let request = client
                .post(format!("{}/api/v1/auctions/{auction_id}/bids", server.address))
                .bearer_auth(&bidder.token)
                .header("Idempotency-Key", format!("held-{index}"))
                .json(&json!({"amount": 1_000}));
            tokio::spawn(async move {
                let response = request.send().await.map_err(|error| format!("no answer: {error:?}"))?;
                let status = response.status();
                let body: Value = response.json().await.map_err(|error| format!("a cut-off answer: {error:?}"))?;
                Ok::<_, String>((status, body))
            })
        })
        .collect();
    eventually(Duration::from_secs(10), "every bid to wait for the commit", || async {
        (labelled_metric(&server.address, "gavel_persistence_queue_depth").await == BIDS as f64).then_some(())
    })
    .await;
    let exit = server.terminate().await;
    assert!(exit.success(), "graceful exit, got {exit:?}");
    for (index, answer) in in_flight.into_iter().enumerate() {
        let (status, body) = answer.await.unwrap().unwrap_or_else(|error| panic!("bid {index}: {error}"));
        assert_eq!(status, StatusCode::CREATED, "bid {index}: {body}");
    }
    let server = storage.start(port).await;
    for (bidder, auction_id) in &bids {
        let history = check_consistent(&server.api(), auction_id).await;
        assert_eq!(history.len(), 1);
        assert_eq!(history[0]["bidder"]["id"].as_str(), Some(bidder.id.as_str()));
    }
    server.terminate().await;
}

/// The workers the binary's ready line reports, started with `extra` flags.
async fn ready_workers(extra: &[&str]) -> u64 {
    use tokio::io::AsyncBufReadExt;
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gavel"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--log-format", "json", "--data-dir"])
        .arg(data_dir.path())
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("GAVEL_WORKER_THREADS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gavel");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("the node's log") {
            let line: Value = serde_json::from_str(&line).expect("a JSON log line");
            if line["fields"]["message"] == "gavel node ready" {
                return line;
            }
        }
        panic!("the node exited before it was ready");
    })
    .await
    .expect("the node is ready within 30 s");
    child.kill().await.unwrap();
    ready["fields"]["workers"].as_u64().expect("the ready line names its workers")
}

#[tokio::test]
async fn the_node_runs_one_worker_fewer_than_the_cores_unless_told() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as u64;
    assert_eq!(ready_workers(&[]).await, cores.saturating_sub(1).max(1));
    assert_eq!(ready_workers(&["--worker-threads", "3"]).await, 3);
}

/// The names of a process's threads (`/proc/PID/task/*/comm`).
fn thread_names(pid: i32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the node's threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

/// The group commit runs on a thread of its own (`gavel-commit`), through
/// which bids are committed and answered, on both stores (on SQLite that
/// thread runs the commit's statements itself: `storage::direct`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commits_get_a_thread_of_their_own() {
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let storage = Storage::new(backend).await;
        let server = storage.start(free_port()).await;
        let api = server.api();
        let (_seller, bidders, auction_id) = setup_auction(&api, 2).await;
        for (bidder, amount) in bidders.iter().zip([1_000, 1_001]) {
            let (status, body) = api.bid(bidder, &auction_id, amount, None).await;
            assert_eq!(status, StatusCode::CREATED, "{backend:?}: {body}");
        }
        assert_eq!(check_consistent(&api, &auction_id).await.len(), 2);
        let names = thread_names(server.pid());
        assert!(names.iter().any(|name| name == "gavel-commit"), "{backend:?}: threads {names:?}");
        assert!(server.terminate().await.success(), "{backend:?}: a graceful exit");
    }
}
