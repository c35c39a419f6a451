//! gavel's load generator. Closed loop: each of N connections (one user each)
//! sends its next request as soon as the previous one is answered. Open model
//! (`--rate`): requests at a fixed arrival rate, latency counted from each
//! request's intended send time (no coordinated omission). Either way the
//! load and its clock start once every connection is open.
//!
//! ```text
//! gavel-bench hot_auction   --target 127.0.0.1:8080 --connections 64 --seconds 10
//! gavel-bench many_auctions --target 127.0.0.1:8080 --auctions 10000 --zipf 1.0
//! gavel-bench reads | http_ceiling | ws_fanout | ws_idle  [...]
//! gavel-bench table RESULTS.jsonl [--json PATH]
//! ```
//!
//! `hot_auction` registers the users, creates one auction (increment 1) and
//! has every connection bid the next value of a shared counter, so nearly all
//! bids are valid and the few that lose a race are rejected as too low.
//! `many_auctions` does the same over N auctions, each request choosing its
//! auction by a Zipf law. At the end both check every auction that took bids:
//! seq 1..n without gaps, `bid_count` = the 201s, and every 201 durable (the
//! newest bid in the store's history); for designs that answer before they
//! write, how many acknowledged bids were not yet durable when the load
//! stopped, and how long they took to get there.
//!
//! `--results PATH` appends one JSON row per scenario (labelled `--design`,
//! `--backend`, and `--label` for the scenario's name in the row, when a run
//! is not the scenario's usual one: `scripts/bench` labels the open-model runs
//! at half the closed-loop rate `hot_auction_half_rate` and
//! `many_auctions_half_rate`; such a row also says `offered_per_s`); `table`
//! prints them side by side. With `--server-pid PID`, and `--store-process
//! NAME` for the store's processes, an HTTP scenario's row also says what a
//! request cost them in CPU time while the load ran (`cpu.rs`).

mod cpu;
mod http;
mod table;
mod ws;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use http::Connection;

#[derive(Clone)]
struct Options {
    scenario: String,
    target: String,
    /// `--targets A,B,C`: the load's connections go to these in turn (a
    /// cluster's nodes); setup and checks use the first. Default: `target`.
    targets: Vec<String>,
    connections: usize,
    seconds: u64,
    /// Open model: total requests per second, spread over the connections;
    /// latency counts from each request's intended send time. 0 = closed loop.
    rate: u64,
    /// ws_fanout: watchers of the auction, and how many of them time every event.
    watchers: usize,
    probes: usize,
    /// ws_fanout, ws_idle: offer `permessage-deflate`, as browsers do.
    deflate: bool,
    /// The server process: ws_idle and live_actors read its resident
    /// memory; the HTTP scenarios its CPU time per request (`cpu.rs`).
    server_pid: Option<u32>,
    /// The HTTP scenarios: processes of these names, comma-separated (the
    /// store's: `postgres`), whose CPU time per request the row reports too.
    store_process: Option<String>,
    /// many_auctions: how many auctions, and the Zipf exponent of their popularity.
    auctions: usize,
    zipf: f64,
    /// hot_auction_uncoordinated (set by the scenario): each connection bids
    /// its own rising amounts instead of the next value of a shared counter.
    uncoordinated: bool,
    /// Labels of the JSON rows, and where to append them. `label` names the
    /// row's scenario instead of the scenario run (`hot_auction_half_rate`
    /// for `hot_auction --rate R`).
    design: String,
    backend: String,
    label: Option<String>,
    results: Option<String>,
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| usage());
    let mut options = Options {
        scenario,
        target: "127.0.0.1:8080".to_owned(),
        targets: Vec::new(),
        connections: 64,
        seconds: 10,
        rate: 0,
        watchers: 10_000,
        probes: 100,
        deflate: false,
        server_pid: None,
        store_process: None,
        auctions: 10_000,
        zipf: 1.0,
        uncoordinated: false,
        design: "gavel".to_owned(),
        backend: "sqlite".to_owned(),
        label: None,
        results: None,
    };
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--target" => options.target = value,
            "--targets" => {
                options.targets = value.split(',').filter(|target| !target.is_empty()).map(str::to_owned).collect();
                options.target = options.targets.first().cloned().unwrap_or_else(|| usage());
            }
            "--connections" => options.connections = value.parse().unwrap_or_else(|_| usage()),
            "--seconds" => options.seconds = value.parse().unwrap_or_else(|_| usage()),
            "--rate" => options.rate = value.parse().unwrap_or_else(|_| usage()),
            "--watchers" => options.watchers = value.parse().unwrap_or_else(|_| usage()),
            "--probes" => options.probes = value.parse().unwrap_or_else(|_| usage()),
            "--compression" => {
                options.deflate = match value.as_str() {
                    "deflate" => true,
                    "none" => false,
                    _ => usage(),
                }
            }
            "--server-pid" => options.server_pid = Some(value.parse().unwrap_or_else(|_| usage())),
            "--store-process" => options.store_process = Some(value),
            "--auctions" => options.auctions = value.parse().unwrap_or_else(|_| usage()),
            "--zipf" => options.zipf = value.parse().unwrap_or_else(|_| usage()),
            "--design" => options.design = value,
            "--backend" => options.backend = value,
            "--label" => options.label = Some(value),
            "--results" => options.results = Some(value),
            _ => usage(),
        }
    }
    if options.connections == 0 || options.auctions == 0 || options.zipf.is_nan() || options.zipf < 0.0 {
        usage();
    }
    if options.targets.is_empty() {
        options.targets.push(options.target.clone());
    }
    options
}

impl Options {
    /// The node the load's `index`-th connection talks to.
    fn target_for(&self, index: usize) -> String {
        self.targets[index % self.targets.len()].clone()
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: gavel-bench hot_auction|hot_auction_uncoordinated|many_auctions|reads|http_ceiling|ws_fanout|ws_fanout_cross_node|ws_idle|forward_cost|overload|live_actors [--target HOST:PORT] [--targets HOST:PORT,...] \
         [--connections N] [--seconds S] [--rate PER_SECOND] [--watchers W] [--probes P] [--compression none|deflate] [--server-pid PID] [--store-process NAME[,NAME]] \
         [--auctions N] [--zipf S] [--design NAME] [--backend NAME] [--label SCENARIO] [--results PATH]\n       \
         gavel-bench table RESULTS.jsonl [--json PATH]"
    );
    std::process::exit(2)
}

/// Rejections the load provokes on purpose: not errors.
const EXPECTED_REJECTIONS: [&str; 2] = ["BID_TOO_LOW", "ALREADY_LEADING"];

struct Report {
    latency: Histogram<u64>,
    /// From the moment each request was sent (not its intended time): the
    /// node's own answer time, split into accepted bids and refusals for
    /// load (429, 503).
    accepted_service: Histogram<u64>,
    refused_service: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    /// Transport failures (no answer).
    errors: u64,
    /// Open model: requests still waiting for their connection a second after
    /// the run's end, never sent (this client could not keep up).
    unsent: u64,
    /// (auction index, seq) of every 201.
    accepted: Vec<(u32, i64)>,
    /// When each 201 was read (wall clock, microseconds), in `accepted`'s order.
    acknowledged_at_us: Vec<i64>,
    /// Error codes of the non-2xx answers.
    codes: BTreeMap<String, u64>,
    /// CPU time the server and the store spent while the load ran, when
    /// asked (`--server-pid`, `--store-process`).
    cpu: Option<cpu::Spent>,
}

impl Report {
    fn new() -> Report {
        Report {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            accepted_service: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            refused_service: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            statuses: BTreeMap::new(),
            errors: 0,
            unsent: 0,
            accepted: Vec::new(),
            acknowledged_at_us: Vec::new(),
            codes: BTreeMap::new(),
            cpu: None,
        }
    }

    fn merge(&mut self, other: Report) {
        self.latency.add(&other.latency).expect("same bounds");
        self.accepted_service.add(&other.accepted_service).expect("same bounds");
        self.refused_service.add(&other.refused_service).expect("same bounds");
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.errors += other.errors;
        self.unsent += other.unsent;
        self.accepted.extend(other.accepted);
        self.acknowledged_at_us.extend(other.acknowledged_at_us);
        for (code, count) in other.codes {
            *self.codes.entry(code).or_default() += count;
        }
    }

    /// No answer, a 5xx, or a rejection the load did not ask for.
    fn error_count(&self) -> u64 {
        let unexpected: u64 = self
            .codes
            .iter()
            .filter(|(code, _)| !EXPECTED_REJECTIONS.contains(&code.as_str()))
            .map(|(_, count)| count)
            .sum();
        self.errors + unexpected
    }

    fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Bids the node decided: accepted (201) or rejected by the rules (409).
    fn decided(&self) -> u64 {
        self.count(201) + self.count(409)
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
    if std::env::args().nth(1).as_deref() == Some("table") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        match args.as_slice() {
            [results] => table::print(results, None),
            [results, flag, json] if flag == "--json" => table::print(results, Some(json)),
            _ => usage(),
        }
        return;
    }
    let options = parse_options();
    match options.scenario.as_str() {
        "hot_auction" => hot_auction(&options, "hot_auction").await,
        "hot_auction_uncoordinated" => {
            hot_auction(&Options { uncoordinated: true, ..options.clone() }, "hot_auction_uncoordinated").await
        }
        "many_auctions" => many_auctions(&options).await,
        "reads" => reads(&options).await,
        "forward_cost" => forward_cost(&options).await,
        "http_ceiling" => http_ceiling(&options).await,
        "ws_fanout" => ws_fanout(&options, false).await,
        "ws_fanout_cross_node" => ws_fanout(&options, true).await,
        "overload" => overload(&options).await,
        "live_actors" => live_actors(&options).await,
        "ws_idle" => {
            let target = options.target.parse().unwrap_or_else(|_| usage());
            ws::idle(
                target,
                options.connections,
                options.server_pid,
                Duration::from_secs(options.seconds),
                options.deflate,
            )
            .await
        }
        _ => usage(),
    }
}

/// Closed loop of GETs on `path` over every connection: the report and its duration.
async fn get_load(options: &Options, path: String) -> (Report, Duration) {
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let mut tasks = Vec::new();
    for index in 0..options.connections {
        let target = options.target_for(index);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = Report::new();
            let mut connection = Connection::open(&target).await.expect("connect");
            while Instant::now() < deadline {
                let started = Instant::now();
                match connection.request("GET", &path, None, None).await {
                    Ok(response) => {
                        report.latency.record(started.elapsed().as_micros() as u64).ok();
                        *report.statuses.entry(response.status).or_default() += 1;
                        if response.status >= 400 {
                            *report.codes.entry(error_code(&response.body)).or_default() += 1;
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
    let watch = cpu::Watch::start(options.server_pid, options.store_process.as_deref());
    let started = Instant::now();
    let mut report = collect(tasks).await;
    report.cpu = watch.map(cpu::Watch::stop);
    (report, started.elapsed())
}

/// The same server's cheapest endpoint: the transport's ceiling.
async fn http_ceiling(options: &Options) {
    let (report, elapsed) = get_load(options, "/health".to_owned()).await;
    let throughput = report.count(200) as f64 / elapsed.as_secs_f64();
    finish(options, "http_ceiling", &report, elapsed, throughput, None);
}

/// Closed-loop GETs of one auction's state (with a few bids on it).
async fn reads(options: &Options) {
    let (mut connection, tokens, auction_id) = auction_with_bidders(options, 2).await;
    let path = format!("/api/v1/auctions/{auction_id}/bids");
    for (round, token) in tokens.iter().cycle().take(10).enumerate() {
        let body = json!({"amount": 1 + 2 * round as i64});
        let (status, reply) = json_call(&mut connection, "POST", &path, Some(token), body).await;
        assert_eq!(status, 201, "setup bid: {reply}");
    }
    let (report, elapsed) = get_load(options, format!("/api/v1/auctions/{auction_id}")).await;
    let throughput = report.count(200) as f64 / elapsed.as_secs_f64();
    finish(options, "reads", &report, elapsed, throughput, None);
}

/// One auction, every connection a bidder. Coordinated: each bid is the next
/// value of a shared counter, so bids rise in send order and few are too low.
/// Uncoordinated, as independent bidders do: each connection raises its own
/// amount by two increments per bid, and after a `409 BID_TOO_LOW` bids the
/// `min_bid` it was told; most bids are then rejected.
async fn hot_auction(options: &Options, scenario: &str) {
    let (_, tokens, auction_id) = auction_with_bidders(options, options.connections).await;
    let auctions = vec![auction_id];
    let started = Instant::now();
    let report = bid_load(options, tokens, &auctions, None).await;
    let elapsed = started.elapsed();
    let verdict = verify(options, &auctions, &report).await;
    let throughput = report.count(201) as f64 / elapsed.as_secs_f64();
    finish(options, scenario, &report, elapsed, throughput, Some(verdict));
}

async fn many_auctions(options: &Options) {
    let tokens = register(&options.target, options.connections + 1).await;
    let opening = Instant::now();
    let auctions = create_auctions(options, &tokens[0], options.auctions).await;
    println!("  {} auctions created in {:.1} s", auctions.len(), opening.elapsed().as_secs_f64());
    let zipf = Arc::new(Zipf::new(auctions.len(), options.zipf));
    let started = Instant::now();
    let report = bid_load(options, tokens.into_iter().skip(1).collect(), &auctions, Some(zipf)).await;
    let elapsed = started.elapsed();
    let verdict = verify(options, &auctions, &report).await;
    let throughput = report.count(201) as f64 / elapsed.as_secs_f64();
    finish(options, "many_auctions", &report, elapsed, throughput, Some(verdict));
}

/// `--auctions` auctions live at once, each with one bid: how fast they are
/// opened (each opening starts its actor), how fast their first bids are
/// taken, and with `--server-pid` what the node's resident memory grew by, per
/// auction. The node's own count of live actors says they all stayed up.
async fn live_actors(options: &Options) {
    let tokens = register(&options.target, options.connections + 1).await;
    let before = options.server_pid.and_then(ws::resident_kib);
    let opening = Instant::now();
    let auctions = Arc::new(create_auctions(options, &tokens[0], options.auctions).await);
    let opened_in = opening.elapsed();
    let bidding = Instant::now();
    let mut tasks = Vec::new();
    for (index, token) in tokens[1..].iter().enumerate() {
        let (target, token, auctions) = (options.target.clone(), token.clone(), auctions.clone());
        let stride = options.connections;
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&target).await.expect("connect");
            let mut accepted = 0u64;
            for auction in auctions.iter().skip(index).step_by(stride) {
                let path = format!("/api/v1/auctions/{auction}/bids");
                let response = connection
                    .request("POST", &path, Some(&token), Some(b"{\"amount\":1}".as_slice()))
                    .await
                    .expect("an answer");
                assert_eq!(response.status, 201, "{}", String::from_utf8_lossy(&response.body));
                accepted += 1;
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.expect("bidder");
    }
    let bid_in = bidding.elapsed();
    let after = options.server_pid.and_then(ws::resident_kib);
    let mut connection = Connection::open(&options.target).await.expect("connect");
    let metrics = connection.request("GET", "/metrics", None, None).await.expect("metrics");
    let live = String::from_utf8_lossy(&metrics.body)
        .lines()
        .find_map(|line| line.strip_prefix("gavel_live_auctions "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or(-1.0);
    let per_auction_bytes = match (before, after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 * 1024.0 / auctions.len() as f64),
        _ => None,
    };
    println!(
        "scenario live_actors: {} auctions opened in {:.1} s ({:.0}/s), {accepted} first bids in {:.1} s ({:.0}/s), \
         {live} live actors",
        auctions.len(),
        opened_in.as_secs_f64(),
        auctions.len() as f64 / opened_in.as_secs_f64(),
        bid_in.as_secs_f64(),
        accepted as f64 / bid_in.as_secs_f64(),
    );
    if let (Some(before), Some(after), Some(per)) = (before, after, per_auction_bytes) {
        // Fewer live actors than open auctions when the node passivates some to stay under its bound.
        let per_live_actor = after.saturating_sub(before) as f64 * 1024.0 / live.max(1.0);
        println!(
            "  node RSS {} MiB before, {} MiB after: {per:.0} bytes per open auction, {per_live_actor:.0} per live actor",
            before / 1024,
            after / 1024
        );
    }
    append_row(
        options,
        &json!({"design": options.design, "backend": options.backend, "scenario": "live_actors",
            "auctions": auctions.len(), "opened_per_s": (auctions.len() as f64 / opened_in.as_secs_f64()).round(),
            "first_bids_per_s": (accepted as f64 / bid_in.as_secs_f64()).round(), "live_actors": live,
            "rss_before_mib": before.map(|kib| kib / 1024), "rss_after_mib": after.map(|kib| kib / 1024),
            "bytes_per_auction": per_auction_bytes.map(f64::round)}),
    );
}

/// Ten times what the node sustains, then half of it. Three legs on the hot
/// auction, each on an auction of its own (so each starts from the opening
/// price): a closed loop over `--connections` for 5 s measures the capacity C
/// (accepted bids a second); an open model offers 10 x C for `--seconds` over
/// 64 times as many connections (the bidders' tokens reused), so that the
/// node, not this client's connections, holds the excess; then 0.5 x C for
/// 5 s. What this client could not send in time is counted as unsent. For each leg: accepted bids' and refusals' answer times (from
/// the moment each request was sent: the node's, not this client's backlog),
/// how the excess was answered, and with `--server-pid` the node's peak
/// resident memory.
async fn overload(options: &Options) {
    let tokens = register(&options.target, options.connections + 1).await;
    let auctions = create_auctions(options, &tokens[0], 3).await;
    let bidders: Vec<String> = tokens[1..].to_vec();
    let leg = |seconds: u64, rate: u64, connections: usize| Options { seconds, rate, connections, ..options.clone() };
    let run = |leg: Options, auction: String, bidders: Vec<String>| async move {
        let tokens: Vec<String> = bidders.iter().cycle().take(leg.connections).cloned().collect();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sampler = leg.server_pid.map(|pid| {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(kib) = ws::resident_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let started = Instant::now();
        let report = bid_load(&leg, tokens, &[auction], None).await;
        let elapsed = started.elapsed();
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        (report, elapsed, peak.load(Ordering::Relaxed))
    };
    ws::raise_open_files(options.connections as u64 * 64 + 1_024);
    let (calibration, elapsed, _) = run(leg(5, 0, options.connections), auctions[0].clone(), bidders.clone()).await;
    let capacity = calibration.count(201) as f64 / elapsed.as_secs_f64();
    println!(
        "scenario overload: capacity {capacity:.0} accepted bids/s (closed loop, {} connections)",
        options.connections
    );
    let offered = (capacity * 10.0).round().max(1.0) as u64;
    let (overload, overload_elapsed, overload_peak) =
        run(leg(options.seconds, offered, options.connections * 64), auctions[1].clone(), bidders.clone()).await;
    let recovery_rate = (capacity * 0.5).round().max(1.0) as u64;
    let (recovery, recovery_elapsed, recovery_peak) =
        run(leg(5, recovery_rate, options.connections), auctions[2].clone(), bidders).await;
    let mut row = json!({"design": options.design, "backend": options.backend, "scenario": "overload",
        "capacity_per_s": capacity.round(), "connections": options.connections});
    for (name, report, elapsed, rate, peak) in [
        ("overload", &overload, overload_elapsed, offered, overload_peak),
        ("recovery", &recovery, recovery_elapsed, recovery_rate, recovery_peak),
    ] {
        let seconds = elapsed.as_secs_f64();
        let answered: u64 = report.statuses.values().sum();
        let ms = |histogram: &Histogram<u64>, quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
        let refused = report.count(503) + report.count(429);
        println!(
            "  {name}: offered {rate}/s, answered {:.0}/s: accepted {:.0}/s (p50 {:.1} ms, p99 {:.1} ms), \
             refused {:.0}/s (p50 {:.1} ms, p99 {:.1} ms); statuses {:?}, transport errors {}, unsent {}{}",
            answered as f64 / seconds,
            report.count(201) as f64 / seconds,
            ms(&report.accepted_service, 0.5),
            ms(&report.accepted_service, 0.99),
            refused as f64 / seconds,
            ms(&report.refused_service, 0.5),
            ms(&report.refused_service, 0.99),
            report.statuses,
            report.errors,
            report.unsent,
            if peak > 0 { format!(", node RSS peak {} MiB", peak / 1024) } else { String::new() },
        );
        row[name] = json!({
            "offered_per_s": rate, "answered_per_s": (answered as f64 / seconds).round(),
            "accepted_per_s": (report.count(201) as f64 / seconds).round(),
            "accepted_p50_ms": ms(&report.accepted_service, 0.5), "accepted_p99_ms": ms(&report.accepted_service, 0.99),
            "refused_per_s": (refused as f64 / seconds).round(),
            "refused_p50_ms": ms(&report.refused_service, 0.5), "refused_p99_ms": ms(&report.refused_service, 0.99),
            "statuses": report.statuses, "transport_errors": report.errors, "unsent": report.unsent,
            "rss_peak_mib": peak / 1024,
            "codes": report.codes,
        });
    }
    append_row(options, &row);
}

/// The address of the node that owns `auction_id`, and of one that does not
/// (from `GET /api/v1/cluster` and `GET /api/v1/cluster/auctions/{id}`).
async fn owner_and_other(connection: &mut Connection, auction_id: &str) -> (String, String) {
    let (status, cluster) = json_call(connection, "GET", "/api/v1/cluster", None, Value::Null).await;
    assert_eq!(status, 200, "GET /api/v1/cluster: {cluster}");
    let path = format!("/api/v1/cluster/auctions/{auction_id}");
    let (status, owner) = json_call(connection, "GET", &path, None, Value::Null).await;
    assert_eq!(status, 200, "{path}: {owner}");
    let nodes = cluster["nodes"].as_array().expect("nodes");
    let address = |node: &Value| node["advertise_url"].as_str().expect("url").trim_start_matches("http://").to_owned();
    let owner_node = nodes.iter().find(|node| node["node_id"] == owner["owner"]).expect("the owner is a live node");
    let other_node =
        nodes.iter().find(|node| node["node_id"] != owner["owner"]).expect("a cluster of two nodes or more");
    (address(owner_node), address(other_node))
}

/// What forwarding adds to a bid (a cluster, `--targets` its nodes): one
/// auction bid on through the node that owns it, then another through a node
/// that does not, the same load each time (best with `--rate`, open model).
async fn forward_cost(options: &Options) {
    let tokens = register(&options.target, options.connections + 1).await;
    let mut connection = Connection::open(&options.target).await.expect("connect");
    let mut legs = Vec::new();
    for scenario in ["forward_cost_local", "forward_cost_forwarded"] {
        let (status, auction) =
            json_call(&mut connection, "POST", "/api/v1/auctions", Some(&tokens[0]), auction_body()).await;
        assert_eq!(status, 201, "create auction: {auction}");
        let auction_id = auction["id"].as_str().expect("id").to_owned();
        let (owner, other) = owner_and_other(&mut connection, &auction_id).await;
        let target = if scenario == "forward_cost_local" { owner } else { other };
        legs.push((scenario, auction_id, target));
    }
    for (scenario, auction_id, target) in legs {
        println!("  {scenario}: auction {auction_id} through {target}");
        let mut leg = options.clone();
        leg.targets = vec![target];
        let auctions = vec![auction_id];
        let started = Instant::now();
        let report = bid_load(&leg, tokens[1..].to_vec(), &auctions, None).await;
        let elapsed = started.elapsed();
        let throughput = report.count(201) as f64 / elapsed.as_secs_f64();
        let verdict = verify(options, &auctions, &report).await;
        finish(options, scenario, &report, elapsed, throughput, Some(verdict));
    }
}

fn auction_body() -> Value {
    json!({"title": "bench", "currency": "EUR", "starting_price": 1, "min_increment": 1, "duration_secs": 3600})
}

/// Registers a seller and `bidders` bidders and creates one auction
/// (increment 1); the bidders' tokens and the auction's id.
async fn auction_with_bidders(options: &Options, bidders: usize) -> (Connection, Vec<String>, String) {
    let tokens = register(&options.target, bidders + 1).await;
    let mut connection = Connection::open(&options.target).await.expect("connect");
    let (status, auction) =
        json_call(&mut connection, "POST", "/api/v1/auctions", Some(&tokens[0]), auction_body()).await;
    assert_eq!(status, 201, "create auction: {auction}");
    let auction_id = auction["id"].as_str().expect("id").to_owned();
    (connection, tokens.into_iter().skip(1).collect(), auction_id)
}

/// `count` auctions of one seller, created over all the connections at once.
async fn create_auctions(options: &Options, seller: &str, count: usize) -> Vec<String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..options.connections.min(count) {
        let (target, seller, next) = (options.target.clone(), seller.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&target).await.expect("connect");
            let mut made = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let (status, auction) =
                    json_call(&mut connection, "POST", "/api/v1/auctions", Some(&seller), auction_body()).await;
                assert_eq!(status, 201, "create auction: {auction}");
                made.push(auction["id"].as_str().expect("id").to_owned());
            }
            made
        }));
    }
    let mut auctions = Vec::with_capacity(count);
    for task in tasks {
        auctions.extend(task.await.expect("create task"));
    }
    auctions
}

/// Zipf-distributed auction indexes: index k (0-based) with weight 1/(k+1)^s.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(count: usize, exponent: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=count)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self, random: &mut Random) -> usize {
        let total = *self.cumulative.last().expect("at least one auction");
        let point = random.unit() * total;
        self.cumulative.partition_point(|&edge| edge <= point).min(self.cumulative.len() - 1)
    }
}

/// xorshift64*: a small, fast generator for choosing auctions.
struct Random(u64);

impl Random {
    fn seeded(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every bidder on its own connection, closed loop or paced (`--rate`); each
/// request bids on one of `auctions` (the first, or one chosen by `zipf`).
///
/// The load starts once every connection is open and its report made (the
/// open model's clock too): a connection still opening, or a generator still
/// zeroing its histograms, is not the server's latency.
async fn bid_load(options: &Options, tokens: Vec<String>, auctions: &[String], zipf: Option<Arc<Zipf>>) -> Report {
    let paths: Arc<Vec<String>> = Arc::new(auctions.iter().map(|id| format!("/api/v1/auctions/{id}/bids")).collect());
    let counters: Arc<Vec<AtomicI64>> = Arc::new(auctions.iter().map(|_| AtomicI64::new(1)).collect());
    let ready = Arc::new(tokio::sync::Barrier::new(tokens.len() + 1));
    let (start_sender, start) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let seconds = Duration::from_secs(options.seconds);
    let mut tasks = Vec::new();
    let mut ticket_senders = Vec::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let target = options.target_for(index);
        let (paths, counters, zipf) = (paths.clone(), counters.clone(), zipf.clone());
        let (ready, mut start) = (ready.clone(), start.clone());
        let (ticket_sender, mut tickets) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        ticket_senders.push(ticket_sender);
        let open_model = options.rate > 0;
        let uncoordinated = options.uncoordinated;
        tasks.push(tokio::spawn(async move {
            let mut report = Report::new();
            // Uncoordinated: this connection's next amount.
            let mut own_next: i64 = 1;
            let mut random = Random::seeded(index as u64 + 1);
            let connection = Connection::open(&target).await;
            // Past the barrier even when the connection failed, so that the others are not held.
            ready.wait().await;
            let mut connection = connection.expect("connect");
            let began = start.wait_for(Option::is_some).await.ok().and_then(|began| *began);
            let deadline = began.expect("the load's start is sent once every connection is ready") + seconds;
            loop {
                // Open model: the pacer names each request's send time;
                // latency counts from that time, so a late send is not forgiven
                // (coordinated omission). Closed loop: next request at once.
                let started = if open_model {
                    match tickets.recv().await {
                        // A backlog this connection cannot send in time is
                        // counted, not sent after the run.
                        Some(_) if Instant::now() > deadline + Duration::from_secs(1) => {
                            report.unsent += 1;
                            while tickets.try_recv().is_ok() {
                                report.unsent += 1;
                            }
                            break;
                        }
                        Some(slot) => slot,
                        None => break,
                    }
                } else {
                    if Instant::now() >= deadline {
                        break;
                    }
                    Instant::now()
                };
                let auction = zipf.as_ref().map_or(0, |zipf| zipf.sample(&mut random));
                // The amount is fixed at the moment of sending, so amounts rise in
                // send order. Steps of two increments: a challenger who stays behind
                // a proxy maximum moves the price to its amount plus one increment.
                let amount = if uncoordinated {
                    let amount = own_next;
                    own_next += 2;
                    amount
                } else {
                    counters[auction].fetch_add(2, Ordering::Relaxed)
                };
                let body = format!("{{\"amount\":{amount}}}");
                let sent = Instant::now();
                match connection.request("POST", &paths[auction], Some(&token), Some(body.as_bytes())).await {
                    Ok(response) => {
                        report.latency.record(started.elapsed().as_micros() as u64).ok();
                        let service = sent.elapsed().as_micros() as u64;
                        match response.status {
                            201 => report.accepted_service.record(service).ok(),
                            429 | 503 => report.refused_service.record(service).ok(),
                            _ => None,
                        };
                        *report.statuses.entry(response.status).or_default() += 1;
                        if response.status >= 400 {
                            // Parsed once: most answers are 409s in the uncoordinated scenario.
                            let reply: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                            let code = reply["error"]["code"].as_str().unwrap_or("?");
                            *report.codes.entry(code.to_owned()).or_default() += 1;
                            if uncoordinated && let Some(min_bid) = reply["error"]["min_bid"].as_i64() {
                                own_next = own_next.max(min_bid);
                            }
                        }
                        if response.status == 201 {
                            let reply: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                            report.accepted.push((auction as u32, reply["seq"].as_i64().unwrap_or(-1)));
                            report.acknowledged_at_us.push(ws::now_us());
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
    ready.wait().await;
    let watch = cpu::Watch::start(options.server_pid, options.store_process.as_deref());
    let began = Instant::now();
    start_sender.send_replace(Some(began));
    if options.rate > 0 {
        spawn_pacer(options.rate, began + seconds, ticket_senders);
    } else {
        drop(ticket_senders);
    }
    let mut report = collect(tasks).await;
    report.cpu = watch.map(cpu::Watch::stop);
    report
}

/// W watchers on one auction while bids arrive at `--rate`; delivery latency
/// from the probes.
async fn ws_fanout(options: &Options, cross_node: bool) {
    ws::raise_open_files(options.watchers as u64 + options.connections as u64 + 1_024);
    let (mut connection, tokens, auction_id) = auction_with_bidders(options, options.connections).await;
    // Across nodes: the bids go to the auction's owner, the watchers to another
    // node, so every event crosses Redis before it reaches them.
    let mut bidding = options.clone();
    let watched = if cross_node {
        let (owner, other) = owner_and_other(&mut connection, &auction_id).await;
        println!("  bids to the owner {owner}, watchers on {other}");
        bidding.targets = vec![owner];
        other
    } else {
        options.target.clone()
    };
    let target: std::net::SocketAddr = watched.parse().unwrap_or_else(|_| usage());
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
        let stream =
            ws::watcher(target, ws::source_for(index), &auction_id, options.deflate).await.expect("open a watcher");
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
    let auctions = vec![auction_id];
    let started = Instant::now();
    let report = bid_load(&bidding, tokens, &auctions, None).await;
    let elapsed = started.elapsed();
    let verdict = verify(options, &auctions, &report).await;
    let accepted = report.count(201);
    last_seq.store(accepted.max(1), Ordering::Relaxed);
    // The probes stop once they have seen the last bid (or at the deadline).
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    // Acknowledged -> delivered: from the moment the bidder read the bid's
    // 201 (sent after the owner's commit) to the frame at a watcher.
    let acknowledged: HashMap<u64, i64> =
        report.accepted.iter().zip(&report.acknowledged_at_us).map(|(&(_, seq), &at)| (seq as u64, at)).collect();
    let mut after_ack = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let mut before_ack = 0u64;
    let (mut events, mut snapshots, mut gaps, mut complete) = (0, 0, 0, 0);
    for probe in probes {
        let probe = probe.await.expect("probe");
        latency.add(&probe.latency).expect("same bounds");
        for (seq, arrived_us) in &probe.arrivals_us {
            if let Some(acked_us) = acknowledged.get(seq) {
                before_ack += u64::from(arrived_us < acked_us);
                after_ack.record((arrived_us - acked_us).max(1) as u64).ok();
            }
        }
        events += probe.events;
        snapshots += probe.snapshots;
        gaps += probe.gaps;
        complete += u64::from(probe.last_seq == accepted);
    }
    let discarded = totals.bytes.load(Ordering::Relaxed) - bytes_before;
    print_report("ws_fanout (bids)", &report, elapsed, Some(&verdict));
    let ms = |quantile: f64| latency.value_at_quantile(quantile) as f64 / 1000.0;
    let deliveries = (accepted * options.watchers as u64) as f64 / elapsed.as_secs_f64();
    let scenario = if cross_node { "ws_fanout_cross_node" } else { "ws_fanout" };
    println!(
        "scenario {scenario}: {} watchers{}, {accepted} events in {:.1} s = {:.0} events/s = {deliveries:.0} deliveries/s",
        options.watchers,
        if options.deflate { " (permessage-deflate)" } else { "" },
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64(),
    );
    println!(
        "  placed -> delivered ms (probes): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        latency.max() as f64 / 1000.0
    );
    let after_ms = |quantile: f64| after_ack.value_at_quantile(quantile) as f64 / 1000.0;
    println!(
        "  acknowledged -> delivered ms (probes): p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} \
         ({before_ack} of {} frames came before their 201)",
        after_ms(0.5),
        after_ms(0.9),
        after_ms(0.99),
        after_ms(0.999),
        after_ack.max() as f64 / 1000.0,
        after_ack.len(),
    );
    let closed = totals.closed.load(Ordering::Relaxed);
    println!(
        "  probes: {events} events timed, {} resync snapshots, {gaps} gaps, {complete}/{} saw the last bid; \
         others read {:.0} MiB; {closed} connections closed",
        snapshots.saturating_sub(options.probes as u64),
        options.probes,
        discarded as f64 / 1_048_576.0,
    );
    // The row: deliveries per second, delivery latency, and as errors every
    // gap, every probe that missed the end, every dropped watcher.
    let delivery_errors = gaps + (options.probes as u64 - complete) + closed + report.error_count();
    let row = json!({
        "design": options.design, "backend": options.backend, "scenario": scenario,
        "throughput_per_s": deliveries.round(), "p50_ms": ms(0.5), "p99_ms": ms(0.99),
        "acknowledged_p50_ms": after_ms(0.5), "acknowledged_p99_ms": after_ms(0.99),
        "errors": delivery_errors, "watchers": options.watchers, "compression": if options.deflate { "deflate" } else { "none" }, "bids_per_s": accepted as f64 / elapsed.as_secs_f64(),
        "correct": verdict.ok && gaps == 0, "verdict": verdict.text,
    });
    append_row(options, &row);
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

struct Verdict {
    ok: bool,
    text: String,
    /// Acknowledged bids that were not yet in the store's history when the
    /// load stopped, and how long the last of them took to get there.
    not_durable_at_stop: u64,
    durable_after: Duration,
}

/// The newest bid in the store's history (0 if none).
async fn durable_seq(connection: &mut Connection, auction_id: &str) -> i64 {
    let (_, page) =
        json_call(connection, "GET", &format!("/api/v1/auctions/{auction_id}/bids?limit=1"), None, Value::Null).await;
    page["items"][0]["seq"].as_i64().unwrap_or(0)
}

/// After the run, for every auction that took bids: seq 1..n without gaps,
/// bid_count = n = its 201s, and all of them durable (waiting up to a minute
/// for a write-behind queue to drain).
async fn verify(options: &Options, auctions: &[String], report: &Report) -> Verdict {
    // A connection of its own, opened now: one left idle through the load
    // would have been closed by the server's keep-alive timeout.
    let mut connection = Connection::open(&options.target).await.expect("connect");
    let mut seqs: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for &(auction, seq) in &report.accepted {
        seqs.entry(auction).or_default().push(seq);
    }
    // Right at the stop: acknowledged but not yet in the history.
    let mut not_durable_at_stop = 0;
    let hottest = seqs.iter().max_by_key(|(_, list)| list.len()).map(|(&auction, list)| (auction, list.len()));
    if let Some((auction, acknowledged)) = hottest {
        let durable = durable_seq(&mut connection, &auctions[auction as usize]).await;
        not_durable_at_stop = (acknowledged as i64 - durable).max(0) as u64;
    }
    let drain_started = Instant::now();
    if let Some((auction, acknowledged)) = hottest {
        while durable_seq(&mut connection, &auctions[auction as usize]).await < acknowledged as i64
            && drain_started.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let durable_after = if not_durable_at_stop > 0 { drain_started.elapsed() } else { Duration::ZERO };

    // Every auction with bids, checked over several connections at once.
    let work: Arc<Vec<(String, Vec<i64>)>> = Arc::new(
        seqs.into_iter()
            .map(|(auction, mut list)| {
                list.sort_unstable();
                (auctions[auction as usize].clone(), list)
            })
            .collect(),
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A write-behind queue may still hold some auctions' bids: each gets until
    // a minute after the stop to be durable.
    let drained_by = drain_started + Duration::from_secs(60);
    let mut checkers = Vec::new();
    for _ in 0..options.connections.clamp(1, 16) {
        let (work, next, target) = (work.clone(), next.clone(), options.target.clone());
        checkers.push(tokio::spawn(async move {
            let mut connection = Connection::open(&target).await.expect("connect");
            let mut failures = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((auction_id, list)) = work.get(index) else { break };
                let (_, auction) =
                    json_call(&mut connection, "GET", &format!("/api/v1/auctions/{auction_id}"), None, Value::Null)
                        .await;
                let bid_count = auction["bid_count"].as_i64().unwrap_or(-1);
                let gap_free = list.iter().enumerate().all(|(index, seq)| *seq == index as i64 + 1);
                let accepted = list.len() as i64;
                let mut durable = durable_seq(&mut connection, auction_id).await;
                while durable < accepted && Instant::now() < drained_by {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    durable = durable_seq(&mut connection, auction_id).await;
                }
                if !gap_free || bid_count != accepted || durable != accepted {
                    failures.push(format!(
                        "{auction_id}: bid_count {bid_count}, 201s {accepted}, gap-free {gap_free}, newest durable {durable}"
                    ));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for checker in checkers {
        failures.extend(checker.await.expect("checker"));
    }
    let accepted = report.accepted.len();
    let checked = work.len();
    if failures.is_empty() {
        Verdict {
            ok: true,
            text: format!(
                "ok: {checked} auction(s), {accepted} 201s, each auction's seq 1..n without gaps, bid_count = its \
                 201s, all durable"
            ),
            not_durable_at_stop,
            durable_after,
        }
    } else {
        Verdict {
            ok: false,
            text: format!("FAILED in {} of {checked} auction(s), e.g. {}", failures.len(), failures[0]),
            not_durable_at_stop,
            durable_after,
        }
    }
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Report>>) -> Report {
    let mut total = Report::new();
    for task in tasks {
        total.merge(task.await.expect("load task"));
    }
    total
}

fn print_report(scenario: &str, report: &Report, elapsed: Duration, verdict: Option<&Verdict>) {
    let seconds = elapsed.as_secs_f64();
    let requests: u64 = report.statuses.values().sum();
    let ms = |quantile: f64| report.latency.value_at_quantile(quantile) as f64 / 1000.0;
    println!("scenario {scenario}: {requests} requests in {seconds:.1} s = {:.0}/s", requests as f64 / seconds);
    if let Some(accepted) = report.statuses.get(&201) {
        println!("  accepted (201): {accepted} = {:.0}/s", *accepted as f64 / seconds);
    }
    println!("  statuses: {:?}, transport errors: {}", report.statuses, report.errors);
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
    if let Some(spent) = &report.cpu {
        let (server, store) = spent.per_request_us(requests);
        let shown = |us: Option<f64>| us.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
        println!("  cpu µs per request: server {}, store {}", shown(server), shown(store));
    }
    if let Some(verdict) = verdict {
        println!("  correctness: {}", verdict.text);
        if verdict.not_durable_at_stop > 0 {
            println!(
                "  durability: {} acknowledged bids were not yet durable when the load stopped; durable {:.0} ms later",
                verdict.not_durable_at_stop,
                verdict.durable_after.as_secs_f64() * 1000.0
            );
        }
    }
}

/// Prints the report and appends its JSON row to `--results`.
fn finish(
    options: &Options,
    scenario: &str,
    report: &Report,
    elapsed: Duration,
    throughput: f64,
    verdict: Option<Verdict>,
) {
    print_report(scenario, report, elapsed, verdict.as_ref());
    let ms = |quantile: f64| report.latency.value_at_quantile(quantile) as f64 / 1000.0;
    let requests: u64 = report.statuses.values().sum();
    let mut row = json!({
        "design": options.design, "backend": options.backend,
        "scenario": options.label.as_deref().unwrap_or(scenario),
        "throughput_per_s": throughput.round(), "p50_ms": ms(0.5), "p99_ms": ms(0.99),
        "errors": report.error_count(),
        "accepted": report.count(201), "decided_per_s": (report.decided() as f64 / elapsed.as_secs_f64()).round(),
        "requests_per_s": (requests as f64 / elapsed.as_secs_f64()).round(),
        "p90_ms": ms(0.9), "p999_ms": ms(0.999), "max_ms": report.latency.max() as f64 / 1000.0,
        "connections": options.connections, "seconds": elapsed.as_secs_f64(),
        "rejections": report.codes.iter()
            .filter(|(code, _)| EXPECTED_REJECTIONS.contains(&code.as_str()))
            .map(|(_, count)| count).sum::<u64>(),
    });
    if scenario == "many_auctions" {
        row["auctions"] = json!(options.auctions);
        row["zipf"] = json!(options.zipf);
    }
    if options.rate > 0 {
        row["offered_per_s"] = json!(options.rate);
    }
    if let Some(spent) = &report.cpu {
        let (server, store) = spent.per_request_us(requests);
        let rounded = |us: Option<f64>| us.map(|us| (us * 10.0).round() / 10.0);
        row["server_cpu_us_per_request"] = json!(rounded(server));
        row["store_cpu_us_per_request"] = json!(rounded(store));
    }
    if let Some(verdict) = verdict {
        row["correct"] = json!(verdict.ok);
        row["verdict"] = json!(verdict.text);
        row["not_durable_at_stop"] = json!(verdict.not_durable_at_stop);
        row["durable_after_ms"] = json!((verdict.durable_after.as_secs_f64() * 1000.0).round());
    }
    append_row(options, &row);
}

fn append_row(options: &Options, row: &Value) {
    let Some(path) = &options.results else { return };
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the --results file");
    writeln!(file, "{row}").expect("write a result row");
}

fn error_code(body: &[u8]) -> String {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    parsed["error"]["code"].as_str().unwrap_or("?").to_owned()
}
