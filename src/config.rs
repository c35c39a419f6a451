//! Configuration: every flag also reads the environment variable in brackets
//! (docs/API.md, "Running"). Defaults make `cargo run --release` a working
//! single node on SQLite under ./data.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::auth::Secret;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug, Parser)]
#[command(name = "gavel", version, about = "A real-time auction server")]
pub struct Config {
    /// HTTP, WebSocket and /metrics.
    #[arg(long, env = "GAVEL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// SQLite database and generated secrets (embedded mode).
    #[arg(long, env = "GAVEL_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// `postgres://…` switches storage to Postgres.
    #[arg(long, env = "GAVEL_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Enables snapshots and cross-node pub/sub (cluster).
    #[arg(long, env = "GAVEL_REDIS_URL")]
    pub redis_url: Option<String>,
    /// This node's name in a cluster; defaults to the host name and a hash of the data directory.
    #[arg(long, env = "GAVEL_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,
    /// Where the other nodes of a cluster reach this one (forwarded writes);
    /// default `http://<listen>`.
    #[arg(long, env = "GAVEL_ADVERTISE_URL", value_parser = parse_advertise_url)]
    pub advertise_url: Option<String>,
    /// A shard lease's length in seconds (cluster); a dead node's shards move within it.
    #[arg(long, env = "GAVEL_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_secs: u64,
    /// Authenticates node-to-node requests; the same on every node. Default:
    /// derived from the JWT secret.
    #[arg(long, env = "GAVEL_CLUSTER_SECRET", hide_env_values = true, value_parser = parse_cluster_secret)]
    pub cluster_secret: Option<Secret>,
    /// Shared by all nodes of a cluster; generated once and kept in the data dir if not given.
    #[arg(long, env = "GAVEL_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<Secret>,
    #[arg(long, env = "GAVEL_LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Bids per second per user (burst twice that); 0 turns the limit off.
    #[arg(long, env = "GAVEL_BID_RATE_PER_USER", default_value_t = 20)]
    pub bid_rate_per_user: u32,
    /// How long the first write of a group commit waits for company, in
    /// microseconds: whole milliseconds (the runtime's timer fires on
    /// millisecond ticks, so 300 would wait 0.3 to 1.3 ms), at most 10 s. 0:
    /// commit as soon as the writes already queued are in (the batch is
    /// whatever arrived during the previous commit).
    #[arg(long, env = "GAVEL_COMMIT_DELAY_US", default_value_t = 0, value_parser = parse_commit_delay_us)]
    pub commit_delay_us: u64,
    /// On Postgres: when a group commit has taken this many milliseconds, a
    /// second starts beside it for the queued writes of the other auctions. 0:
    /// one commit at a time. SQLite has one writer and always commits one at a time.
    #[arg(long, env = "GAVEL_COMMIT_HEDGE_AFTER_MS", default_value_t = 5)]
    pub commit_hedge_after_ms: u64,
    /// Threads that run requests, auction actors and commits (the runtime's
    /// workers). Default: one fewer than the machine's cores, at least one, so
    /// that the threads outside them (SQLite's writer, the WebSocket hub's, a
    /// database on the same host) have a core of their own rather than taking
    /// turns with a worker, and a bid's hops stay on one awake worker instead
    /// of waking a parked one (README, "The path of a bid").
    #[arg(long, env = "GAVEL_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Auction actors kept live at most (some 10 KB each). Past it, each
    /// activation asks an idle one to passivate: of a few sampled, the one
    /// written to least recently. Its auction stays open; its next write
    /// reloads it from the store.
    #[arg(long, env = "GAVEL_MAX_LIVE_AUCTIONS", default_value_t = 40_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_live_auctions: u64,
    /// Registrations and sign-ins a minute from one client address (bursts
    /// of as many); 0: no limit.
    #[arg(long, env = "GAVEL_SIGN_INS_PER_ADDRESS", default_value_t = 60)]
    pub sign_ins_per_address: u32,
    /// Registrations and sign-ins a minute for one username; 0: no limit.
    #[arg(long, env = "GAVEL_SIGN_INS_PER_USERNAME", default_value_t = 10)]
    pub sign_ins_per_username: u32,
    /// Take the client's address from the last `X-Forwarded-For` entry (set
    /// by a load balancer in front; only where clients cannot reach the node
    /// directly).
    #[arg(long, env = "GAVEL_TRUST_FORWARDED_FOR", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded_for: bool,
    /// Open connections at most; at the cap new ones wait in the kernel's
    /// backlog. Default: what the process's open-file limit allows (its soft
    /// limit is raised to the hard one at start), less a reserve for the
    /// store, Redis and peers.
    #[arg(long, env = "GAVEL_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections: Option<u64>,
    /// Seconds a connection may take to send a request's head, counted from
    /// when the server is ready for it (so also how long an idle keep-alive
    /// connection is kept); then it is closed.
    #[arg(long, env = "GAVEL_HTTP_HEAD_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub http_head_timeout_secs: u64,
    /// Seconds a request's body may take to arrive once its head has; then
    /// `408 REQUEST_TIMEOUT`.
    #[arg(long, env = "GAVEL_HTTP_BODY_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub http_body_timeout_secs: u64,
    /// On SIGTERM, seconds the open connections get to finish their requests
    /// in flight before they are cut; the node then drains and exits.
    #[arg(long, env = "GAVEL_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub shutdown_timeout_secs: u64,
    /// Events kept per auction watched on the node for WebSocket resumes
    /// (`since_seq`); also how far a subscriber may fall behind before it gets
    /// a fresh snapshot instead.
    #[arg(long, env = "GAVEL_WS_BUFFER_EVENTS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub ws_buffer_events: u32,
    /// Auctions one WebSocket connection may watch at once.
    #[arg(long, env = "GAVEL_WS_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub ws_max_subscriptions: usize,
    /// Messages per second one WebSocket client may send (bursts of twice that); 0: no limit.
    #[arg(long, env = "GAVEL_WS_MESSAGES_PER_SEC", default_value_t = 50)]
    pub ws_messages_per_sec: u32,
    /// Seconds between server pings; a client silent for 2.5 intervals is disconnected.
    #[arg(long, env = "GAVEL_WS_PING_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub ws_ping_secs: u64,
    /// Seconds one write to a WebSocket client may take before the connection is closed.
    #[arg(long, env = "GAVEL_WS_WRITE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub ws_write_timeout_secs: u64,
    /// Milliseconds within which one auction's events are sent to watchers
    /// together (one write per watcher); 0 sends every event at once.
    #[arg(long, env = "GAVEL_WS_BATCH_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub ws_batch_ms: u64,
    /// Accept `permessage-deflate` (RFC 7692) from WebSocket clients that offer
    /// it: each batch of events is compressed once, its bytes shared by the watchers.
    #[arg(long, env = "GAVEL_WS_COMPRESSION", default_value_t = true, action = clap::ArgAction::Set)]
    pub ws_compression: bool,
    /// Web origins whose pages may call the API from a browser (CORS), comma-separated,
    /// e.g. `https://shop.example`; `*` for any. Default: none (same origin only).
    #[arg(long, env = "GAVEL_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origins: Vec<String>,
    /// Kernel send buffer per connection, in bytes; unset: the kernel's automatic sizing.
    #[arg(long, env = "GAVEL_SOCKET_SEND_BUFFER_BYTES", value_parser = clap::value_parser!(u64).range(4_096..=16_777_216))]
    pub socket_send_buffer_bytes: Option<u64>,
}

fn parse_origin(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    let valid = text == "*"
        || ((text.starts_with("http://") || text.starts_with("https://"))
            && !text.split_once("//").is_some_and(|(_, rest)| rest.is_empty() || rest.contains('/')));
    if valid { Ok(text.to_owned()) } else { Err("an origin is scheme://host[:port], or *".to_owned()) }
}

fn parse_cluster_secret(text: &str) -> Result<Secret, String> {
    if text.len() < 32 || !text.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err("the cluster secret must be at least 32 printable characters".to_owned());
    }
    Ok(Secret::new(text.to_owned()))
}

fn parse_node_id(text: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&text.len())
        && text.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    if valid { Ok(text.to_owned()) } else { Err("a node id is 1 to 64 of [A-Za-z0-9._-]".to_owned()) }
}

fn parse_advertise_url(text: &str) -> Result<String, String> {
    let trimmed = text.trim_end_matches('/');
    let rest = trimmed.strip_prefix("http://").ok_or("the advertise URL must start with http://")?;
    if rest.is_empty() || rest.contains('/') {
        return Err("the advertise URL is http://host:port, without a path".to_owned());
    }
    Ok(trimmed.to_owned())
}

/// The longest `--commit-delay-us`: a bid's answer may wait that much longer.
const MAX_COMMIT_DELAY_US: u64 = 10_000_000;

/// `--commit-delay-us`: whole milliseconds, because the wait is a tokio timer,
/// which fires on millisecond ticks (a shorter or finer value would wait
/// another length than it says; measured in README, "The path of a bid").
fn parse_commit_delay_us(text: &str) -> Result<u64, String> {
    let micros: u64 = text.trim().parse().map_err(|_| "the commit delay is a number of microseconds".to_owned())?;
    if micros > MAX_COMMIT_DELAY_US {
        return Err(format!("the commit delay is at most {MAX_COMMIT_DELAY_US} µs (10 s)"));
    }
    if !micros.is_multiple_of(1_000) {
        return Err(format!(
            "the commit delay is whole milliseconds (0, 1000, 2000, …): the commit's timer fires on millisecond \
             ticks, so {micros} µs would wait anywhere from {micros} to {} µs",
            micros + 1_000
        ));
    }
    Ok(micros)
}

fn parse_secret(text: &str) -> Result<Secret, String> {
    if text.len() < 32 {
        return Err("the JWT secret must be at least 32 characters".to_owned());
    }
    Ok(Secret::new(text.to_owned()))
}

impl Config {
    /// Defaults for tests and embedding: an ephemeral port, everything else as shipped.
    pub fn for_data_dir(data_dir: PathBuf) -> Config {
        Config::parse_from(["gavel", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap_or("./data")])
    }

    /// `--worker-threads`, or one fewer than `cores` (at least one).
    pub fn worker_threads(&self, cores: usize) -> usize {
        match self.worker_threads {
            Some(threads) => usize::from(threads),
            None => cores.saturating_sub(1).max(1),
        }
    }

    pub fn ws_settings(&self) -> crate::ws::WsSettings {
        crate::ws::WsSettings {
            buffer_events: self.ws_buffer_events as usize,
            max_subscriptions: self.ws_max_subscriptions,
            messages_per_sec: self.ws_messages_per_sec,
            ping_interval: std::time::Duration::from_secs(self.ws_ping_secs),
            write_timeout: std::time::Duration::from_secs(self.ws_write_timeout_secs),
            batch_interval: std::time::Duration::from_millis(self.ws_batch_ms),
            compression: self.ws_compression,
            ..crate::ws::WsSettings::default()
        }
    }

    /// `--advertise-url`, or `http://` and the address the listener got.
    pub fn advertise_url(&self, bound: SocketAddr) -> String {
        self.advertise_url.clone().unwrap_or_else(|| format!("http://{bound}"))
    }

    /// `--node-id`, or the host name and a hash of the data directory: two
    /// nodes on one host (with their own data directories) never share an id
    /// by accident, and a node restarted on its data directory keeps its id
    /// (so it takes its own shard leases back at once).
    pub fn node_id(&self) -> String {
        if let Some(node_id) = &self.node_id {
            return node_id.clone();
        }
        let host: String = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "gavel".to_owned())
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(48)
            .collect();
        let directory = std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        let hash = crate::bidding::keys::fingerprint(&[directory.to_string_lossy().as_bytes()]);
        format!("{host}-{:08x}", hash as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_default_to_one_fewer_than_the_cores_and_take_the_flag() {
        let default = Config::parse_from(["gavel"]);
        assert_eq!(default.worker_threads(1), 1);
        assert_eq!(default.worker_threads(2), 1);
        assert_eq!(default.worker_threads(16), 15);
        let given = Config::parse_from(["gavel", "--worker-threads", "3"]);
        assert_eq!(given.worker_threads(2), 3);
        assert!(Config::try_parse_from(["gavel", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn the_commit_delay_is_whole_milliseconds_up_to_ten_seconds() {
        let delay =
            |value: &str| Config::try_parse_from(["gavel", "--commit-delay-us", value]).map(|c| c.commit_delay_us);
        assert_eq!(Config::parse_from(["gavel"]).commit_delay_us, 0);
        assert_eq!(delay("0").unwrap(), 0);
        assert_eq!(delay("1000").unwrap(), 1_000);
        assert_eq!(delay("2000000").unwrap(), 2_000_000);
        assert_eq!(delay("10000000").unwrap(), 10_000_000);
        for refused in ["300", "999", "1500", "10001000", "-1", "1ms"] {
            assert!(delay(refused).is_err(), "{refused} µs was taken");
        }
        let message = delay("300").unwrap_err().to_string();
        assert!(message.contains("whole milliseconds") && message.contains("from 300 to 1300 µs"), "{message}");
    }

    #[test]
    fn default_node_ids_differ_by_data_directory_and_survive_a_restart() {
        let (one, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = |dir: &std::path::Path| Config::for_data_dir(dir.to_path_buf()).node_id();
        assert_ne!(id(one.path()), id(other.path()), "two nodes on one host");
        assert_eq!(id(one.path()), id(one.path()), "a restart on the same data directory");
        let given = Config::parse_from(["gavel", "--node-id", "node-a"]);
        assert_eq!(given.node_id(), "node-a");
        assert!(id(one.path()).bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte)));
    }
}
