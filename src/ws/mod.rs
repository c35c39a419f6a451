//! `GET /ws`: the WebSocket edge of docs/API.md on the same listener as REST.
//! Bids go through the bid service (`bidding/`), the same path as `POST
//! …/bids`, so one actor decides every bid of an auction whichever edge (and
//! whichever node) it came from.
//!
//! Each connection is one task that reads the client, writes what its
//! subscriptions and private queue hand it (feeding every ready frame, then
//! flushing once), and pings the client. Everything is bounded: frame size,
//! subscriptions, messages per second, bids in flight, the private queue, how
//! far a subscription may fall behind (then it is resynchronised by snapshot),
//! and how long one write may take (then the connection is closed).

pub mod deflate;
pub mod frame;
pub mod hub;
pub mod protocol;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes};
use futures_util::{FutureExt, SinkExt, StreamExt};
use gavel_actors::AuctionId;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use sha1::{Digest, Sha1};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode};
use tokio_tungstenite::tungstenite::{self, Message};

use frame::OPCODE_PING;
pub use hub::{Hub, WsSettings};
use protocol::{Batch, ClientMessage, Encoding, Frame, MSGPACK_PROTOCOL, ServerMessage, Version, follows_on};

use crate::http::ApiContext;
use crate::http::bids::{PlaceBidRequest, bid_request};
use crate::http::error::ApiError;
use crate::http::extract::{ApiQuery, AuthUser, parse_id};
use crate::http::views::BidResultView;
use crate::http::views::{AuctionView, BidView, UserView, timestamp};
use crate::telemetry;

type Socket = WebSocketStream<deflate::ClientStream<TokioIo<hyper::upgrade::Upgraded>>>;

/// The largest message a client may send.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing node waits for a connection's bids in flight.
const SHUTDOWN_BIDS_WAIT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Frames written between two flushes at most.
const WRITE_BATCH: usize = 256;

/// Close codes (RFC 6455).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// What a snapshot that cannot be read (the store is down or too slow) ends in.
#[derive(Clone, Copy)]
enum Unreadable {
    /// The client subscribed: an `error` `UNAVAILABLE` answers it.
    Reply,
    /// The server resynchronises a subscription: the connection closes.
    Close,
}

#[derive(Deserialize)]
pub struct WsParams {
    token: Option<String>,
}

/// The `/ws` route, to be merged into the node's router (so that its
/// middleware applies to it too). The hub comes with the route: the HTTP
/// side needs nothing of WebSockets.
pub fn routes(hub: Arc<Hub>) -> axum::Router<ApiContext> {
    axum::Router::new().route("/ws", axum::routing::get(upgrade)).layer(Extension(hub))
}

/// Upgrades to a WebSocket (RFC 6455 over HTTP/1.1). A `?token=` that is
/// present must be valid (401 otherwise); without one the connection may
/// watch, and send `auth` later. The handshake is answered here rather than by
/// axum's extractor because the connection writes shared, pre-framed events
/// straight to the socket.
async fn upgrade(
    State(context): State<ApiContext>,
    Extension(hub): Extension<Arc<Hub>>,
    ApiQuery(params): ApiQuery<WsParams>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let key = match handshake_key(request.headers()) {
        Ok(key) => key,
        Err(Refusal::NotAnUpgrade) => {
            return Err(ApiError::InvalidRequest("not a WebSocket upgrade (RFC 6455, version 13)".to_owned()));
        }
        Err(Refusal::OtherVersion) => {
            let mut refusal =
                ApiError::InvalidRequest("this server speaks WebSocket version 13".to_owned()).into_response();
            *refusal.status_mut() = StatusCode::UPGRADE_REQUIRED;
            refusal.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return Ok(refusal);
        }
    };
    let user = match params.token {
        Some(token) => Some(context.auth.verify(&token, context.now_ms() / 1000).ok_or(ApiError::Unauthenticated)?),
        None => None,
    };
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| ApiError::InvalidRequest("this connection cannot be upgraded".to_owned()))?;
    let msgpack = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == MSGPACK_PROTOCOL);
    let encoding = if msgpack { Encoding::MsgPack } else { Encoding::Json };
    let offers: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let compression = if hub.settings.compression { deflate::negotiate(&offers) } else { None };
    let deflate = compression.is_some();
    let node_runtime = tokio::runtime::Handle::current();
    // Counted from here, so shutdown also waits for connections still upgrading.
    let counted = Counted::new(hub.clone());
    let connection_hub = hub.clone();
    hub.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(64 * 1024)
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES));
        let stream = deflate::ClientStream::new(TokioIo::new(upgraded), deflate, MAX_MESSAGE_BYTES);
        let socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
        serve(context, connection_hub, socket, user, encoding, deflate, node_runtime).await;
        drop(counted);
    });
    let accept = {
        let mut hasher = Sha1::new();
        hasher.update(key.as_bytes());
        hasher.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, hasher.finalize())
    };
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .map_err(|error| ApiError::internal("building the upgrade response", error))?;
    if msgpack {
        response.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(MSGPACK_PROTOCOL));
    }
    if let Some(answer) = compression {
        response.headers_mut().insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(answer));
    }
    Ok(response)
}

/// Why a request is not a WebSocket upgrade this server accepts.
enum Refusal {
    /// `400`.
    NotAnUpgrade,
    /// `426`, naming the version this server speaks (RFC 6455, 4.4).
    OtherVersion,
}

/// The client's `Sec-WebSocket-Key`, once the request is checked to be a
/// version-13 WebSocket upgrade.
fn handshake_key(headers: &HeaderMap) -> Result<String, Refusal> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(Refusal::NotAnUpgrade);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|version| version != "13") {
        return Err(Refusal::OtherVersion);
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).and_then(|key| key.to_str().ok()).ok_or(Refusal::NotAnUpgrade)?;
    if key.is_empty() || key.len() > 64 {
        return Err(Refusal::NotAnUpgrade);
    }
    Ok(key.to_owned())
}

/// What one write sends: wire bytes, and how many messages they hold (for
/// `gavel_ws_messages_sent_total`; pings are not messages).
#[derive(Default)]
struct Out {
    chunks: Vec<Bytes>,
    messages: u64,
}

impl Out {
    fn push(&mut self, chunk: Bytes, messages: u64) {
        self.chunks.push(chunk);
        self.messages += messages;
    }
}

enum Stop {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The client closed, or the connection is dead: nothing more to say.
    Gone,
}

/// Counts the connection (gauge, and the hub's count that shutdown waits on)
/// for exactly as long as it lives.
struct Counted(Arc<Hub>);

impl Counted {
    fn new(hub: Arc<Hub>) -> Counted {
        metrics::gauge!(telemetry::WS_CONNECTIONS).increment(1.0);
        hub.connection_opened();
        Counted(hub)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::WS_CONNECTIONS).decrement(1.0);
        self.0.connection_closed();
    }
}

struct Connection {
    context: ApiContext,
    hub: Arc<Hub>,
    id: u64,
    encoding: Encoding,
    /// `permessage-deflate` negotiated: whole batches go out compressed.
    deflate: bool,
    socket: Socket,
    /// Where bids run: the node's runtime, at the node's priority.
    node_runtime: tokio::runtime::Handle,
    user: Option<AuthUser>,
    /// Bid results and private messages. Boxed: the channel allocates its
    /// first block of slots up front, and idle connections should cost little.
    direct: mpsc::Sender<Box<ServerMessage>>,
    overflow: Arc<Notify>,
    subscriptions: StreamMap<AuctionId, BroadcastStream<Arc<Batch>>>,
    /// What each subscription has been shown so far.
    versions: HashMap<AuctionId, Version>,
    budget: MessageBudget,
    resyncs: VecDeque<Instant>,
    bids_in_flight: Arc<Semaphore>,
}

async fn serve(
    context: ApiContext,
    hub: Arc<Hub>,
    socket: Socket,
    user: Option<AuthUser>,
    encoding: Encoding,
    deflate: bool,
    node_runtime: tokio::runtime::Handle,
) {
    let settings = hub.settings.clone();
    let (direct, mut direct_queue) = mpsc::channel(settings.direct_queue.max(1));
    let mut connection = Connection {
        id: hub.connection_id(),
        hub,
        context,
        encoding,
        deflate,
        socket,
        node_runtime,
        user: None,
        direct,
        overflow: Arc::new(Notify::new()),
        subscriptions: StreamMap::new(),
        versions: HashMap::new(),
        budget: MessageBudget::new(settings.messages_per_sec, Instant::now()),
        resyncs: VecDeque::new(),
        bids_in_flight: Arc::new(Semaphore::new(settings.max_bids_in_flight.max(1))),
    };
    if let Some(user) = user {
        connection.authenticate(user);
    }
    let stop = connection.run(&mut direct_queue).await;
    connection.finish(stop).await;
}

impl Connection {
    async fn run(&mut self, direct_queue: &mut mpsc::Receiver<Box<ServerMessage>>) -> Stop {
        let mut shutdown = self.hub.shutdown_signal();
        let ping_interval = self.hub.settings.ping_interval;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let overflow = self.overflow.clone();
        // Both end the connection: made once, not again on every turn of the
        // loop (a watcher of a hot auction turns it dozens of times a second).
        let stopping = async {
            let _ = shutdown.wait_for(|stopping| *stopping).await;
        };
        let overflowed = overflow.notified();
        tokio::pin!(stopping, overflowed);
        loop {
            let step = tokio::select! {
                biased;
                () = &mut stopping => {
                    // Bids in flight are answered before closing: wait (a
                    // while) for their tasks to hand back their permits.
                    let in_flight = self.hub.settings.max_bids_in_flight.max(1) as u32;
                    let _ = tokio::time::timeout(SHUTDOWN_BIDS_WAIT, self.bids_in_flight.acquire_many(in_flight)).await;
                    // The last batches (sent just before the signal) first,
                    // then the private messages they caused.
                    let mut last = Out::default();
                    while let Some(Some((_, Ok(batch)))) = self.subscriptions.next().now_or_never() {
                        // Shutting down: a gap is not mended by a snapshot any more.
                        let _ = self.accept_batch(&batch, &mut last);
                    }
                    while let Ok(message) = direct_queue.try_recv() {
                        last.push(message.encode(self.encoding), 1);
                    }
                    if let Err(stop) = self.write(last).await {
                        return stop;
                    }
                    return Stop::Close(CLOSE_GOING_AWAY, "server shutting down");
                }
                () = &mut overflowed => Err(Stop::Close(CLOSE_POLICY, "too slow to keep up")),
                // The client first: a busy subscription must not leave its
                // messages (or its answers to pings) unread.
                incoming = self.socket.next() => match incoming {
                    None => Err(Stop::Gone),
                    Some(Err(error)) => Err(read_error(error)),
                    Some(Ok(message)) => {
                        last_heard = Instant::now();
                        self.on_message(message).await
                    }
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > ping_interval * 2 + ping_interval / 2 {
                        Err(Stop::Close(CLOSE_GOING_AWAY, "no answer to pings"))
                    } else {
                        let mut ping = Vec::with_capacity(2);
                        frame::frame_into(OPCODE_PING, &[], &mut ping);
                        self.write(Out { chunks: vec![Bytes::from(ping)], messages: 0 }).await
                    }
                }
                // Events before the private messages they caused.
                Some((auction_id, item)) = self.subscriptions.next(), if !self.subscriptions.is_empty() => {
                    self.on_frames(auction_id, item).await
                }
                Some(message) = direct_queue.recv() => {
                    let mut batch = Out::default();
                    batch.push(message.encode(self.encoding), 1);
                    while batch.chunks.len() < WRITE_BATCH && let Ok(message) = direct_queue.try_recv() {
                        batch.push(message.encode(self.encoding), 1);
                    }
                    self.write(batch).await
                }
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    async fn finish(mut self, stop: Stop) {
        if let Stop::Close(code, reason) = stop {
            let close = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
            let sent = tokio::time::timeout(self.hub.settings.write_timeout, self.socket.close(Some(close))).await;
            // Wait briefly for the client's close, discarding what it still
            // sends: closing with unread input would reset the connection and
            // could lose our close frame on the way.
            if matches!(sent, Ok(Ok(()))) {
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    while let Some(Ok(message)) = self.socket.next().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.get_mut().shutdown()).await;
        if let Some(user) = &self.user {
            self.hub.unregister_user(user.id, self.id);
        }
    }

    fn authenticate(&mut self, user: AuthUser) {
        let route =
            hub::PrivateRoute { connection: self.id, sender: self.direct.clone(), overflow: self.overflow.clone() };
        self.hub.register_user(user.id, route);
        self.user = Some(user);
    }

    /// Writes wire bytes (complete frames) straight to the socket, as few
    /// system calls as it takes, within the write timeout. The protocol
    /// layer's own pending frames (answers to pings) go first, so frames never
    /// interleave.
    async fn write(&mut self, out: Out) -> Result<(), Stop> {
        let Out { chunks, messages } = out;
        if chunks.is_empty() {
            return Ok(());
        }
        let socket = &mut self.socket;
        let written = tokio::time::timeout(self.hub.settings.write_timeout, async move {
            socket.flush().await.map_err(std::io::Error::other)?;
            write_all_vectored(socket.get_mut(), chunks).await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                metrics::counter!(telemetry::WS_MESSAGES_SENT_TOTAL).increment(messages);
                Ok(())
            }
            // Too slow to take even this, or gone.
            Ok(Err(_)) | Err(_) => Err(Stop::Gone),
        }
    }

    async fn reply(&mut self, message: ServerMessage) -> Result<(), Stop> {
        let mut out = Out::default();
        out.push(message.encode(self.encoding), 1);
        self.write(out).await
    }

    /// Handles one subscription item and whatever else is ready right now, so a
    /// burst of events leaves in one flush.
    async fn on_frames(
        &mut self,
        auction_id: AuctionId,
        first: Result<Arc<Batch>, BroadcastStreamRecvError>,
    ) -> Result<(), Stop> {
        let mut out = Out::default();
        let mut lagged = HashSet::new();
        let mut stale = HashSet::new();
        let mut item = Some((auction_id, first));
        let mut handled = 0;
        while let Some((auction_id, result)) = item.take() {
            match result {
                // The node missed events of this auction (from another node):
                // a snapshot replaces what this subscriber may not have seen.
                Ok(batch) if batch.resync => {
                    stale.insert(auction_id);
                }
                Ok(batch) if batch.head.is_some() => {
                    let shown = self.versions.get(&auction_id);
                    if batch.head.is_some_and(|head| shown.is_some_and(|shown| *shown < head)) {
                        stale.insert(auction_id);
                    }
                }
                Ok(batch) if !lagged.contains(&auction_id) && !stale.contains(&auction_id) => {
                    if !self.accept_batch(&batch, &mut out) {
                        stale.insert(auction_id);
                    }
                }
                Ok(_) => {}
                // Events were lost to this reader: nothing more of this auction
                // is written until a snapshot has replaced the gap.
                Err(BroadcastStreamRecvError::Lagged(_)) => {
                    lagged.insert(auction_id);
                }
            }
            handled += 1;
            if handled < WRITE_BATCH {
                item = self.subscriptions.next().now_or_never().flatten();
            }
        }
        self.write(out).await?;
        for auction_id in lagged {
            self.resync(auction_id).await?;
        }
        for auction_id in stale {
            if self.versions.contains_key(&auction_id) {
                self.resubscribe(auction_id).await?;
            }
        }
        Ok(())
    }

    /// The part of a batch this subscription has not been shown yet: its
    /// frames are in order, so that is everything from the first new one on.
    /// `false` (nothing shown) when the new frames do not follow on from what
    /// was shown: events of another node's auction were missed on the way
    /// here, and a snapshot must replace them.
    fn accept_batch(&mut self, batch: &Batch, out: &mut Out) -> bool {
        let Some(shown) = self.versions.get_mut(&batch.auction_id) else {
            return true;
        };
        let first_new = batch.frames.iter().position(|frame| frame.version.is_none_or(|version| version > *shown));
        let Some(first_new) = first_new else {
            return true;
        };
        if !follows_on(*shown, &batch.frames[first_new..]) {
            return false;
        }
        if let Some(version) = batch.frames.iter().rev().find_map(|frame| frame.version) {
            *shown = (*shown).max(version);
        }
        let messages = batch.frames[first_new..].iter().map(|frame| frame.message_count()).sum();
        if self.deflate && first_new == 0 {
            out.push(batch.deflated_wire(self.encoding).clone(), messages);
            return true;
        }
        // Part of a batch goes uncompressed: its compressed messages would
        // refer to the ones before them.
        let (wire, starts) = batch.wire(self.encoding);
        out.push(wire.slice(starts[first_new]..), messages);
        true
    }

    fn accept(&mut self, frame: &Frame, out: &mut Out) {
        let Some(shown) = self.versions.get_mut(&frame.auction_id) else {
            return;
        };
        if let Some(version) = frame.version {
            if version <= *shown {
                return;
            }
            *shown = version;
        }
        out.push(frame.wire(self.encoding).clone(), frame.message_count());
    }

    async fn resync(&mut self, auction_id: AuctionId) -> Result<(), Stop> {
        metrics::counter!(telemetry::WS_SLOW_CONSUMER_RESYNCS_TOTAL).increment(1);
        let now = Instant::now();
        while self.resyncs.front().is_some_and(|at| now.duration_since(*at) > Duration::from_secs(60)) {
            self.resyncs.pop_front();
        }
        self.resyncs.push_back(now);
        if self.resyncs.len() > self.hub.settings.max_resyncs_per_minute {
            return Err(Stop::Close(CLOSE_POLICY, "too slow to keep up"));
        }
        self.resubscribe(auction_id).await
    }

    /// A fresh snapshot, and the auction's events from there on. When it
    /// cannot be read, the connection closes with 1013 (try again later): the
    /// client asked for nothing, so an `error` would leave it watching an
    /// auction that no longer moves; reconnecting, it resumes.
    async fn resubscribe(&mut self, auction_id: AuctionId) -> Result<(), Stop> {
        self.subscriptions.remove(&auction_id);
        self.versions.remove(&auction_id);
        let joined = self.hub.join(auction_id, None);
        self.send_snapshot(auction_id, joined.receiver, Unreadable::Close).await
    }

    async fn on_message(&mut self, message: Message) -> Result<(), Stop> {
        let mut message_text = None;
        let parsed = match message {
            Message::Text(text) => {
                if !self.admit().await? {
                    return Ok(());
                }
                let parsed = serde_json::from_str::<Value>(text.as_str()).map_err(|error| format!("not JSON: {error}"));
                message_text = Some(text);
                parsed
            }
            Message::Binary(bytes) => {
                if !self.admit().await? {
                    return Ok(());
                }
                rmp_serde::from_slice::<Value>(&bytes).map_err(|error| format!("not MessagePack: {error}"))
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
            Message::Close(_) => {
                // The close reply is queued by the protocol layer; send it.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.flush()).await;
                return Err(Stop::Gone);
            }
        };
        match parsed {
            Ok(value) => self.handle(value).await,
            Err(message) => match out_of_range_bid(&message_text) {
                // A number too large to parse (`1e400`) is an absurd amount, as on REST;
                // the bid's own `request_id` still gets its answer.
                Some(request_id) => {
                    let error = ApiError::InvalidAmount("a number is out of range".to_owned());
                    self.reply(bid_error(request_id, &error)).await
                }
                None => self.reply(ServerMessage::error("INVALID_REQUEST", message)).await,
            },
        }
    }

    /// Charges one message to the budget: `false` (and an error to the client)
    /// when it is spent; a client that keeps going regardless is closed.
    async fn admit(&mut self) -> Result<bool, Stop> {
        match self.budget.charge(Instant::now()) {
            Charge::Admitted => Ok(true),
            Charge::Refused => {
                self.reply(ServerMessage::error("RATE_LIMITED", "too many messages; slow down")).await?;
                Ok(false)
            }
            Charge::Flood => Err(Stop::Close(CLOSE_POLICY, "message rate exceeded")),
        }
    }

    async fn handle(&mut self, value: Value) -> Result<(), Stop> {
        let request_id = value.get("request_id").and_then(Value::as_str).map(str::to_owned);
        let is_bid = value.get("type").and_then(Value::as_str) == Some("bid");
        let message = match serde_json::from_value::<ClientMessage>(value) {
            Ok(message) => message,
            Err(error) => {
                let error = ApiError::InvalidRequest(format!("invalid message: {error}"));
                return match request_id {
                    Some(request_id) if is_bid => self.reply(bid_error(request_id, &error)).await,
                    _ => self.reply(api_error(&error)).await,
                };
            }
        };
        match message {
            ClientMessage::Ping {} => {
                self.reply(ServerMessage::Pong { server_time: timestamp(self.context.now_ms()) }).await
            }
            ClientMessage::Auth { token } => {
                if self.user.is_some() {
                    return self
                        .reply(ServerMessage::error("INVALID_REQUEST", "this connection is authenticated"))
                        .await;
                }
                match self.context.auth.verify(&token, self.context.now_ms() / 1000) {
                    Some(user) => {
                        let view = UserView { id: user.id, username: user.username.clone() };
                        self.authenticate(user);
                        self.reply(ServerMessage::Authenticated { user: view }).await
                    }
                    None => self.reply(ServerMessage::error("UNAUTHENTICATED", "invalid or expired token")).await,
                }
            }
            ClientMessage::Subscribe { auction_id, since_seq } => match parse_id(&auction_id, "auction_id") {
                Ok(auction_id) => self.subscribe(auction_id, since_seq).await,
                Err(error) => self.reply(api_error(&error)).await,
            },
            ClientMessage::Unsubscribe { auction_id } => match parse_id(&auction_id, "auction_id") {
                Ok(auction_id) => {
                    self.subscriptions.remove(&auction_id);
                    self.versions.remove(&auction_id);
                    Ok(())
                }
                Err(error) => self.reply(api_error(&error)).await,
            },
            ClientMessage::Bid { request_id, auction_id, amount, max_amount } => {
                self.bid(request_id, auction_id, PlaceBidRequest { amount, max_amount }).await
            }
        }
    }

    async fn subscribe(&mut self, auction_id: AuctionId, since_seq: Option<u64>) -> Result<(), Stop> {
        let resubscribing = self.versions.contains_key(&auction_id);
        if !resubscribing && self.versions.len() >= self.hub.settings.max_subscriptions {
            let message = format!("at most {} subscriptions per connection", self.hub.settings.max_subscriptions);
            return self
                .reply(ServerMessage::Error { code: "TOO_MANY_SUBSCRIPTIONS", message, auction_id: Some(auction_id) })
                .await;
        }
        self.subscriptions.remove(&auction_id);
        self.versions.remove(&auction_id);
        let joined = self.hub.join(auction_id, since_seq);
        match joined.replay {
            Some((version, frames)) => {
                self.versions.insert(auction_id, version);
                self.subscriptions.insert(auction_id, BroadcastStream::new(joined.receiver));
                let mut out = Out::default();
                for frame in &frames {
                    self.accept(frame, &mut out);
                }
                self.write(out).await
            }
            None => self.send_snapshot(auction_id, joined.receiver, Unreadable::Reply).await,
        }
    }

    /// The auction as committed, then its events from there on. The receiver
    /// was subscribed before the store is read, so whatever is published
    /// meanwhile is either in the snapshot (and dropped as already shown) or
    /// after it.
    async fn send_snapshot(
        &mut self,
        auction_id: AuctionId,
        receiver: broadcast::Receiver<Arc<Batch>>,
        unreadable: Unreadable,
    ) -> Result<(), Stop> {
        let db = self.context.db.clone();
        let redis = self.context.redis.clone();
        // On the node's runtime: the database's and Redis's connections belong there.
        let read = self.node_runtime.spawn(async move {
            let snapshots = redis.as_deref().and_then(|redis| redis.snapshots());
            crate::events::snapshots::current(&db, snapshots, auction_id, true).await
        });
        let (row, bids) = match tokio::time::timeout(SNAPSHOT_TIMEOUT, read).await {
            Ok(Ok(Ok(Some(current)))) => (current.row, current.recent_bids),
            Ok(Ok(Ok(None))) => {
                let message = ServerMessage::Error {
                    code: "AUCTION_NOT_FOUND",
                    message: "no such auction".to_owned(),
                    auction_id: Some(auction_id),
                };
                return self.reply(message).await;
            }
            failed => {
                if let Ok(Ok(Err(error))) = failed {
                    tracing::error!(%error, %auction_id, "reading a snapshot");
                }
                return match unreadable {
                    Unreadable::Reply => self.reply(unavailable(auction_id)).await,
                    Unreadable::Close => Err(Stop::Close(CLOSE_TRY_AGAIN_LATER, "an auction could not be read")),
                };
            }
        };
        let now = self.context.now_ms();
        let viewer = self.user.as_ref().map(|user| user.id);
        let snapshot = ServerMessage::Snapshot {
            auction_id,
            auction: Box::new(AuctionView::from_row(&row, viewer, now)),
            recent_bids: bids.iter().map(BidView::from).collect(),
            viewers: self.hub.viewers(auction_id),
            server_time: timestamp(now),
        };
        self.versions.insert(auction_id, Version::of(row.seq as u64, row.status()));
        self.subscriptions.insert(auction_id, BroadcastStream::new(receiver));
        self.reply(snapshot).await
    }

    async fn bid(&mut self, request_id: String, auction_id: String, request: PlaceBidRequest) -> Result<(), Stop> {
        let Some(user) = self.user.clone() else {
            return self.reply(bid_error(request_id, &ApiError::Unauthenticated)).await;
        };
        if request_id.is_empty()
            || request_id.len() > 64
            || !request_id.bytes().all(|byte| (0x20..=0x7e).contains(&byte))
        {
            let error = ApiError::InvalidRequest("request_id must be 1 to 64 printable ASCII characters".to_owned());
            return self.reply(bid_error(request_id, &error)).await;
        }
        let auction_id = match parse_id(&auction_id, "auction_id") {
            Ok(auction_id) => auction_id,
            Err(error) => return self.reply(bid_error(request_id, &error)).await,
        };
        let Ok(permit) = self.bids_in_flight.clone().try_acquire_owned() else {
            let error = ApiError::RateLimited { retry_after_secs: 1, of: crate::http::error::Limited::Bids };
            return self.reply(bid_error(request_id, &error)).await;
        };
        let bid = match bid_request(&user, auction_id, &request, Some(request_id.clone())) {
            Ok(bid) => bid,
            Err(error) => return self.reply(bid_error(request_id, &error)).await,
        };
        let context = self.context.clone();
        let direct = self.direct.clone();
        self.node_runtime.spawn(async move {
            let started = std::time::Instant::now();
            let decided = context.bidding.place(bid).await;
            let outcome = decided.result.map(|receipt| BidResultView::from(&receipt)).map_err(ApiError::from);
            let label = outcome.as_ref().map_or_else(ApiError::code, |_| "accepted");
            metrics::counter!(telemetry::BIDS_TOTAL, "outcome" => label).increment(1);
            metrics::histogram!(telemetry::BID_LATENCY_SECONDS).record(started.elapsed().as_secs_f64());
            let message = match outcome {
                Ok(result) => ServerMessage::BidResult { request_id, result: Some(result), error: None },
                Err(error) => bid_error(request_id, &error),
            };
            // Waits while the connection's queue is full; ends when it closes.
            let _ = direct.send(Box::new(message)).await;
            drop(permit);
        });
        Ok(())
    }
}

/// The `request_id` of a JSON bid that failed to parse only because a number
/// in it is out of range; `None` for anything else.
fn out_of_range_bid(text: &Option<tungstenite::Utf8Bytes>) -> Option<String> {
    #[derive(Deserialize)]
    struct BidEnvelope {
        #[serde(rename = "type")]
        kind: String,
        request_id: String,
    }
    let text = text.as_ref()?.as_str();
    let number_out_of_range = serde_json::from_str::<Value>(text)
        .err()
        .is_some_and(|error| error.to_string().starts_with("number out of range"));
    // Skipping a number does not convert it: the rest of the message still parses.
    let envelope: BidEnvelope = serde_json::from_str(text).ok()?;
    (number_out_of_range && envelope.kind == "bid").then_some(envelope.request_id)
}

fn bid_error(request_id: String, error: &ApiError) -> ServerMessage {
    ServerMessage::BidResult { request_id, result: None, error: Some(error.detail()) }
}

fn api_error(error: &ApiError) -> ServerMessage {
    let message = error.detail().get("message").and_then(Value::as_str).unwrap_or_default().to_owned();
    ServerMessage::error(error.code(), message)
}

fn unavailable(auction_id: AuctionId) -> ServerMessage {
    ServerMessage::Error {
        code: "UNAVAILABLE",
        message: "the auction cannot be read right now; subscribe again".to_owned(),
        auction_id: Some(auction_id),
    }
}

/// Why reading failed, as the close the client should get.
fn read_error(error: tungstenite::Error) -> Stop {
    match error {
        tungstenite::Error::Capacity(_) => Stop::Close(CLOSE_TOO_BIG, "message too big"),
        tungstenite::Error::Utf8(_) => Stop::Close(CLOSE_INVALID_PAYLOAD, "text frame is not UTF-8"),
        tungstenite::Error::Protocol(_) => Stop::Close(CLOSE_PROTOCOL_ERROR, "protocol error"),
        _ => Stop::Gone,
    }
}

/// Writes every chunk, whole, in vectored writes.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    chunks: Vec<Bytes>,
) -> std::io::Result<()> {
    let mut chunks = VecDeque::from(chunks);
    while !chunks.is_empty() {
        let slices: Vec<IoSlice<'_>> = chunks.iter().take(64).map(|chunk| IoSlice::new(chunk)).collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(first) = chunks.front_mut() else { break };
            if written >= first.len() {
                written -= first.len();
                chunks.pop_front();
            } else {
                first.advance(written);
                written = 0;
            }
        }
    }
    writer.flush().await
}

enum Charge {
    Admitted,
    Refused,
    Flood,
}

/// A token bucket in thousandths of a message: `per_sec` a second, bursts of
/// twice that. Refusals in a row beyond one second's worth are a flood.
struct MessageBudget {
    per_sec: u64,
    milli_tokens: u64,
    refilled: Instant,
    refused_in_a_row: u64,
}

impl MessageBudget {
    fn new(per_sec: u32, now: Instant) -> MessageBudget {
        let per_sec = u64::from(per_sec);
        MessageBudget { per_sec, milli_tokens: per_sec * 2_000, refilled: now, refused_in_a_row: 0 }
    }

    fn charge(&mut self, now: Instant) -> Charge {
        if self.per_sec == 0 {
            return Charge::Admitted;
        }
        let elapsed_ms = now.duration_since(self.refilled).as_millis() as u64;
        if elapsed_ms > 0 {
            self.milli_tokens = (self.milli_tokens + elapsed_ms * self.per_sec).min(self.per_sec * 2_000);
            self.refilled = now;
        }
        if self.milli_tokens >= 1_000 {
            self.milli_tokens -= 1_000;
            self.refused_in_a_row = 0;
            return Charge::Admitted;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row > self.per_sec { Charge::Flood } else { Charge::Refused }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_bursts_refuses_then_calls_a_flood() {
        let start = Instant::now();
        let mut budget = MessageBudget::new(5, start);
        for _ in 0..10 {
            assert!(matches!(budget.charge(start), Charge::Admitted));
        }
        for _ in 0..5 {
            assert!(matches!(budget.charge(start), Charge::Refused));
        }
        assert!(matches!(budget.charge(start), Charge::Flood));
        // A fifth of a second later one message's worth has come back.
        assert!(matches!(budget.charge(start + Duration::from_millis(200)), Charge::Admitted));
    }
}
