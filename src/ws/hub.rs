//! The fan-out: the node's `EventSink`. Each durable event becomes one shared
//! `Frame`, appended to its auction's topic: a bounded buffer of recent events
//! (for `since_seq` resumes) and a broadcast channel to the subscribed
//! connections. Publishing never blocks and never waits for a reader: a reader
//! that falls more than the channel's capacity behind finds out (it lagged) and
//! resynchronises from a snapshot. Private messages (`outbid`, `won`) go to
//! every connection of their user through that connection's own bounded queue.
//!
//! Events are sent in batches: publishing (inside the auction's actor) only
//! appends to the topic; a ticker sends what arrived every `batch_interval`
//! (20 ms), each auction's events in one shared buffer. A hot auction's
//! watchers are then woken, and write, at most once an interval however many
//! bids arrive, and the actor never waits on a send: the ticker holds its own
//! lock while sending, the actor only the short one that guards the topic.
//! Private messages follow the batch holding their event.
//!
//! Connections run on a runtime of their own whose threads have a lower
//! scheduling priority than the node's: writing to thousands of watchers can
//! use whatever CPU is left, but never delays a bid, its commit or its answer.
//!
//! A ticker sends each auction's viewer count when it changed, at most once a
//! second, and forgets topics nobody has watched or published to for a while.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use gavel_actors::ports::EventSink;
use gavel_actors::runtime::OwnedRuntime;
use gavel_actors::{AuctionId, AuctionState, Event, UserId};
use tokio::sync::{broadcast, mpsc, watch};

use super::protocol::{Batch, Frame, ServerMessage, Version, follows_on, private_messages};
use crate::events::{RemoteViewers, Watchers};

#[derive(Clone, Debug)]
pub struct WsSettings {
    /// Events kept per auction for `since_seq` resumes, and how far a
    /// subscriber may fall behind before it is resynchronised by snapshot.
    pub buffer_events: usize,
    pub max_subscriptions: usize,
    /// Messages a client may send per second (bursts of twice that).
    pub messages_per_sec: u32,
    pub ping_interval: Duration,
    /// A write to a client that takes longer than this closes the connection.
    pub write_timeout: Duration,
    /// Snapshot resyncs within a minute after which a slow client is closed.
    pub max_resyncs_per_minute: usize,
    /// Bids of one connection waiting for their result at once.
    pub max_bids_in_flight: usize,
    /// Private messages and bid results waiting to be written, per connection.
    pub direct_queue: usize,
    /// Events of one auction within this interval go out together; zero: each at once.
    pub batch_interval: Duration,
    /// Accept `permessage-deflate` from clients that offer it.
    pub compression: bool,
}

impl Default for WsSettings {
    fn default() -> Self {
        WsSettings {
            buffer_events: 256,
            max_subscriptions: 100,
            messages_per_sec: 50,
            ping_interval: Duration::from_secs(20),
            write_timeout: Duration::from_secs(10),
            max_resyncs_per_minute: 5,
            max_bids_in_flight: 16,
            direct_queue: 256,
            batch_interval: Duration::from_millis(20),
            compression: true,
        }
    }
}

struct Topic {
    state: Mutex<TopicState>,
    /// Made by the first subscriber: a broadcast channel allocates all its
    /// slots at once (`--ws-buffer-events` of them, some 8 KB at 256), and
    /// most auctions with events have nobody watching on this node. Before
    /// it exists a batch goes nowhere, as it would with no receivers.
    sender: std::sync::OnceLock<broadcast::Sender<Arc<Batch>>>,
    /// Held while sending, so batches leave in order; never taken by publish.
    sending: Mutex<()>,
}

impl TopicState {
    /// Whether the topic waits for the ticker already.
    fn is_waiting(&self) -> bool {
        !self.pending.is_empty() || !self.pending_private.is_empty() || self.pending_head.is_some()
    }
}

impl Topic {
    fn receiver_count(&self) -> usize {
        self.sender.get().map_or(0, broadcast::Sender::receiver_count)
    }

    /// Sends to the subscribers, if there are any.
    fn send(&self, batch: Batch) {
        if let Some(sender) = self.sender.get() {
            let _ = sender.send(Arc::new(batch));
        }
    }
}

struct TopicState {
    recent: VecDeque<Arc<Frame>>,
    /// Published, waiting for the next batch, with the private messages they cause.
    pending: Vec<Arc<Frame>>,
    pending_private: Vec<(UserId, ServerMessage)>,
    /// The owner's last version, to check the subscribers against after the batch.
    pending_head: Option<Version>,
    viewers_sent: usize,
    touched: Instant,
}

/// Where a user's private messages go: one entry per connection.
#[derive(Clone)]
pub struct PrivateRoute {
    pub connection: u64,
    pub sender: mpsc::Sender<Box<ServerMessage>>,
    /// Told when the connection's queue was full: it cannot keep up and closes.
    pub overflow: Arc<tokio::sync::Notify>,
}

/// What `join` hands a connection: its receiver, and the events to replay
/// first when a resume could be served from the buffer.
pub struct Joined {
    pub receiver: broadcast::Receiver<Arc<Batch>>,
    pub replay: Option<(Version, Vec<Arc<Frame>>)>,
}

pub struct Hub {
    pub settings: WsSettings,
    /// Set in a cluster with Redis: `viewers` counts every node's watchers.
    remote_viewers: std::sync::OnceLock<Arc<dyn RemoteViewers>>,
    topics: Mutex<HashMap<AuctionId, Arc<Topic>>>,
    users: Mutex<HashMap<UserId, Vec<PrivateRoute>>>,
    /// Topics with a batch waiting.
    waiting: Mutex<Vec<(AuctionId, Weak<Topic>)>>,
    next_connection: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Open connections, so shutdown can wait for them to close.
    open: watch::Sender<usize>,
    /// The connections' runtime.
    runtime: OwnedRuntime,
}

/// How much lower the fan-out threads' priority is (`nice` steps).
const FANOUT_NICENESS: i32 = 5;

fn fanout_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("gavel-ws")
        .enable_all()
        .on_thread_start(|| {
            // On Linux, `nice` is per thread: this lowers only the calling one.
            // SAFETY: setpriority reads its plain integer arguments only.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, FANOUT_NICENESS);
            }
        })
        .build()
}

/// How long a topic nobody watches is kept after its last event (for resumes).
const TOPIC_KEEP: Duration = Duration::from_secs(300);

impl Hub {
    pub fn new(settings: WsSettings) -> std::io::Result<Arc<Hub>> {
        let (shutdown, _) = watch::channel(false);
        let (open, _) = watch::channel(0);
        let runtime = OwnedRuntime::new(fanout_runtime()?);
        Ok(Arc::new(Hub {
            settings,
            remote_viewers: std::sync::OnceLock::new(),
            topics: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            waiting: Mutex::new(Vec::new()),
            next_connection: AtomicU64::new(1),
            shutdown,
            open,
            runtime,
        }))
    }

    /// Runs `future` on the connections' runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(future)
    }

    /// Sends waiting batches every `batch_interval`, and viewer counts (and
    /// forgets idle topics) once a second, for as long as the hub lives.
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let hub: Weak<Hub> = Arc::downgrade(self);
        let period = self.settings.batch_interval.max(Duration::from_millis(1));
        self.spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_viewers = Instant::now();
            loop {
                interval.tick().await;
                let Some(hub) = hub.upgrade() else { return };
                hub.send_waiting();
                if last_viewers.elapsed() >= Duration::from_secs(1) {
                    last_viewers = Instant::now();
                    hub.tick();
                }
            }
        })
    }

    /// Sends every waiting batch, then the private messages of its events.
    pub fn send_waiting(&self) {
        let waiting = std::mem::take(&mut *self.waiting.lock().expect("waiting lock"));
        for (auction_id, topic) in waiting {
            let Some(topic) = topic.upgrade() else { continue };
            let _sending = topic.sending.lock().expect("sending lock");
            let (frames, private, head) = {
                let mut state = topic.state.lock().expect("topic lock");
                (
                    std::mem::take(&mut state.pending),
                    std::mem::take(&mut state.pending_private),
                    state.pending_head.take(),
                )
            };
            if !frames.is_empty() {
                // No receivers is not an error: nobody is watching.
                topic.send(Batch::new(auction_id, frames));
            }
            if let Some(head) = head {
                topic.send(Batch::head(auction_id, head));
            }
            for (user_id, message) in private {
                self.send_private(user_id, message);
            }
        }
    }

    /// Viewer counts that changed, and forgetting topics nobody watches,
    /// holds, or published to for a while.
    fn tick(&self) {
        let topics: Vec<(AuctionId, Arc<Topic>)> = {
            let topics = self.topics.lock().expect("topics lock");
            topics.iter().map(|(id, topic)| (*id, topic.clone())).collect()
        };
        for (auction_id, topic) in &topics {
            let viewers = topic.receiver_count() + self.remote_viewers(*auction_id) as usize;
            let changed = {
                let mut state = topic.state.lock().expect("topic lock");
                let changed = viewers != state.viewers_sent;
                state.viewers_sent = viewers;
                changed
            };
            if changed {
                let _sending = topic.sending.lock().expect("sending lock");
                let frame = Arc::new(Frame::viewers(*auction_id, viewers as u64));
                topic.send(Batch::new(*auction_id, vec![frame]));
            }
        }
        drop(topics);
        let mut topics = self.topics.lock().expect("topics lock");
        topics.retain(|_, topic| {
            // Held elsewhere (a join or publish in progress), watched, recent,
            // or busy right now (publish holds it: keep, and never wait for it).
            Arc::strong_count(topic) > 1
                || topic.receiver_count() > 0
                || topic.state.try_lock().map_or(true, |state| state.touched.elapsed() < TOPIC_KEEP)
        });
    }

    fn topic(&self, auction_id: AuctionId) -> Arc<Topic> {
        let mut topics = self.topics.lock().expect("topics lock");
        topics
            .entry(auction_id)
            .or_insert_with(|| {
                // Only events make a topic worth keeping unwatched.
                let long_ago = Instant::now().checked_sub(TOPIC_KEEP).unwrap_or_else(Instant::now);
                Arc::new(Topic {
                    state: Mutex::new(TopicState {
                        recent: VecDeque::new(),
                        pending: Vec::new(),
                        pending_private: Vec::new(),
                        pending_head: None,
                        viewers_sent: 0,
                        touched: long_ago,
                    }),
                    sender: std::sync::OnceLock::new(),
                    sending: Mutex::new(()),
                })
            })
            .clone()
    }

    /// Starts receiving an auction's events. With `since_seq`, and when the
    /// buffer still holds the bid with that `seq` and everything after it, the
    /// events after it come back for replay; otherwise the caller sends a
    /// snapshot. Either way nothing published after this call is missed.
    pub fn join(&self, auction_id: AuctionId, since_seq: Option<u64>) -> Joined {
        let topic = self.topic(auction_id);
        // Subscribed first, then `recent` read: a frame is either sent in a
        // batch after this (and received), or in `recent` by the time it is
        // read, or both (the version filter drops the second copy). The
        // subscription never waits under the state lock that publish needs.
        let capacity = self.settings.buffer_events.max(1);
        let receiver = topic.sender.get_or_init(|| broadcast::channel(capacity).0).subscribe();
        let state = topic.state.lock().expect("topic lock");
        let replay = since_seq.and_then(|since| {
            let position = state.recent.iter().position(|frame| frame.bid_seq == Some(since))?;
            let after: Vec<Arc<Frame>> = state.recent.iter().skip(position + 1).cloned().collect();
            // A start, end or cancel at that same seq may or may not have been
            // seen: a snapshot settles it.
            if after.iter().any(|frame| frame.is_lifecycle() && frame.version.is_some_and(|v| v.seq == since)) {
                return None;
            }
            let version = state.recent[position].version?;
            // Events of another node's auction can miss this node (from Redis):
            // a hole in what is at hand is settled by a snapshot too.
            follows_on(version, &after).then_some((version, after))
        });
        Joined { receiver, replay }
    }

    /// Watchers of the auction, on this node and (in a cluster with Redis) the others.
    pub fn viewers(&self, auction_id: AuctionId) -> u64 {
        let local = {
            let topics = self.topics.lock().expect("topics lock");
            topics.get(&auction_id).map_or(0, |topic| topic.receiver_count() as u64)
        };
        local + self.remote_viewers(auction_id)
    }

    fn remote_viewers(&self, auction_id: AuctionId) -> u64 {
        self.remote_viewers.get().map_or(0, |remote| remote.count(auction_id))
    }

    pub fn connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Private messages for `user_id` go to `sender` from now on.
    pub fn register_user(&self, user_id: UserId, route: PrivateRoute) {
        self.users.lock().expect("users lock").entry(user_id).or_default().push(route);
    }

    pub fn unregister_user(&self, user_id: UserId, connection: u64) {
        let mut users = self.users.lock().expect("users lock");
        if let Some(connections) = users.get_mut(&user_id) {
            connections.retain(|route| route.connection != connection);
            if connections.is_empty() {
                users.remove(&user_id);
            }
        }
    }

    fn send_private(&self, user_id: UserId, message: ServerMessage) {
        let users = self.users.lock().expect("users lock");
        for route in users.get(&user_id).into_iter().flatten() {
            // A full queue means the connection is far behind: it is closed
            // (the client reconnects and resubscribes) rather than left to miss this.
            if let Err(mpsc::error::TrySendError::Full(_)) = route.sender.try_send(Box::new(message.clone())) {
                route.overflow.notify_one();
            }
        }
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn connection_opened(&self) {
        self.open.send_modify(|open| *open += 1);
    }

    pub fn connection_closed(&self) {
        self.open.send_modify(|open| *open = open.saturating_sub(1));
    }

    /// Sends what is waiting, tells every connection to close (1001, going
    /// away) and waits, at most `deadline`, until they have.
    pub async fn shut_down(&self, deadline: Duration) {
        self.send_waiting();
        self.shutdown.send_replace(true);
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(deadline, open.wait_for(|open| *open == 0)).await;
    }
}

impl Watchers for Hub {
    /// Its watchers take a snapshot, and the events at hand are forgotten:
    /// some may be missing from them, so a later resume takes a snapshot too.
    fn resync(&self, auction_id: AuctionId) {
        let topic = self.topics.lock().expect("topics lock").get(&auction_id).cloned();
        if let Some(topic) = topic {
            let _sending = topic.sending.lock().expect("sending lock");
            topic.state.lock().expect("topic lock").recent.clear();
            topic.send(Batch::resync(auction_id));
        }
    }

    fn resync_where(&self, which: &dyn Fn(AuctionId) -> bool) {
        let topics: Vec<AuctionId> = self.topics.lock().expect("topics lock").keys().copied().collect();
        for auction_id in topics.into_iter().filter(|id| which(*id)) {
            self.resync(auction_id);
        }
    }

    fn check_head(&self, auction_id: AuctionId, head: Version) {
        let Some(topic) = self.topics.lock().expect("topics lock").get(&auction_id).cloned() else {
            return;
        };
        let watched = topic.receiver_count() > 0;
        let was_waiting = {
            let mut state = topic.state.lock().expect("topic lock");
            // Events after the last at hand were missed: a resume from the
            // last at hand must not be answered with nothing.
            if state.recent.back().and_then(|frame| frame.version).is_some_and(|last| last < head) {
                state.recent.clear();
            }
            if !watched {
                return;
            }
            let was_waiting = state.is_waiting();
            state.pending_head = Some(state.pending_head.map_or(head, |pending| pending.max(head)));
            was_waiting
        };
        if !was_waiting {
            self.waiting.lock().expect("waiting lock").push((auction_id, Arc::downgrade(&topic)));
        }
    }

    fn local_viewers(&self) -> Vec<(AuctionId, u64)> {
        let topics = self.topics.lock().expect("topics lock");
        topics.iter().map(|(id, topic)| (*id, topic.receiver_count() as u64)).filter(|(_, count)| *count > 0).collect()
    }

    fn set_remote_viewers(&self, remote: Arc<dyn RemoteViewers>) {
        let _ = self.remote_viewers.set(remote);
    }
}

impl EventSink for Hub {
    /// An event of this node's auctions or, from Redis, of another node's.
    /// Appends to the auction's topic when this node has one (someone
    /// watches, or watched in the last `TOPIC_KEEP`); the ticker sends. Never
    /// blocks on a reader. Without a topic only the private message goes (to
    /// the user's connections here): nobody here can have missed the event,
    /// since a watcher joining later reads the store, which already holds
    /// it. Topics are not made for auctions nobody here watches: a node runs
    /// or hears of many more auctions than are watched on it, and a buffer for
    /// each cost some 500 bytes per live auction and work on every bid.
    fn publish(&self, event: &Event, state: &AuctionState) {
        let Some(topic) = self.topics.lock().expect("topics lock").get(&state.id).cloned() else {
            tracing::debug!(auction_id = %state.id, seq = state.seq, "queued for fan-out: private messages only, nobody watches here");
            if let Some((user_id, message)) = private_messages(event, state.id) {
                self.send_private(user_id, message);
            }
            return;
        };
        tracing::debug!(auction_id = %state.id, seq = state.seq, "queued for fan-out");
        let frame = Arc::new(Frame::event(event, state));
        let was_waiting = {
            let mut topic_state = topic.state.lock().expect("topic lock");
            topic_state.touched = Instant::now();
            if topic_state.recent.len() >= self.settings.buffer_events.max(1) {
                topic_state.recent.pop_front();
            }
            topic_state.recent.push_back(frame.clone());
            let was_waiting = topic_state.is_waiting();
            topic_state.pending.push(frame);
            if let Some(private) = private_messages(event, state.id) {
                topic_state.pending_private.push(private);
            }
            was_waiting
        };
        if !was_waiting {
            self.waiting.lock().expect("waiting lock").push((state.id, Arc::downgrade(&topic)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::tests::{auction, bid};

    /// Events of another node's auction reach this node over Redis, where
    /// one can be lost: the events at hand then have a hole. A resume from
    /// before the hole was replayed across it, the missing `seq` skipped
    /// without a snapshot in its place.
    #[test]
    fn a_resume_is_replayed_only_when_no_event_since_is_missing() {
        let hub = Hub::new(WsSettings::default()).unwrap();
        let mut state = auction();
        let _watcher = hub.join(state.id, None);
        let events: Vec<(Event, AuctionState)> = (0..7).map(|step| bid(&mut state, 100 + step)).collect();
        for (event, after) in &events {
            // The bid with seq 6 never arrives.
            if after.seq != 6 {
                hub.publish(event, after);
            }
        }
        let id = state.id;
        let replayed = |since: u64| hub.join(id, Some(since)).replay.map(|(_, frames)| frames.len());
        assert_eq!(replayed(3), None, "4, 5, then 7: the hole takes a snapshot");
        assert_eq!(replayed(5), None, "7 alone does not follow on from 5");
        assert_eq!(replayed(1), None);
        assert_eq!(replayed(7), Some(0), "nothing is missing after 7");

        // A resync (events were missed, which ones unknown) forgets what is at hand.
        hub.resync(id);
        assert_eq!(replayed(7), None, "after a resync, a resume takes a snapshot");
        let (event, after) = bid(&mut state, 200);
        hub.publish(&event, &after);
        assert_eq!(replayed(8), Some(0), "events after the resync are at hand again");
    }

    /// The owner says where the auction stands. Past the last event at hand,
    /// events were missed: a resume from there takes a snapshot rather than
    /// an empty replay, whether anyone watches here now or not.
    #[test]
    fn a_head_past_the_events_at_hand_makes_a_resume_take_a_snapshot() {
        let hub = Hub::new(WsSettings::default()).unwrap();
        let mut state = auction();
        let id = state.id;
        drop(hub.join(id, None));
        for step in 0..3 {
            let (event, after) = bid(&mut state, 100 + step);
            hub.publish(&event, &after);
        }
        let replayed = |since: u64| hub.join(id, Some(since)).replay.map(|(_, frames)| frames.len());
        hub.check_head(id, Version { seq: 3, stage: 1 });
        assert_eq!(replayed(2), Some(1), "a head at hand changes nothing");
        hub.check_head(id, Version { seq: 4, stage: 1 });
        assert_eq!(replayed(3), None, "seq 4 was missed: a snapshot");
    }
}
