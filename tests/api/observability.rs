//! The operators' side: `/metrics` as Prometheus reads it, the Prometheus
//! configuration and alert rules (checked and unit-tested by `promtool`), the
//! Grafana dashboards' structure, and a real Prometheus scraping a node under
//! a little load, evaluating every dashboard expression and every alert rule.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use gavel_actors::node::NodeSettings;

use crate::helpers::{Backend, HasApi, ServerProcess, TestApp, eventually, free_port, metric};
use crate::ws_client::WsClient;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut command = tokio::process::Command::new("promtool");
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("promtool is installed (scripts/test installs Debian's prometheus)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).await.unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn prometheus_config_is_valid_and_every_alert_passes_its_unit_test() {
    // The local one, and compose.yaml's, which scrapes its three nodes.
    for config in ["prometheus/prometheus.yml", "prometheus/cluster.yml"] {
        let (ok, output) = promtool(&["check", "config", repo(config).to_str().unwrap()], None).await;
        assert!(ok, "{config}: {output}");
    }
    let tests = repo("prometheus/alerts_test.yml");
    let (ok, output) = promtool(&["test", "rules", tests.to_str().unwrap()], None).await;
    assert!(ok, "{output}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(repo("prometheus/alerts.yml")).unwrap();
    let tested = std::fs::read_to_string(tests).unwrap();
    for line in rules.lines().filter_map(|line| line.trim().strip_prefix("- alert: ")) {
        assert!(tested.contains(&format!("alertname: {line}")), "alert {line} has no unit test");
    }
}

/// Every series the operators' issue names, with help text, from start-up.
const REQUIRED_SERIES: &[&str] = &[
    "gavel_bids_total",
    "gavel_bid_latency_seconds",
    "gavel_commit_batch_size",
    "gavel_commit_latency_seconds",
    "gavel_commit_failures_total",
    "gavel_commit_hedges_total",
    "gavel_persistence_queue_depth",
    "gavel_live_auctions",
    "gavel_passivations_total",
    "gavel_actor_mailbox_depth",
    "gavel_ws_connections",
    "gavel_http_connections",
    "gavel_http_connections_max",
    "gavel_ws_messages_sent_total",
    "gavel_ws_slow_consumer_resyncs_total",
    "gavel_http_requests_total",
    "gavel_http_request_duration_seconds",
    "gavel_shards_owned",
    "gavel_lease_renewals_total",
    "gavel_shard_moves_total",
    "gavel_forwarded_bids_total",
    "gavel_forward_latency_seconds",
    "gavel_pubsub_lag_seconds",
    "gavel_pubsub_gaps_total",
    "gavel_pubsub_dropped_total",
];

/// Accepted and rejected bids, a watcher, a 404: every series has samples.
/// The watcher is handed back to keep its connection open.
async fn some_load(app: &TestApp) -> WsClient {
    let api = app.api();
    let (_seller, users, auction_id) = api.scene(&["ann", "bob"], json!({})).await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.subscribe(&auction_id).await;
    for (index, amount) in [10_000, 10_500, 11_000, 100].into_iter().enumerate() {
        let _ = api.bid(&users[index % 2], &auction_id, amount, None).await;
    }
    let (status, _) = api.get("/api/v1/no-such-route", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    watcher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_name_every_required_series() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let _watcher = some_load(&app).await;
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let (ok, output) = promtool(&["check", "metrics"], Some(&text)).await;
    assert!(ok, "promtool check metrics: {output}");
    for series in REQUIRED_SERIES {
        assert!(text.contains(&format!("# HELP {series} ")), "{series} has help text");
        assert!(text.lines().any(|line| line.starts_with(series)), "{series} is exported");
    }
    app.stop().await;
}

fn dashboards() -> Vec<(String, Value)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(repo("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        found.push((path.display().to_string(), serde_json::from_str(&text).expect("dashboard JSON")));
    }
    assert!(found.len() >= 2, "an overview and a drill-down");
    found
}

#[test]
fn dashboards_are_well_formed() {
    let provisioning = std::fs::read_to_string(repo("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    let uid = provisioning
        .lines()
        .find_map(|line| line.trim().strip_prefix("uid: "))
        .expect("the datasource has a uid")
        .trim()
        .to_owned();
    let mut uids = std::collections::HashSet::new();
    for (path, dashboard) in dashboards() {
        assert!(uids.insert(dashboard["uid"].as_str().unwrap().to_owned()), "{path}: unique dashboard uid");
        let panels = dashboard["panels"].as_array().expect("panels");
        let mut ids = std::collections::HashSet::new();
        let mut cells = std::collections::HashSet::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            assert!(ids.insert(panel["id"].as_u64().expect("numeric id")), "{path}: unique panel id ({title})");
            let grid = &panel["gridPos"];
            let (x, y, w, h) = (grid["x"].as_u64(), grid["y"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64());
            let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
                panic!("{path}: {title} has a grid position")
            };
            assert!(w > 0 && h > 0 && x + w <= 24, "{path}: {title} fits the 24-column grid");
            for column in x..x + w {
                for row in y..y + h {
                    assert!(cells.insert((column, row)), "{path}: {title} overlaps another panel");
                }
            }
            assert_eq!(panel["datasource"]["uid"], uid.as_str(), "{path}: {title} uses the provisioned datasource");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{path}: {title} queries something");
            for target in targets {
                assert_eq!(target["datasource"]["uid"], uid.as_str(), "{path}: {title}");
                assert!(target["expr"].as_str().is_some_and(|expr| !expr.is_empty()), "{path}: {title}");
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            assert_eq!(variable["datasource"]["uid"], uid.as_str(), "{path}: variable {}", variable["name"]);
        }
    }
}

/// A dashboard expression as Grafana would send it, with its variables set to "all".
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$route", ".*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_node_and_every_panel_and_alert_evaluates() {
    // With the machine's Redis (its keys are under this database's own id), so the Redis panels have data.
    let redis = std::env::var("GAVEL_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.redis_url = Some(redis), NodeSettings::default()).await;
    let work = tempfile::tempdir().unwrap();
    let target = app.address.trim_start_matches("http://");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: gavel\n    static_configs:\n      - targets: [\"{target}\"]\n",
        repo("prometheus/alerts.yml").display()
    );
    std::fs::write(work.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", work.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", work.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (scripts/test installs Debian's prometheus)");
    let query = |expr: String| {
        let client = app.client.clone();
        async move {
            let response = client
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", expr.as_str())])
                .send()
                .await
                .ok()?;
            response.json::<Value>().await.ok()
        }
    };
    eventually(Duration::from_secs(60), "Prometheus scraping the node", || async {
        let answer = query("up{job=\"gavel\"} == 1".to_owned()).await?;
        (answer["data"]["result"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let _watcher = some_load(&app).await;

    for (path, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = concrete(target["expr"].as_str().unwrap());
                let what = format!("{path}: {} returns data: {expr}", panel["title"]);
                eventually(Duration::from_secs(30), &what, || async {
                    let answer = query(expr.clone()).await?;
                    assert_eq!(answer["status"], "success", "{what}: {answer}");
                    (!answer["data"]["result"].as_array()?.is_empty()).then_some(())
                })
                .await;
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let definition = variable["definition"].as_str().unwrap();
            let inner = definition.trim_start_matches("label_values(").trim_end_matches(')');
            let series = concrete(inner.rsplit_once(',').map_or(inner, |(series, _)| series));
            let answer = query(series.clone()).await.expect("an answer");
            assert!(!answer["data"]["result"].as_array().unwrap().is_empty(), "variable {definition}: {answer}");
        }
    }
    // Every alert rule is loaded and evaluates without error.
    let alerts = std::fs::read_to_string(repo("prometheus/alerts.yml")).unwrap();
    let alert_count = alerts.lines().filter(|line| line.trim_start().starts_with("- alert:")).count();
    let rules = eventually(Duration::from_secs(30), "alert rules evaluated", || async {
        let client = app.client.clone();
        let answer: Value =
            client.get(format!("http://127.0.0.1:{port}/api/v1/rules")).send().await.ok()?.json().await.ok()?;
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let all_evaluated = rules.iter().all(|rule| rule["lastEvaluation"] != "0001-01-01T00:00:00Z");
        (rules.len() == alert_count && all_evaluated).then_some(rules)
    })
    .await;
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    app.stop().await;
}

/// A caller that gives up while its bid waits for the commit leaves the
/// admission gauge as it found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailbox_gauge_returns_to_zero_when_callers_give_up() {
    // Each commit waits 2 s for company: long enough to give up on.
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.commit_delay_us = 2_000_000, Default::default()).await;
    let api = app.api();
    let (_seller, bidders, auction_id) = api.scene(&["ann"], json!({})).await;
    let command = gavel_actors::BidCommand {
        bidder: gavel_actors::UserRef { id: bidders[0].id.parse().unwrap(), username: "ann".into() },
        amount: gavel_actors::Money::parse(20_000).unwrap(),
        max_amount: None,
    };
    let node = app.node.clone();
    let auction: uuid::Uuid = auction_id.parse().unwrap();
    let caller = tokio::spawn(async move { node.place_bid(auction, command, None).await });
    let depth = || metric(&app, "gavel_actor_mailbox_depth");
    eventually(Duration::from_secs(10), "the bid waiting in the actor", || async {
        (depth().await == 1.0).then_some(())
    })
    .await;
    caller.abort();
    eventually(Duration::from_secs(10), "the gauge back at zero", || async { (depth().await == 0.0).then_some(()) })
        .await;
    app.stop().await;
}

/// The value of the series `name` whose labels include every one of `labels`
/// (0 when no such series is exported yet).
fn labelled(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| rest.split_once("} "))
        .filter(|(found, _)| {
            labels.iter().all(|(key, value)| found.split(',').any(|pair| pair == format!("{key}=\"{value}\"")))
        })
        .map(|(_, value)| value.trim().parse().expect("a number"))
        .collect();
    assert!(matching.len() <= 1, "{name} {labels:?} names one series: {matching:?}");
    matching.first().copied().unwrap_or(0.0)
}

/// Every request is counted once, under its route's template (never the raw
/// path) and its status; every bid once more under its outcome; a CORS
/// preflight, answered before the routes, is counted too; every answer names
/// the node. A node in a process of its own, so that its counts hold only
/// this test's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_counted_once_under_its_route_and_status_and_each_bid_under_its_outcome() {
    let data_dir = tempfile::tempdir().unwrap();
    let cors = ["--cors-origins".to_owned(), "https://shop.example".to_owned()];
    let server = ServerProcess::start_with(data_dir.path(), None, free_port(), &cors).await;
    let api = server.api();
    let (_seller, bidders, auction_id) = api.scene(&["ann", "bob"], json!({})).await;
    let bids_route = "/api/v1/auctions/{id}/bids";
    let scrape = || async {
        server.client.get(format!("{}/metrics", server.address)).send().await.unwrap().text().await.unwrap()
    };
    let before = scrape().await;
    assert_eq!(labelled(&before, "gavel_http_requests_total", &[("route", bids_route)]), 0.0, "no bid yet");

    // Starting price 10,000, increment 500.
    assert_eq!(api.bid(&bidders[0], &auction_id, 10_000, None).await.0, StatusCode::CREATED);
    assert_eq!(api.bid(&bidders[1], &auction_id, 10_000, None).await.0, StatusCode::CONFLICT);
    assert_eq!(api.bid(&bidders[1], &auction_id, 11_000, None).await.0, StatusCode::CREATED);
    let unknown = "/api/v1/auctions/00000000-0000-7000-8000-000000000000";
    for _ in 0..2 {
        assert_eq!(api.get(unknown, None).await.0, StatusCode::NOT_FOUND);
    }
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, format!("{}/api/v1/auctions/{auction_id}/bids", server.address))
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "https://shop.example");
    assert!(preflight.headers().contains_key("gavel-node"), "a preflight names the node too");
    let nowhere = server.client.get(format!("{}/nowhere/{auction_id}", server.address)).send().await.unwrap();
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);
    assert!(nowhere.headers().contains_key("gavel-node"), "an unmatched path's answer names the node");

    let after = scrape().await;
    let requests = |route: &str, status: &str| {
        labelled(&after, "gavel_http_requests_total", &[("route", route), ("status", status)])
            - labelled(&before, "gavel_http_requests_total", &[("route", route), ("status", status)])
    };
    assert_eq!(requests(bids_route, "201"), 2.0);
    assert_eq!(requests(bids_route, "409"), 1.0);
    assert_eq!(requests(bids_route, "204"), 1.0, "the preflight");
    assert_eq!(requests("/api/v1/auctions/{id}", "404"), 2.0);
    assert_eq!(requests("unmatched", "404"), 1.0);
    assert!(!after.contains(&auction_id), "no raw path in a label");
    assert_eq!(labelled(&after, "gavel_bids_total", &[("outcome", "accepted")]), 2.0);
    assert_eq!(labelled(&after, "gavel_bids_total", &[("outcome", "BID_TOO_LOW")]), 1.0);
    let bid_latencies = after
        .lines()
        .find_map(|line| line.strip_prefix("gavel_bid_latency_seconds_count "))
        .map(|value| value.trim().parse::<f64>().unwrap());
    assert_eq!(bid_latencies, Some(3.0), "one latency per bid, none for the preflight");
    let timed = labelled(&after, "gavel_http_request_duration_seconds_count", &[("route", bids_route)]);
    assert_eq!(timed, 4.0, "three bids and the preflight");
    server.terminate().await;
}
