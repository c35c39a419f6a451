//! The fan-out: the node's `EventSink`. Each durable event becomes one shared
//! `Frame`, appended to its auction's topic: a bounded buffer of recent events
//! (for `since_seq` resumes) and a broadcast channel to the subscribed
//! connections. Publishing never blocks and never waits for a reader: a reader
//! that falls more than the channel's capacity behind finds out (it lagged) and
//! resynchronises from a snapshot. Private messages (`outbid`, `won`) go to
//! every connection of their user through that connection's own bounded queue.
//!
//! A ticker sends each auction's viewer count when it changed, at most once a
//! second, and forgets topics nobody has watched or published to for a while.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use gavel_actors::ports::EventSink;
use gavel_actors::{AuctionId, AuctionState, Event, UserId};
use tokio::sync::{broadcast, mpsc, watch};

use super::protocol::{Frame, ServerMessage, Version, private_messages};

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
        }
    }
}

struct Topic {
    recent: VecDeque<Arc<Frame>>,
    sender: broadcast::Sender<Arc<Frame>>,
    viewers_sent: usize,
    touched: Instant,
}

/// Where a user's private messages go: one entry per connection.
#[derive(Clone)]
pub struct PrivateRoute {
    pub connection: u64,
    pub sender: mpsc::Sender<ServerMessage>,
    /// Told when the connection's queue was full: it cannot keep up and closes.
    pub overflow: Arc<tokio::sync::Notify>,
}

/// What `join` hands a connection: its receiver, and the events to replay
/// first when a resume could be served from the buffer.
pub struct Joined {
    pub receiver: broadcast::Receiver<Arc<Frame>>,
    pub replay: Option<(Version, Vec<Arc<Frame>>)>,
}

pub struct Hub {
    pub settings: WsSettings,
    topics: Mutex<HashMap<AuctionId, Arc<Mutex<Topic>>>>,
    users: Mutex<HashMap<UserId, Vec<PrivateRoute>>>,
    next_connection: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Open connections, so shutdown can wait for them to close.
    open: watch::Sender<usize>,
}

/// How long a topic nobody watches is kept after its last event (for resumes).
const TOPIC_KEEP: Duration = Duration::from_secs(300);

impl Hub {
    pub fn new(settings: WsSettings) -> Arc<Hub> {
        let (shutdown, _) = watch::channel(false);
        let (open, _) = watch::channel(0);
        Arc::new(Hub {
            settings,
            topics: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            shutdown,
            open,
        })
    }

    /// Sends viewer counts and forgets idle topics, once a second, for as long
    /// as the hub lives.
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let hub: Weak<Hub> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(hub) = hub.upgrade() else { return };
                hub.tick();
            }
        })
    }

    fn tick(&self) {
        let mut topics = self.topics.lock().expect("topics lock");
        topics.retain(|auction_id, topic| {
            let mut topic = topic.lock().expect("topic lock");
            let viewers = topic.sender.receiver_count();
            if viewers != topic.viewers_sent {
                topic.viewers_sent = viewers;
                let _ = topic.sender.send(Arc::new(Frame::viewers(*auction_id, viewers as u64)));
            }
            viewers > 0 || topic.touched.elapsed() < TOPIC_KEEP
        });
    }

    fn topic(&self, auction_id: AuctionId) -> Arc<Mutex<Topic>> {
        let mut topics = self.topics.lock().expect("topics lock");
        topics
            .entry(auction_id)
            .or_insert_with(|| {
                let (sender, _) = broadcast::channel(self.settings.buffer_events.max(1));
                Arc::new(Mutex::new(Topic {
                    recent: VecDeque::new(),
                    sender,
                    viewers_sent: 0,
                    touched: Instant::now(),
                }))
            })
            .clone()
    }

    /// Starts receiving an auction's events. With `since_seq`, and when the
    /// buffer still holds the bid with that `seq` and everything after it, the
    /// events after it come back for replay; otherwise the caller sends a
    /// snapshot. Either way nothing published after this call is missed.
    pub fn join(&self, auction_id: AuctionId, since_seq: Option<u64>) -> Joined {
        let topic = self.topic(auction_id);
        let topic = topic.lock().expect("topic lock");
        let receiver = topic.sender.subscribe();
        let replay = since_seq.and_then(|since| {
            let position = topic.recent.iter().position(|frame| frame.bid_seq == Some(since))?;
            let after: Vec<Arc<Frame>> = topic.recent.iter().skip(position + 1).cloned().collect();
            // A start, end or cancel at that same seq may or may not have been
            // seen: a snapshot settles it.
            if after.iter().any(|frame| frame.is_lifecycle() && frame.version.is_some_and(|v| v.seq == since)) {
                return None;
            }
            let version = topic.recent[position].version?;
            Some((version, after))
        });
        Joined { receiver, replay }
    }

    pub fn viewers(&self, auction_id: AuctionId) -> u64 {
        let topics = self.topics.lock().expect("topics lock");
        topics.get(&auction_id).map_or(0, |topic| topic.lock().expect("topic lock").sender.receiver_count() as u64)
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
            if let Err(mpsc::error::TrySendError::Full(_)) = route.sender.try_send(message.clone()) {
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

    /// Tells every connection to close (1001, going away) and waits, at most
    /// `deadline`, until they have.
    pub async fn shut_down(&self, deadline: Duration) {
        self.shutdown.send_replace(true);
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(deadline, open.wait_for(|open| *open == 0)).await;
    }
}

impl EventSink for Hub {
    fn publish(&self, event: &Event, state: &AuctionState) {
        if let Some((user_id, message)) = private_messages(event, state.id) {
            self.send_private(user_id, message);
        }
        let frame = Arc::new(Frame::event(event, state));
        let topic = self.topic(state.id);
        let mut topic = topic.lock().expect("topic lock");
        topic.touched = Instant::now();
        if topic.recent.len() >= self.settings.buffer_events.max(1) {
            topic.recent.pop_front();
        }
        topic.recent.push_back(frame.clone());
        // No receivers is not an error: nobody is watching.
        let _ = topic.sender.send(frame);
    }
}
