//! Several real gavel processes on one Postgres, as one service: every node
//! answers every request, each auction has one fenced owner, and shards move
//! when nodes die, pause, stop or join, without an acknowledged bid lost or a
//! `seq` acknowledged twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::concurrency::{bidders_ids, check_history, check_with_model};
use crate::helpers::{
    Api, HasApi, ServerProcess, User, auction_body, client, eventually, free_port, fresh_postgres_database,
};

const JWT_SECRET: &str = "cluster-test-secret-0123456789abcdef0123";
const NODE_NAMES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

pub struct Member {
    pub id: String,
    port: u16,
    _data_dir: tempfile::TempDir,
    process: Option<ServerProcess>,
}

/// N real nodes on one fresh Postgres database.
pub struct TestCluster {
    database_url: String,
    pub lease_secs: u64,
    pub members: Vec<Member>,
    /// Flags every node gets besides its own.
    extra_flags: Vec<String>,
}

impl TestCluster {
    pub async fn start(nodes: usize, lease_secs: u64) -> TestCluster {
        Self::start_with(nodes, lease_secs, Vec::new()).await
    }

    /// `nodes` nodes, each (and each added later) with `extra_flags`.
    pub async fn start_with(nodes: usize, lease_secs: u64, extra_flags: Vec<String>) -> TestCluster {
        let mut cluster =
            TestCluster { database_url: fresh_postgres_database().await, lease_secs, members: Vec::new(), extra_flags };
        for _ in 0..nodes {
            cluster.add().await;
        }
        cluster.settled(nodes).await;
        cluster
    }

    /// A node for each entry of `flags`, with those flags of its own.
    pub async fn start_each(lease_secs: u64, flags: Vec<Vec<String>>) -> TestCluster {
        let database_url = fresh_postgres_database().await;
        let mut cluster = TestCluster { database_url, lease_secs, members: Vec::new(), extra_flags: Vec::new() };
        for own in &flags {
            cluster.add_with(own).await;
        }
        cluster.settled(flags.len()).await;
        cluster
    }

    /// Starts one more node; returns its index.
    pub async fn add(&mut self) -> usize {
        self.add_with(&[]).await
    }

    /// Starts one more node with `own` flags besides the cluster's; returns its index.
    pub async fn add_with(&mut self, own: &[String]) -> usize {
        let index = self.members.len();
        let id = NODE_NAMES[index].to_owned();
        let port = free_port();
        let data_dir = tempfile::tempdir().unwrap();
        let flags: Vec<String> =
            ["--node-id", &id, "--lease-secs", &self.lease_secs.to_string(), "--jwt-secret", JWT_SECRET]
                .iter()
                .map(|flag| (*flag).to_owned())
                .chain(self.extra_flags.iter().cloned())
                .chain(own.iter().cloned())
                .collect();
        let process = ServerProcess::start_with(data_dir.path(), Some(&self.database_url), port, &flags).await;
        self.members.push(Member { id, port, _data_dir: data_dir, process: Some(process) });
        index
    }

    pub fn address(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[index].port)
    }

    pub fn api(&self, index: usize) -> Api<'_> {
        self.members[index].process.as_ref().expect("node running").api()
    }

    pub fn process(&self, index: usize) -> &ServerProcess {
        self.members[index].process.as_ref().expect("node running")
    }

    pub fn take(&mut self, index: usize) -> ServerProcess {
        self.members[index].process.take().expect("node running")
    }

    pub fn index_of(&self, node_id: &str) -> usize {
        self.members.iter().position(|member| member.id == node_id).expect("a known node")
    }

    pub async fn view(&self, via: usize) -> Value {
        let (status, view) = self.api(via).get("/api/v1/cluster", None).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        view
    }

    pub async fn owner_of(&self, via: usize, auction_id: &str) -> String {
        let (status, body) = self.api(via).get(&format!("/api/v1/cluster/auctions/{auction_id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["owner"].as_str().expect("an owner").to_owned()
    }

    /// Waits until `count` nodes are live, every shard is owned by one of
    /// them, and the spread is even (256 / count, or one more).
    pub async fn settled(&self, count: usize) -> Value {
        let via = self.members.iter().position(|member| member.process.is_some()).unwrap();
        eventually(Duration::from_secs(20), "the shards to settle over the nodes", || async move {
            let view = self.view(via).await;
            let nodes = view["nodes"].as_array().unwrap();
            let live: HashSet<&str> = nodes.iter().map(|node| node["node_id"].as_str().unwrap()).collect();
            let owned = view["shards"]
                .as_array()
                .unwrap()
                .iter()
                .all(|shard| shard["owner"].as_str().is_some_and(|owner| live.contains(owner)));
            let counted: u64 = nodes.iter().map(|node| node["shards"].as_u64().unwrap()).sum();
            let even = 256 / count as u64;
            let spread_evenly = nodes.iter().all(|node| (even..=even + 1).contains(&node["shards"].as_u64().unwrap()));
            (live.len() == count && owned && counted == 256 && spread_evenly).then_some(view)
        })
        .await
    }

    /// A seller, `bidders` bidders and one auction of the seller's (start
    /// 1,000, increment 1): its id and the index of the node that owns it.
    pub async fn hot_auction(&self, bidders: usize) -> (User, Vec<User>, String, usize) {
        let (seller, users) = users(&self.api(0), bidders).await;
        let auction = self
            .api(0)
            .create_auction(&seller, auction_body(json!({"starting_price": 1_000, "min_increment": 1})))
            .await;
        let auction_id = auction["id"].as_str().unwrap().to_owned();
        let owner = self.index_of(&self.owner_of(0, &auction_id).await);
        (seller, users, auction_id, owner)
    }

    /// How many shards each node owns, by node id.
    pub async fn spread(&self, via: usize) -> HashMap<String, u64> {
        let view = self.view(via).await;
        view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| (node["node_id"].as_str().unwrap().to_owned(), node["shards"].as_u64().unwrap()))
            .collect()
    }
}

/// One answer a bidder got: which node answered, which decided, what was asked.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub node: Option<String>,
    pub owner: Option<String>,
    pub request: Value,
    pub body: Value,
}

pub type Answers = Arc<Mutex<Vec<Answer>>>;

/// Bidders at work (`cluster_storm`) and what they were answered.
pub struct Storm {
    pub answers: Answers,
    stop: Arc<AtomicBool>,
    bidders: Vec<tokio::task::JoinHandle<()>>,
}

impl Storm {
    pub fn start(routes: Vec<Vec<String>>, bidders: Vec<User>, auction_id: String) -> Storm {
        let (answers, stop): (Answers, _) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let bidders = cluster_storm(routes, bidders, auction_id, answers.clone(), stop.clone());
        Storm { answers, stop, bidders }
    }

    /// Stops the bidders and waits until each has had its last answer.
    pub async fn finish(self) {
        self.stop.store(true, Ordering::Release);
        for bidder in self.bidders {
            bidder.await.expect("bidder task");
        }
    }
}

/// Bidders that bid just above the price they last heard of, each through the
/// nodes at `routes[bidder]` in turn, until `stop` is set. A `503` is retried
/// after a pause; a node that cannot be reached (it died) is dropped from the
/// bidder's rotation. Every answer is recorded.
fn cluster_storm(
    routes: Vec<Vec<String>>,
    bidders: Vec<User>,
    auction_id: String,
    answers: Answers,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    bidders
        .into_iter()
        .zip(routes)
        .enumerate()
        .map(|(index, (bidder, mut addresses))| {
            let auction_id = auction_id.clone();
            let answers = answers.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
                let mut next_amount = 1_000 + index as i64;
                let mut attempt = 0usize;
                while !stop.load(Ordering::Acquire) && !addresses.is_empty() {
                    attempt += 1;
                    let address = addresses[attempt % addresses.len()].clone();
                    let max_amount = (index % 3 == 0).then_some(next_amount + 7);
                    let mut body = json!({"amount": next_amount});
                    if let Some(max) = max_amount {
                        body["max_amount"] = json!(max);
                    }
                    let sent = client
                        .post(format!("{address}/api/v1/auctions/{auction_id}/bids"))
                        .bearer_auth(&bidder.token)
                        .json(&body)
                        .send()
                        .await;
                    let Ok(response) = sent else {
                        addresses.retain(|candidate| *candidate != address);
                        continue;
                    };
                    let status = response.status();
                    let header = |name: &str| {
                        response.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
                    };
                    let (node, owner) = (header("gavel-node"), header("gavel-owner"));
                    let Ok(reply) = response.json::<Value>().await else {
                        addresses.retain(|candidate| *candidate != address);
                        continue;
                    };
                    let request = json!({"amount": next_amount, "max_amount": max_amount, "bidder": bidder.id});
                    answers.lock().unwrap().push(Answer { status, node, owner, request, body: reply.clone() });
                    match (status, reply["error"]["code"].as_str()) {
                        (StatusCode::CREATED, _) => {
                            next_amount = reply["current_price"].as_i64().unwrap() + 1 + (index as i64 % 4);
                        }
                        (StatusCode::CONFLICT, Some("BID_TOO_LOW")) => {
                            next_amount = reply["error"]["min_bid"].as_i64().unwrap() + (index as i64 % 3);
                        }
                        (StatusCode::CONFLICT, Some("ALREADY_LEADING")) => next_amount += 10,
                        (StatusCode::CONFLICT, Some("AUCTION_NOT_ACTIVE")) => return,
                        (StatusCode::SERVICE_UNAVAILABLE, _) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        (other, _) => panic!("unexpected answer {other}: {reply}"),
                    }
                }
            })
        })
        .collect()
}

pub fn acknowledged_of(answers: &Answers) -> Vec<Value> {
    let mut acknowledged: Vec<Value> = answers
        .lock()
        .unwrap()
        .iter()
        .filter(|answer| answer.status == StatusCode::CREATED)
        .map(|answer| json!({"request": answer.request, "reply": answer.body}))
        .collect();
    acknowledged.sort_by_key(|record| record["reply"]["seq"].as_u64());
    acknowledged
}

pub fn created_count(answers: &Answers) -> usize {
    answers.lock().unwrap().iter().filter(|answer| answer.status == StatusCode::CREATED).count()
}

pub async fn wait_for_acknowledged(answers: &Answers, at_least: usize, what: &str) {
    eventually(Duration::from_secs(60), what, || {
        let count = created_count(answers);
        async move { (count >= at_least).then_some(()) }
    })
    .await;
}

/// Every 201 is in the store's history unchanged, and no seq was acknowledged twice.
pub fn check_acknowledged_are_stored(history: &[Value], acknowledged: &[Value]) {
    for (position, row) in history.iter().enumerate() {
        assert_eq!(row["seq"].as_u64(), Some(position as u64 + 1), "history is 1..n without gaps");
    }
    let mut seen = HashSet::new();
    for record in acknowledged {
        let reply = &record["reply"];
        let seq = reply["seq"].as_u64().unwrap();
        assert!(seen.insert(seq), "seq {seq} was acknowledged twice");
        let row = history.get(seq as usize - 1).unwrap_or_else(|| panic!("acknowledged seq {seq} is not stored"));
        assert_eq!(row["bidder"]["id"], record["request"]["bidder"], "seq {seq} is the acknowledged bidder's");
        assert_eq!(row["amount"], record["request"]["amount"], "seq {seq} unchanged");
        assert_eq!(row["current_price"], reply["current_price"], "seq {seq} unchanged");
        assert_eq!(row["placed_at"], reply["placed_at"], "seq {seq} unchanged");
    }
}

/// Only 503 among the server errors: nothing a node did came out as a 500.
pub fn check_no_other_server_errors(answers: &Answers) {
    for answer in answers.lock().unwrap().iter() {
        assert!(
            !answer.status.is_server_error() || answer.status == StatusCode::SERVICE_UNAVAILABLE,
            "a server error other than 503: {} {}",
            answer.status,
            answer.body
        );
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(answer.body["error"]["code"], "UNAVAILABLE", "{}", answer.body);
        }
    }
}

pub async fn labelled_metric(address: &str, series: &str) -> f64 {
    let text = client().get(format!("{address}/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("{series} ");
    text.lines().find_map(|line| line.strip_prefix(prefix.as_str())).map_or(0.0, |value| value.trim().parse().unwrap())
}

pub async fn users(api: &Api<'_>, bidders: usize) -> (User, Vec<User>) {
    let seller = api.register("seller").await;
    let mut users = Vec::new();
    for index in 0..bidders {
        users.push(api.register(&format!("bidder_{index}")).await);
    }
    (seller, users)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_decide_one_auction_as_one_service() {
    let cluster = TestCluster::start(3, 10).await;
    let spread = cluster.spread(0).await;
    assert!(spread.values().all(|&shards| (68..=103).contains(&shards)), "even within ±20%: {spread:?}");

    let (seller, bidders) = users(&cluster.api(0), 12).await;
    let auction = cluster
        .api(1)
        .create_auction(
            &seller,
            auction_body(json!({"starting_price": 1_000, "min_increment": 1, "reserve_price": 1_300})),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let owner = cluster.owner_of(2, &auction_id).await;

    // Every bidder goes through all three nodes in turn.
    let all: Vec<String> = (0..3).map(|index| cluster.address(index)).collect();
    let routes = (0..bidders.len()).map(|_| all.clone()).collect();
    let bidder_ids = bidders_ids(&bidders);
    let storm = Storm::start(routes, bidders.clone(), auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 150, "150 bids acknowledged through three nodes").await;
    storm.finish().await;
    check_no_other_server_errors(&answers);
    let answered = answers.lock().unwrap().clone();
    assert!(answered.iter().all(|answer| answer.status != StatusCode::SERVICE_UNAVAILABLE), "no node was unavailable");
    for answer in &answered {
        assert_eq!(answer.owner.as_deref(), Some(owner.as_str()), "every bid was decided by the owner");
    }
    let forwarded = answered.iter().filter(|answer| answer.node.as_deref() != Some(owner.as_str())).count();
    assert!(forwarded * 2 >= answered.len(), "about two thirds came through other nodes: {forwarded}");
    let owner_index = cluster.index_of(&owner);
    let mut relayed = 0.0;
    for index in (0..3).filter(|index| *index != owner_index) {
        relayed += labelled_metric(&cluster.address(index), "gavel_forwarded_bids_total{outcome=\"relayed\"}").await;
    }
    assert!(relayed >= forwarded as f64, "forwards are counted: {relayed} for {forwarded}");

    // One history, the same from every node, that the rules explain.
    let history = cluster.api(0).history(&auction_id).await;
    for via in 1..3 {
        assert_eq!(cluster.api(via).history(&auction_id).await, history, "node {via} has the same history");
    }
    let acknowledged = acknowledged_of(&answers);
    check_history(&history, &acknowledged);
    let final_state = cluster.api(2).auction(&auction_id).await;
    check_with_model(&seller, &bidder_ids, &auction, &acknowledged, &final_state);

    // A read after a 201 on any node shows the bid.
    let bob = &bidders[1];
    for via in 0..3 {
        let (status, placed) = cluster.api(via).bid(bob, &auction_id, 1_000_000 + via as i64 * 10, None).await;
        assert_eq!(status, StatusCode::CREATED, "{placed}");
        for reader in 0..3 {
            let seen = cluster.api(reader).auction(&auction_id).await;
            assert!(seen["seq"].as_u64() >= placed["seq"].as_u64(), "node {reader} shows the bid placed on {via}");
        }
    }
    let history = cluster.api(0).history(&auction_id).await;

    // An idempotency key means the same thing on every node.
    let carol = &bidders[2];
    let path = format!("/api/v1/auctions/{auction_id}/bids");
    let keyed = |via: usize, amount: i64| {
        let request = cluster
            .api(via)
            .client
            .post(format!("{}{path}", cluster.address(via)))
            .bearer_auth(&carol.token)
            .header("Idempotency-Key", "carol-once")
            .json(&json!({"amount": amount}));
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (first_status, first) = keyed(0, 2_000_000).await;
    assert_eq!(first_status, StatusCode::CREATED, "{first}");
    for via in 1..3 {
        let (status, again) = keyed(via, 2_000_000).await;
        assert_eq!((status, &again), (StatusCode::CREATED, &first), "a retry on node {via} gets the first answer");
    }
    let (status, reused) = keyed(1, 2_000_001).await;
    assert_eq!(
        (status, reused["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("IDEMPOTENCY_KEY_REUSED"))
    );
    assert_eq!(cluster.api(2).history(&auction_id).await.len(), history.len() + 1, "the key placed one bid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_loses_its_shards_within_the_lease_and_no_acknowledged_bid() {
    let mut cluster = TestCluster::start(3, 3).await;
    let (_seller, bidders, auction_id, owner) = cluster.hot_auction(8).await;
    let survivors: Vec<usize> = (0..3).filter(|index| *index != owner).collect();
    let through: Vec<String> = survivors.iter().map(|index| cluster.address(*index)).collect();

    let routes = (0..bidders.len()).map(|_| through.clone()).collect();
    let storm = Storm::start(routes, bidders, auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 60, "60 bids before the kill").await;

    let killed_id = cluster.members[owner].id.clone();
    cluster.take(owner).kill_hard().await;
    let killed_at = Instant::now();
    let before_kill = created_count(&answers);
    let survivor = survivors[0];
    eventually(Duration::from_secs(cluster.lease_secs + 5), "every shard owned by the survivors", || async {
        let view = cluster.view(survivor).await;
        let shards = view["shards"].as_array().unwrap();
        shards.iter().all(|shard| shard["owner"].as_str().is_some_and(|owner| owner != killed_id)).then_some(())
    })
    .await;
    let moved_after = killed_at.elapsed();
    assert!(
        moved_after <= Duration::from_secs(cluster.lease_secs + 2),
        "shards owned again after {moved_after:?}, lease {} s",
        cluster.lease_secs
    );
    wait_for_acknowledged(&answers, before_kill + 40, "40 more bids after the takeover").await;
    storm.finish().await;
    check_no_other_server_errors(&answers);
    let history = cluster.api(survivor).history(&auction_id).await;
    check_acknowledged_are_stored(&history, &acknowledged_of(&answers));
    let auction = cluster.api(survivors[1]).auction(&auction_id).await;
    assert_eq!(auction["seq"].as_u64(), Some(history.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_when_it_wakes_and_the_auction_has_one_winner() {
    let cluster = TestCluster::start(3, 3).await;
    let (seller, bidders) = users(&cluster.api(0), 9).await;
    let auction = cluster
        .api(0)
        .create_auction(
            &seller,
            auction_body(json!({"starting_price": 1_000, "min_increment": 1, "duration_secs": 35})),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let owner = cluster.index_of(&cluster.owner_of(0, &auction_id).await);
    let others: Vec<usize> = (0..3).filter(|index| *index != owner).collect();

    // A third of the bidders talk to the owner directly, the rest to the others.
    let routes = (0..bidders.len())
        .map(|index| match index % 3 {
            0 => vec![cluster.address(owner)],
            _ => others.iter().map(|other| cluster.address(*other)).collect(),
        })
        .collect();
    let storm = Storm::start(routes, bidders, auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 60, "60 bids before the pause").await;

    cluster.process(owner).signal(libc::SIGSTOP);
    let other = others[0];
    let paused_id = cluster.members[owner].id.clone();
    eventually(Duration::from_secs(cluster.lease_secs + 5), "another node to own the auction", || async {
        (cluster.owner_of(other, &auction_id).await != paused_id).then_some(())
    })
    .await;
    let at_takeover = created_count(&answers);
    wait_for_acknowledged(&answers, at_takeover + 30, "30 bids accepted by the new owner").await;
    cluster.process(owner).signal(libc::SIGCONT);
    eventually(Duration::from_secs(10), "the woken node to see it lost its shards", || async {
        let lost = labelled_metric(&cluster.address(owner), "gavel_shard_moves_total{kind=\"lost\"}").await;
        (lost >= 1.0).then_some(())
    })
    .await;
    let after_wake = created_count(&answers);
    wait_for_acknowledged(&answers, after_wake + 20, "20 more bids after the wake").await;
    storm.finish().await;
    check_no_other_server_errors(&answers);
    let history = cluster.api(other).history(&auction_id).await;
    check_acknowledged_are_stored(&history, &acknowledged_of(&answers));

    // The auction ends once, on every node alike, with the last leader as winner.
    let ended = eventually(Duration::from_secs(60), "the auction to end", || async {
        let auction = cluster.api(owner).auction(&auction_id).await;
        (auction["status"] == "ended").then_some(auction)
    })
    .await;
    let last = history.last().expect("bids were placed");
    assert_eq!(ended["winner"], last["leader"], "the last leader won");
    assert_eq!(ended["final_price"], last["current_price"]);
    assert_eq!(ended["seq"].as_u64(), Some(history.len() as u64), "no bid after the last one in the history");
    assert_eq!(ended["bid_count"].as_u64(), Some(history.len() as u64));
    for via in others {
        assert_eq!(cluster.api(via).auction(&auction_id).await["winner"], ended["winner"]);
    }
}

/// Stops node `leaving` with SIGTERM and checks, as node `observer` sees
/// it, that no shard is the stopping node's within 2 s (the contract);
/// returns the process's exit.
async fn terminate_and_see_its_shards_move_at_once(
    cluster: &mut TestCluster,
    leaving: usize,
    observer: usize,
) -> tokio::task::JoinHandle<std::process::ExitStatus> {
    let leaving_id = cluster.members[leaving].id.clone();
    let process = cluster.take(leaving);
    let terminated_at = Instant::now();
    let exit = tokio::spawn(process.terminate());
    eventually(Duration::from_secs(15), "the shards to move off the stopping node", || async {
        let view = cluster.view(observer).await;
        let shards = view["shards"].as_array().unwrap();
        shards.iter().all(|shard| shard["owner"].as_str().is_some_and(|owner| owner != leaving_id)).then_some(())
    })
    .await;
    let moved_after = terminated_at.elapsed();
    assert!(moved_after <= Duration::from_secs(2), "shards moved {moved_after:?} after SIGTERM");
    exit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_shards_over_at_once_under_load() {
    let mut cluster = TestCluster::start(3, 10).await;
    let (_seller, bidders, auction_id, leaving) = cluster.hot_auction(9).await;
    let staying: Vec<usize> = (0..3).filter(|index| *index != leaving).collect();
    let all: Vec<String> = (0..3).map(|index| cluster.address(index)).collect();

    let routes = (0..bidders.len()).map(|_| all.clone()).collect();
    let storm = Storm::start(routes, bidders, auction_id.clone());
    let answers = storm.answers.clone();
    wait_for_acknowledged(&answers, 60, "60 bids before SIGTERM").await;

    let exit = terminate_and_see_its_shards_move_at_once(&mut cluster, leaving, staying[0]).await;
    let status = exit.await.unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
    let after_exit = created_count(&answers);
    wait_for_acknowledged(&answers, after_exit + 30, "30 bids after the handover").await;
    storm.finish().await;
    check_no_other_server_errors(&answers);
    let history = cluster.api(staying[1]).history(&auction_id).await;
    check_acknowledged_are_stored(&history, &acknowledged_of(&answers));
}

/// A node stopped with SIGTERM finishes the requests it is in before it
/// exits. One client trickling its request's body held the shards (and every
/// bid other nodes forward to them) until the body's deadline, 10 s. Half a
/// second into the drain the node now hands its shards over meanwhile, and
/// the trickled bid, once whole, is forwarded to the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_shards_over_at_once_though_a_client_trickles_its_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut cluster = TestCluster::start(2, 10).await;
    let (_seller, bidders, auction_id, _owner) = cluster.hot_auction(1).await;
    let (leaving, staying) = (0, 1);
    let address = cluster.address(leaving).trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    let body = br#"{"amount":5000}"#;
    let head = format!(
        "POST /api/v1/auctions/{auction_id}/bids HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        bidders[0].token,
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // `100 Continue` comes when the handler starts reading the body: the request is in flight.
    let mut answer = vec![0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer)).await.unwrap().unwrap();
    assert!(answer[..read].starts_with(b"HTTP/1.1 100"), "{}", String::from_utf8_lossy(&answer[..read]));
    slow.write_all(&body[..10]).await.unwrap();

    let exit = terminate_and_see_its_shards_move_at_once(&mut cluster, leaving, staying).await;

    // The trickled bid, whole at last, is decided by the new owner.
    slow.write_all(&body[10..]).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut response)).await.unwrap().unwrap();
    let response = String::from_utf8_lossy(&response).to_lowercase();
    assert!(response.starts_with("http/1.1 201"), "{response}");
    let decided_by = format!("gavel-owner: {}", cluster.members[staying].id.to_lowercase());
    assert!(response.contains(&decided_by), "{response}");
    let status = exit.await.unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
}

/// One key sent at once to several auctions of one node, some through that
/// node and some through another, twenty times over, while another bidder
/// bids on them. The copies that entered at the other node were decided by
/// the owner without the key held, and met the others only in the store,
/// where the one refused took the other bidder's bid on its auction with it
/// (`503`). The owner now holds the key for a forwarded write too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sent_at_once_through_two_nodes_never_costs_another_bidder_their_bid() {
    // Each commit waits 300 ms for company: the writes of a round are all in
    // their auctions before the first commits.
    let cluster = TestCluster::start_with(2, 10, vec!["--commit-delay-us".to_owned(), "300000".to_owned()]).await;
    let (seller, users) = users(&cluster.api(0), 2).await;
    let (mallory, alice) = (&users[0], &users[1]);
    let owner_id = cluster.members[0].id.clone();
    let client = crate::helpers::client();
    let send = |via: usize, auction_id: &str, token: &str, key: Option<String>, amount: i64| {
        let url = format!("{}/api/v1/auctions/{auction_id}/bids", cluster.address(via));
        crate::helpers::bid_request(&client, url, token, key, amount)
    };
    for round in 0..20 {
        // Four auctions of node 0.
        let mut auctions = Vec::new();
        while auctions.len() < 4 {
            let auction = cluster.api(0).create_auction(&seller, auction_body(json!({}))).await;
            let id = auction["id"].as_str().unwrap().to_owned();
            if cluster.owner_of(0, &id).await == owner_id {
                auctions.push(id);
            }
        }
        let keyed: Vec<_> = auctions
            .iter()
            .enumerate()
            .map(|(index, id)| tokio::spawn(send(index % 2, id, &mallory.token, Some(format!("key-{round}")), 10_000)))
            .collect();
        // Each node refuses at once its second copy (its own hold); the
        // others are in their auctions, waiting for the commit, once the
        // owner's queue holds a write. Then another bidder bids on top.
        eventually(Duration::from_secs(5), "the keyed bids to reach their auctions", || async {
            let refused = keyed.iter().filter(|answer| answer.is_finished()).count();
            let queued = labelled_metric(&cluster.address(0), "gavel_persistence_queue_depth").await;
            (refused >= 2 && queued >= 1.0).then_some(())
        })
        .await;
        let others: Vec<_> = auctions.iter().map(|id| tokio::spawn(send(0, id, &alice.token, None, 20_000))).collect();
        crate::helpers::check_keyed_round(round, keyed, others).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auction_whose_owner_died_closes_on_time_after_takeover() {
    let mut cluster = TestCluster::start(2, 3).await;
    let (seller, bidders) = users(&cluster.api(0), 1).await;
    // Find an auction the first node owns, so the one that survives is not its owner.
    let mut auction_id = String::new();
    for _attempt in 0..40 {
        let auction = cluster.api(0).create_auction(&seller, auction_body(json!({"duration_secs": 4}))).await;
        let id = auction["id"].as_str().unwrap().to_owned();
        if cluster.owner_of(0, &id).await == cluster.members[0].id {
            auction_id = id;
            break;
        }
    }
    assert!(!auction_id.is_empty(), "node-a owns about half the auctions");
    let created_at = Instant::now();
    let (status, bid) = cluster.api(1).bid(&bidders[0], &auction_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{bid}");
    cluster.take(0).kill_hard().await;

    let survivor = cluster.api(1);
    let ended = eventually(Duration::from_secs(15), "the auction to end after the takeover", || async {
        let auction = survivor.auction(&auction_id).await;
        (auction["status"] == "ended").then_some(auction)
    })
    .await;
    // Its end (4 s) passed while nobody owned it; the survivor took over after
    // the lease (3 s) and ended it at once.
    let ended_after = created_at.elapsed();
    assert!(ended_after <= Duration::from_secs(4 + cluster.lease_secs + 2), "ended {ended_after:?} after creation");
    assert_eq!(ended["winner"]["username"], bidders[0].username.as_str());
    assert_eq!(ended["final_price"], 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_gets_its_share_of_the_shards() {
    let mut cluster = TestCluster::start(2, 3).await;
    let spread = cluster.spread(0).await;
    assert_eq!(spread.values().copied().collect::<Vec<_>>(), vec![128, 128], "{spread:?}");
    let (seller, bidders) = users(&cluster.api(0), 1).await;

    let joined = cluster.add().await;
    cluster.settled(3).await;
    let spread = cluster.spread(joined).await;
    assert_eq!(spread.len(), 3);
    for (node, shards) in &spread {
        assert!((68..=103).contains(shards), "{node} owns {shards} of 256 (even ±20%): {spread:?}");
    }
    // The new node decides the auctions of its shards.
    let joined_id = cluster.members[joined].id.clone();
    let mut decided_by_new_node = false;
    for _attempt in 0..40 {
        let auction = cluster.api(0).create_auction(&seller, auction_body(json!({}))).await;
        let id = auction["id"].as_str().unwrap().to_owned();
        if cluster.owner_of(0, &id).await != joined_id {
            continue;
        }
        let response = cluster
            .api(0)
            .client
            .post(format!("{}/api/v1/auctions/{id}/bids", cluster.address(0)))
            .bearer_auth(&bidders[0].token)
            .json(&json!({"amount": 10_000}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()["gavel-owner"], joined_id.as_str());
        decided_by_new_node = true;
        break;
    }
    assert!(decided_by_new_node, "the new node owns about a third of the auctions");
}
