//! A WebSocket client for tests: real sockets (tokio-tungstenite), JSON or
//! MessagePack, every read with a deadline.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const READ_DEADLINE: Duration = Duration::from_secs(15);

/// What both test clients share: their messages, decoded, each read with a deadline.
pub(crate) trait Watcher {
    /// The next data message; `None` once the server closed.
    async fn try_next(&mut self) -> Option<Value>;

    async fn next(&mut self) -> Value {
        self.try_next().await.expect("connection open")
    }

    /// The next message that is not a viewer count.
    async fn next_event(&mut self) -> Value {
        loop {
            let message = self.next().await;
            if message["type"] != "viewers" {
                return message;
            }
        }
    }

    /// Reads the messages after a snapshot until bid `last_seq`: bids only.
    async fn bids_until(&mut self, last_seq: u64) -> Vec<Value> {
        let mut bids = Vec::new();
        while bids.last().is_none_or(|bid: &Value| bid["seq"].as_u64() != Some(last_seq)) {
            let message = self.next_event().await;
            assert_eq!(message["type"], "bid", "only bids follow here: {message}");
            bids.push(message);
        }
        bids
    }
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub msgpack: bool,
}

pub fn ws_url(address: &str, token: Option<&str>) -> String {
    let base = address.replacen("http://", "ws://", 1);
    match token {
        Some(token) => format!("{base}/ws?token={token}"),
        None => format!("{base}/ws"),
    }
}

impl WsClient {
    pub async fn connect(address: &str, token: Option<&str>) -> WsClient {
        Self::connect_with(address, token, false).await
    }

    pub async fn connect_msgpack(address: &str, token: Option<&str>) -> WsClient {
        Self::connect_with(address, token, true).await
    }

    async fn connect_with(address: &str, token: Option<&str>, msgpack: bool) -> WsClient {
        let mut request = ws_url(address, token).into_client_request().expect("ws request");
        if msgpack {
            request.headers_mut().insert("sec-websocket-protocol", "gavel.msgpack".parse().unwrap());
        }
        let (stream, response) = tokio::time::timeout(READ_DEADLINE, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect within the deadline")
            .expect("WebSocket handshake");
        let protocol = response.headers().get("sec-websocket-protocol").map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(protocol.as_deref(), msgpack.then_some("gavel.msgpack"), "negotiated subprotocol");
        WsClient { stream, msgpack }
    }

    /// Sends in the connection's encoding.
    pub async fn send(&mut self, value: Value) {
        let message = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&value).expect("msgpack").into())
        } else {
            Message::Text(value.to_string().into())
        };
        self.send_raw(message).await;
    }

    pub async fn send_raw(&mut self, message: Message) {
        tokio::time::timeout(READ_DEADLINE, self.stream.send(message))
            .await
            .expect("send within the deadline")
            .expect("send");
    }

    /// Skips messages until one of type `kind`.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let message = self.next().await;
            if message["type"] == kind {
                return message;
            }
        }
    }

    pub async fn subscribe(&mut self, auction_id: &str) -> Value {
        self.send(json!({"type": "subscribe", "auction_id": auction_id})).await;
        let snapshot = self.next_event().await;
        assert_eq!(snapshot["type"], "snapshot", "subscribe answers with a snapshot: {snapshot}");
        snapshot
    }

    /// Everything the server sends in the next observation window (viewer
    /// counts left out): until the answer to a ping, then, after several
    /// event-batch intervals (20 ms) have passed, until the answer to another.
    /// Checking that nothing (else) arrives needs a window; this one is ten
    /// batch intervals long.
    pub async fn drain(&mut self) -> Vec<Value> {
        let mut seen = Vec::new();
        for round in 0..2 {
            if round == 1 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            self.send(json!({"type": "ping"})).await;
            loop {
                let message = self.next().await;
                if message["type"] == "pong" {
                    break;
                }
                if message["type"] != "viewers" {
                    seen.push(message);
                }
            }
        }
        seen
    }

    /// Reads until the server's close frame and returns it.
    pub async fn close_frame(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(READ_DEADLINE, self.stream.next()).await.expect("close within the deadline") {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

impl Watcher for WsClient {
    async fn try_next(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(READ_DEADLINE, self.stream.next())
                .await
                .expect("a message within the deadline")?
                .ok()?;
            match message {
                Message::Text(text) => {
                    assert!(!self.msgpack, "a text frame on a MessagePack connection: {text}");
                    return Some(serde_json::from_str(&text).expect("server sends JSON"));
                }
                Message::Binary(bytes) => {
                    assert!(self.msgpack, "a binary frame on a JSON connection");
                    return Some(
                        rmp_serde::from_slice(&bytes)
                            .unwrap_or_else(|error| panic!("server sends MessagePack: {error}: {bytes:?}")),
                    );
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }
}

/// A WebSocket client written from RFC 6455 and RFC 7692, with no library
/// between it and the socket: it offers `permessage-deflate`, inflates the
/// server's compressed messages with one window kept from each to the next (as
/// browsers do), and can send its own messages compressed and fragmented.
pub struct DeflateClient {
    stream: TcpStream,
    buffer: Vec<u8>,
    inflater: flate2::Decompress,
    /// The `Sec-WebSocket-Extensions` of the 101, if any.
    pub extensions: Option<String>,
    /// Messages that came compressed.
    pub compressed_messages: u64,
    /// Of those, `bid` events.
    pub compressed_bids: u64,
    /// The close code the server sent, once it closed.
    pub close_code: Option<u16>,
    /// Every data message, in order: how it came.
    pub received: Vec<Received>,
    /// `gavel.msgpack` negotiated: binary MessagePack frames.
    pub msgpack: bool,
}

/// How one message came.
#[derive(Clone, Debug)]
pub struct Received {
    pub kind: String,
    pub seq: Option<u64>,
    pub compressed: bool,
    /// Its payload on the wire, and inflated.
    pub wire_bytes: usize,
    pub bytes: usize,
}

const FLUSH_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Raw deflate with a sync flush, its four trailing bytes dropped (RFC 7692, 7.2.1).
pub fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(bytes.len() + 64);
    compressor.compress_vec(bytes, &mut out, flate2::FlushCompress::Sync).expect("deflate");
    assert!(out.ends_with(&FLUSH_TAIL) && compressor.total_in() as usize == bytes.len(), "one call was enough");
    out.truncate(out.len() - FLUSH_TAIL.len());
    out
}

/// One masked client frame.
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x08];
    let mut frame = vec![first];
    match payload.len() {
        length @ 0..=125 => frame.push(0x80 | length as u8),
        length @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(length as u16).to_be_bytes());
        }
        length => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
    frame
}

impl DeflateClient {
    /// Connects to `/ws` offering `offer` in `Sec-WebSocket-Extensions`.
    pub async fn connect(address: &str, token: Option<&str>, offer: &str) -> DeflateClient {
        Self::connect_with(address, token, offer, false).await
    }

    /// The same, asking for `gavel.msgpack` too when `msgpack`.
    pub async fn connect_with(address: &str, token: Option<&str>, offer: &str, msgpack: bool) -> DeflateClient {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = address.trim_start_matches("http://");
        let mut stream = tokio::time::timeout(READ_DEADLINE, TcpStream::connect(host))
            .await
            .expect("connect in time")
            .expect("connect");
        let path = token.map_or_else(|| "/ws".to_owned(), |token| format!("/ws?token={token}"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: {offer}\r\n{protocol}\r\n",
            protocol = if msgpack { "Sec-WebSocket-Protocol: gavel.msgpack\r\n" } else { "" }
        );
        stream.write_all(request.as_bytes()).await.expect("send the upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(READ_DEADLINE, stream.read(&mut byte)).await.expect("101 in time");
            assert_eq!(read.expect("read the 101"), 1, "the server answered the upgrade: {head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).expect("an HTTP head");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim().to_owned())
        });
        DeflateClient {
            stream,
            buffer: Vec::new(),
            inflater: flate2::Decompress::new(false),
            extensions,
            compressed_messages: 0,
            compressed_bids: 0,
            close_code: None,
            received: Vec::new(),
            msgpack,
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        tokio::time::timeout(READ_DEADLINE, self.stream.write_all(bytes)).await.expect("send in time").expect("send");
    }

    /// Sends `value` as JSON text, compressed, in `fragments` frames.
    pub async fn send_compressed(&mut self, value: &Value, fragments: usize) {
        let compressed = deflate(value.to_string().as_bytes());
        let size = compressed.len().div_ceil(fragments.max(1));
        let pieces: Vec<&[u8]> = compressed.chunks(size.max(1)).collect();
        let mut wire = Vec::new();
        for (index, piece) in pieces.iter().enumerate() {
            let fin = if index + 1 == pieces.len() { 0x80 } else { 0 };
            let first = if index == 0 { fin | 0x40 | 0x1 } else { fin };
            wire.extend(client_frame(first, piece));
        }
        self.send_bytes(&wire).await;
    }

    pub async fn send_plain(&mut self, value: &Value) {
        self.send_bytes(&client_frame(0x81, value.to_string().as_bytes())).await;
    }

    /// The next whole server frame: its first byte and payload; `None` at the end.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buffer.len() >= 2 {
                assert_eq!(self.buffer[1] & 0x80, 0, "server frames are not masked");
                let (header, length) = match self.buffer[1] & 0x7f {
                    126 if self.buffer.len() >= 4 => (4, u16::from_be_bytes([self.buffer[2], self.buffer[3]]) as usize),
                    127 if self.buffer.len() >= 10 => {
                        (10, u64::from_be_bytes(self.buffer[2..10].try_into().unwrap()) as usize)
                    }
                    126 | 127 => (usize::MAX / 2, 0),
                    short => (2, short as usize),
                };
                if self.buffer.len() >= header + length {
                    let first = self.buffer[0];
                    let payload = self.buffer[header..header + length].to_vec();
                    self.buffer.drain(..header + length);
                    return Some((first, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout(READ_DEADLINE, self.stream.read(&mut chunk))
                .await
                .expect("a frame within the deadline");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(count) => self.buffer.extend_from_slice(&chunk[..count]),
            }
        }
    }

    /// Reads until the server closes; its close code.
    pub async fn closed_with(&mut self) -> Option<u16> {
        while self.try_next().await.is_some() {}
        self.close_code
    }
}

impl Watcher for DeflateClient {
    /// The next data message, inflated if it came compressed; `None` once the
    /// server closed (its code in `close_code`).
    async fn try_next(&mut self) -> Option<Value> {
        loop {
            let (first, payload) = self.next_frame().await?;
            assert_eq!(first & 0x80, 0x80, "the server sends whole messages in one frame");
            assert_eq!(first & 0x30, 0, "RSV2 and RSV3 stay clear");
            match first & 0x0f {
                0x1 => assert!(!self.msgpack, "a text frame on a MessagePack connection"),
                0x2 => assert!(self.msgpack, "a binary frame on a JSON connection"),
                0x8 => {
                    self.close_code = payload.get(..2).map(|code| u16::from_be_bytes([code[0], code[1]]));
                    return None;
                }
                0x9 => {
                    self.send_bytes(&client_frame(0x8a, &payload)).await;
                    continue;
                }
                0xa => continue,
                opcode => panic!("unexpected opcode {opcode:#x}"),
            }
            let compressed = first & 0x40 != 0;
            let wire_length = payload.len();
            let text = if compressed {
                self.compressed_messages += 1;
                let mut compressed = payload;
                compressed.extend_from_slice(&FLUSH_TAIL);
                let mut out = Vec::with_capacity(64 * 1024);
                let before = self.inflater.total_in();
                self.inflater
                    .decompress_vec(&compressed, &mut out, flate2::FlushDecompress::Sync)
                    .expect("the server's message inflates with the window of the ones before it");
                assert_eq!(self.inflater.total_in() - before, compressed.len() as u64, "all of it read");
                out
            } else {
                payload
            };
            let message: Value = if self.msgpack {
                rmp_serde::from_slice(&text).expect("server sends MessagePack")
            } else {
                serde_json::from_slice(&text).expect("server sends JSON")
            };
            if compressed && message["type"] == "bid" {
                self.compressed_bids += 1;
            }
            self.received.push(Received {
                kind: message["type"].as_str().unwrap_or_default().to_owned(),
                seq: message["seq"].as_u64(),
                compressed,
                wire_bytes: wire_length,
                bytes: text.len(),
            });
            return Some(message);
        }
    }
}
