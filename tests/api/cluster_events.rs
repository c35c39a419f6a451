//! Live events across nodes, through a Redis of the test's own (a
//! `redis-server` on a free port): a watcher on any node sees every event of
//! an auction owned by another, in order and once (or a superseding
//! snapshot), also when the owner dies and when Redis restarts.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::{
    Storm, TestCluster, check_acknowledged_are_stored, check_no_other_server_errors, created_count, labelled_metric,
    wait_for_acknowledged,
};
use crate::helpers::{auction_body, eventually, free_port};
use crate::ws_client::{Watcher, WsClient};

/// A `redis-server` of the test's own, stopped when dropped.
pub struct RedisServer {
    port: u16,
    process: Option<tokio::process::Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer { port: free_port(), process: None };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        self.process = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        eventually(Duration::from_secs(10), "redis-server to listen", || {
            let address = address.clone();
            async move { tokio::net::TcpStream::connect(address).await.ok().map(|_| ()) }
        })
        .await;
    }

    /// Runs `redis-cli` against this server; its output, trimmed.
    async fn cli(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli is installed");
        assert!(output.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.start_kill().expect("kill redis-server");
            let _ = process.wait().await;
        }
    }
}

pub async fn cluster_with_redis(nodes: usize, lease_secs: u64, redis: &RedisServer) -> TestCluster {
    let cluster = TestCluster::start_with(nodes, lease_secs, vec!["--redis-url".to_owned(), redis.url()]).await;
    // Every node subscribed (its Redis health check says up) before anything is published.
    for index in 0..nodes {
        let address = cluster.address(index);
        eventually(Duration::from_secs(10), "the node to reach Redis", || {
            let address = address.clone();
            async move { (labelled_metric(&address, "gavel_redis_up").await == 1.0).then_some(()) }
        })
        .await;
    }
    cluster
}

/// What a watcher saw from its snapshot on, until it has been shown `last_seq`:
/// bids must follow each other by one `seq`; a snapshot may supersede them (a
/// resync) but never go back. Returns the bids' seqs and how many snapshots.
async fn watch_until(watcher: &mut WsClient, snapshot: &Value, last_seq: u64) -> (Vec<u64>, usize) {
    let mut shown = snapshot["auction"]["seq"].as_u64().expect("a snapshot's seq");
    let (mut seqs, mut snapshots) = (Vec::new(), 0);
    while shown < last_seq {
        let message = watcher.next_event().await;
        match message["type"].as_str() {
            Some("bid") => {
                let seq = message["seq"].as_u64().unwrap();
                assert_eq!(seq, shown + 1, "bids arrive in order, once, without a gap: {message}");
                shown = seq;
                seqs.push(seq);
            }
            Some("snapshot") => {
                let seq = message["auction"]["seq"].as_u64().unwrap();
                assert!(seq >= shown, "a snapshot never goes back: {seq} after {shown}");
                shown = seq;
                snapshots += 1;
            }
            _ => {}
        }
    }
    (seqs, snapshots)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_other_nodes_see_every_bid_in_order_and_outbid_reaches_its_user() {
    let redis = RedisServer::start().await;
    let cluster = cluster_with_redis(3, 10, &redis).await;
    let (seller, bidders, auction_id, owner) = cluster.hot_auction(6).await;
    let olivia = cluster.api(0).register("olivia").await;
    let (b, c) = match owner {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };

    let mut json_watcher = WsClient::connect(&cluster.address(c), None).await;
    let json_snapshot = json_watcher.subscribe(&auction_id).await;
    let mut msgpack_watcher = WsClient::connect_msgpack(&cluster.address(b), None).await;
    let msgpack_snapshot = msgpack_watcher.subscribe(&auction_id).await;
    // `viewers` counts the watchers of every node: one here, one on B.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while json_watcher.next_of("viewers").await["count"] != 2 {
        assert!(std::time::Instant::now() < deadline, "a viewer count of both nodes' watchers within 10 s");
    }
    // Olivia's own connection is on C; she bids through the owner.
    let mut olivia_on_c = WsClient::connect(&cluster.address(c), Some(&olivia.token)).await;
    olivia_on_c.drain().await;
    let (status, placed) = cluster.api(owner).bid(&olivia, &auction_id, 1_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");

    let through = vec![cluster.address(owner), cluster.address(b)];
    let routes = (0..bidders.len()).map(|_| through.clone()).collect();
    let storm = Storm::start(routes, bidders, auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 120, "120 bids through the owner and B").await;
    storm.finish().await;
    check_no_other_server_errors(&answers);
    let last_seq = cluster.api(owner).auction(&auction_id).await["seq"].as_u64().unwrap();

    for (name, watcher, snapshot) in [
        ("JSON on C", &mut json_watcher, &json_snapshot),
        ("MessagePack on B", &mut msgpack_watcher, &msgpack_snapshot),
    ] {
        let (seqs, snapshots) = watch_until(watcher, snapshot, last_seq).await;
        assert_eq!(snapshots, 0, "{name}: no resync without a fault");
        assert_eq!(seqs.len() as u64, last_seq - snapshot["auction"]["seq"].as_u64().unwrap(), "{name}: every bid");
    }
    let outbid = olivia_on_c.next_of("outbid").await;
    assert_eq!(outbid["auction_id"], auction_id.as_str(), "{outbid}");
    assert_eq!(labelled_metric(&cluster.address(c), "gavel_pubsub_gaps_total").await, 0.0);

    // An auction nobody watches anywhere: its outbid still reaches its user's
    // connection on another node.
    let quiet = cluster.api(0).create_auction(&seller, auction_body(json!({}))).await;
    let quiet_id = quiet["id"].as_str().unwrap().to_owned();
    let quiet_owner = cluster.index_of(&cluster.owner_of(0, &quiet_id).await);
    let elsewhere = (quiet_owner + 1) % 3;
    let oscar = cluster.api(0).register("oscar").await;
    let mut oscar_elsewhere = WsClient::connect(&cluster.address(elsewhere), Some(&oscar.token)).await;
    oscar_elsewhere.drain().await;
    assert_eq!(cluster.api(quiet_owner).bid(&oscar, &quiet_id, 10_000, None).await.0, StatusCode::CREATED);
    assert_eq!(cluster.api(quiet_owner).bid(&olivia, &quiet_id, 20_000, None).await.0, StatusCode::CREATED);
    let outbid = oscar_elsewhere.next_of("outbid").await;
    assert_eq!(
        (outbid["auction_id"].as_str(), outbid["current_price"].as_i64()),
        (Some(quiet_id.as_str()), Some(20_000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_go_on_after_the_owner_is_killed() {
    let redis = RedisServer::start().await;
    let mut cluster = cluster_with_redis(3, 3, &redis).await;
    let (_seller, bidders, auction_id, owner) = cluster.hot_auction(6).await;
    let others: Vec<usize> = (0..3).filter(|index| *index != owner).collect();
    let mut watchers = Vec::new();
    for (index, other) in others.iter().enumerate() {
        let mut watcher = if index == 0 {
            WsClient::connect(&cluster.address(*other), None).await
        } else {
            WsClient::connect_msgpack(&cluster.address(*other), None).await
        };
        let snapshot = watcher.subscribe(&auction_id).await;
        watchers.push((watcher, snapshot));
    }

    let through: Vec<String> = others.iter().map(|index| cluster.address(*index)).collect();
    let routes = (0..bidders.len()).map(|_| through.clone()).collect();
    let storm = Storm::start(routes, bidders, auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 60, "60 bids before the kill").await;
    cluster.take(owner).kill_hard().await;
    let at_kill = created_count(&answers);
    wait_for_acknowledged(&answers, at_kill + 60, "60 bids after the takeover").await;
    storm.finish().await;
    check_no_other_server_errors(&answers);
    let survivor = others[0];
    let history = cluster.api(survivor).history(&auction_id).await;
    check_acknowledged_are_stored(&history, &crate::cluster::acknowledged_of(&answers));
    let last_seq = history.len() as u64;
    for (watcher, snapshot) in &mut watchers {
        // In order, once, no gap: bids, or a snapshot that supersedes them.
        let (seqs, _snapshots) = watch_until(watcher, snapshot, last_seq).await;
        assert!(!seqs.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_fails_no_bid_and_watchers_are_resynchronised() {
    let mut redis = RedisServer::start().await;
    let cluster = cluster_with_redis(2, 10, &redis).await;
    let (_seller, bidders, auction_id, owner) = cluster.hot_auction(4).await;
    let other = 1 - owner;
    let mut watcher = WsClient::connect(&cluster.address(other), None).await;
    let snapshot = watcher.subscribe(&auction_id).await;

    let through = vec![cluster.address(owner), cluster.address(other)];
    let routes = (0..bidders.len()).map(|_| through.clone()).collect();
    let storm = Storm::start(routes, bidders, auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 40, "40 bids before Redis stops").await;

    redis.stop().await;
    eventually(Duration::from_secs(10), "the node to see Redis down", || async {
        let (status, body) = cluster.api(other).get("/ready", None).await;
        (status == StatusCode::OK && body["degraded"] == json!(["redis"])).then_some(())
    })
    .await;
    let while_down = created_count(&answers);
    wait_for_acknowledged(&answers, while_down + 40, "40 bids while Redis is down").await;
    redis.restart().await;
    eventually(Duration::from_secs(15), "the node to reach Redis again", || async {
        (labelled_metric(&cluster.address(other), "gavel_redis_up").await == 1.0).then_some(())
    })
    .await;
    let after = created_count(&answers);
    wait_for_acknowledged(&answers, after + 40, "40 bids after Redis is back").await;
    storm.finish().await;
    let failed: Vec<Value> = answers
        .lock()
        .unwrap()
        .iter()
        .filter(|answer| answer.status.is_server_error())
        .map(|answer| answer.body.clone())
        .collect();
    assert!(failed.is_empty(), "no bid failed for Redis: {failed:?}");

    let last_seq = cluster.api(owner).auction(&auction_id).await["seq"].as_u64().unwrap();
    let (_, snapshots) = watch_until(&mut watcher, &snapshot, last_seq).await;
    assert!(snapshots >= 1, "the watcher was resynchronised by a snapshot after the outage");
    // And it follows live again: one more bid reaches it as an event.
    let late = cluster.api(owner).register("late").await;
    let (status, placed) = cluster.api(owner).bid(&late, &auction_id, 10_000_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    let next = watcher.next_of("bid").await;
    assert_eq!(next["seq"].as_u64(), Some(last_seq + 1), "{next}");
}

/// A TCP proxy to Redis for one node that can lose the events it would be
/// sent: while `losing` is set, every pub/sub message on an events channel
/// from Redis to the node is dropped whole (and counted); everything else
/// passes. A stand-in for any event lost on its way: the node's connection
/// never breaks, so nothing else tells it to resynchronise.
struct LosingProxy {
    port: u16,
    losing: Arc<AtomicBool>,
    lost: Arc<AtomicUsize>,
}

impl LosingProxy {
    async fn start(redis_port: u16) -> LosingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (losing, lost) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (losing_here, lost_here) = (losing.clone(), lost.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                let (losing, lost) = (losing_here.clone(), lost_here.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_server);
                    let down = async {
                        let (mut pending, mut buffer) = (Vec::new(), vec![0u8; 16 * 1024]);
                        loop {
                            let count = match from_server.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(count) => count,
                            };
                            pending.extend_from_slice(&buffer[..count]);
                            let mut passed = Vec::new();
                            while let Some(length) = resp_frame_length(&pending) {
                                let frame: Vec<u8> = pending.drain(..length).collect();
                                let an_event = frame.windows(8).any(|window| window == b":events:");
                                if an_event && losing.load(Ordering::Acquire) {
                                    lost.fetch_add(1, Ordering::AcqRel);
                                } else {
                                    passed.extend_from_slice(&frame);
                                }
                            }
                            if to_client.write_all(&passed).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        () = down => {}
                    }
                });
            }
        });
        LosingProxy { port, losing, lost }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// The length of the RESP value at the start of `bytes`, once all of it is there.
fn resp_frame_length(bytes: &[u8]) -> Option<usize> {
    let line_end = bytes.windows(2).position(|window| window == b"\r\n")?;
    let line = std::str::from_utf8(&bytes[1..line_end]).ok()?;
    let after_line = line_end + 2;
    match bytes.first()? {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' => Some(after_line),
        b'$' | b'=' | b'!' => {
            let length: i64 = line.parse().ok()?;
            if length < 0 {
                return Some(after_line);
            }
            let end = after_line + length as usize + 2;
            (bytes.len() >= end).then_some(end)
        }
        b'*' | b'>' | b'~' | b'%' => {
            let mut items: i64 = line.parse().ok()?;
            if bytes[0] == b'%' {
                items *= 2;
            }
            let mut at = after_line;
            for _ in 0..items.max(0) {
                at += resp_frame_length(&bytes[at..])?;
            }
            Some(at)
        }
        _ => None,
    }
}

/// An event of another node's auction lost on its way here, with no later
/// event to show the gap, and no broken connection to prompt a resync: the
/// watcher here showed the auction without that bid for good. (Here the
/// proxy in front of the watcher's node drops it; an owner whose link to
/// Redis stalls or breaks while it publishes loses events the same way.) The
/// owner's heads, sent with its watcher counts every second, now show this
/// node what it missed, and its watcher takes a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_lost_on_its_way_reaches_the_watchers_by_snapshot() {
    let redis = RedisServer::start().await;
    let proxy = LosingProxy::start(redis.port).await;
    let redis_url = |url: String| vec!["--redis-url".to_owned(), url];
    let cluster = TestCluster::start_each(10, vec![redis_url(redis.url()), redis_url(proxy.url())]).await;
    let (owner, other) = (0, 1);
    for index in [owner, other] {
        let address = cluster.address(index);
        eventually(Duration::from_secs(10), "the node to reach Redis", || {
            let address = address.clone();
            async move { (labelled_metric(&address, "gavel_redis_up").await == 1.0).then_some(()) }
        })
        .await;
    }
    let (seller, bidders) = crate::cluster::users(&cluster.api(owner), 1).await;
    let mut auction_id = String::new();
    for _attempt in 0..40 {
        let auction = cluster.api(owner).create_auction(&seller, auction_body(json!({}))).await;
        let id = auction["id"].as_str().unwrap().to_owned();
        if cluster.owner_of(owner, &id).await == cluster.members[owner].id {
            auction_id = id;
            break;
        }
    }
    assert!(!auction_id.is_empty(), "each node owns about half the auctions");
    let mut watcher = WsClient::connect(&cluster.address(other), None).await;
    let snapshot = watcher.subscribe(&auction_id).await;
    assert_eq!(snapshot["auction"]["seq"], 0);
    // The owner reports heads of its auctions watched elsewhere: once it
    // counts the other node's watcher, its own watcher is told of two.
    let mut at_owner = WsClient::connect(&cluster.address(owner), None).await;
    at_owner.subscribe(&auction_id).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while at_owner.next_of("viewers").await["count"] != 2 {
        assert!(std::time::Instant::now() < deadline, "the owner counts the other node's watcher within 10 s");
    }

    proxy.losing.store(true, Ordering::Release);
    let (status, placed) = cluster.api(owner).bid(&bidders[0], &auction_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{placed}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proxy.lost.load(Ordering::Acquire) == 0 {
        assert!(std::time::Instant::now() < deadline, "the bid's event reached the proxy within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.losing.store(false, Ordering::Release);

    let message = watcher.next_event().await;
    assert_eq!(
        (message["type"].as_str(), message["auction"]["seq"].as_u64()),
        (Some("snapshot"), Some(1)),
        "the bid whose event was lost comes as a snapshot: {message}"
    );
}

/// The non-owner's reads of the auction: (from Redis, from the store).
async fn snapshot_reads(address: &str) -> (f64, f64) {
    (
        labelled_metric(address, "gavel_snapshot_reads_total{source=\"redis\"}").await,
        labelled_metric(address, "gavel_snapshot_reads_total{source=\"store\"}").await,
    )
}

/// The parts of an auction's view that do not depend on who asks or when.
fn settled(view: &Value) -> Value {
    let mut view = view.clone();
    view.as_object_mut().unwrap().remove("server_time");
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_reads_the_redis_snapshot_only_while_it_is_the_stores_latest() {
    let redis = RedisServer::start().await;
    let cluster = cluster_with_redis(2, 10, &redis).await;
    let (_seller, bidders, auction_id, owner) = cluster.hot_auction(2).await;
    let other = 1 - owner;
    // Twelve bids: more than a snapshot's ten recent ones.
    for index in 0..12 {
        let (status, body) =
            cluster.api(owner).bid(&bidders[index % 2], &auction_id, 2_000 + 10 * index as i64, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let owners_view = settled(&cluster.api(owner).auction(&auction_id).await);
    assert_eq!(owners_view["seq"], 12);

    // Once the owner has written it, the other node answers from the snapshot,
    // and shows exactly what the owner shows.
    let other_address = cluster.address(other);
    let from_redis = eventually(Duration::from_secs(10), "a GET on the non-owner served from Redis", || {
        let (other_address, auction_id) = (other_address.clone(), auction_id.clone());
        let api = cluster.api(other);
        async move {
            let (redis_before, _) = snapshot_reads(&other_address).await;
            let view = api.auction(&auction_id).await;
            let (redis_after, _) = snapshot_reads(&other_address).await;
            (redis_after > redis_before).then_some(view)
        }
    })
    .await;
    assert_eq!(settled(&from_redis), owners_view, "the snapshot shows what the store does");
    // A WebSocket snapshot there too: the auction and its last ten bids.
    let (redis_before, _) = snapshot_reads(&other_address).await;
    let mut on_other = WsClient::connect(&other_address, None).await;
    let snapshot = on_other.subscribe(&auction_id).await;
    assert_eq!(snapshot_reads(&other_address).await.0, redis_before + 1.0, "the WebSocket snapshot came from Redis");
    let mut on_owner = WsClient::connect(&cluster.address(owner), None).await;
    let owners_snapshot = on_owner.subscribe(&auction_id).await;
    assert_eq!(settled(&snapshot["auction"]), settled(&owners_snapshot["auction"]));
    assert_eq!(snapshot["recent_bids"], owners_snapshot["recent_bids"]);
    let seqs: Vec<u64> =
        snapshot["recent_bids"].as_array().unwrap().iter().map(|bid| bid["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (3..=12).rev().collect::<Vec<u64>>(), "the last ten bids, newest first");

    // A snapshot behind the store is not used: keep the one of seq 12, bid
    // once more, wait for the owner to write seq 13, then put 12 back.
    let key = redis.cli(&["--scan", "--pattern", &format!("gavel:*:snapshot:{auction_id}")]).await;
    assert!(key.ends_with(&auction_id), "one snapshot key: {key}");
    assert_eq!(redis.cli(&["COPY", &key, "kept", "REPLACE"]).await, "1");
    let (status, body) = cluster.api(owner).bid(&bidders[0], &auction_id, 5_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    eventually(Duration::from_secs(10), "the owner to write the snapshot of seq 13", || {
        let (other_address, auction_id) = (other_address.clone(), auction_id.clone());
        let api = cluster.api(other);
        async move {
            let (redis_before, _) = snapshot_reads(&other_address).await;
            let view = api.auction(&auction_id).await;
            (snapshot_reads(&other_address).await.0 > redis_before && view["seq"] == 13).then_some(())
        }
    })
    .await;
    assert_eq!(redis.cli(&["COPY", "kept", &key, "REPLACE"]).await, "1");
    let (redis_before, store_before) = snapshot_reads(&other_address).await;
    let view = cluster.api(other).auction(&auction_id).await;
    assert_eq!((view["seq"].as_u64(), view["current_price"].as_i64()), (Some(13), Some(5_000)), "{view}");
    let mut late = WsClient::connect(&other_address, None).await;
    let late_snapshot = late.subscribe(&auction_id).await;
    assert_eq!(late_snapshot["auction"]["seq"], 13);
    assert_eq!(late_snapshot["recent_bids"][0]["seq"], 13);
    assert_eq!(snapshot_reads(&other_address).await, (redis_before, store_before + 2.0), "both from the store");
}
