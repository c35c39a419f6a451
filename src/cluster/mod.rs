//! Several nodes as one service. Each node owns some of the 256 shards through
//! leases in the shared Postgres (`storage/leases.rs`), renews them, takes
//! over shards whose owner is gone, and hands its own over when the spread
//! (`assign.rs`) says so or when it stops (`manager.rs`). A write for a shard
//! owned elsewhere is forwarded to the owner (`forward`), whose answer is
//! returned unchanged; the owner's commit checks its lease epoch, so a node
//! that lost a shard can never get a write acknowledged for it.
//!
//! The embedded node (SQLite) is a cluster of one: it holds every shard
//! without expiry, and `route` always says "here".

mod assign;
mod manager;
mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use gavel_actors::node::Node;
use tokio::sync::Notify;

use crate::auth::Secret;
use crate::bidding::wire::{Forwarded, ForwardedReply, WIRE_VERSION, WriteRequest};
use crate::read_cache::ReadCache;
use crate::telemetry;
pub use store::{ClusterRows, LeaseRow, LeaseStore, LeaseStoreError, MemberRow, ShardOwner};

pub use assign::assign;

/// The header that carries the cluster secret on node-to-node requests.
pub const SECRET_HEADER: &str = "gavel-cluster-secret";

#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub node_id: String,
    /// Where the other nodes reach this one: `http://host:port`.
    pub advertise_url: String,
    pub lease: Duration,
    /// How often leases are renewed and the spread checked.
    pub tick: Duration,
    /// How long a forwarded write may take before its outcome is called unknown.
    pub forward_timeout: Duration,
    pub secret: Secret,
}

impl ClusterSettings {
    /// A tick of a fifth of the lease (200 ms to 1 s): a lease is renewed
    /// several times before it could expire, and a dead node's shards are
    /// taken within a tick of their expiry.
    pub fn tick_for(lease: Duration) -> Duration {
        (lease / 5).clamp(Duration::from_millis(200), Duration::from_secs(1))
    }

    /// How long the lease store lets a session sit inside a transaction
    /// before it ends it. A live node runs a tick's statements back to back;
    /// one stopped between them holds lease rows locked, and the others'
    /// takeover waits at most this much past the lease's expiry.
    pub fn idle_in_transaction_limit(lease: Duration) -> Duration {
        (lease / 3).max(Duration::from_millis(250))
    }

    /// A node that has not been seen for this long gets no forwarded writes:
    /// they fail fast instead of waiting on a process that stopped answering.
    fn silence(&self) -> Duration {
        self.tick * 3 + Duration::from_millis(500)
    }
}

/// Where a write for a shard should go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node holds the shard's lease.
    Local,
    Remote {
        owner: String,
        url: String,
    },
    /// Nobody can take it right now (the shard is moving, or its owner is silent).
    Nobody,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The owner could not be reached: the write was not delivered.
    #[error("owner unreachable: {0}")]
    Unreachable(String),
    /// Delivered (or maybe delivered), but no answer in time.
    #[error("no answer from the owner in time")]
    TimedOut,
}

/// The cluster as this node last read it from the store.
#[derive(Default)]
struct View {
    /// When it was read, and the database's clock then.
    read_at: Option<Instant>,
    now_ms: i64,
    members: HashMap<String, MemberRow>,
    leases: HashMap<i32, LeaseRow>,
}

impl View {
    fn now_ms(&self) -> i64 {
        self.now_ms + self.read_at.map_or(0, |read_at| read_at.elapsed().as_millis() as i64)
    }
}

/// When an owner of another wire version was last logged (see `now_and_then`).
static VERSION_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct Cluster {
    settings: ClusterSettings,
    /// `None`: a single embedded node.
    store: Option<Arc<dyn LeaseStore>>,
    node: Arc<Node>,
    read_cache: Arc<ReadCache>,
    view: RwLock<View>,
    client: reqwest::Client,
    wake: Notify,
    stopping: AtomicBool,
    stopped: Notify,
    /// Set once the first `leave` has ended.
    left: tokio::sync::OnceCell<()>,
    /// Held by the lease manager through each tick: stepping down waits for
    /// the one under way (it may be taking shards).
    ticking: tokio::sync::Mutex<()>,
    /// When the last tick completed (membership and leases current).
    last_tick: RwLock<Option<Instant>>,
    /// Per shard: one read of its owner at a time, shared by the writes that
    /// asked for it meanwhile (see `refresh`).
    refreshes: Vec<Refresh>,
}

#[derive(Default)]
struct Refresh {
    turn: tokio::sync::Mutex<()>,
    /// The number of the last read of the shard's owner begun, and of the
    /// last one that came to an end (an answer, an error or its time limit;
    /// not one whose caller went away midway).
    begun: AtomicU64,
    ended: AtomicU64,
}

impl Cluster {
    pub fn new(
        settings: ClusterSettings,
        store: Option<Arc<dyn LeaseStore>>,
        node: Arc<Node>,
        read_cache: Arc<ReadCache>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(300))
            .timeout(settings.forward_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()?;
        Ok(Arc::new(Cluster {
            settings,
            store,
            node,
            read_cache,
            view: RwLock::new(View::default()),
            client,
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
            left: tokio::sync::OnceCell::new(),
            ticking: tokio::sync::Mutex::new(()),
            last_tick: RwLock::new(None),
            refreshes: (0..gavel_actors::ports::SHARD_COUNT).map(|_| Refresh::default()).collect(),
        }))
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The cluster's leases and membership; `None` for the single embedded node.
    pub fn shared_store(&self) -> Option<&dyn LeaseStore> {
        self.store.as_deref()
    }

    /// Whether several nodes may share the store (Postgres).
    pub fn is_shared(&self) -> bool {
        self.store.is_some()
    }

    /// Whether `secret` is this cluster's (constant time).
    pub fn authenticates(&self, secret: &[u8]) -> bool {
        let ours = self.settings.secret.expose().as_bytes();
        ours.len() == secret.len() && ours.iter().zip(secret).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    }

    /// Wakes the lease manager now (a peer released a shard for us, or joined).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether this node can serve: a single node always; a cluster node while
    /// its membership and leases were confirmed within a lease length.
    pub fn is_serving(&self) -> bool {
        if !self.is_shared() {
            return true;
        }
        let last = *self.last_tick.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        last.is_some_and(|at| at.elapsed() < self.settings.lease)
    }

    /// Where a write for `shard` goes.
    pub fn route(&self, shard: u32) -> Route {
        if self.node.leases.lease_for(shard).is_some() {
            return Route::Local;
        }
        if !self.is_shared() {
            return Route::Nobody;
        }
        let view = self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(lease) = view.leases.get(&(shard as i32)) else {
            return Route::Nobody;
        };
        let now_ms = view.now_ms();
        if lease.owner.is_empty() || lease.owner == self.settings.node_id || lease.expires_at_ms <= now_ms {
            return Route::Nobody;
        }
        match view.members.get(&lease.owner) {
            Some(member) if member.last_seen_ms > now_ms - self.settings.silence().as_millis() as i64 => {
                Route::Remote { owner: lease.owner.clone(), url: member.advertise_url.clone() }
            }
            _ => Route::Nobody,
        }
    }

    /// Reads `shard`'s lease and its owner's address from the store again.
    /// While a shard moves, every write to it comes here: one read of a
    /// shard runs at a time, and the writes that asked while one waited for
    /// its turn take the answer of the first read begun after they asked,
    /// rather than each reading again (the lease store's few connections
    /// also renew this node's leases).
    pub async fn refresh(&self, shard: u32) {
        let Some(store) = &self.store else {
            return;
        };
        let refresh = &self.refreshes[shard as usize];
        // A read begun before this write asked may predate what it was told.
        let begun_before_asking = refresh.begun.load(Ordering::Acquire);
        let _turn = refresh.turn.lock().await;
        if refresh.ended.load(Ordering::Acquire) > begun_before_asking {
            return;
        }
        let this_read = refresh.begun.fetch_add(1, Ordering::AcqRel) + 1;
        let read = tokio::time::timeout(self.settings.tick, store.owner_of(shard)).await;
        refresh.ended.store(this_read, Ordering::Release);
        match read {
            Ok(Ok(Some(found))) => {
                let mut view = self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if view.read_at.is_none() {
                    view.read_at = Some(Instant::now());
                    view.now_ms = found.now_ms;
                }
                if let Some(member) = found.owner {
                    view.members.insert(member.node_id.clone(), member);
                }
                view.leases.insert(found.lease.shard, found.lease);
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => tracing::warn!(shard, %error, "reading a shard's owner failed"),
            Err(_) => tracing::warn!(shard, "reading a shard's owner timed out"),
        }
    }

    /// Sends `request` to the node at `url` and returns its answer.
    pub async fn forward(&self, url: &str, request: &WriteRequest) -> Result<ForwardedReply, ForwardError> {
        let started = Instant::now();
        let result = self.forward_once(url, request).await;
        let outcome = match &result {
            Ok(reply) if reply.result.as_ref().is_err_and(is_not_owner) => "not_owner",
            Ok(_) => "relayed",
            Err(ForwardError::Unreachable(_)) => "unreachable",
            Err(ForwardError::TimedOut) => "outcome_unknown",
        };
        metrics::counter!(telemetry::FORWARDED_BIDS_TOTAL, "outcome" => outcome).increment(1);
        if result.is_ok() {
            metrics::histogram!(telemetry::FORWARD_LATENCY_SECONDS).record(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn forward_once(&self, url: &str, request: &WriteRequest) -> Result<ForwardedReply, ForwardError> {
        let forwarded =
            Forwarded { version: WIRE_VERSION, from_node: self.settings.node_id.clone(), request: request.clone() };
        let body = rmp_serde::to_vec_named(&forwarded).map_err(|error| ForwardError::Unreachable(error.to_string()))?;
        let response = self
            .client
            .post(format!("{url}/internal/v1/writes"))
            .header(SECRET_HEADER, self.settings.secret.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/msgpack")
            .body(body)
            .send()
            .await
            .map_err(|error| {
                if error.is_connect() { ForwardError::Unreachable(error.to_string()) } else { ForwardError::TimedOut }
            })?;
        if response.status().is_server_error() {
            // The owner's edge (its time limit, an answer it could not encode)
            // or a proxy before it: the write may have been decided.
            return Err(ForwardError::TimedOut);
        }
        if response.status() == reqwest::StatusCode::UPGRADE_REQUIRED && crate::telemetry::now_and_then(&VERSION_WARNED)
        {
            // The owner runs a release with another wire version: not delivered.
            tracing::warn!(%url, ours = WIRE_VERSION, "the owner speaks another wire version (a rolling upgrade?): not forwarded");
        }
        if response.status() != reqwest::StatusCode::OK {
            // Refused before it was decided (authentication, version, size): not delivered.
            return Err(ForwardError::Unreachable(format!("owner answered {}", response.status())));
        }
        let bytes = response.bytes().await.map_err(|_| ForwardError::TimedOut)?;
        let reply: ForwardedReply = rmp_serde::from_slice(&bytes).map_err(|_| ForwardError::TimedOut)?;
        if reply.version != WIRE_VERSION {
            return Err(ForwardError::TimedOut);
        }
        Ok(reply)
    }

    /// `(node_id, advertise_url, last_seen_ms)` of every member, and every
    /// lease, as last read; for `GET /api/v1/cluster`.
    pub fn members(&self) -> Vec<MemberRow> {
        let view = self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut members: Vec<MemberRow> = view.members.values().cloned().collect();
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        members
    }

    /// Whether `last_seen_ms` (database clock) is recent enough to count as live.
    pub fn is_live(&self, last_seen_ms: i64, now_ms: i64) -> bool {
        last_seen_ms > now_ms - self.settings.lease.as_millis() as i64
    }
}

fn is_not_owner(failure: &crate::bidding::WriteFailure) -> bool {
    matches!(
        failure,
        crate::bidding::WriteFailure::Unavailable(crate::bidding::Unavailable::Node(
            gavel_actors::outcome::Unavailable::NotOwner { .. }
        ))
    )
}
