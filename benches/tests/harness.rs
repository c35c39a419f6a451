//! The benchmark harness end to end, small: gavel (in-process, SQLite) and
//! each baseline (its real binary, a fresh Postgres database, Redis) run every
//! scenario for a second through the real load generator, and every row must
//! be correct, error-free and complete; then `table` prints them and writes
//! the JSON list that `scripts/bench --json` promises.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;

const SCENARIOS: [&str; 5] = ["http_ceiling", "hot_auction", "hot_auction_uncoordinated", "many_auctions", "reads"];

fn postgres_base_url() -> String {
    std::env::var("GAVEL_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

fn redis_url() -> String {
    std::env::var("GAVEL_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn fresh_postgres_database() -> String {
    let name = format!("gavel_test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_base_url())).await.expect("Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.expect("create db");
    format!("{}/{name}", postgres_base_url())
}

async fn bench(address: &str, design: &str, scenario: &str, results: &Path, extra: &[&str]) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gavel-bench"));
    command
        .arg(scenario)
        .args(["--target", address, "--seconds", "1", "--connections", "8", "--auctions", "200"])
        .args(["--design", design, "--backend", if design == "gavel" { "sqlite" } else { "postgres" }])
        .arg("--results")
        .arg(results)
        .args(extra)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{design} {scenario} finishes within 2 minutes"))
        .expect("run gavel-bench");
    assert!(
        output.status.success(),
        "{design} {scenario}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// gavel in this process, its limits off as a benchmark needs: its address,
/// the sender that stops it, and its task.
async fn start_gavel(
    dir: &Path,
) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), String>>) {
    let mut config = gavel::Config::for_data_dir(dir.join("gavel"));
    config.bid_rate_per_user = 0;
    config.sign_ins_per_address = 0;
    let application = gavel::Application::build(config).await.expect("build gavel");
    let address = application.local_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let server =
        tokio::spawn(async move { application.run_until_stopped(stopped).await.map_err(|error| format!("{error:#}")) });
    (address, stop, server)
}

async fn wait_for_health(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(address).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request = format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            if stream.write_all(request.as_bytes()).await.is_ok()
                && stream.read_to_string(&mut answer).await.is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{address} serves /health within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes the node's persistence actor has committed (`gavel_commit_batch_size_sum`).
async fn committed_writes(address: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
        .lines()
        .find_map(|line| line.strip_prefix("gavel_commit_batch_size_sum "))
        .map_or(0, |value| value.trim().parse::<f64>().expect("a number") as u64)
}

/// Runs `scenario` against a gavel of its own (this process, whose memory
/// it reads), and returns its row.
async fn alone_against_gavel(scenario: &str) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let results = dir.path().join("results.jsonl");
    let (address, stop, server) = start_gavel(dir.path()).await;
    let pid = std::process::id().to_string();
    bench(&address, "gavel", scenario, &results, &["--server-pid", &pid]).await;
    let _ = stop.send(());
    server.await.expect("server task").expect("gavel stops cleanly");
    last_row(&results)
}

fn last_row(results: &Path) -> Value {
    let text = std::fs::read_to_string(results).expect("results");
    serde_json::from_str(text.lines().last().expect("a row")).expect("a JSON row")
}

/// `gavel-bench table RESULTS --json LIST`: what it prints, and the list.
fn run_table(results: &Path) -> (String, Vec<Value>) {
    let list = results.with_extension("list.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gavel-bench"))
        .arg("table")
        .arg(results)
        .arg("--json")
        .arg(&list)
        .output()
        .expect("run the table");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).expect("UTF-8");
    let list = serde_json::from_str(&std::fs::read_to_string(&list).expect("the JSON list")).expect("JSON");
    (printed, list)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_design_runs_every_scenario_correctly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let results = dir.path().join("results.jsonl");

    let (address, stop, server) = start_gavel(dir.path()).await;
    for scenario in SCENARIOS {
        let committed_before = committed_writes(&address).await;
        bench(&address, "gavel", scenario, &results, &[]).await;
        if scenario == "hot_auction_uncoordinated" {
            // Rejections cost the store nothing: it committed exactly the 201s.
            let row = last_row(&results);
            let accepted = row["accepted"].as_u64().unwrap();
            assert_eq!(committed_writes(&address).await - committed_before, accepted, "{row}");
            assert!(row["rejections"].as_u64().unwrap() > accepted, "most uncoordinated bids are rejected: {row}");
        }
    }
    bench(&address, "gavel", "ws_fanout", &results, &["--watchers", "20", "--probes", "5", "--rate", "200"]).await;
    // An open-model run under a label of its own, as `scripts/bench` runs each design at half its rate.
    bench(&address, "gavel", "hot_auction", &results, &["--rate", "200", "--label", "hot_auction_half_rate"]).await;
    let row = last_row(&results);
    assert_eq!(row["scenario"], "hot_auction_half_rate", "{row}");
    assert_eq!(row["offered_per_s"], 200, "{row}");
    let _ = stop.send(());
    server.await.expect("server task").expect("gavel stops cleanly");

    for design in ["pg_row_lock", "redis_lock", "redis_lua"] {
        let address = format!("127.0.0.1:{}", free_port());
        let mut baseline = tokio::process::Command::new(env!("CARGO_BIN_EXE_gavel-baseline"))
            .args(["--design", design, "--listen", &address, "--redis-url", &redis_url()])
            .arg("--database-url")
            .arg(fresh_postgres_database().await)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the baseline");
        wait_for_health(&address).await;
        for scenario in SCENARIOS {
            bench(&address, design, scenario, &results, &[]).await;
        }
        // SIGTERM: it stops serving and removes its keys from Redis.
        let pid = baseline.id().expect("running") as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status =
            tokio::time::timeout(Duration::from_secs(30), baseline.wait()).await.expect("stops").expect("exit");
        assert!(status.success(), "{design} stopped cleanly: {status}");
    }

    let rows: Vec<Value> = std::fs::read_to_string(&results)
        .expect("results")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON row"))
        .collect();
    assert_eq!(rows.len(), SCENARIOS.len() + 2 + 3 * SCENARIOS.len(), "{rows:#?}");
    for row in &rows {
        assert!(row["throughput_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        // The bid scenarios check every auction's history; the others have no verdict.
        let scenario = row["scenario"].as_str().unwrap();
        if matches!(
            scenario,
            "hot_auction" | "hot_auction_half_rate" | "hot_auction_uncoordinated" | "many_auctions" | "ws_fanout"
        ) {
            assert_eq!(row["correct"], true, "{row}");
        }
    }

    let (table, list) = run_table(&results);
    for design in ["gavel", "pg_row_lock", "redis_lock", "redis_lua"] {
        assert!(table.lines().any(|line| line.starts_with(design)), "{design} in\n{table}");
    }
    assert_eq!(list.len(), rows.len());
    for row in &list {
        for key in ["design", "backend", "scenario"] {
            assert!(row[key].is_string(), "{key} in {row}");
        }
        for key in ["throughput_per_s", "p50_ms", "p99_ms", "errors"] {
            assert!(row[key].is_number(), "{key} in {row}");
        }
    }

    // The same rows as two rounds of `scripts/bench --rounds 2`, the second
    // at twice the throughput: one row each, the lower (median) round, both
    // rounds' figures beside it, the errors of both.
    let rounds = dir.path().join("rounds.jsonl");
    let mut text = String::new();
    for (round, factor) in [(1, 1.0), (2, 2.0)] {
        for row in &rows {
            let mut row = row.clone();
            row["round"] = round.into();
            row["throughput_per_s"] = (row["throughput_per_s"].as_f64().unwrap() * factor).into();
            text += &format!("{row}\n");
        }
    }
    std::fs::write(&rounds, text).expect("write the rounds");
    let (table, list) = run_table(&rounds);
    assert!(table.lines().next().unwrap().contains("throughput/s of each round"), "{table}");
    assert_eq!(list.len(), rows.len());
    for row in &list {
        let original = rows
            .iter()
            .find(|first| (&first["design"], &first["scenario"]) == (&row["design"], &row["scenario"]))
            .expect("every design and scenario");
        let figure = original["throughput_per_s"].as_f64().unwrap();
        assert_eq!(row["rounds"], 2, "{row}");
        assert_eq!(row["round"], 1, "{row}");
        assert_eq!(row["throughput_per_s"].as_f64().unwrap(), figure, "{row}");
        assert_eq!(row["throughput_per_s_rounds"], serde_json::json!([figure, figure * 2.0]), "{row}");
        assert_eq!(row["errors"], 0, "{row}");
    }
}

/// The overload scenario's three legs against gavel: every request is
/// answered (no transport error), only with 201, the load's own 409s, or 429
/// and 503 for the excess; the node still accepts bids during the overload and
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_every_request_and_recovers() {
    let row = alone_against_gavel("overload").await;
    assert!(row["capacity_per_s"].as_f64().unwrap() > 0.0, "{row}");
    for leg in ["overload", "recovery"] {
        let leg = &row[leg];
        assert_eq!(leg["transport_errors"], 0, "{leg}");
        assert!(leg["accepted_per_s"].as_f64().unwrap() > 0.0, "{leg}");
        for (status, _) in leg["statuses"].as_object().unwrap() {
            assert!(["201", "409", "429", "503"].contains(&status.as_str()), "{status} in {leg}");
        }
        assert!(leg["rss_peak_mib"].as_u64().unwrap() > 0, "{leg}");
    }
    let offered = row["overload"]["offered_per_s"].as_f64().unwrap();
    assert!(offered >= 9.0 * row["capacity_per_s"].as_f64().unwrap(), "{row}");
}

/// live_actors against gavel: every auction opened gets its bid, and the
/// node counts every one of them live at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_actors_keeps_every_auction_live() {
    let row = alone_against_gavel("live_actors").await;
    assert_eq!(row["auctions"], 200, "{row}");
    assert_eq!(row["live_actors"], 200.0, "{row}");
    assert!(row["opened_per_s"].as_f64().unwrap() > 0.0 && row["first_bids_per_s"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["bytes_per_auction"].is_number(), "{row}");
}

/// With `--server-pid` and `--store-process`, a scenario's row says what a
/// request cost each in CPU time while the load ran; without them it says
/// nothing of it. gavel runs in this process here, so this process is the
/// server, and, named by its own name, the store as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_tells_the_cpu_a_request_cost_when_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let results = dir.path().join("results.jsonl");
    let (address, stop, server) = start_gavel(dir.path()).await;
    let pid = std::process::id().to_string();
    let name = std::fs::read_to_string("/proc/self/comm").expect("this process's name");
    let cpu_flags = ["--server-pid", pid.as_str(), "--store-process", name.trim_end()];
    bench(&address, "gavel", "hot_auction", &results, &cpu_flags).await;
    let watched = last_row(&results);
    bench(&address, "gavel", "http_ceiling", &results, &[]).await;
    let unwatched = last_row(&results);
    let _ = stop.send(());
    server.await.expect("server task").expect("gavel stops cleanly");

    let server_us = watched["server_cpu_us_per_request"].as_f64().expect("the server's figure");
    let store_us = watched["store_cpu_us_per_request"].as_f64().expect("the store's figure");
    // Every request cost this process something, and no more than every core
    // for the whole run (and a clock tick) could give it.
    let seconds = watched["seconds"].as_f64().unwrap();
    let requests = watched["requests_per_s"].as_f64().unwrap() * seconds;
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let most_us = cores * (seconds + 0.01) * 1e6 / requests;
    for figure in [server_us, store_us] {
        assert!(figure > 0.0 && figure <= most_us, "{figure} µs per request (at most {most_us:.0}): {watched}");
    }
    assert!(unwatched.get("server_cpu_us_per_request").is_none(), "{unwatched}");
    assert!(unwatched.get("store_cpu_us_per_request").is_none(), "{unwatched}");
}
