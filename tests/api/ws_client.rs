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

    /// The next data message, decoded; `None` once the server closed.
    pub async fn try_next(&mut self) -> Option<Value> {
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

    pub async fn next(&mut self) -> Value {
        self.try_next().await.expect("connection open")
    }

    /// The next message that is not a viewer count.
    pub async fn next_event(&mut self) -> Value {
        loop {
            let message = self.next().await;
            if message["type"] != "viewers" {
                return message;
            }
        }
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
