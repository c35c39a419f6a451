//! Spawning a real gavel node for a test: in-process on port 0 (SQLite in a
//! temp dir, or a fresh Postgres database per test), or as the real binary
//! (for kill and restart tests). Waits are on conditions with deadlines.

use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gavel::{Application, Config};
use gavel_actors::node::NodeSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Postgres of this machine; every test gets its own database in it.
pub fn postgres_base_url() -> String {
    std::env::var("GAVEL_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub async fn fresh_postgres_database() -> String {
    let name = format!("gavel_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_base_url()))
        .await
        .expect("Postgres must run at GAVEL_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    format!("{}/{name}", postgres_base_url())
}

#[derive(Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub token: String,
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    pub database_url: Option<String>,
    pub node: std::sync::Arc<gavel_actors::node::Node>,
    pub bidding: std::sync::Arc<gavel::bidding::Bidding>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("reqwest client")
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}, NodeSettings::default()).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Config), settings: NodeSettings) -> TestApp {
        if std::env::var("TEST_LOG").is_ok() {
            gavel::telemetry::init_tracing(false);
        }
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_data_dir(data_dir.path().to_path_buf());
        config.bid_rate_per_user = 0;
        config.sign_ins_per_address = 0;
        config.sign_ins_per_username = 0;
        if backend == Backend::Postgres {
            config.database_url = Some(fresh_postgres_database().await);
        }
        adjust(&mut config);
        let database_url = config.database_url.clone();
        let application = Application::build_with(config, settings).await.expect("build the application");
        let address = format!("http://{}", application.local_addr());
        let node = application.node();
        let bidding = application.bidding();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(application.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestApp {
            address,
            client: client(),
            backend,
            data_dir,
            database_url,
            node,
            bidding,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Graceful stop, as on SIGTERM; waits until the node has shut down.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("graceful shutdown within 30 s")
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }

    /// Stops gracefully and hands back the data dir for a restart on the same store.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        let data_dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"));
        self.stop().await;
        data_dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }
}

/// Calls the API of a node at `address`; shared by in-process and spawned nodes.
pub struct Api<'a> {
    pub address: &'a str,
    pub client: &'a reqwest::Client,
}

pub trait HasApi {
    fn api(&self) -> Api<'_>;
}

impl HasApi for TestApp {
    fn api(&self) -> Api<'_> {
        Api { address: &self.address, client: &self.client }
    }
}

impl Api<'_> {
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status();
        let text = response.text().await.expect("response body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, token, Some(body)).await
    }

    pub async fn register(&self, username: &str) -> User {
        let (status, body) =
            self.post("/api/v1/auth/register", None, json!({"username": username, "password": "password-123"})).await;
        assert_eq!(status, StatusCode::CREATED, "register {username}: {body}");
        User {
            id: body["user"]["id"].as_str().expect("user id").to_owned(),
            username: username.to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
        }
    }

    pub async fn create_auction(&self, seller: &User, body: Value) -> Value {
        let (status, auction) = self.post("/api/v1/auctions", Some(&seller.token), body).await;
        assert_eq!(status, StatusCode::CREATED, "create auction: {auction}");
        auction
    }

    pub async fn bid(
        &self,
        bidder: &User,
        auction_id: &str,
        amount: i64,
        max_amount: Option<i64>,
    ) -> (StatusCode, Value) {
        let mut body = json!({"amount": amount});
        if let Some(max) = max_amount {
            body["max_amount"] = json!(max);
        }
        self.post(&format!("/api/v1/auctions/{auction_id}/bids"), Some(&bidder.token), body).await
    }

    /// A seller, the named bidders and one auction of the seller's (`auction_body`
    /// with `overrides`): the opening of most tests.
    pub async fn scene(&self, bidders: &[&str], overrides: Value) -> (User, Vec<User>, String) {
        let seller = self.register("seller").await;
        let mut users = Vec::new();
        for name in bidders {
            users.push(self.register(name).await);
        }
        let auction = self.create_auction(&seller, auction_body(overrides)).await;
        (seller, users, auction["id"].as_str().expect("auction id").to_owned())
    }

    pub async fn auction(&self, auction_id: &str) -> Value {
        let (status, auction) = self.get(&format!("/api/v1/auctions/{auction_id}"), None).await;
        assert_eq!(status, StatusCode::OK, "get auction: {auction}");
        auction
    }

    /// The whole bid history, oldest first, following `next_before_seq`.
    pub async fn history(&self, auction_id: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let query = match before {
                Some(seq) => format!("?limit=100&before_seq={seq}"),
                None => "?limit=100".to_owned(),
            };
            let (status, page) = self.get(&format!("/api/v1/auctions/{auction_id}/bids{query}"), None).await;
            assert_eq!(status, StatusCode::OK, "history: {page}");
            items.extend(page["items"].as_array().expect("items").iter().cloned());
            match page["next_before_seq"].as_i64() {
                Some(seq) => before = Some(seq),
                None => break,
            }
        }
        items.reverse();
        items
    }
}

/// An auction body with sane defaults; `overrides` replaces fields.
/// A bid of `amount` posted to `url`, with an `Idempotency-Key` when given:
/// its status and body, once sent.
pub fn bid_request(
    client: &reqwest::Client,
    url: String,
    token: &str,
    key: Option<String>,
    amount: i64,
) -> impl Future<Output = (StatusCode, Value)> + Send + use<> {
    let mut request = client.post(url).bearer_auth(token).json(&json!({"amount": amount}));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    async move {
        let response = request.send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    }
}

/// The answers of one round of a key sent at once to several auctions
/// (`keyed`) while another bidder bids on them (`others`): each keyed bid is
/// `201`, `409` or `422`, at most one of them `201`; every other bid is decided
/// by the rules alone (`201` or `409`, never `503`). Returns the `201`s.
pub async fn check_keyed_round(
    round: usize,
    keyed: Vec<tokio::task::JoinHandle<(StatusCode, Value)>>,
    others: Vec<tokio::task::JoinHandle<(StatusCode, Value)>>,
) -> usize {
    let mut created = 0;
    for answer in keyed {
        let (status, body) = answer.await.unwrap();
        assert!(
            [StatusCode::CREATED, StatusCode::CONFLICT, StatusCode::UNPROCESSABLE_ENTITY].contains(&status),
            "round {round}: the keyed bid got {status} {body}"
        );
        created += usize::from(status == StatusCode::CREATED);
    }
    assert!(created <= 1, "round {round}: {created} bids took effect under one key");
    for answer in others {
        let (status, body) = answer.await.unwrap();
        assert!(
            [StatusCode::CREATED, StatusCode::CONFLICT].contains(&status),
            "round {round}: another bidder's bid got {status} {body}"
        );
        created += usize::from(status == StatusCode::CREATED);
    }
    created
}

pub fn auction_body(overrides: Value) -> Value {
    let mut body = json!({
        "title": "Leica M6", "description": "a camera", "currency": "EUR",
        "starting_price": 10_000, "min_increment": 500, "duration_secs": 3600,
    });
    for (key, value) in overrides.as_object().expect("overrides object") {
        if value.is_null() {
            body.as_object_mut().unwrap().remove(key);
        } else {
            body[key] = value.clone();
        }
    }
    body
}

/// The value of an unlabelled series on the node's `/metrics` (0 before it appears).
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.client.get(app.url("/metrics")).send().await.expect("GET /metrics").text().await.expect("body");
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real `gavel` binary, for tests that kill it or restart it.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub address: String,
    pub client: reqwest::Client,
}

impl HasApi for ServerProcess {
    fn api(&self) -> Api<'_> {
        Api { address: &self.address, client: &self.client }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl ServerProcess {
    /// Starts the binary and waits until `/ready` answers 200.
    pub async fn start(data_dir: &Path, database_url: Option<&str>, port: u16) -> ServerProcess {
        Self::start_with(data_dir, database_url, port, &[]).await
    }

    /// `start`, with more flags.
    pub async fn start_with(data_dir: &Path, database_url: Option<&str>, port: u16, extra: &[String]) -> ServerProcess {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gavel"));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--bid-rate-per-user")
            .arg("0")
            .args(["--sign-ins-per-address", "0", "--sign-ins-per-username", "0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if std::env::var("TEST_LOG").is_err() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        if let Some(url) = database_url {
            command.arg("--database-url").arg(url);
        }
        command.args(extra);
        let child = command.spawn().expect("spawn gavel");
        let process = ServerProcess { child, address: format!("http://127.0.0.1:{port}"), client: client() };
        let ready_url = format!("{}/ready", process.address);
        let probe = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        eventually(Duration::from_secs(30), "the server to become ready", || {
            let probe = probe.clone();
            let url = ready_url.clone();
            async move {
                probe.get(url).send().await.ok().filter(|response| response.status() == StatusCode::OK).map(|_| ())
            }
        })
        .await;
        process
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill({signal})");
    }

    pub async fn kill_hard(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .expect("wait")
    }
}

/// Every 201 a storm of bidders got, in the order they got them.
pub type Acknowledged = Arc<Mutex<Vec<Value>>>;

/// Bidders that bid just above the price they last heard of, for
/// `attempts_per_bidder` bids or until their connection fails (the server died).
pub fn start_storm(
    address: String,
    bidders: Vec<User>,
    auction_id: String,
    acknowledged: Acknowledged,
    attempts_per_bidder: usize,
) -> Vec<tokio::task::JoinHandle<usize>> {
    bidders
        .into_iter()
        .enumerate()
        .map(|(index, bidder)| {
            let address = address.clone();
            let auction_id = auction_id.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
                let api = Api { address: &address, client: &client };
                let mut next_amount = 1_000 + index as i64;
                let mut answered = 0;
                for _attempt in 0..attempts_per_bidder {
                    let max_amount = (index % 3 == 0).then_some(next_amount + 7);
                    let mut body = json!({"amount": next_amount});
                    if let Some(max) = max_amount {
                        body["max_amount"] = json!(max);
                    }
                    let response = client
                        .post(format!("{}/api/v1/auctions/{auction_id}/bids", api.address))
                        .bearer_auth(&bidder.token)
                        .json(&body)
                        .send()
                        .await;
                    let Ok(response) = response else { return answered };
                    let status = response.status();
                    let Ok(body) = response.json::<Value>().await else { return answered };
                    answered += 1;
                    match status {
                        StatusCode::CREATED => {
                            let request = json!({"amount": next_amount, "max_amount": max_amount, "bidder": bidder.id});
                            next_amount = body["current_price"].as_i64().unwrap() + 1 + (index as i64 % 4);
                            acknowledged.lock().unwrap().push(json!({"request": request, "reply": body}));
                        }
                        StatusCode::CONFLICT if body["error"]["code"] == "BID_TOO_LOW" => {
                            next_amount = body["error"]["min_bid"].as_i64().unwrap() + (index as i64 % 3);
                        }
                        StatusCode::CONFLICT if body["error"]["code"] == "ALREADY_LEADING" => {
                            next_amount += 10;
                        }
                        StatusCode::SERVICE_UNAVAILABLE => return answered,
                        other => panic!("unexpected answer {other}: {body}"),
                    }
                }
                answered
            })
        })
        .collect()
}

/// A TCP proxy in front of Postgres that can lose the database's answers on
/// the way back, as a network can: while `lose_answers` is on, a connection
/// that sends an Execute gets nothing back from then on, though the statement
/// is carried out (statements being prepared still get their answers, so the
/// one that executes is the one whose answer is lost). `cut_lossy` then closes
/// every connection that lost answers (a client cannot read on past a gap);
/// new connections go through whole. Speaks enough of the protocol to find
/// the Execute messages, so the client must not use TLS (the node's sqlx is
/// built without it).
pub struct LossyProxy {
    pub address: std::net::SocketAddr,
    losing: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    pub async fn start(upstream: &str) -> LossyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let losing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (upstream, task_losing, task_cut) = (upstream.to_owned(), losing.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                tokio::spawn(Self::relay(client, server, task_losing.clone(), task_cut.subscribe()));
            }
        });
        LossyProxy { address, losing, cut, task }
    }

    async fn relay(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        losing: Arc<std::sync::atomic::AtomicBool>,
        mut cut: tokio::sync::watch::Receiver<u64>,
    ) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let answers_lost = AtomicBool::new(false);
        let requests = Self::forward_requests(&mut client_read, &mut server_write, &losing, &answers_lost);
        let answers = async {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let read = server_read.read(&mut buffer).await?;
                if read == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                if !answers_lost.load(Ordering::Acquire) {
                    client_write.write_all(&buffer[..read]).await?;
                }
            }
        };
        let cut_if_lossy = async {
            while cut.changed().await.is_ok() {
                if answers_lost.load(Ordering::Acquire) {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        // Either side closing, or a cut, ends the connection (both sockets drop).
        tokio::select! {
            _ = requests => {}
            _ = answers => {}
            () = cut_if_lossy => {}
        }
    }

    /// Client to server, message by message: the untyped start-up messages (an
    /// SSL request, the start-up) until the start-up itself, then a type byte
    /// each. Marks the connection's answers lost at an Execute sent while losing.
    async fn forward_requests(
        client: &mut tokio::net::tcp::OwnedReadHalf,
        server: &mut tokio::net::tcp::OwnedWriteHalf,
        losing: &std::sync::atomic::AtomicBool,
        answers_lost: &std::sync::atomic::AtomicBool,
    ) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let mut typed = false;
        loop {
            let mut head = [0u8; 5];
            let head = if typed { &mut head[..] } else { &mut head[1..] };
            client.read_exact(head).await?;
            let length = u32::from_be_bytes(head[head.len() - 4..].try_into().expect("four bytes")) as usize;
            let mut body = vec![0u8; length.saturating_sub(4)];
            client.read_exact(&mut body).await?;
            if typed && head[0] == b'E' && losing.load(Ordering::Acquire) {
                answers_lost.store(true, Ordering::Release);
            }
            // Protocol 3.0 in a start-up message: typed messages follow.
            typed |= body.starts_with(&[0, 3, 0, 0]);
            server.write_all(head).await?;
            server.write_all(&body).await?;
        }
    }

    /// From now on, a connection that sends an Execute gets no answer back.
    pub fn lose_answers(&self) {
        self.losing.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Answers go through again; the connections that lost some are closed.
    pub fn cut_lossy(&self) {
        self.losing.store(false, std::sync::atomic::Ordering::Release);
        self.cut.send_modify(|generation| *generation += 1);
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
