//! compose.yaml and its parts, each checked with the real tool (no container
//! engine runs here): the compose file against the Compose specification's
//! JSON schema and read by Debian's docker-compose, the Dockerfile by
//! hadolint, the cluster's Prometheus config by promtool (observability.rs),
//! and the load balancer's own config run by a real haproxy in front of three
//! local nodes.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster_events::{RedisServer, cluster_with_redis};
use crate::helpers::{Api, User, auction_body, client, free_port};
use crate::ws_client::WsClient;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a tool to its end; whether it succeeded, and what it printed.
async fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(program)
        .args(args)
        .current_dir(repo(""))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|error| panic!("{program} runs (scripts/test installs it): {error}"));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
    (output.status.success(), stdout, stderr)
}

/// The compose file as docker-compose reads it (anchors merged, defaults
/// filled in, every profile's services), as JSON.
async fn compose_config() -> Value {
    let (ok, yaml, errors) = run("docker-compose", &["--file", "compose.yaml", "--profile", "load", "config"]).await;
    assert!(ok, "docker-compose config: {errors}");
    // docker-compose runs on Debian's Python, which therefore has PyYAML.
    let mut convert = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("Debian's python3");
    use tokio::io::AsyncWriteExt;
    convert.stdin.take().unwrap().write_all(yaml.as_bytes()).await.unwrap();
    let output = convert.wait_with_output().await.unwrap();
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn depends_on_healthy(service: &Value, dependency: &str) -> bool {
    service["depends_on"][dependency]["condition"] == "service_healthy"
}

fn mounts(service: &Value) -> Vec<String> {
    service["volumes"].as_array().map_or_else(Vec::new, |volumes| {
        volumes.iter().map(|volume| volume.as_str().expect("short volume syntax").to_owned()).collect()
    })
}

#[tokio::test]
async fn the_compose_file_follows_the_specification_and_describes_the_cluster() {
    let (ok, stdout, stderr) =
        run("check-jsonschema", &["--builtin-schema", "vendor.compose-spec", "compose.yaml"]).await;
    assert!(ok, "compose.yaml against the Compose specification's schema: {stdout}{stderr}");

    let config = compose_config().await;
    let services = config["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected = ["grafana", "lb", "load", "node1", "node2", "node3", "postgres", "prometheus", "redis"];
    assert_eq!(names, expected.into_iter().collect(), "the services");
    let named_volumes: HashSet<&str> =
        config["volumes"].as_object().expect("named volumes").keys().map(String::as_str).collect();

    // Every long-running service says when it is healthy.
    for name in expected.iter().filter(|name| **name != "load") {
        let test = &services[*name]["healthcheck"]["test"];
        assert!(test.as_array().is_some_and(|test| test.len() > 1), "{name} has a health check: {test}");
    }
    // Postgres and Redis keep their data in named volumes.
    for name in ["postgres", "redis"] {
        let volume = mounts(&services[name]).first().cloned().unwrap_or_default();
        assert!(named_volumes.contains(volume.split(':').next().unwrap()), "{name} has a named volume: {volume}");
    }

    // Three nodes: their own names and addresses, the same secrets and
    // stores, started once Postgres and Redis are healthy.
    let mut shared = HashSet::new();
    for node in ["node1", "node2", "node3"] {
        let service = &services[node];
        let environment = &service["environment"];
        assert_eq!(environment["GAVEL_NODE_ID"], node);
        assert_eq!(environment["GAVEL_ADVERTISE_URL"], format!("http://{node}:8080"));
        assert_eq!(environment["GAVEL_LISTEN"], "0.0.0.0:8080");
        // Sign-in limits count the client's address, which the balancer passes on.
        assert_eq!(environment["GAVEL_TRUST_FORWARDED_FOR"], "true");
        assert!(depends_on_healthy(service, "postgres") && depends_on_healthy(service, "redis"), "{node}: {service}");
        assert!(service["healthcheck"]["test"].to_string().contains("/ready"), "{node} is healthy when ready");
        assert!(service["build"].is_object(), "{node} is built from the Dockerfile");
        let secrets = ["GAVEL_JWT_SECRET", "GAVEL_CLUSTER_SECRET", "GAVEL_DATABASE_URL", "GAVEL_REDIS_URL"]
            .map(|name| environment[name].as_str().unwrap_or_else(|| panic!("{node} has {name}")).to_owned());
        assert!(secrets[0].len() >= 32 && secrets[1].len() >= 32, "secrets long enough for gavel");
        assert!(secrets[2].starts_with("postgres://") && secrets[2].contains("@postgres:5432/"));
        assert_eq!(secrets[3], "redis://redis:6379");
        shared.insert(secrets);
    }
    assert_eq!(shared.len(), 1, "the nodes share one JWT secret, cluster secret, Postgres and Redis");

    // The load balancer runs scripts/haproxy.cfg, with the nodes' addresses,
    // once they are healthy.
    let lb = &services["lb"];
    assert!(
        mounts(lb).iter().any(|mount| mount.ends_with("/scripts/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"))
    );
    for (index, node) in ["node1", "node2", "node3"].iter().enumerate() {
        assert_eq!(lb["environment"][format!("GAVEL_NODE{}", index + 1)], format!("{node}:8080"));
        assert!(depends_on_healthy(lb, node), "lb waits for {node}");
    }
    assert_eq!(lb["ports"][0]["published"].to_string().trim_matches('"'), "8080");
    let balancer = std::fs::read_to_string(repo("scripts/haproxy.cfg")).unwrap();
    assert!(balancer.contains("\n    option forwardfor\n"), "haproxy passes the client's address on");

    // Prometheus scrapes the three nodes with the alert rules; Grafana shows
    // the dashboards to anonymous viewers, the overview as the home page.
    let prometheus = &services["prometheus"];
    assert!(prometheus["command"].to_string().contains("/etc/prometheus/cluster.yml"));
    assert!(mounts(prometheus).iter().any(|mount| mount.ends_with("/prometheus:/etc/prometheus:ro")));
    let scrape = std::fs::read_to_string(repo("prometheus/cluster.yml")).unwrap();
    assert!(scrape.contains(r#"targets: ["node1:8080", "node2:8080", "node3:8080"]"#) && scrape.contains("alerts.yml"));
    let grafana = &services["grafana"];
    assert_eq!(grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"], "true");
    assert_eq!(grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"], "Viewer");
    let home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].as_str().unwrap();
    let home = home.strip_prefix("/var/lib/grafana/dashboards/").expect("a provisioned dashboard");
    assert!(repo("grafana/dashboards").join(home).is_file(), "the home dashboard {home} exists");
    let grafana_mounts = mounts(grafana);
    assert!(grafana_mounts.iter().any(|mount| mount.ends_with("/grafana/provisioning:/etc/grafana/provisioning:ro")));
    assert!(grafana_mounts.iter().any(|mount| mount.ends_with("/grafana/dashboards:/var/lib/grafana/dashboards:ro")));
    assert!(depends_on_healthy(grafana, "prometheus"));

    // The load profile runs gavel-bench, from the nodes' image, at the balancer.
    let load = &services["load"];
    assert_eq!(load["profiles"], json!(["load"]));
    assert_eq!(load["image"], services["node1"]["image"]);
    assert_eq!(load["entrypoint"], json!(["gavel-bench"]));
    assert!(load["command"].to_string().contains("lb:8080"));
    assert!(depends_on_healthy(load, "lb"));
}

#[tokio::test]
async fn the_dockerfile_lints_clean_and_builds_a_slim_non_root_image() {
    let (ok, stdout, stderr) = run("hadolint", &["Dockerfile"]).await;
    assert!(ok && stdout.trim().is_empty(), "hadolint Dockerfile: {stdout}{stderr}");

    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with(' ') && !line.is_empty())
        .collect();
    let froms: Vec<&&str> = instructions.iter().filter(|line| line.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert!(froms[1].contains("-slim"), "a slim runtime: {}", froms[1]);
    // The dependencies are built from the manifests before the sources come in.
    let position = |prefix: &str| instructions.iter().position(|line| line.starts_with(prefix));
    let first_build = position("RUN mkdir -p src").expect("the dependency layer");
    assert!(
        first_build < position("COPY src src").expect("the sources")
            && first_build > position("COPY Cargo.toml").unwrap()
    );
    // Every crate is built with cargo's configuration: without it the
    // runtime is built without `tokio_unstable` and keeps its LIFO slot, and
    // a burst of bids reaches an auction out of order (src/main.rs).
    let config = position("COPY .cargo/config.toml").expect("cargo's configuration is copied");
    assert!(config < first_build, "cargo's configuration comes before the first build");
    let ignored = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    assert!(ignored.lines().any(|line| line == "!.cargo/config.toml"), "the build context holds it");
    // Runs as a numbered user that is not root.
    let user = instructions.iter().rev().find_map(|line| line.strip_prefix("USER ")).expect("a USER");
    assert!(!user.starts_with("0") && !user.starts_with("root"), "USER {user}");
    assert!(instructions.iter().any(|line| line.starts_with("HEALTHCHECK ")) && dockerfile.contains("/ready\"]"));
    // The image's version label is the crate's.
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let version = manifest.lines().find_map(|line| line.strip_prefix("version = \"")).unwrap().trim_end_matches('"');
    assert!(instructions.contains(&format!("ARG VERSION={version}").as_str()), "ARG VERSION={version}");
    assert!(dockerfile.contains("org.opencontainers.image.version=\"${VERSION}\""));
}

/// Debian's haproxy running scripts/haproxy.cfg, its addresses local ones.
struct Haproxy {
    process: tokio::process::Child,
    log: tempfile::NamedTempFile,
    address: String,
}

impl Haproxy {
    fn start(nodes: [String; 3]) -> Haproxy {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = tokio::process::Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(repo("scripts/haproxy.cfg"))
            .env("GAVEL_LB_BIND", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .kill_on_drop(true);
        for (index, node) in nodes.iter().enumerate() {
            command.env(format!("GAVEL_NODE{}", index + 1), node.trim_start_matches("http://"));
        }
        let process = command.spawn().expect("haproxy is installed (scripts/test installs Debian's haproxy)");
        Haproxy { process, log, address: format!("http://127.0.0.1:{port}") }
    }

    /// Fails the test if haproxy has stopped, with what it said.
    fn check_running(&mut self) {
        if let Some(status) = self.process.try_wait().unwrap() {
            panic!("haproxy exited ({status}): {}", std::fs::read_to_string(self.log.path()).unwrap());
        }
    }
}

/// A bid through the balancer: the status and which node answered (`None`
/// when the answer did not come from a gavel node but from haproxy itself).
async fn bid_through(
    client: &reqwest::Client,
    lb: &str,
    bidder: &User,
    auction_id: &str,
    amount: i64,
) -> (StatusCode, Option<String>, Value) {
    let response = client
        .post(format!("{lb}/api/v1/auctions/{auction_id}/bids"))
        .bearer_auth(&bidder.token)
        .json(&json!({"amount": amount}))
        .send()
        .await
        .expect("haproxy answers");
    let status = response.status();
    let node = response.headers().get("gavel-node").map(|value| value.to_str().unwrap().to_owned());
    (status, node, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_of_three_nodes_carries_bids_and_websockets_and_routes_around_a_dead_node() {
    let redis = RedisServer::start().await;
    let mut cluster = cluster_with_redis(3, 2, &redis).await;
    let mut lb = Haproxy::start([cluster.address(0), cluster.address(1), cluster.address(2)]);
    let client = client();
    let address = lb.address.clone();
    let api = Api { address: &address, client: &client };

    // Every node is in rotation once its /ready check passes.
    let mut answered_by = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered_by.len() < 3 {
        lb.check_running();
        assert!(Instant::now() < deadline, "haproxy sent requests to {answered_by:?} only, not to all three nodes");
        if let Ok(response) = client.get(format!("{}/api/v1/cluster", lb.address)).send().await {
            answered_by.extend(response.headers().get("gavel-node").map(|node| node.to_str().unwrap().to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An auction and its bidders, made through the balancer; a watcher on a
    // WebSocket through it.
    let seller = api.register("seller").await;
    let bidders = [api.register("ann").await, api.register("bob").await];
    let auction = api.create_auction(&seller, auction_body(json!({"starting_price": 1_000, "min_increment": 1}))).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let (status, placement) = api.get(&format!("/api/v1/cluster/auctions/{auction_id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{placement}");
    let owner = placement["owner"].as_str().unwrap().to_owned();
    let mut watcher = WsClient::connect(&lb.address, None).await;
    watcher.subscribe(&auction_id).await;

    let mut amount = 1_000;
    let (mut nodes_that_answered, mut accepted) = (HashSet::new(), Vec::new());
    for round in 0..12 {
        amount += 1;
        let (status, node, body) = bid_through(&client, &lb.address, &bidders[round % 2], &auction_id, amount).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        accepted.push(amount);
        nodes_that_answered.insert(node.expect("a node answered"));
        let event = watcher.next_of("bid").await;
        assert_eq!((event["seq"].as_u64(), event["current_price"].as_i64()), (body["seq"].as_u64(), Some(amount)));
    }
    assert!(nodes_that_answered.len() >= 2, "bids are spread over the nodes: {nodes_that_answered:?}");

    // The owner dies. Until its shards have moved, bids of its auction get
    // gavel's 503; every answer comes from a live node, none from haproxy
    // itself (a 502 or its own 503) however the requests were spread.
    cluster.take(cluster.index_of(&owner)).kill_hard().await;
    let (mut accepted_after, mut unavailable) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted_after < 10 {
        assert!(Instant::now() < deadline, "bids through the balancer still fail 30 s after the owner died");
        amount += 1;
        let (status, node, body) =
            bid_through(&client, &lb.address, &bidders[amount as usize % 2], &auction_id, amount).await;
        let node = node.unwrap_or_else(|| panic!("an answer from a node, not haproxy's own {status}: {body}"));
        assert_ne!(node, owner, "the dead node answered");
        match status {
            StatusCode::CREATED => {
                accepted.push(amount);
                accepted_after += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                accepted_after = 0;
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other}: {body}"),
        }
    }

    // A new watcher through the balancer starts from the current state and
    // sees the next bid.
    let mut late = WsClient::connect(&lb.address, None).await;
    let snapshot = late.subscribe(&auction_id).await;
    assert_eq!(snapshot["auction"]["current_price"].as_i64(), Some(amount));
    amount += 1;
    let (status, _, body) = bid_through(&client, &lb.address, &bidders[0], &auction_id, amount).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    accepted.push(amount);
    let event = late.next_of("bid").await;
    assert_eq!(event["seq"], body["seq"]);

    // Every accepted bid is in the store, in order, and nothing else.
    let history = api.history(&auction_id).await;
    let stored: Vec<i64> = history.iter().map(|bid| bid["amount"].as_i64().unwrap()).collect();
    assert_eq!(stored, accepted);
    eprintln!("{unavailable} bids answered 503 while the dead node's shards moved");
}
