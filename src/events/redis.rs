//! Cross-node events through Redis pub/sub (fred).
//!
//! - **Publishing.** The owner of an auction publishes each of its committed
//!   events (MessagePack, `wire.rs`) on its shard's channel, `<prefix><shard>`:
//!   256 channels, however many auctions are live. The auction actor only
//!   encodes the event and puts it in a bounded queue; a task sends what is
//!   queued as one pipeline. A full queue or a failing Redis drops events and
//!   counts them (`gavel_pubsub_dropped_total`): never a stall of the actor.
//! - **Receiving.** Every node subscribes to one pattern, `<prefix>*`. An event
//!   of an auction this node owns, or its own, is ignored (it took the local
//!   path already); any other goes through `Sequencer` into the read cache and
//!   the hub, like a local one (into its topic when someone here watches it;
//!   otherwise only its private message goes out, to its user's
//!   connections). A gap (`gavel_pubsub_gaps_total`) makes the auction's
//!   watchers here take a fresh snapshot from the store.
//! - **Redis down or restarted.** Bids do not use Redis. The clients reconnect
//!   on their own (a constant policy, forever); on every reconnect the pattern
//!   is subscribed again and every watcher of another node's auction here is
//!   resynchronised by snapshot, since events may have been missed. The same
//!   happens when the message stream lagged (fred's broadcast channel is
//!   bounded; `Lagged` is counted as dropped). `gavel_redis_up` follows a ping
//!   every second; every command has a one-second deadline.
//! - **Snapshots.** The owner also keeps each changed auction's snapshot
//!   under a key of its own (`snapshots.rs`), which other nodes read instead
//!   of the store when it is the store's latest.
//! - **Viewers.** Every second each node sends its watcher counts on one
//!   channel (`ViewerReport`); each node adds the other nodes' fresh counts
//!   (at most three seconds old) to its own (`RemoteViewers`), so `viewers`
//!   counts the watchers of every node, sent at most once a second.
//! - **Heads.** A gap shows only when a later event arrives. So with its
//!   counts, the owner sends the version each of its auctions watched on
//!   other nodes stands at, for 30 s after each event, from a second after it
//!   was published: a node whose watchers were shown less (an event was lost
//!   on the way, and none came after) resynchronises them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::prelude::{Builder, Client, Config, ReconnectPolicy};
use fred::types::Value as RedisValue;
use gavel_actors::ports::{Clock, EventSink, shard_of};
use gavel_actors::shards::Leases;
use gavel_actors::{AuctionId, AuctionState, Event};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::snapshots::Snapshots;
use super::wire::{AuctionHead, EVENTS_VERSION, EventEnvelope, ViewerReport};
use super::{Arrival, Sequencer, Version};
use super::{RemoteViewers, Watchers};
use crate::read_cache::ReadCache;
use crate::telemetry;

/// Every Redis command's deadline.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Events waiting to be published; past it they are dropped (and counted).
const PUBLISH_QUEUE: usize = 16_384;
/// Events sent in one pipeline at most.
const PUBLISH_BATCH: usize = 256;
/// fred's message stream (a broadcast channel): how far the receiving task may lag.
const MESSAGE_STREAM_CAPACITY: usize = 16_384;
/// Auctions of other nodes whose last version is remembered.
const SEQUENCED_AUCTIONS: usize = 100_000;
/// Auctions whose watchers on other nodes are counted at most.
const COUNTED_AUCTIONS: usize = 100_000;
/// Another node's count older than this is not counted (that node is gone or cut off).
const VIEWER_REPORT_FRESH: Duration = Duration::from_secs(3);
/// An auction's head is reported once its event was handed to Redis this
/// long ago (any node that was sent it has it by then) ...
const HEAD_SETTLED: Duration = Duration::from_secs(1);
/// ... in every report for this long after ...
const HEAD_REPORTED_FOR: Duration = Duration::from_secs(30);
/// ... and for at most this many auctions a report (the most recent first).
const HEADS_PER_REPORT: usize = 10_000;

pub struct RedisEvents {
    node_id: String,
    /// `gavel:<database id>:events:`; the shard number completes a channel.
    prefix: String,
    leases: Arc<Leases>,
    clock: Arc<dyn Clock>,
    queue: mpsc::Sender<Queued>,
    up: AtomicBool,
    hub: Arc<dyn Watchers>,
    read_cache: Arc<ReadCache>,
    sequencer: Sequencer,
    publisher: Client,
    subscriber: SubscriberClient,
    snapshots: Arc<Snapshots>,
    /// The other nodes' watcher counts: auction → node → (count, when reported).
    remote_viewers: Mutex<HashMap<AuctionId, NodeCounts>>,
    /// This node's auctions with an event in the last `HEAD_REPORTED_FOR`:
    /// the version it brought them to, and when it was handed to Redis.
    heads: Mutex<HashMap<AuctionId, (Version, Instant)>>,
}

/// One auction's watchers on other nodes: node → (count, when reported).
type NodeCounts = HashMap<String, (u64, Instant)>;

/// An event waiting to be published: its shard, its auction and the version
/// it brings that auction to, and its bytes.
struct Queued {
    shard: u32,
    auction_id: AuctionId,
    version: Version,
    bytes: Vec<u8>,
}

fn config(url: &str) -> anyhow::Result<Builder> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|performance| {
            performance.default_command_timeout = COMMAND_TIMEOUT;
            performance.broadcast_channel_capacity = MESSAGE_STREAM_CAPACITY;
        })
        .with_connection_config(|connection| {
            connection.connection_timeout = COMMAND_TIMEOUT;
            connection.internal_command_timeout = COMMAND_TIMEOUT;
            connection.max_command_attempts = 1;
        })
        // Forever, every half second: Redis coming back is noticed at once.
        .set_policy(ReconnectPolicy::new_constant(0, 500));
    Ok(builder)
}

/// What the Redis side of a node works with.
pub struct NodeParts {
    pub node_id: String,
    pub leases: Arc<Leases>,
    pub clock: Arc<dyn Clock>,
    pub hub: Arc<dyn Watchers>,
    pub read_cache: Arc<ReadCache>,
    /// For what a snapshot holds beyond the state (`snapshots.rs`).
    pub db: crate::storage::Db,
}

impl RedisEvents {
    /// Connects (in the background: a Redis that is down does not stop the
    /// node from starting) and starts publishing, receiving and health checks.
    pub fn start(url: &str, database_id: &str, parts: NodeParts) -> anyhow::Result<Arc<RedisEvents>> {
        let NodeParts { node_id, leases, clock, hub, read_cache, db } = parts;
        let builder = config(url)?;
        let publisher = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        let snapshots =
            Snapshots::new(publisher.clone(), database_id, node_id.clone(), leases.clone(), clock.clone(), db);
        let (queue, queued) = mpsc::channel(PUBLISH_QUEUE);
        let events = Arc::new(RedisEvents {
            node_id,
            prefix: format!("gavel:{database_id}:events:"),
            leases,
            clock,
            queue,
            up: AtomicBool::new(false),
            hub,
            read_cache,
            sequencer: Sequencer::new(SEQUENCED_AUCTIONS),
            publisher,
            subscriber,
            snapshots,
            remote_viewers: Mutex::new(HashMap::new()),
            heads: Mutex::new(HashMap::new()),
        });
        events.hub.set_remote_viewers(events.clone());
        metrics::gauge!(telemetry::REDIS_UP).set(0.0);
        events.publisher.connect();
        events.subscriber.connect();
        tokio::spawn(events.clone().publish_queued(queued));
        tokio::spawn(events.clone().receive());
        tokio::spawn(events.clone().resubscribe_on_reconnect());
        tokio::spawn(events.clone().watch_health());
        tokio::spawn(events.clone().report_viewers());
        Ok(events)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The auction snapshots, while Redis answers (`snapshots.rs`).
    pub fn snapshots(&self) -> Option<&Snapshots> {
        self.is_up().then_some(&*self.snapshots)
    }

    /// Sends what is queued, a pipeline at a time. Once a pipeline has gone
    /// (or failed, or timed out: its events may then never arrive), the heads
    /// of its auctions watched elsewhere are reported from a second on.
    async fn publish_queued(self: Arc<Self>, mut queued: mpsc::Receiver<Queued>) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        while queued.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
            let count = batch.len() as u64;
            let pipeline = self.publisher.pipeline();
            let mut heads = Vec::with_capacity(batch.len());
            for Queued { shard, auction_id, version, bytes } in batch.drain(..) {
                let channel = format!("{}{shard}", self.prefix);
                // Queued in the pipeline; sent by `all` below.
                let _: Result<(), _> = pipeline.publish(channel, RedisValue::Bytes(bytes.into())).await;
                heads.push((auction_id, version));
            }
            match tokio::time::timeout(COMMAND_TIMEOUT, pipeline.all::<Vec<RedisValue>>()).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    metrics::counter!(telemetry::PUBSUB_DROPPED_TOTAL).increment(count);
                    warn!(%error, events = count, "publishing events to Redis failed; dropped");
                }
                Err(_) => {
                    metrics::counter!(telemetry::PUBSUB_DROPPED_TOTAL).increment(count);
                    warn!(events = count, "publishing events to Redis timed out; dropped");
                }
            }
            self.remember_heads(heads);
        }
    }

    /// Feeds other nodes' events into this node's pipeline.
    async fn receive(self: Arc<Self>) {
        let mut messages = self.subscriber.message_rx();
        loop {
            match messages.recv().await {
                Ok(message) => {
                    let Some(bytes) = message.value.as_bytes() else { continue };
                    if message.channel.as_bytes() == self.viewers_channel().as_bytes() {
                        self.on_viewer_report(bytes);
                    } else {
                        self.on_message(bytes);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!(telemetry::PUBSUB_DROPPED_TOTAL).increment(missed);
                    warn!(missed, "fell behind the Redis message stream; resynchronising watchers");
                    self.resync_remote_watchers();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn on_message(&self, bytes: &[u8]) {
        let envelope: EventEnvelope = match rmp_serde::from_slice(bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                metrics::counter!(telemetry::PUBSUB_GAPS_TOTAL).increment(1);
                warn!(%error, "an event from Redis that does not decode");
                return;
            }
        };
        if envelope.version != EVENTS_VERSION {
            metrics::counter!(telemetry::PUBSUB_GAPS_TOTAL).increment(1);
            return;
        }
        let state = &envelope.state;
        if envelope.node == self.node_id || self.leases.epoch_of(shard_of(state.id)).is_some() {
            return;
        }
        let lag_ms = (self.clock.now_ms() - envelope.sent_at_ms).max(0);
        metrics::histogram!(telemetry::PUBSUB_LAG_SECONDS).record(lag_ms as f64 / 1000.0);
        match self.sequencer.arrive(&envelope.event, state) {
            Arrival::Repeat => {}
            Arrival::Next => {
                self.read_cache.invalidate(state.id);
                self.hub.publish(&envelope.event, state);
            }
            Arrival::Gap => {
                metrics::counter!(telemetry::PUBSUB_GAPS_TOTAL).increment(1);
                self.read_cache.invalidate(state.id);
                // The watchers take a snapshot from the store, which holds this
                // event already (it was committed before it was published).
                self.hub.resync(state.id);
                self.hub.publish(&envelope.event, state);
            }
        }
    }

    fn viewers_channel(&self) -> String {
        self.prefix.replacen(":events:", ":viewers", 1)
    }

    fn on_viewer_report(&self, bytes: &[u8]) {
        let Ok(report) = rmp_serde::from_slice::<ViewerReport>(bytes) else {
            return;
        };
        if report.version != EVENTS_VERSION || report.node == self.node_id {
            return;
        }
        let now = Instant::now();
        let mut counts = self.remote_viewers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() >= COUNTED_AUCTIONS {
            counts.retain(|_, nodes| nodes.values().any(|(_, at)| now.duration_since(*at) < VIEWER_REPORT_FRESH));
        }
        for (auction_id, count) in report.counts {
            let nodes = counts.entry(auction_id).or_default();
            if count == 0 {
                nodes.remove(&report.node);
            } else {
                nodes.insert(report.node.clone(), (count, now));
            }
            if nodes.is_empty() {
                counts.remove(&auction_id);
            }
        }
        drop(counts);
        // An event its owner published a while ago and this node never got
        // (the owner's link to Redis stalled or broke), with no later event
        // to show the gap.
        for head in report.heads {
            if self.leases.epoch_of(shard_of(head.auction_id)).is_some() {
                continue;
            }
            let version = Version { seq: head.seq, stage: head.stage };
            // Behind it, this node missed events: forgotten, the auction's next
            // event is taken as it comes (the watchers resynchronise now, once).
            if self.sequencer.forget_if_behind(head.auction_id, version) {
                metrics::counter!(telemetry::PUBSUB_GAPS_TOTAL).increment(1);
                self.read_cache.invalidate(head.auction_id);
            }
            self.hub.check_head(head.auction_id, version);
        }
    }

    /// The heads of this node's auctions watched on other nodes whose last
    /// event was handed to Redis between `HEAD_SETTLED` and
    /// `HEAD_REPORTED_FOR` ago, most recent first; forgets older ones. Also
    /// of shards it no longer holds: the new owner has no head until its own
    /// first event, and a head below what a watcher was shown does nothing.
    fn heads_to_report(&self) -> Vec<AuctionHead> {
        let now = Instant::now();
        let mut recent: Vec<(AuctionId, Version, Instant)> = {
            let mut heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            heads.retain(|_, (_, at)| now.duration_since(*at) < HEAD_REPORTED_FOR);
            heads
                .iter()
                .filter(|(_, (_, at))| now.duration_since(*at) >= HEAD_SETTLED)
                .map(|(id, (version, at))| (*id, *version, *at))
                .collect()
        };
        recent.retain(|(id, _, _)| self.count(*id) > 0);
        recent.sort_unstable_by_key(|(_, _, at)| std::cmp::Reverse(*at));
        recent.truncate(HEADS_PER_REPORT);
        recent.into_iter().map(|(auction_id, v, _)| AuctionHead { auction_id, seq: v.seq, stage: v.stage }).collect()
    }

    /// Sends this node's watcher counts every second (and a zero for each
    /// auction that had watchers at the last report and has none now), with
    /// the heads of its auctions watched elsewhere.
    async fn report_viewers(self: Arc<Self>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Vec<AuctionId> = Vec::new();
        loop {
            interval.tick().await;
            let mut counts = self.hub.local_viewers();
            let now_watched: std::collections::HashSet<AuctionId> = counts.iter().map(|(id, _)| *id).collect();
            counts.extend(reported.iter().filter(|id| !now_watched.contains(id)).map(|id| (*id, 0)));
            reported = now_watched.into_iter().collect();
            let heads = self.heads_to_report();
            if counts.is_empty() && heads.is_empty() {
                continue;
            }
            let report = ViewerReport { version: EVENTS_VERSION, node: self.node_id.clone(), counts, heads };
            let Ok(bytes) = rmp_serde::to_vec_named(&report) else { continue };
            let publish = self.publisher.publish::<(), _, _>(self.viewers_channel(), RedisValue::Bytes(bytes.into()));
            if let Ok(Err(error)) | Err(error) = tokio::time::timeout(COMMAND_TIMEOUT, publish)
                .await
                .map_err(|_| "timed out".to_owned())
                .map(|r| r.map_err(|e| e.to_string()))
            {
                tracing::debug!(%error, "sending watcher counts failed");
            }
        }
    }

    /// Subscribes to every shard's channel, now and after every reconnect,
    /// and resynchronises the watchers of other nodes' auctions then.
    async fn resubscribe_on_reconnect(self: Arc<Self>) {
        let mut reconnects = self.subscriber.reconnect_rx();
        let pattern = format!("{}*", self.prefix);
        loop {
            let subscribed = async {
                self.subscriber.psubscribe(pattern.clone()).await?;
                self.subscriber.subscribe(self.viewers_channel()).await
            };
            match subscribed.await {
                Ok(()) => break,
                Err(error) => {
                    warn!(%error, "subscribing to Redis failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        loop {
            // A reconnect missed (lagged) is a reconnect all the same.
            if let Err(tokio::sync::broadcast::error::RecvError::Closed) = reconnects.recv().await {
                return;
            }
            info!("reconnected to Redis; subscribing again and resynchronising watchers");
            if let Err(error) = self.subscriber.psubscribe(pattern.clone()).await {
                warn!(%error, "subscribing again after a reconnect failed");
            }
            if let Err(error) = self.subscriber.subscribe(self.viewers_channel()).await {
                warn!(%error, "subscribing to watcher counts again after a reconnect failed");
            }
            self.resync_remote_watchers();
        }
    }

    /// Pings Redis every second: `gavel_redis_up`, and a resync when it is back.
    async fn watch_health(self: Arc<Self>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let ping: Result<Result<RedisValue, _>, _> =
                tokio::time::timeout(COMMAND_TIMEOUT, self.publisher.ping(None)).await;
            let up = matches!(ping, Ok(Ok(_)));
            let was_up = self.up.swap(up, Ordering::AcqRel);
            metrics::gauge!(telemetry::REDIS_UP).set(if up { 1.0 } else { 0.0 });
            if up && !was_up {
                self.resync_remote_watchers();
            }
        }
    }

    /// Every watcher here of an auction this node does not own takes a fresh snapshot.
    fn resync_remote_watchers(&self) {
        self.sequencer.clear();
        let leases = self.leases.clone();
        self.hub.resync_where(&|auction_id| leases.epoch_of(shard_of(auction_id)).is_none());
    }
}

impl EventSink for RedisEvents {
    /// Encodes and queues; never waits. Runs in the auction's actor.
    fn publish(&self, event: &Event, state: &AuctionState) {
        let shard = shard_of(state.id);
        let envelope = EventEnvelope {
            version: EVENTS_VERSION,
            node: self.node_id.clone(),
            epoch: self.leases.epoch_of(shard).unwrap_or(0),
            sent_at_ms: self.clock.now_ms(),
            event: event.clone(),
            state: state.clone(),
        };
        let Ok(bytes) = rmp_serde::to_vec_named(&envelope) else {
            return;
        };
        let version = Version::of(state.seq, state.status);
        let queued = Queued { shard, auction_id: state.id, version, bytes };
        if self.queue.try_send(queued).is_err() {
            metrics::counter!(telemetry::PUBSUB_DROPPED_TOTAL).increment(1);
            self.remember_heads(vec![(state.id, version)]);
        }
        self.snapshots.mark(event, state);
    }
}

impl RedisEvents {
    /// Where these auctions stand, their events just sent (or dropped), for
    /// the heads this node reports: of those watched on other nodes only.
    fn remember_heads(&self, sent: Vec<(AuctionId, Version)>) {
        let watched: Vec<(AuctionId, Version)> = sent.into_iter().filter(|(id, _)| self.count(*id) > 0).collect();
        if watched.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (auction_id, version) in watched {
            let full = heads.len() >= SEQUENCED_AUCTIONS;
            match heads.get_mut(&auction_id) {
                // An event dropped from a full queue may be newer than one sent after it.
                Some(entry) if entry.0 <= version => *entry = (version, now),
                Some(_) => {}
                // Bounded (a report a second forgets the old ones anyway).
                None if full => {}
                None => {
                    heads.insert(auction_id, (version, now));
                }
            }
        }
    }
}

impl RemoteViewers for RedisEvents {
    fn count(&self, auction_id: AuctionId) -> u64 {
        let counts = self.remote_viewers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.get(&auction_id).map_or(0, |nodes| {
            nodes.values().filter(|(_, at)| at.elapsed() < VIEWER_REPORT_FRESH).map(|(count, _)| count).sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's Redis side, its Redis unreachable (nothing here needs it).
    async fn events(db_dir: &std::path::Path) -> Arc<RedisEvents> {
        let parts = NodeParts {
            node_id: "node-a".to_owned(),
            leases: Arc::new(Leases::none()),
            clock: Arc::new(crate::clock::SystemClock),
            hub: crate::ws::Hub::new(crate::ws::hub::WsSettings::default()).unwrap(),
            read_cache: Arc::new(ReadCache::new(16)),
            db: crate::storage::Db::open_sqlite(db_dir).await.unwrap(),
        };
        RedisEvents::start("redis://127.0.0.1:1", "test", parts).unwrap()
    }

    /// Heads are kept only for auctions watched on other nodes, and never
    /// move back: an event dropped from a full queue is remembered at once,
    /// and may be newer than one of the same auction whose pipeline ends later.
    #[test]
    fn heads_are_kept_for_auctions_watched_elsewhere_and_never_move_back() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let events = events(dir.path()).await;
            let (watched, unwatched) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
            let report = ViewerReport {
                version: EVENTS_VERSION,
                node: "node-b".to_owned(),
                counts: vec![(watched, 1)],
                heads: Vec::new(),
            };
            events.on_viewer_report(&rmp_serde::to_vec_named(&report).unwrap());
            let version = |seq| Version { seq, stage: 1 };
            events.remember_heads(vec![(watched, version(5)), (unwatched, version(5))]);
            events.remember_heads(vec![(watched, version(4))]);
            let heads = events.heads.lock().unwrap().clone();
            assert_eq!(heads.keys().collect::<Vec<_>>(), [&watched], "only the auction watched elsewhere");
            assert_eq!(heads[&watched].0, version(5), "a later pipeline's older event does not move it back");
        });
    }
}
