//! Traces: a `bid` span per bid carrying the auction and its seq through the
//! request, the auction's actor, the commit (a `commit` span linked to it) and
//! the fan-out, in JSON logs; and never a token or a password in the log.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, HasApi, TestApp, eventually};
use crate::ws_client::WsClient;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().map(|line| serde_json::from_str(line).expect("every log line is JSON")).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bid_has_a_span_from_request_to_fan_out_and_no_secret_is_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    gavel::telemetry::init_tracing_with(true, "info,ractor=warn,gavel=debug,gavel_actors=debug", move || {
        writer.clone()
    });
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, users, auction_id) = api.scene(&["ann", "bob"], json!({})).await;
    let (status, body) = api.bid(&users[0], &auction_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut bob = WsClient::connect(&app.address, Some(&users[1].token)).await;
    bob.send(json!({"type": "bid", "request_id": "b-1", "auction_id": auction_id, "amount": 10_500})).await;
    assert_eq!(bob.next_of("bid_result").await["result"]["seq"], 2);
    let (status, _) = api.bid(&users[0], &auction_id, 100, None).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Both accepted bids' spans close with their seq; the rejected one with its code.
    let lines = eventually(Duration::from_secs(10), "the bid spans closed", || async {
        let lines = captured.lines();
        let closed =
            lines.iter().filter(|line| line["fields"]["message"] == "close" && line["span"]["name"] == "bid").count();
        (closed >= 3).then_some(lines)
    })
    .await;
    let closed_bids: Vec<&Value> = lines
        .iter()
        .filter(|line| line["fields"]["message"] == "close" && line["span"]["name"] == "bid")
        .map(|line| &line["span"])
        .collect();
    for seq in [1, 2] {
        let span = closed_bids
            .iter()
            .find(|span| span["seq"].as_u64() == Some(seq))
            .unwrap_or_else(|| panic!("a bid span with seq {seq}: {closed_bids:?}"));
        assert_eq!(span["auction_id"], auction_id.as_str());
        assert_eq!(span["outcome"], "accepted");
    }
    assert!(closed_bids.iter().any(|span| span["outcome"] == "BID_TOO_LOW" && span["seq"].is_null()));

    // Inside the bid span: the actor applied it, it became durable, it went to the fan-out.
    let in_bid_span = |message: &str, seq: u64| {
        lines.iter().any(|line| {
            line["fields"]["message"].as_str().is_some_and(|text| text.starts_with(message))
                && line["spans"].as_array().is_some_and(|spans| {
                    spans.iter().any(|span| span["name"] == "bid" && span["auction_id"] == auction_id.as_str())
                })
                && (line["fields"]["seq"].as_u64() == Some(seq) || line["span"]["seq"].as_u64() == Some(seq))
        })
    };
    for seq in [1, 2] {
        assert!(in_bid_span("bid applied", seq), "actor step of bid {seq}");
        assert!(in_bid_span("durable", seq), "commit step of bid {seq}");
        assert!(in_bid_span("queued for fan-out", seq), "fan-out step of bid {seq}");
    }
    assert!(
        lines.iter().any(|line| line["fields"]["message"] == "close" && line["span"]["name"] == "commit"),
        "commit spans are logged"
    );

    // No secret, anywhere.
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(!text.contains("password-123"), "a password was logged");
    for user in &users {
        assert!(!text.contains(&user.token), "a token was logged");
    }
    assert!(!text.to_lowercase().contains("bearer"), "an Authorization header was logged");
    app.stop().await;
}
