//! Building and running one gavel node: open the store, take the shards, start
//! the actors, bind the listener. `Application::build` then `run_until_stopped`
//! with any shutdown future, so tests bind port 0 and stop the node at will.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use gavel_actors::node::{Node, NodeSettings};
use gavel_actors::ports::{Clock, EventSink, Store};
use gavel_actors::shards::Leases;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth::{self, Auth};
use crate::bidding::Bidding;
use crate::clock::SystemClock;
use crate::cluster::{Cluster, ClusterSettings};
use crate::config::Config;
use crate::events::Tee;
use crate::events::redis::RedisEvents;
use crate::http::extract::BodyTimeout;
use crate::http::{self, ApiContext, ContextInner};
use crate::listener::LimitedListener;
use crate::ratelimit::RateLimiter;
use crate::read_cache::{InvalidatingSink, ReadCache};
use crate::serve::HttpLimits;
use crate::storage::{Db, DbStore};
use crate::telemetry;
use crate::ws::Hub;

/// Auction rows kept for reads (a few hundred bytes each).
const READ_CACHE_ENTRIES: usize = 16_384;
/// How long a write forwarded to its owner may take before its outcome is
/// called unknown (503, retry with the same key). An owner answers in
/// milliseconds, or 503 within its persistence queue's bounds; a node that
/// stopped answering is skipped within a few ticks anyway.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long after the shutdown signal requests in flight may hold the
/// node's shards; then they are handed over while those requests finish.
const STEP_DOWN_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

pub struct Application {
    listener: LimitedListener,
    limits: HttpLimits,
    body_timeout: BodyTimeout,
    context: ApiContext,
    /// The WebSocket connections and their fan-out.
    hub: Arc<Hub>,
    sweeper: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
    /// The lease manager (a cluster node on Postgres).
    manager: Option<tokio::task::JoinHandle<()>>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        Self::build_with(config, NodeSettings::default()).await
    }

    pub async fn build_with(config: Config, mut settings: NodeSettings) -> anyhow::Result<Application> {
        settings.persistence.batch_delay = std::time::Duration::from_micros(config.commit_delay_us);
        settings.max_live_auctions = config.max_live_auctions as usize;
        let metrics = telemetry::metrics();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        // The default node id hashes the data directory's canonical path: it must exist first.
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
        let node_id = config.node_id();
        let db = match &config.database_url {
            Some(url) => Db::open_postgres(url).await.context("connecting to Postgres")?,
            None => Db::open_sqlite(&config.data_dir)
                .await
                .with_context(|| format!("opening SQLite in {}", config.data_dir.display()))?,
        };
        settings.persistence.hedge_after = match db {
            Db::Postgres { .. } if config.commit_hedge_after_ms > 0 => {
                Some(std::time::Duration::from_millis(config.commit_hedge_after_ms))
            }
            _ => None,
        };
        // The commits get a thread of their own: a commit's answer is taken
        // and the next batch sent at once, not when the node's worker gets to
        // it. On SQLite that thread runs the commit's statements itself
        // (`storage::direct`). Both measured under "The path of a bid".
        settings.persistence.own_thread = true;
        let secret = match &config.jwt_secret {
            Some(secret) => secret.clone(),
            None => auth::load_or_create_secret(&config.data_dir).context("creating the JWT secret")?,
        };
        let database_id = db.database_id().await.context("reading the database id")?;
        let leases = Arc::new(Leases::none());
        if matches!(db, Db::Sqlite { .. }) {
            // The embedded node is a cluster of one: every shard, no expiry.
            for lease in db.acquire_all_shards(&node_id).await.context("taking the shard leases")? {
                leases.grant(lease.shard, lease.epoch);
            }
            metrics::gauge!(telemetry::SHARDS_OWNED).set(leases.held_count() as f64);
        }
        let store: Arc<dyn Store> = Arc::new(DbStore { db: db.clone(), node_id: node_id.clone() });
        let hub = Hub::new(config.ws_settings()).context("starting the WebSocket runtime")?;
        let read_cache = Arc::new(ReadCache::new(READ_CACHE_ENTRIES));
        let redis = match &config.redis_url {
            Some(url) => Some(
                RedisEvents::start(
                    url,
                    &database_id,
                    crate::events::redis::NodeParts {
                        node_id: node_id.clone(),
                        leases: leases.clone(),
                        clock: clock.clone(),
                        hub: hub.clone(),
                        read_cache: read_cache.clone(),
                        db: db.clone(),
                    },
                )
                .context("setting up Redis")?,
            ),
            None => None,
        };
        // After commit: the read cache, this node's watchers, and (with Redis) the other nodes'.
        let mut sinks: Vec<Arc<dyn EventSink>> = vec![hub.clone()];
        if let Some(redis) = &redis {
            sinks.push(redis.clone());
        }
        let events: Arc<dyn EventSink> =
            Arc::new(InvalidatingSink { cache: read_cache.clone(), next: Arc::new(Tee(sinks)) });
        let node = Node::start(settings, clock.clone(), store, events, leases).await.context("starting the actors")?;
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let (max_connections, open_files) = crate::listener::connection_cap(config.max_connections);
        if let Some(open_files) = open_files.filter(|limit| max_connections as u64 > *limit) {
            warn!(max_connections, open_files, "--max-connections is above the open-file limit; raise the limit");
        }
        metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS_MAX).set(max_connections as f64);
        let listener = LimitedListener::new(listener, max_connections)
            .with_send_buffer(config.socket_send_buffer_bytes.map(|bytes| bytes as usize));
        let limits = HttpLimits {
            head_timeout: std::time::Duration::from_secs(config.http_head_timeout_secs),
            shutdown_timeout: std::time::Duration::from_secs(config.shutdown_timeout_secs),
        };
        let body_timeout = BodyTimeout(std::time::Duration::from_secs(config.http_body_timeout_secs));
        let lease = std::time::Duration::from_secs(config.lease_secs);
        let cluster_settings = ClusterSettings {
            node_id: node_id.clone(),
            advertise_url: config.advertise_url(listener.local_addr()?),
            lease,
            tick: ClusterSettings::tick_for(lease),
            forward_timeout: FORWARD_TIMEOUT,
            secret: config.cluster_secret.clone().unwrap_or_else(|| auth::derive_cluster_secret(&secret)),
        };
        let lease_store = db
            .cluster_leases(ClusterSettings::idle_in_transaction_limit(lease))
            .map(|store| Arc::new(store) as Arc<dyn crate::cluster::LeaseStore>);
        let cluster = Cluster::new(cluster_settings, lease_store, node.clone(), read_cache.clone())
            .context("starting the cluster client")?;
        let manager = cluster.join().await.context("joining the cluster")?;
        // Auctions that should have opened or closed while the node was down do so now.
        node.sweep_once().await;
        let sweeper = node.spawn_sweeper();
        info!(
            listen = %listener.local_addr()?,
            max_connections,
            store = db.backend_name(),
            node_id,
            shards = node.leases.held_count(),
            workers = tokio::runtime::Handle::current().metrics().num_workers(),
            "gavel node ready"
        );
        let bidding = Arc::new(Bidding {
            node: node.clone(),
            db: db.clone(),
            cluster: cluster.clone(),
            rate_limiter: RateLimiter::new(config.bid_rate_per_user),
            clock: clock.clone(),
            users: Default::default(),
            keys_in_flight: Default::default(),
        });
        let node_header = axum::http::HeaderValue::from_str(&node_id).context("the node id as a header")?;
        let context = ApiContext::new(ContextInner {
            db,
            node,
            auth: Auth::new(&secret, &database_id),
            passwords: crate::auth::PasswordHashing::new(),
            bidding,
            cluster,
            clock,
            metrics,
            node_id,
            read_cache,
            node_header,
            redis,
            cors_origins: config.cors_origins.clone(),
            sign_in_limits: http::SignInLimits::new(config.sign_ins_per_address, config.sign_ins_per_username),
            trust_forwarded_for: config.trust_forwarded_for,
        });
        let ticker = hub.spawn_ticker();
        Ok(Application { listener, limits, body_timeout, context, hub, sweeper, ticker, manager })
    }

    /// The actor side of this node, for tests and embedding.
    pub fn node(&self) -> Arc<Node> {
        self.context.node.clone()
    }

    /// What the bid endpoint and the WebSocket call to place a bid, for tests and embedding.
    pub fn bidding(&self) -> Arc<Bidding> {
        self.context.bidding.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` completes, then stops in order: no new
    /// connections, in-flight requests answered (their bids committed), the
    /// persistence queue drained, the actors stopped, the store closed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application { listener, limits, body_timeout, context, hub, sweeper, ticker, manager } = self;
        let router = http::router(context.clone(), body_timeout, crate::ws::routes(hub.clone()));
        let signalled = Arc::new(tokio::sync::Notify::new());
        let shutdown = {
            let signalled = signalled.clone();
            async move {
                shutdown.await;
                signalled.notify_one();
            }
        };
        let serving = crate::serve::serve(listener, router, limits, shutdown);
        tokio::pin!(serving);
        // Requests in flight normally end within milliseconds; past that, the
        // shards move meanwhile, not after the slowest client.
        let mut stepping_down = None;
        tokio::select! {
            () = &mut serving => {}
            () = async {
                signalled.notified().await;
                tokio::time::sleep(STEP_DOWN_AFTER).await;
            } => {
                info!(after = ?STEP_DOWN_AFTER, "requests still in flight; handing the shards over meanwhile");
                let cluster = context.cluster.clone();
                stepping_down = Some(tokio::spawn(async move { cluster.step_down().await }));
                serving.await;
            }
        }
        if let Some(stepping_down) = stepping_down {
            let _ = stepping_down.await;
        }
        info!("stopped taking requests; draining");
        sweeper.abort();
        context.node.shutdown().await;
        // Every write taken is answered: hand the shards over to the other
        // nodes (after the lease tick under way, if any; then the manager stops).
        context.cluster.leave().await;
        if let Some(manager) = manager {
            manager.abort();
            let _ = manager.await;
        }
        // Bid results of the last commits are written, then every socket closes.
        hub.shut_down(std::time::Duration::from_secs(5)).await;
        ticker.abort();
        context.db.close().await;
        info!("shutdown complete");
        Ok(())
    }
}

/// The node's runtime: `workers` threads (`Config::worker_threads`), without
/// the LIFO slot. That slot runs the most recently woken task first, so of a
/// burst of requests arriving together the last one reaches its auction
/// first; in a hot auction every earlier bid of the burst is then rejected as
/// too low. Without it, bids reach the auction in the order their sockets
/// became readable (as near as several workers allow): fairer to bidders,
/// and several times more bids accepted under load.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("gavel").worker_threads(workers);
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_runtime_has_the_workers_it_is_given() {
        for workers in [1, 3] {
            let runtime = super::runtime(workers).expect("a runtime");
            assert_eq!(runtime.metrics().num_workers(), workers);
        }
    }
}
