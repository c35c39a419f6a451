//! gavel's load generator. Closed loop: each of N connections (one user each)
//! sends its next request as soon as the previous one is answered.
//!
//! ```text
//! gavel-bench hot_auction  --target 127.0.0.1:8080 --connections 64 --seconds 10
//! gavel-bench http_ceiling --target 127.0.0.1:8080 --connections 64 --seconds 10
//! ```
//!
//! `hot_auction` registers the users, creates one auction (increment 1) and
//! has every connection bid the next value of a shared counter, so nearly all
//! bids are valid and the few that lose a race are rejected as too low. At the
//! end it checks the history: seq 1..n without gaps and every 201 in it.

mod http;
mod ws;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use http::Connection;

struct Options {
    scenario: String,
    target: String,
    connections: usize,
    seconds: u64,
    /// Open model: total requests per second, spread over the connections;
    /// latency counts from each request's intended send time. 0 = closed loop.
    rate: u64,
    /// ws_fanout: watchers of the auction, and how many of them time every event.
    watchers: usize,
    probes: usize,
    /// ws_idle: the server process, to read its resident memory.
    server_pid: Option<u32>,
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| usage());
    let mut options = Options {
        scenario,
        target: "127.0.0.1:8080".to_owned(),
        connections: 64,
        seconds: 10,
        rate: 0,
        watchers: 10_000,
        probes: 100,
        server_pid: None,
    };
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--target" => options.target = value,
            "--connections" => options.connections = value.parse().unwrap_or_else(|_| usage()),
            "--seconds" => options.seconds = value.parse().unwrap_or_else(|_| usage()),
            "--rate" => options.rate = value.parse().unwrap_or_else(|_| usage()),
            "--watchers" => options.watchers = value.parse().unwrap_or_else(|_| usage()),
            "--probes" => options.probes = value.parse().unwrap_or_else(|_| usage()),
            "--server-pid" => options.server_pid = Some(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    options
}

fn usage() -> ! {
    eprintln!(
        "usage: gavel-bench hot_auction|http_ceiling|ws_fanout|ws_idle [--target HOST:PORT] [--connections N] \
         [--seconds S] [--rate PER_SECOND] [--watchers W] [--probes P] [--server-pid PID]"
    );
    std::process::exit(2)
}

struct Report {
    latency: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    accepted_seqs: Vec<i64>,
    /// Error codes of the non-2xx answers.
    codes: BTreeMap<String, u64>,
}

impl Report {
    fn new() -> Report {
        Report {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            statuses: BTreeMap::new(),
            errors: 0,
            accepted_seqs: Vec::new(),
            codes: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Report) {
        self.latency.add(&other.latency).expect("same bounds");
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.errors += other.errors;
        self.accepted_seqs.extend(other.accepted_seqs);
        for (code, count) in other.codes {
            *self.codes.entry(code).or_default() += count;
        }
    }
}

async fn json_call(
    connection: &mut Connection,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let bytes = serde_json::to_vec(&body).expect("json");
    let body = if method == "GET" { None } else { Some(bytes.as_slice()) };
    let response = connection.request(method, path, token, body).await.expect("setup request");
    (response.status, serde_json::from_slice(&response.body).unwrap_or(Value::Null))
}

async fn register(target: &str, count: usize) -> Vec<String> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut connection = Connection::open(target).await.expect("connect");
    let mut tokens = Vec::new();
    for index in 0..count {
        let username = format!("b{}_{index}", &run[20..]);
        let (status, body) = json_call(
            &mut connection,
            "POST",
            "/api/v1/auth/register",
            None,
            json!({"username": username, "password": "bench-password"}),
        )
        .await;
        assert_eq!(status, 201, "register: {body}");
        tokens.push(body["token"].as_str().expect("token").to_owned());
    }
    tokens
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = parse_options();
    match options.scenario.as_str() {
        "hot_auction" => hot_auction(&options).await,
        "http_ceiling" => http_ceiling(&options).await,
        "ws_fanout" => ws_fanout(&options).await,
        "ws_idle" => {
            let target = options.target.parse().unwrap_or_else(|_| usage());
            ws::idle(target, options.connections, options.server_pid, Duration::from_secs(options.seconds)).await
        }
        _ => usage(),
    }
}

async fn http_ceiling(options: &Options) {
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let mut tasks = Vec::new();
    for _ in 0..options.connections {
        let target = options.target.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = Report::new();
            let mut connection = Connection::open(&target).await.expect("connect");
            while Instant::now() < deadline {
                let started = Instant::now();
                match connection.request("GET", "/health", None, None).await {
                    Ok(response) => {
                        report.latency.record(started.elapsed().as_micros() as u64).ok();
                        *report.statuses.entry(response.status).or_default() += 1;
                    }
                    Err(_) => report.errors += 1,
                }
            }
            report
        }));
    }
    let started = Instant::now();
    let report = collect(tasks).await;
    print_report("http_ceiling", &report, started.elapsed(), None);
}

async fn hot_auction(options: &Options) {
    let (mut connection, tokens, auction_id) = auction_with_bidders(options).await;
    let started = Instant::now();
    let mut report = bid_load(options, tokens, &auction_id).await;
    let elapsed = started.elapsed();
    let verdict = verify(&mut connection, &auction_id, &mut report).await;
    print_report("hot_auction", &report, elapsed, Some(verdict));
}

/// Registers a seller and `connections` bidders and creates one auction
/// (increment 1); the bidders' tokens and the auction's id.
async fn auction_with_bidders(options: &Options) -> (Connection, Vec<String>, String) {
    let tokens = register(&options.target, options.connections + 1).await;
    let mut connection = Connection::open(&options.target).await.expect("connect");
    let (status, auction) = json_call(
        &mut connection,
        "POST",
        "/api/v1/auctions",
        Some(&tokens[0]),
        json!({"title": "bench", "currency": "EUR", "starting_price": 1, "min_increment": 1, "duration_secs": 3600}),
    )
    .await;
    assert_eq!(status, 201, "create auction: {auction}");
    let auction_id = auction["id"].as_str().expect("id").to_owned();
    (connection, tokens.into_iter().skip(1).collect(), auction_id)
}

/// Every bidder on its own connection, closed loop or paced (`--rate`).
async fn bid_load(options: &Options, tokens: Vec<String>, auction_id: &str) -> Report {
    let path = format!("/api/v1/auctions/{auction_id}/bids");
    let counter = Arc::new(AtomicI64::new(1));
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let mut tasks = Vec::new();
    let mut ticket_senders = Vec::new();
    for token in tokens {
        let target = options.target.clone();
        let path = path.clone();
        let counter = counter.clone();
        let (ticket_sender, mut tickets) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        ticket_senders.push(ticket_sender);
        let open_model = options.rate > 0;
        tasks.push(tokio::spawn(async move {
            let mut report = Report::new();
            let mut connection = Connection::open(&target).await.expect("connect");
            loop {
                // Open model: the pacer names each request's send time and amount;
                // latency counts from that time, so a late send is not forgiven
                // (coordinated omission). Closed loop: next request at once.
                let started = if open_model {
                    match tickets.recv().await {
                        Some(slot) => slot,
                        None => break,
                    }
                } else {
                    if Instant::now() >= deadline {
                        break;
                    }
                    Instant::now()
                };
                // The amount is fixed at the moment of sending, so amounts rise in
                // send order. Steps of two increments: a challenger who stays behind
                // a proxy maximum moves the price to its amount plus one increment.
                let amount = counter.fetch_add(2, Ordering::Relaxed);
                let body = format!("{{\"amount\":{amount}}}");
                match connection.request("POST", &path, Some(&token), Some(body.as_bytes())).await {
                    Ok(response) => {
                        report.latency.record(started.elapsed().as_micros() as u64).ok();
                        *report.statuses.entry(response.status).or_default() += 1;
                        if response.status >= 400 {
                            let code = error_code(&response.body);
                            *report.codes.entry(code).or_default() += 1;
                        }
                        if response.status == 201 {
                            let reply: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                            report.accepted_seqs.push(reply["seq"].as_i64().unwrap_or(-1));
                        }
                    }
                    Err(_) => {
                        report.errors += 1;
                        connection = match Connection::open(&target).await {
                            Ok(connection) => connection,
                            Err(_) => break,
                        };
                    }
                }
            }
            report
        }));
    }
    if options.rate > 0 {
        spawn_pacer(options.rate, deadline, ticket_senders);
    } else {
        drop(ticket_senders);
    }
    collect(tasks).await
}

/// W watchers on one auction while bids arrive at `--rate`; delivery latency
/// from the probes.
async fn ws_fanout(options: &Options) {
    let target: std::net::SocketAddr = options.target.parse().unwrap_or_else(|_| usage());
    ws::raise_open_files(options.watchers as u64 + options.connections as u64 + 1_024);
    let (mut connection, tokens, auction_id) = auction_with_bidders(options).await;
    let totals = Arc::new(ws::FanoutTotals::default());
    let last_seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut probes = Vec::new();
    let opening = Instant::now();
    // The discarding watchers read on a thread of their own, so that reading
    // thousands of sockets does not delay the bidders and probes here.
    let (discarders, mut streams) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
    let discard_totals = totals.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let mut readers = Vec::new();
            while let Some(stream) = streams.recv().await {
                let stream = tokio::net::TcpStream::from_std(stream).expect("register the socket");
                readers.push(tokio::spawn(ws::discard(stream, discard_totals.clone())));
            }
            for reader in readers {
                let _ = reader.await;
            }
        });
    });
    for index in 0..options.watchers {
        let stream = ws::watcher(target, ws::source_for(index), &auction_id).await.expect("open a watcher");
        if index < options.probes {
            probes.push(tokio::spawn(ws::probe(stream, last_seq.clone())));
        } else {
            discarders.send(stream.into_std().expect("a plain socket")).expect("the discard thread runs");
        }
    }
    drop(discarders);
    println!("  {} watchers subscribed in {:.1} s", options.watchers, opening.elapsed().as_secs_f64());
    // Let the snapshots go out before the bids start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bytes_before = totals.bytes.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut report = bid_load(options, tokens, &auction_id).await;
    let elapsed = started.elapsed();
    let verdict = verify(&mut connection, &auction_id, &mut report).await;
    let accepted = report.statuses.get(&201).copied().unwrap_or(0);
    last_seq.store(accepted.max(1), Ordering::Relaxed);
    // The probes stop once they have seen the last bid (or at the deadline).
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let (mut events, mut snapshots, mut gaps, mut complete) = (0, 0, 0, 0);
    for probe in probes {
        let probe = probe.await.expect("probe");
        latency.add(&probe.latency).expect("same bounds");
        events += probe.events;
        snapshots += probe.snapshots;
        gaps += probe.gaps;
        complete += u64::from(probe.last_seq == accepted);
    }
    let discarded = totals.bytes.load(Ordering::Relaxed) - bytes_before;
    print_report("ws_fanout (bids)", &report, elapsed, Some(verdict));
    let ms = |quantile: f64| latency.value_at_quantile(quantile) as f64 / 1000.0;
    println!(
        "scenario ws_fanout: {} watchers, {accepted} events in {:.1} s = {:.0} events/s = {:.0} deliveries/s",
        options.watchers,
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64(),
        (accepted * options.watchers as u64) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  placed -> delivered ms (probes): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1000.0
    );
    println!(
        "  probes: {events} events timed, {} resync snapshots, {gaps} gaps, {complete}/{} saw the last bid; \
         others read {:.0} MiB; {} connections closed",
        snapshots.saturating_sub(options.probes as u64),
        options.probes,
        discarded as f64 / 1_048_576.0,
        totals.closed.load(Ordering::Relaxed)
    );
}

/// The open model's clock: a thread that hands out send times at exactly
/// `rate` per second, round-robin over the connections. It sleeps between
/// tickets (never spins: the server shares the machine), so the load comes in
/// groups a sleep's granularity apart (~0.1 ms) rather than in 1 ms timer-tick
/// bursts.
fn spawn_pacer(rate: u64, deadline: Instant, connections: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>) {
    std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let begin = Instant::now();
        let mut issued: u32 = 0;
        loop {
            let slot = begin + interval * issued;
            if slot >= deadline {
                break;
            }
            let now = Instant::now();
            if slot > now + Duration::from_micros(100) {
                std::thread::sleep(slot - now);
            }
            let _ = connections[issued as usize % connections.len()].send(slot);
            issued += 1;
        }
    });
}

/// Checks the history after the run: seq 1..n, bid_count = n = number of 201s.
async fn verify(connection: &mut Connection, auction_id: &str, report: &mut Report) -> String {
    let (_, auction) = json_call(connection, "GET", &format!("/api/v1/auctions/{auction_id}"), None, Value::Null).await;
    let bid_count = auction["bid_count"].as_i64().unwrap_or(-1);
    report.accepted_seqs.sort_unstable();
    let gap_free = report.accepted_seqs.iter().enumerate().all(|(index, seq)| *seq == index as i64 + 1);
    let accepted = report.accepted_seqs.len() as i64;
    if gap_free && accepted == bid_count {
        format!("ok: seq 1..{bid_count} without gaps, bid_count = 201s = {accepted}")
    } else {
        format!("FAILED: bid_count {bid_count}, 201s {accepted}, gap-free {gap_free}")
    }
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Report>>) -> Report {
    let mut total = Report::new();
    for task in tasks {
        total.merge(task.await.expect("load task"));
    }
    total
}

fn print_report(scenario: &str, report: &Report, elapsed: Duration, verdict: Option<String>) {
    let seconds = elapsed.as_secs_f64();
    let requests: u64 = report.statuses.values().sum();
    let ms = |quantile: f64| report.latency.value_at_quantile(quantile) as f64 / 1000.0;
    println!("scenario {scenario}: {requests} requests in {seconds:.1} s = {:.0}/s", requests as f64 / seconds);
    if let Some(accepted) = report.statuses.get(&201) {
        println!("  accepted (201): {accepted} = {:.0}/s", *accepted as f64 / seconds);
    }
    println!("  statuses: {:?}, errors: {}", report.statuses, report.errors);
    if !report.codes.is_empty() {
        println!("  error codes: {:?}", report.codes);
    }
    println!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        report.latency.max() as f64 / 1000.0
    );
    if let Some(verdict) = verdict {
        println!("  correctness: {verdict}");
    }
}

fn error_code(body: &[u8]) -> String {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    parsed["error"]["code"].as_str().unwrap_or("?").to_owned()
}
