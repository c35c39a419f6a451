//! Logs (`tracing`, pretty or JSON) and metrics (Prometheus text at `/metrics`).
//! Every series is described and created at start-up, so dashboards show zeros
//! instead of gaps; histogram buckets run from a tenth of a millisecond to
//! seconds, where bid and commit latencies live.

use std::sync::OnceLock;
use std::time::Duration;

use gavel_actors::metrics_names as actor_names;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const BIDS_TOTAL: &str = "gavel_bids_total";
pub const BID_LATENCY_SECONDS: &str = "gavel_bid_latency_seconds";
pub const PERSISTENCE_QUEUE_DEPTH: &str = "gavel_persistence_queue_depth";
pub const HTTP_REQUESTS_TOTAL: &str = "gavel_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "gavel_http_request_duration_seconds";
pub const WS_CONNECTIONS: &str = "gavel_ws_connections";
pub const HTTP_CONNECTIONS: &str = "gavel_http_connections";
pub const HTTP_CONNECTIONS_MAX: &str = "gavel_http_connections_max";
pub const WS_MESSAGES_SENT_TOTAL: &str = "gavel_ws_messages_sent_total";
pub const WS_SLOW_CONSUMER_RESYNCS_TOTAL: &str = "gavel_ws_slow_consumer_resyncs_total";
pub const SHARDS_OWNED: &str = "gavel_shards_owned";
pub const LEASE_RENEWALS_TOTAL: &str = "gavel_lease_renewals_total";
pub const SHARD_MOVES_TOTAL: &str = "gavel_shard_moves_total";
pub const FORWARDED_BIDS_TOTAL: &str = "gavel_forwarded_bids_total";
pub const FORWARD_LATENCY_SECONDS: &str = "gavel_forward_latency_seconds";
pub const REDIS_UP: &str = "gavel_redis_up";
pub const PUBSUB_LAG_SECONDS: &str = "gavel_pubsub_lag_seconds";
pub const PUBSUB_GAPS_TOTAL: &str = "gavel_pubsub_gaps_total";
pub const PUBSUB_DROPPED_TOTAL: &str = "gavel_pubsub_dropped_total";
pub const SNAPSHOT_READS_TOTAL: &str = "gavel_snapshot_reads_total";
pub const SNAPSHOT_WRITES_TOTAL: &str = "gavel_snapshot_writes_total";

/// `outcome` of a lease renewal: each lease renewed, each lease found taken
/// over, each tick that failed.
pub const LEASE_RENEWAL_OUTCOMES: &[&str] = &["renewed", "lost", "failed"];
/// `kind` of a shard move as this node saw it.
pub const SHARD_MOVE_KINDS: &[&str] = &["acquired", "released", "lost"];
/// `outcome` of a write forwarded to its owner: its answer relayed, the owner
/// said it no longer owns the shard, unreachable, or no answer in time.
pub const FORWARD_OUTCOMES: &[&str] = &["relayed", "not_owner", "unreachable", "outcome_unknown"];
/// The `reason` label values of `gavel_passivations_total`.
pub const PASSIVATION_REASONS: &[&str] = &["idle", "room"];

/// Every outcome a bid can have, as the `outcome` label.
pub const BID_OUTCOMES: &[&str] = &[
    "accepted",
    "AUCTION_NOT_FOUND",
    "AUCTION_NOT_ACTIVE",
    "SELLER_CANNOT_BID",
    "BID_TOO_LOW",
    "ALREADY_LEADING",
    "INVALID_AMOUNT",
    "IDEMPOTENCY_KEY_REUSED",
    "RATE_LIMITED",
    "UNAVAILABLE",
    "INVALID_REQUEST",
    "UNAUTHENTICATED",
];

const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (later calls get the same handle)
/// and starts its upkeep.
pub fn metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS_SECONDS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(actor_names::COMMIT_BATCH_SIZE.to_owned()),
                        BATCH_SIZE_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("the metrics recorder is installed once per process");
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".to_owned())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(BIDS_TOTAL, Unit::Count, "Bids answered, by outcome (accepted or the rejection code).");
    describe_histogram!(BID_LATENCY_SECONDS, Unit::Seconds, "Time from a bid request in to its reply out.");
    describe_histogram!(actor_names::COMMIT_BATCH_SIZE, Unit::Count, "Writes per group-commit transaction.");
    describe_histogram!(actor_names::COMMIT_LATENCY_SECONDS, Unit::Seconds, "Time one group commit takes.");
    describe_counter!(actor_names::COMMIT_FAILURES_TOTAL, Unit::Count, "Commit attempts that failed and were retried.");
    describe_counter!(
        actor_names::COMMIT_HEDGES_TOTAL,
        Unit::Count,
        "Commits started beside one that had run past --commit-hedge-after-ms."
    );
    describe_gauge!(PERSISTENCE_QUEUE_DEPTH, Unit::Count, "Writes accepted but not yet durable.");
    describe_gauge!(actor_names::LIVE_AUCTIONS, Unit::Count, "Auction actors running on this node.");
    describe_counter!(
        actor_names::PASSIVATIONS_TOTAL,
        Unit::Count,
        "Auction actors stopped while their auction stays open, by reason: idle, or room (past --max-live-auctions)."
    );
    describe_gauge!(
        actor_names::ACTOR_MAILBOX_DEPTH,
        Unit::Count,
        "Bid and cancel calls admitted to auction actors and not answered yet (admission in use)."
    );
    describe_counter!(HTTP_REQUESTS_TOTAL, Unit::Count, "HTTP requests, by matched route and status.");
    describe_histogram!(HTTP_REQUEST_DURATION_SECONDS, Unit::Seconds, "HTTP request duration, by matched route.");
    describe_gauge!(WS_CONNECTIONS, Unit::Count, "Open WebSocket connections.");
    describe_gauge!(HTTP_CONNECTIONS, Unit::Count, "Open client connections (HTTP and WebSocket).");
    describe_gauge!(
        HTTP_CONNECTIONS_MAX,
        Unit::Count,
        "The connection cap (--max-connections, by default from the open-file limit)."
    );
    describe_counter!(WS_MESSAGES_SENT_TOTAL, Unit::Count, "Messages written to WebSocket clients.");
    describe_counter!(
        WS_SLOW_CONSUMER_RESYNCS_TOTAL,
        Unit::Count,
        "Subscriptions that fell behind and were resynchronised by snapshot."
    );
    describe_gauge!(SHARDS_OWNED, Unit::Count, "Shards whose lease this node holds.");
    describe_counter!(LEASE_RENEWALS_TOTAL, Unit::Count, "Lease renewals, by outcome (renewed, lost, failed).");
    describe_counter!(SHARD_MOVES_TOTAL, Unit::Count, "Shards this node acquired, released or lost.");
    describe_counter!(FORWARDED_BIDS_TOTAL, Unit::Count, "Writes forwarded to their shard's owner, by outcome.");
    describe_histogram!(FORWARD_LATENCY_SECONDS, Unit::Seconds, "Time from forwarding a write to the owner's answer.");
    describe_gauge!(REDIS_UP, Unit::Count, "1 while Redis answers pings, 0 while not (absent without --redis-url).");
    describe_histogram!(
        PUBSUB_LAG_SECONDS,
        Unit::Seconds,
        "Time from an owner publishing an event to this node receiving it (wall clocks)."
    );
    describe_counter!(PUBSUB_GAPS_TOTAL, Unit::Count, "Events from other nodes that showed a gap (watchers resynced).");
    describe_counter!(PUBSUB_DROPPED_TOTAL, Unit::Count, "Events not published, or not received, through Redis.");
    describe_counter!(
        SNAPSHOT_READS_TOTAL,
        Unit::Count,
        "Auctions read for GET and WebSocket snapshots (with --redis-url), by source (redis, store)."
    );
    describe_counter!(
        SNAPSHOT_WRITES_TOTAL,
        Unit::Count,
        "Auction snapshots written to Redis by their owner, by outcome (written, failed, dropped)."
    );
    metrics::counter!(PUBSUB_GAPS_TOTAL).absolute(0);
    metrics::counter!(PUBSUB_DROPPED_TOTAL).absolute(0);
    let _ = metrics::histogram!(PUBSUB_LAG_SECONDS);
    metrics::gauge!(SHARDS_OWNED).set(0.0);
    // Registered now so that the series (empty buckets) is there before the first forward.
    let _ = metrics::histogram!(FORWARD_LATENCY_SECONDS);
    for outcome in LEASE_RENEWAL_OUTCOMES {
        metrics::counter!(LEASE_RENEWALS_TOTAL, "outcome" => *outcome).absolute(0);
    }
    for kind in SHARD_MOVE_KINDS {
        metrics::counter!(SHARD_MOVES_TOTAL, "kind" => *kind).absolute(0);
    }
    for outcome in FORWARD_OUTCOMES {
        metrics::counter!(FORWARDED_BIDS_TOTAL, "outcome" => *outcome).absolute(0);
    }
    for outcome in BID_OUTCOMES {
        metrics::counter!(BIDS_TOTAL, "outcome" => *outcome).absolute(0);
    }
    metrics::counter!(actor_names::COMMIT_FAILURES_TOTAL).absolute(0);
    metrics::counter!(actor_names::COMMIT_HEDGES_TOTAL).absolute(0);
    for reason in PASSIVATION_REASONS {
        metrics::counter!(actor_names::PASSIVATIONS_TOTAL, "reason" => *reason).absolute(0);
    }
    describe_counter!(
        actor_names::WRITES_REFUSED_TOTAL,
        Unit::Count,
        "Writes the store refused as invalid (not retried; their auctions reload)."
    );
    metrics::counter!(actor_names::WRITES_REFUSED_TOTAL).absolute(0);
    metrics::gauge!(PERSISTENCE_QUEUE_DEPTH).set(0.0);
    metrics::gauge!(actor_names::LIVE_AUCTIONS).set(0.0);
    metrics::gauge!(actor_names::ACTOR_MAILBOX_DEPTH).set(0.0);
    metrics::gauge!(WS_CONNECTIONS).set(0.0);
    metrics::gauge!(HTTP_CONNECTIONS).set(0.0);
    metrics::counter!(WS_MESSAGES_SENT_TOTAL).absolute(0);
    metrics::counter!(WS_SLOW_CONSUMER_RESYNCS_TOTAL).absolute(0);
}

/// `pretty` for people, `json` for machines. `RUST_LOG` filters (default
/// `info`); `RUST_LOG=info,gavel=debug,gavel_actors=debug` adds a span per bid
/// (`bid`: auction, bidder, seq, outcome) followed through the auction's actor,
/// the `commit` span that links to it, and the fan-out, each logged with its
/// timing when it closes. Requests are never logged with their headers or
/// bodies, so tokens and passwords never reach the log.
pub fn init_tracing(json: bool) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn,ractor=warn".to_owned());
    init_tracing_with(json, &filter, std::io::stdout);
}

/// As `init_tracing`, with the filter and the output given (tests capture it).
pub fn init_tracing_with<W>(json: bool, filter: &str, writer: W)
where
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::format::FmtSpan;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_span_events(FmtSpan::CLOSE).with_writer(writer);
    let result = if json { builder.json().try_init() } else { builder.try_init() };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Whether a warning that could come with every request is due: at most
/// once a minute for each `last` (seconds since the process started, plus
/// one, when it was last given; 0 for never).
pub fn now_and_then(last: &std::sync::atomic::AtomicU64) -> bool {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = STARTED.get_or_init(std::time::Instant::now).elapsed().as_secs() + 1;
    let previous = last.load(std::sync::atomic::Ordering::Relaxed);
    (previous == 0 || now >= previous + 60)
        && last
            .compare_exchange(previous, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_warning_now_and_then_is_given_once_a_minute() {
        let last = std::sync::atomic::AtomicU64::new(0);
        assert!(super::now_and_then(&last), "the first is given");
        assert!(!super::now_and_then(&last), "the next within a minute is not");
    }
}
