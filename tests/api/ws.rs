//! The WebSocket protocol over real sockets: ordering without gaps while REST
//! and WebSocket bidders race, resumes, a stalled reader, private messages,
//! MessagePack against JSON, bad frames, heartbeats and shutdown.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Acknowledged, Backend, HasApi, TestApp, User, eventually, metric, start_storm};
use crate::on_both_backends;
use crate::ws_client::{DeflateClient, Received, Watcher, WsClient, client_frame, deflate, ws_url};
use gavel_actors::node::NodeSettings;

on_both_backends!(watchers_see_every_bid_once_in_order);

/// Bids over the socket until `attempts` answers came back; the accepted results.
async fn ws_bidder(address: String, bidder: User, auction_id: String, attempts: usize, offset: i64) -> Vec<Value> {
    let mut client = WsClient::connect(&address, Some(&bidder.token)).await;
    let mut amount = 1_000 + offset;
    let mut accepted = Vec::new();
    for attempt in 0..attempts {
        let request_id = format!("{}-{attempt}", bidder.username);
        client.send(json!({"type": "bid", "request_id": request_id, "auction_id": auction_id, "amount": amount})).await;
        let answer = client.next_of("bid_result").await;
        assert_eq!(answer["request_id"], request_id.as_str(), "bid_result carries the request_id");
        if let Some(result) = answer.get("result") {
            assert_eq!(result["accepted"], true);
            accepted.push(json!({"bidder": bidder.id, "amount": amount, "result": result}));
            amount = result["current_price"].as_i64().unwrap() + 1 + offset;
        } else {
            let error = &answer["error"];
            match error["code"].as_str() {
                Some("BID_TOO_LOW") => amount = error["min_bid"].as_i64().unwrap() + offset,
                Some("ALREADY_LEADING") => amount += 1,
                other => panic!("unexpected bid error {other:?}: {answer}"),
            }
        }
    }
    accepted
}

async fn watchers_see_every_bid_once_in_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let (seller, bidders, auction_id) = api
        .scene(
            &["rest_0", "rest_1", "rest_2", "ws_0", "ws_1", "ws_2"],
            json!({"starting_price": 1_000, "min_increment": 1}),
        )
        .await;
    let mut json_watcher = WsClient::connect(&app.address, None).await;
    let mut msgpack_watcher = WsClient::connect_msgpack(&app.address, None).await;
    let mut seller_watcher = WsClient::connect(&app.address, Some(&seller.token)).await;
    let mut snapshots = Vec::new();
    for watcher in [&mut json_watcher, &mut msgpack_watcher, &mut seller_watcher] {
        let snapshot = watcher.subscribe(&auction_id).await;
        assert_eq!(snapshot["auction"]["seq"], 0);
        assert_eq!(snapshot["recent_bids"], json!([]));
        snapshots.push(snapshot);
    }
    // Compressed (permessage-deflate), as browsers connect.
    let mut deflate_watcher = DeflateClient::connect(&app.address, None, DEFLATE_OFFER).await;
    deflate_watcher.send_compressed(&json!({"type": "subscribe", "auction_id": auction_id}), 2).await;
    let snapshot = deflate_watcher.next_event().await;
    assert_eq!((&snapshot["type"], &snapshot["auction"]["seq"]), (&json!("snapshot"), &json!(0)), "{snapshot}");
    let mut msgpack_deflate_watcher = DeflateClient::connect_with(&app.address, None, DEFLATE_OFFER, true).await;
    assert!(msgpack_deflate_watcher.extensions.is_some(), "both negotiated");
    msgpack_deflate_watcher.send_plain(&json!({"type": "subscribe", "auction_id": auction_id})).await;
    assert_eq!(msgpack_deflate_watcher.next_event().await["type"], "snapshot");

    let mut bidders = bidders.into_iter();
    let rest_bidders: Vec<User> = bidders.by_ref().take(3).collect();
    let acknowledged: Acknowledged = Arc::default();
    let storm = start_storm(app.address.clone(), rest_bidders, auction_id.clone(), acknowledged.clone(), 25);
    let ws_storm: Vec<_> = bidders
        .enumerate()
        .map(|(index, bidder)| {
            tokio::spawn(ws_bidder(app.address.clone(), bidder, auction_id.clone(), 25, index as i64 % 3))
        })
        .collect();
    // A watcher that joins while the bids are pouring in: a snapshot, then
    // every later bid exactly once, in order.
    eventually(Duration::from_secs(30), "some bids before the late watcher", || async {
        (api.auction(&auction_id).await["seq"].as_u64().unwrap() >= 3).then_some(())
    })
    .await;
    let mut late_watcher = WsClient::connect(&app.address, None).await;
    late_watcher.send(json!({"type": "subscribe", "auction_id": auction_id})).await;
    // Likely to join in the middle of a batch: that part comes uncompressed.
    let mut late_deflate_watcher = DeflateClient::connect(&app.address, None, DEFLATE_OFFER).await;
    late_deflate_watcher.send_plain(&json!({"type": "subscribe", "auction_id": auction_id})).await;
    for bidder in storm {
        bidder.await.expect("REST bidder");
    }
    let mut ws_accepted = Vec::new();
    for bidder in ws_storm {
        ws_accepted.extend(bidder.await.expect("WebSocket bidder"));
    }

    let history = api.history(&auction_id).await;
    let rest_accepted = acknowledged.lock().unwrap().len();
    let n = history.len() as u64;
    assert_eq!(n as usize, rest_accepted + ws_accepted.len(), "every 201 and every accepted bid_result is one bid");
    assert!(!ws_accepted.is_empty() && rest_accepted > 0, "both edges got bids in");
    let by_seq: HashMap<u64, &Value> = history.iter().map(|row| (row["seq"].as_u64().unwrap(), row)).collect();
    for accepted in &ws_accepted {
        let row = by_seq[&accepted["result"]["seq"].as_u64().unwrap()];
        assert_eq!(row["bidder"]["id"], accepted["bidder"]);
        assert_eq!(row["amount"], accepted["amount"]);
    }

    let mut streams = Vec::new();
    for watcher in [&mut json_watcher, &mut msgpack_watcher, &mut seller_watcher] {
        let bids = watcher.bids_until(n).await;
        assert_eq!(bids.len() as u64, n, "every bid exactly once");
        for (position, (bid, row)) in bids.iter().zip(&history).enumerate() {
            assert_eq!(bid["seq"].as_u64(), Some(position as u64 + 1), "in seq order without gaps");
            assert_eq!(bid["auction_id"], auction_id.as_str());
            assert_eq!(bid["current_price"], row["current_price"], "price as committed");
            assert_eq!(bid["leader"], row["leader"], "leader as committed");
            assert_eq!(bid["bid_count"], row["seq"]);
            assert_eq!(bid["placed_at"], row["placed_at"]);
        }
        assert_eq!(watcher.drain().await, Vec::<Value>::new(), "nothing after the last bid");
        streams.push(bids);
    }
    assert_eq!(streams[0], streams[1], "MessagePack carries what JSON carries");
    assert_eq!(streams[0], streams[2]);
    assert_eq!(deflate_watcher.bids_until(n).await, streams[0], "compressed messages carry what plain ones carry");
    assert_eq!(deflate_watcher.compressed_bids, n, "every event came compressed");
    assert_eq!(msgpack_deflate_watcher.bids_until(n).await, streams[0], "compressed MessagePack too");
    assert_eq!(msgpack_deflate_watcher.compressed_bids, n);
    let snapshot = late_watcher.next_event().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let from = snapshot["auction"]["seq"].as_u64().unwrap();
    if from < n {
        let later = late_watcher.bids_until(n).await;
        assert_eq!(later, streams[0][from as usize..].to_vec(), "after the snapshot: every later bid, once, in order");
    }
    let snapshot = late_deflate_watcher.next_event().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let from = snapshot["auction"]["seq"].as_u64().unwrap();
    if from < n {
        let later = late_deflate_watcher.bids_until(n).await;
        assert_eq!(later, streams[0][from as usize..].to_vec(), "compressed, after the snapshot: every later bid");
    }

    app.stop().await;
    let close = json_watcher.close_frame().await.expect("a close frame on shutdown");
    assert_eq!(u16::from(close.code), 1001, "going away: {close:?}");
}

/// What Chromium offers.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_connections_inflate_both_ways_within_the_limits() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, bidders, auction_id) =
        api.scene(&["ann", "bob"], json!({"starting_price": 1_000, "min_increment": 10})).await;

    let mut ann = DeflateClient::connect(&app.address, Some(&bidders[0].token), DEFLATE_OFFER).await;
    assert_eq!(ann.extensions.as_deref(), Some("permessage-deflate; client_no_context_takeover"));
    // A compressed message in three frames, a ping between two of them.
    let subscribe = deflate(json!({"type": "subscribe", "auction_id": auction_id}).to_string().as_bytes());
    let third = subscribe.len() / 3;
    let mut wire = client_frame(0x40 | 0x1, &subscribe[..third]);
    wire.extend(client_frame(0x0, &subscribe[third..2 * third]));
    wire.extend(client_frame(0x89, b"between"));
    wire.extend(client_frame(0x80, &subscribe[2 * third..]));
    ann.send_bytes(&wire).await;
    let snapshot = ann.next_event().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    // A compressed bid, then a plain message on the same connection.
    ann.send_compressed(&json!({"type": "bid", "request_id": "ann-1", "auction_id": auction_id, "amount": 1_000}), 1)
        .await;
    ann.send_plain(&json!({"type": "ping"})).await;
    let mut seen: HashMap<String, Value> = HashMap::new();
    while seen.len() < 3 {
        let message = ann.next_event().await;
        let kind = message["type"].as_str().unwrap().to_owned();
        assert!(seen.insert(kind, message.clone()).is_none(), "once each: {message}");
    }
    assert_eq!(seen["bid_result"]["request_id"], "ann-1");
    assert_eq!(seen["bid_result"]["result"]["seq"], 1, "{}", seen["bid_result"]);
    assert_eq!((&seen["bid"]["seq"], &seen["bid"]["current_price"]), (&json!(1), &json!(1_000)));
    assert!(seen.contains_key("pong"));
    assert_eq!(ann.compressed_bids, 1, "the event came compressed");
    assert_eq!(api.history(&auction_id).await.len(), 1);

    // Inflating past 16 KiB closes with 1009, however small the frame.
    let bomb = json!({"type": "ping", "padding": "a".repeat(20_000)}).to_string();
    let mut bomber = DeflateClient::connect(&app.address, None, DEFLATE_OFFER).await;
    bomber.send_compressed(&serde_json::from_str(&bomb).unwrap(), 1).await;
    assert_eq!(bomber.closed_with().await, Some(1009), "too big once inflated");
    // Compressed bytes that are not deflate close with 1002.
    let mut garbler = DeflateClient::connect(&app.address, None, DEFLATE_OFFER).await;
    garbler.send_bytes(&client_frame(0x80 | 0x40 | 0x1, &[0xff; 40])).await;
    assert_eq!(garbler.closed_with().await, Some(1002), "not deflate");
    // RSV1 on a connection that did not negotiate the extension is refused too.
    let mut plain = DeflateClient::connect(&app.address, None, "x-unknown-extension").await;
    assert_eq!(plain.extensions, None);
    plain.send_compressed(&json!({"type": "ping"}), 1).await;
    assert_eq!(plain.closed_with().await, Some(1002), "RSV1 without the extension");

    // Offers this server cannot serve are declined: the events come plain.
    let mut declined =
        DeflateClient::connect(&app.address, None, "permessage-deflate; server_no_context_takeover").await;
    assert_eq!(declined.extensions, None, "declined");
    declined.send_plain(&json!({"type": "subscribe", "auction_id": auction_id})).await;
    assert_eq!(declined.next_event().await["type"], "snapshot");
    bid_up(&api, &bidders, &auction_id, 3).await;
    let bids = declined.bids_until(4).await;
    assert_eq!(bids.len(), 3);
    assert_eq!(declined.compressed_messages, 0, "nothing compressed without the extension");

    // The server keeps serving the others.
    // Ann was outbid by bid 3 (her private `outbid` comes uncompressed).
    let mut later = Vec::new();
    while later.last().is_none_or(|bid: &Value| bid["seq"] != 4) {
        let message = ann.next_event().await;
        match message["type"].as_str() {
            Some("bid") => later.push(message),
            Some("outbid") => assert_eq!(message["seq"], 3),
            _ => panic!("unexpected {message}"),
        }
    }
    assert_eq!(later.len(), 3, "ann still gets the bids: {later:?}");
    assert_eq!(ann.compressed_bids, 4, "compressed");
    app.stop().await;

    // And compression can be turned off.
    let off =
        TestApp::spawn_with(Backend::Sqlite, |config| config.ws_compression = false, NodeSettings::default()).await;
    let client = DeflateClient::connect(&off.address, None, DEFLATE_OFFER).await;
    assert_eq!(client.extensions, None, "--ws-compression false");
    off.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_batch_goes_compressed_and_part_of_one_goes_plain() {
    // Batches three seconds apart: what falls within one is in the test's hands.
    let app = TestApp::spawn_with(Backend::Sqlite, |config| config.ws_batch_ms = 3_000, NodeSettings::default()).await;
    let api = app.api();
    let (_seller, bidders, auction_id) =
        api.scene(&["ann", "bob"], json!({"starting_price": 1_000, "min_increment": 10})).await;
    let subscribe = json!({"type": "subscribe", "auction_id": auction_id});
    let mut early = DeflateClient::connect(&app.address, None, DEFLATE_OFFER).await;
    early.send_plain(&subscribe).await;
    assert_eq!(early.next_event().await["auction"]["seq"], 0);
    bid_up(&api, &bidders, &auction_id, 1).await;
    // Bid 1 just came in a batch: the next one is three seconds away.
    early.bids_until(1).await;
    bid_up(&api, &bidders, &auction_id, 2).await;
    let mut late = DeflateClient::connect(&app.address, None, DEFLATE_OFFER).await;
    late.send_plain(&subscribe).await;
    assert_eq!(late.next_event().await["auction"]["seq"], 3, "the snapshot holds bids 2 and 3");
    bid_up(&api, &bidders, &auction_id, 1).await;

    // One batch holds bids 2, 3 and 4. The early watcher gets all of it, compressed as one stream...
    assert_eq!(early.bids_until(4).await.len(), 3);
    let batch: Vec<&Received> = early.received.iter().filter(|message| message.kind == "bid").skip(1).collect();
    assert!(batch.iter().all(|message| message.compressed), "{batch:?}");
    let wire: usize = batch.iter().map(|message| message.wire_bytes).sum();
    let plain: usize = batch.iter().map(|message| message.bytes).sum();
    assert!(wire * 2 < plain, "later messages refer back to earlier ones: {wire} bytes on the wire for {plain}");
    assert!(batch[2].wire_bytes * 3 < batch[2].bytes, "{batch:?}");
    // ...the late one only bid 4 of it, uncompressed: its window knows nothing of bids 2 and 3.
    assert_eq!(late.bids_until(4).await.len(), 1);
    let partial = late.received.iter().find(|message| message.seq == Some(4)).unwrap();
    assert!(!partial.compressed, "{partial:?}");

    // The next batch reaches both whole and compressed, and both inflate it.
    bid_up(&api, &bidders, &auction_id, 1).await;
    for watcher in [&mut early, &mut late] {
        let bids = watcher.bids_until(5).await;
        assert_eq!(bids.len(), 1);
        assert!(watcher.received.last().unwrap().compressed);
    }
    app.stop().await;
}

/// `count` more accepted bids, each 10 above the last, the two bidders taking turns.
async fn bid_up(api: &crate::helpers::Api<'_>, bidders: &[User], auction_id: &str, count: u64) {
    let auction = api.auction(auction_id).await;
    let seq = auction["seq"].as_u64().unwrap();
    for next in seq + 1..=seq + count {
        let (status, body) = api.bid(&bidders[(next % 2) as usize], auction_id, 1_000 + next as i64 * 10, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_missed_events_or_sends_a_snapshot() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| config.ws_buffer_events = 8, NodeSettings::default()).await;
    let api = app.api();
    let (_seller, bidders, auction_id) =
        api.scene(&["ann", "bob"], json!({"starting_price": 1_000, "min_increment": 10})).await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.subscribe(&auction_id).await;
    bid_up(&api, &bidders, &auction_id, 3).await;
    let seen = watcher.bids_until(3).await;
    assert_eq!(seen.len(), 3);
    drop(watcher);

    bid_up(&api, &bidders, &auction_id, 3).await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.send(json!({"type": "subscribe", "auction_id": auction_id, "since_seq": 3})).await;
    let replayed = watcher.bids_until(6).await;
    let seqs: Vec<u64> = replayed.iter().map(|bid| bid["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 5, 6], "exactly the missed events, no snapshot");
    assert_eq!(watcher.drain().await, Vec::<Value>::new());
    drop(watcher);

    // More than the buffer holds (8) happen while away: a superseding snapshot.
    bid_up(&api, &bidders, &auction_id, 12).await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.send(json!({"type": "subscribe", "auction_id": auction_id, "since_seq": 6})).await;
    let snapshot = watcher.next_event().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["auction"]["seq"], 18);
    assert_eq!(snapshot["auction"]["current_price"], 1_000 + 18 * 10);
    let recent: Vec<u64> =
        snapshot["recent_bids"].as_array().unwrap().iter().map(|bid| bid["seq"].as_u64().unwrap()).collect();
    assert_eq!(recent, (9..=18).rev().collect::<Vec<u64>>(), "the last ten bids, newest first");
    bid_up(&api, &bidders, &auction_id, 1).await;
    let next = watcher.bids_until(19).await;
    assert_eq!(next.len(), 1, "and the events after it: {next:?}");
    drop(watcher);

    // A replayed subscription is live too.
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.send(json!({"type": "subscribe", "auction_id": auction_id, "since_seq": 17})).await;
    bid_up(&api, &bidders, &auction_id, 1).await;
    let seqs: Vec<u64> = watcher.bids_until(20).await.iter().map(|bid| bid["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![18, 19, 20], "replay, then the live event");
    app.stop().await;
}

/// A WebSocket client whose socket takes at most 4 KiB before its reader
/// reads: a reader that stops reading stalls the server's writes at once.
async fn small_window_client(app: &TestApp) -> WsClient {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.address.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (stream, _) = tokio_tungstenite::client_async(ws_url(&app.address, None), stream).await.unwrap();
    WsClient { stream, msgpack: false }
}

/// The Prometheus counter of snapshot resyncs, read from /metrics.
async fn resyncs(app: &TestApp) -> f64 {
    metric(app, "gavel_ws_slow_consumer_resyncs_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_blocks_nobody_and_catches_up_by_snapshot() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        |config| {
            config.ws_buffer_events = 16;
            config.ws_messages_per_sec = 0;
            config.ws_write_timeout_secs = 60;
            config.socket_send_buffer_bytes = Some(8 * 1024);
        },
        NodeSettings::default(),
    )
    .await;
    let api = app.api();
    let (_seller, bidders, auction_id) =
        api.scene(&["ann", "bob"], json!({"starting_price": 1_000, "min_increment": 1})).await;

    // The stalled reader: a tiny receive buffer, and it stops reading after its snapshot.
    let mut stalled = small_window_client(&app).await;
    stalled.subscribe(&auction_id).await;
    let mut healthy = WsClient::connect(&app.address, None).await;
    healthy.subscribe(&auction_id).await;
    let resyncs_before = resyncs(&app).await;

    // Bids pour in over the socket while the stalled reader reads nothing; each
    // is answered, and the healthy reader sees every one.
    let total: u64 = 800;
    let healthy_reader = tokio::spawn(async move {
        let bids = healthy.bids_until(total).await;
        (healthy, bids)
    });
    let mut bidder_clients = Vec::new();
    for bidder in &bidders {
        bidder_clients.push(WsClient::connect(&app.address, Some(&bidder.token)).await);
    }
    for seq in 1..=total {
        let client = &mut bidder_clients[(seq % 2) as usize];
        let amount = 1_000 + seq as i64;
        client
            .send(json!({"type": "bid", "request_id": format!("b-{seq}"), "auction_id": auction_id, "amount": amount}))
            .await;
        let result = client.next_of("bid_result").await;
        assert_eq!(result["result"]["seq"], seq, "{result}");
    }
    let (_healthy, bids) = healthy_reader.await.expect("healthy reader");
    assert!(
        bids.iter().enumerate().all(|(index, bid)| bid["seq"] == index as u64 + 1),
        "healthy reader: all, in order"
    );

    // Now the stalled reader reads: what fitted in the buffers, in order, then
    // a snapshot superseding the gap, then live events again.
    let mut last_seq = 0;
    let snapshot = loop {
        let message = stalled.next_event().await;
        match message["type"].as_str() {
            Some("bid") => {
                assert_eq!(message["seq"], last_seq + 1, "in order until the gap");
                last_seq += 1;
            }
            Some("snapshot") => break message,
            _ => panic!("unexpected {message}"),
        }
    };
    assert!(last_seq < total, "the stalled reader fell behind (it read {last_seq} of {total} before the snapshot)");
    let snapshot_seq = snapshot["auction"]["seq"].as_u64().unwrap();
    assert!(snapshot_seq > last_seq, "the snapshot supersedes the gap: {snapshot_seq} after {last_seq}");
    let rest = if snapshot_seq < total { stalled.bids_until(total).await } else { Vec::new() };
    for (index, bid) in rest.iter().enumerate() {
        assert_eq!(bid["seq"], snapshot_seq + index as u64 + 1, "live events after the snapshot, in order");
    }
    assert_eq!(resyncs(&app).await, resyncs_before + 1.0, "counted as one slow-consumer resync");
    // And it keeps up from here.
    let (status, body) = api.bid(&bidders[1], &auction_id, 1_000 + total as i64 + 1, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let next = stalled.bids_until(total + 1).await;
    assert_eq!(next.len(), 1);
    app.stop().await;
}

/// A reader that fell behind is resynchronised by snapshot. When the store
/// cannot answer that read, the reader got an `error` it never asked for,
/// and its subscription was dropped: a client that took the error for a
/// passing one (as the page does) watched an auction that no longer moved.
/// The connection now closes with 1013 (try again later), and the client,
/// reconnecting, resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_whose_snapshot_cannot_be_read_closes_with_1013() {
    use sqlx::Connection as _;

    // A buffer of 64 events: the connection falls that far behind only once its
    // socket is full, not while it can still write (on a busy machine it may
    // all the same: a resync then, while the store answers, is a snapshot).
    let (app, bidders, auction_id, mut stalled) = behind_a_small_window(Backend::Postgres, 60, Some(64)).await;
    let api = app.api();
    let total: u64 = 250;
    for seq in 1..=total {
        let (status, body) = api.bid(&bidders[(seq % 2) as usize], &auction_id, 1_000 + seq as i64, None).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // The store stops answering reads of auctions, then the reader reads.
    let mut locker = sqlx::PgConnection::connect(app.database_url.as_deref().unwrap()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE auctions IN ACCESS EXCLUSIVE MODE").execute(&mut locker).await.unwrap();
    let mut last_seq = 0;
    let close = loop {
        let message = tokio::time::timeout(Duration::from_secs(30), futures_util::StreamExt::next(&mut stalled.stream))
            .await
            .expect("the server writes or closes within 30 s");
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a close frame: {other:?}"),
        };
        let message: Value = serde_json::from_str(&text).unwrap();
        match message["type"].as_str() {
            Some("bid") => {
                assert_eq!(message["seq"], last_seq + 1, "in order until the gap");
                last_seq += 1;
            }
            Some("snapshot") => {
                let seq = message["auction"]["seq"].as_u64().unwrap();
                assert!(seq >= last_seq, "a snapshot never goes back");
                last_seq = seq;
            }
            Some("viewers") => {}
            _ => panic!("a resync that cannot be read sends nothing but a close: got {message}"),
        }
    };
    assert!(last_seq < total, "the reader fell behind (it read {last_seq} of {total})");
    assert_eq!(close.map(|frame| u16::from(frame.code)), Some(1013), "try again later");
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();

    // Reconnecting, the client watches again.
    let mut again = WsClient::connect(&app.address, None).await;
    let snapshot = again.subscribe(&auction_id).await;
    assert_eq!(snapshot["auction"]["seq"].as_u64(), Some(total), "{snapshot}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbid_and_won_reach_their_user_and_nobody_else() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, users, auction_id) = api
        .scene(&["ann", "bob", "cat"], json!({"starting_price": 10_000, "min_increment": 500, "duration_secs": 5}))
        .await;
    let (ann, bob, cat) = (&users[0], &users[1], &users[2]);
    // Ann twice (token in the URL, and an `auth` message), Bob and Cat once;
    // only Cat watches the auction.
    let mut ann_1 = WsClient::connect(&app.address, Some(&ann.token)).await;
    let mut ann_2 = WsClient::connect(&app.address, None).await;
    ann_2.send(json!({"type": "auth", "token": ann.token})).await;
    let authenticated = ann_2.next_event().await;
    assert_eq!(authenticated, json!({"type": "authenticated", "user": {"id": ann.id, "username": "ann"}}));
    let mut bob_ws = WsClient::connect(&app.address, Some(&bob.token)).await;
    let mut cat_ws = WsClient::connect(&app.address, Some(&cat.token)).await;
    cat_ws.subscribe(&auction_id).await;

    let (status, body) = api.bid(ann, &auction_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    bob_ws.send(json!({"type": "bid", "request_id": "bob-1", "auction_id": auction_id, "amount": 10_500})).await;
    let result = bob_ws.next_of("bid_result").await;
    assert_eq!(result["result"]["leading"], true, "{result}");

    let outbid = json!({"type": "outbid", "auction_id": auction_id, "current_price": 10_500, "seq": 2});
    for ann_ws in [&mut ann_1, &mut ann_2] {
        assert_eq!(ann_ws.next_event().await, outbid, "on each of the outbid user's connections");
    }
    assert_eq!(bob_ws.drain().await, Vec::<Value>::new(), "the new leader is not outbid");
    let cat_seen = cat_ws.drain().await;
    assert!(cat_seen.iter().all(|message| message["type"] == "bid"), "Cat only watches: {cat_seen:?}");

    let won = bob_ws.next_event().await;
    assert_eq!(won, json!({"type": "won", "auction_id": auction_id, "final_price": 10_500, "seq": 2}));
    let ended = cat_ws.next_of("ended").await;
    assert_eq!(ended["winner"]["id"], bob.id.as_str());
    assert_eq!(ended["final_price"], 10_500);
    assert_eq!(ended["seq"], 2);
    for other in [&mut ann_1, &mut ann_2, &mut cat_ws] {
        let seen = other.drain().await;
        assert!(seen.iter().all(|message| message["type"] != "won" && message["type"] != "outbid"), "{seen:?}");
    }
    app.stop().await;
}

/// A node keeps no buffer of events for an auction nobody watches on it: the
/// private messages still reach their users, and a watcher that comes later
/// asking to resume gets a snapshot (the store already holds every event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auction_nobody_watches_keeps_no_events_and_its_private_messages_still_go() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, users, auction_id) =
        api.scene(&["ann", "bob"], json!({"starting_price": 10_000, "min_increment": 500, "duration_secs": 5})).await;
    let (ann, bob) = (&users[0], &users[1]);
    let mut ann_ws = WsClient::connect(&app.address, Some(&ann.token)).await;
    let mut bob_ws = WsClient::connect(&app.address, Some(&bob.token)).await;
    let (status, body) = api.bid(ann, &auction_id, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api.bid(bob, &auction_id, 10_500, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let outbid = json!({"type": "outbid", "auction_id": auction_id, "current_price": 10_500, "seq": 2});
    assert_eq!(ann_ws.next_event().await, outbid, "nobody watches, the outbid user still hears");

    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.send(json!({"type": "subscribe", "auction_id": auction_id, "since_seq": 1})).await;
    let snapshot = watcher.next_event().await;
    assert_eq!(snapshot["type"], "snapshot", "no events were kept to replay: {snapshot}");
    assert_eq!(snapshot["auction"]["seq"], 2);
    assert_eq!(snapshot["auction"]["current_price"], 10_500);

    let won = bob_ws.next_event().await;
    assert_eq!(won, json!({"type": "won", "auction_id": auction_id, "final_price": 10_500, "seq": 2}));
    let ended = watcher.next_of("ended").await;
    assert_eq!((ended["seq"].as_u64(), ended["final_price"].as_i64()), (Some(2), Some(10_500)), "{ended}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_connection_stays_usable() {
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.ws_max_subscriptions = 2, NodeSettings::default()).await;
    let api = app.api();
    let (seller, users, auction_id) = api.scene(&["ann"], json!({})).await;
    let unknown = "01a20000-0000-7000-8000-000000000000";

    // A token that is sent must be valid.
    let refused = tokio_tungstenite::connect_async(ws_url(&app.address, Some("not-a-token"))).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a bad token is refused with 401: {other:?}"),
    }
    // Another protocol version: 426, naming the one spoken (RFC 6455, 4.4).
    let response = app
        .client
        .get(app.url("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(response.headers()["sec-websocket-version"], "13");
    // A plain GET is not an upgrade: a JSON 400.
    let (status, body) = api.get("/ws", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "INVALID_REQUEST");

    let mut anonymous = WsClient::connect(&app.address, None).await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "INVALID_REQUEST"),
        (Message::Text("42".into()), "INVALID_REQUEST"),
        (Message::Text("{}".into()), "INVALID_REQUEST"),
        (Message::Text(r#"{"type":"dance"}"#.into()), "INVALID_REQUEST"),
        (Message::Text(r#"{"type":"subscribe"}"#.into()), "INVALID_REQUEST"),
        (Message::Text(r#"{"type":"subscribe","auction_id":"nope"}"#.into()), "INVALID_REQUEST"),
        (Message::Text(r#"{"type":"subscribe","auction_id":42}"#.into()), "INVALID_REQUEST"),
        (
            Message::Text(format!(r#"{{"type":"subscribe","auction_id":"{auction_id}","since_seq":-1}}"#).into()),
            "INVALID_REQUEST",
        ),
        (
            Message::Text(format!(r#"{{"type":"subscribe","auction_id":"{auction_id}","extra":1}}"#).into()),
            "INVALID_REQUEST",
        ),
        (Message::Text(format!(r#"{{"type":"subscribe","auction_id":"{unknown}"}}"#).into()), "AUCTION_NOT_FOUND"),
        (Message::Text(r#"{"type":"unsubscribe","auction_id":"nope"}"#.into()), "INVALID_REQUEST"),
        (Message::Text(r#"{"type":"auth","token":"forged"}"#.into()), "UNAUTHENTICATED"),
        (Message::Binary(vec![0xc1, 0xff, 0x00].into()), "INVALID_REQUEST"),
    ];
    for (frame, code) in cases {
        let shown = format!("{frame:?}");
        anonymous.send_raw(frame).await;
        let answer = anonymous.next_event().await;
        assert_eq!(answer["type"], "error", "{shown}: {answer}");
        assert_eq!(answer["code"], code, "{shown}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|message| !message.is_empty()));
    }
    // Anonymous connections may watch but not bid.
    anonymous.send(json!({"type": "bid", "request_id": "r1", "auction_id": auction_id, "amount": 20_000})).await;
    let refused = anonymous.next_event().await;
    assert_eq!(refused["type"], "bid_result");
    assert_eq!(refused["request_id"], "r1");
    assert_eq!(refused["error"]["code"], "UNAUTHENTICATED");
    assert_eq!(api.auction(&auction_id).await["bid_count"], 0, "nothing changed");

    // Bids with bad fields answer under their request_id.
    let mut ann = WsClient::connect(&app.address, Some(&users[0].token)).await;
    let bad_bids = [
        (json!({"type": "bid", "request_id": "b1", "auction_id": auction_id, "amount": "12"}), "INVALID_REQUEST"),
        (json!({"type": "bid", "request_id": "b2", "auction_id": auction_id}), "INVALID_REQUEST"),
        (json!({"type": "bid", "request_id": "b3", "auction_id": auction_id, "amount": 0}), "INVALID_AMOUNT"),
        (json!({"type": "bid", "request_id": "b4", "auction_id": auction_id, "amount": 1.5}), "INVALID_AMOUNT"),
        (
            json!({"type": "bid", "request_id": "b5", "auction_id": auction_id, "amount": 20_000, "max_amount": 100}),
            "INVALID_AMOUNT",
        ),
        (json!({"type": "bid", "request_id": "b6", "auction_id": "nope", "amount": 20_000}), "INVALID_REQUEST"),
        (json!({"type": "bid", "request_id": "", "auction_id": auction_id, "amount": 20_000}), "INVALID_REQUEST"),
        (json!({"type": "bid", "request_id": "b7", "auction_id": unknown, "amount": 20_000}), "AUCTION_NOT_FOUND"),
        (json!({"type": "bid", "request_id": "b8", "auction_id": auction_id, "amount": 10}), "BID_TOO_LOW"),
    ];
    for (bid, code) in bad_bids {
        ann.send(bid.clone()).await;
        let answer = ann.next_event().await;
        assert_eq!(answer["type"], "bid_result", "{bid}: {answer}");
        assert_eq!(answer["request_id"], bid["request_id"], "{answer}");
        assert_eq!(answer["error"]["code"], code, "{bid}: {answer}");
    }
    // Subscriptions are capped per connection (2 here); a failed one takes no place.
    let second = api.create_auction(&seller, crate::helpers::auction_body(json!({}))).await;
    let third = api.create_auction(&seller, crate::helpers::auction_body(json!({}))).await;
    ann.subscribe(&auction_id).await;
    ann.subscribe(second["id"].as_str().unwrap()).await;
    ann.subscribe(&auction_id).await;
    ann.send(json!({"type": "subscribe", "auction_id": third["id"]})).await;
    let capped = ann.next_event().await;
    assert_eq!(capped["code"], "TOO_MANY_SUBSCRIPTIONS", "{capped}");
    assert_eq!(capped["auction_id"], third["id"]);
    ann.send(json!({"type": "unsubscribe", "auction_id": second["id"]})).await;
    ann.subscribe(third["id"].as_str().unwrap()).await;
    assert_eq!(api.auction(&auction_id).await["bid_count"], 0, "nothing changed");

    // Still usable after all that.
    anonymous.send(json!({"type": "ping"})).await;
    let pong = anonymous.next_event().await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["server_time"].is_string());

    // Oversized frames close the connection with 1009.
    anonymous.send_raw(Message::Text("x".repeat(17 * 1024).into())).await;
    let close = anonymous.close_frame().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_refused_then_closed_with_1008() {
    use futures_util::StreamExt;
    let app =
        TestApp::spawn_with(Backend::Sqlite, |config| config.ws_messages_per_sec = 5, NodeSettings::default()).await;
    let mut client = WsClient::connect(&app.address, None).await;
    for _ in 0..40 {
        client.send(json!({"type": "ping"})).await;
    }
    let (mut pongs, mut refused) = (0, 0);
    let close = loop {
        let message = tokio::time::timeout(Duration::from_secs(15), client.stream.next())
            .await
            .expect("answers within the deadline")
            .expect("a close frame before the end of the stream")
            .expect("no transport error");
        let value: Value = match message {
            Message::Text(text) => serde_json::from_str(&text).unwrap(),
            Message::Close(frame) => break frame.expect("a close code"),
            _ => continue,
        };
        match value["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if value["code"] == "RATE_LIMITED" => refused += 1,
            _ => panic!("unexpected {value}"),
        }
    };
    assert!((10..=20).contains(&pongs), "a burst of twice the rate is served, then about the rate: {pongs}");
    assert!(refused >= 5, "then refused with RATE_LIMITED: {refused}");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    app.stop().await;
}

/// A client that completes the handshake and then never answers: the server's
/// pings go unanswered and it closes the connection (1001) on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_connections_are_reaped_by_heartbeat() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Backend::Sqlite, |config| config.ws_ping_secs = 1, NodeSettings::default()).await;
    let mut socket = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://")).await.unwrap();
    let handshake = "GET /ws HTTP/1.1\r\nHost: gavel\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    socket.write_all(handshake.as_bytes()).await.unwrap();
    // Read nothing until the server gives up on us, then everything it sent.
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut received))
        .await
        .expect("the server closes a silent connection by itself")
        .expect("read");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let mut frames = &received[text.find("\r\n\r\n").unwrap() + 4..];
    let (mut pings, mut close_code) = (0, None);
    while frames.len() >= 2 {
        let (opcode, length) = (frames[0] & 0x0f, (frames[1] & 0x7f) as usize);
        let payload = &frames[2..2 + length];
        match opcode {
            0x9 => pings += 1,
            0x8 => close_code = Some(u16::from_be_bytes([payload[0], payload[1]])),
            _ => {}
        }
        frames = &frames[2 + length..];
    }
    assert!(pings >= 2, "pinged before giving up: {pings}");
    assert_eq!(close_code, Some(1001));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_reach_watchers() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let seller = api.register("seller").await;
    let ann = api.register("ann").await;
    // Two seconds from now, taken after the slow part (registering).
    let start_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let start_at = start_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body = json!({"start_at": start_at, "duration_secs": 30, "soft_close_secs": 120, "starting_price": 1_000});
    let auction = api.create_auction(&seller, crate::helpers::auction_body(body)).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut watcher = WsClient::connect(&app.address, None).await;
    let snapshot = watcher.subscribe(&auction_id).await;
    assert_eq!(snapshot["auction"]["status"], "scheduled");
    let started = watcher.next_event().await;
    assert_eq!(started, json!({"type": "started", "auction_id": auction_id, "seq": 0}));

    // Within the soft-close window: the bid, then the extension it caused.
    let (status, body) = api.bid(&ann, &auction_id, 1_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bid = watcher.next_event().await;
    assert_eq!(bid["type"], "bid");
    let extended = watcher.next_event().await;
    assert_eq!(extended["type"], "extended", "{extended}");
    assert_eq!(extended["seq"], 1);
    assert_eq!(extended["end_at"], bid["end_at"]);
    assert_eq!(extended["end_at"], api.auction(&auction_id).await["end_at"]);

    let other = api.create_auction(&seller, crate::helpers::auction_body(json!({}))).await;
    let other_id = other["id"].as_str().unwrap();
    watcher.subscribe(other_id).await;
    let (status, body) = api.post(&format!("/api/v1/auctions/{other_id}/cancel"), Some(&seller.token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cancelled = watcher.next_event().await;
    assert_eq!(cancelled, json!({"type": "cancelled", "auction_id": other_id, "seq": 0}));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_counts_follow_subscriptions() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, _users, auction_id) = api.scene(&[], json!({})).await;
    let mut first = WsClient::connect(&app.address, None).await;
    let snapshot = first.subscribe(&auction_id).await;
    assert_eq!(snapshot["viewers"], 1, "the snapshot counts its own subscription");
    let mut second = WsClient::connect_msgpack(&app.address, None).await;
    let snapshot = second.subscribe(&auction_id).await;
    assert_eq!(snapshot["viewers"], 2);
    let counted = loop {
        let message = first.next_of("viewers").await;
        if message["count"] == 2 {
            break message;
        }
    };
    assert_eq!(counted, json!({"type": "viewers", "auction_id": auction_id, "count": 2}));
    second.send(json!({"type": "unsubscribe", "auction_id": auction_id})).await;
    loop {
        if first.next_of("viewers").await["count"] == 1 {
            break;
        }
    }
    app.stop().await;
}

/// `gavel_ws_messages_sent_total` counts messages, also when many leave in one
/// batch (a slow batch window puts three bids in one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_messages_are_counted_one_by_one() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| config.ws_batch_ms = 500, NodeSettings::default()).await;
    let api = app.api();
    let (_seller, bidders, auction_id) =
        api.scene(&["ann", "bob"], json!({"starting_price": 1_000, "min_increment": 10})).await;
    let sent = || metric(&app, "gavel_ws_messages_sent_total");
    let before = sent().await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.send(json!({"type": "subscribe", "auction_id": auction_id})).await;
    // Everything this only connection receives is counted: the snapshot, the
    // three bids, viewer counts, and the pong at the end.
    let mut received = 0;
    loop {
        received += 1;
        if watcher.next().await["type"] == "snapshot" {
            break;
        }
    }
    bid_up(&api, &bidders, &auction_id, 3).await;
    // The viewer count (it changed to 1) comes within a second: waited for, so
    // that nothing is still on its way when the count is compared.
    let (mut last_bid_seen, mut viewers_seen) = (false, false);
    while !(last_bid_seen && viewers_seen) {
        received += 1;
        let message = watcher.next().await;
        last_bid_seen |= message["seq"] == 3;
        viewers_seen |= message["type"] == "viewers";
    }
    watcher.send(json!({"type": "ping"})).await;
    loop {
        received += 1;
        if watcher.next().await["type"] == "pong" {
            break;
        }
    }
    // Counted once written: the count may trail the client's read by a moment.
    eventually(Duration::from_secs(5), "every received message to be counted", || async {
        let counted = sent().await - before;
        (counted >= received as f64).then_some(())
    })
    .await;
    assert_eq!(sent().await - before, received as f64);
    app.stop().await;
}

/// Stopping the node sends the events still waiting for their batch before
/// it closes the connections (a slow batch window keeps the bid waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_the_last_events_before_closing() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| config.ws_batch_ms = 1_000, NodeSettings::default()).await;
    let api = app.api();
    let (_seller, bidders, auction_id) = api.scene(&["ann", "bob"], json!({"starting_price": 1_000})).await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.subscribe(&auction_id).await;
    let (status, body) = api.bid(&bidders[0], &auction_id, 1_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.stop().await;
    let bid = watcher.next_event().await;
    assert_eq!(bid["type"], "bid", "the last event before the close: {bid}");
    assert_eq!(bid["seq"], 1);
    let close = watcher.close_frame().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
}

/// A bid's `request_id` is its idempotency key: the same request again gets
/// the first `bid_result` (same seq), places nothing more and tells watchers
/// nothing; the same id on another amount is `IDEMPOTENCY_KEY_REUSED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_gets_the_first_result_and_places_nothing() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let api = app.api();
    let (_seller, bidders, auction_id) = api.scene(&["ann"], json!({"starting_price": 1_000})).await;
    let mut watcher = WsClient::connect(&app.address, None).await;
    watcher.subscribe(&auction_id).await;
    let mut ann = WsClient::connect(&app.address, Some(&bidders[0].token)).await;
    let bid = json!({"type": "bid", "request_id": "ann-1", "auction_id": auction_id, "amount": 1_000});
    ann.send(bid.clone()).await;
    let first = ann.next_of("bid_result").await;
    assert_eq!(first["result"]["seq"], 1, "{first}");
    ann.send(bid).await;
    let again = ann.next_of("bid_result").await;
    assert_eq!(again, first, "the first result, as it was");
    ann.send(json!({"type": "bid", "request_id": "ann-1", "auction_id": auction_id, "amount": 2_000})).await;
    let reused = ann.next_of("bid_result").await;
    assert_eq!(reused["error"]["code"], "IDEMPOTENCY_KEY_REUSED", "{reused}");
    // The watcher was told of one bid, and of nothing else.
    let seen = watcher.drain().await;
    let bids: Vec<&Value> = seen.iter().filter(|message| message["type"] == "bid").collect();
    assert_eq!(bids.len(), 1, "{seen:?}");
    assert_eq!(api.history(&auction_id).await.len(), 1);
    app.stop().await;
}

/// A node with small socket buffers and every event sent at once, an
/// auction with two bidders, and a watcher on a `small_window_client`.
async fn behind_a_small_window(
    backend: Backend,
    write_timeout_secs: u64,
    buffer_events: Option<u32>,
) -> (TestApp, Vec<User>, String, WsClient) {
    let app = TestApp::spawn_with(
        backend,
        |config| {
            config.ws_buffer_events = buffer_events.unwrap_or(config.ws_buffer_events);
            config.ws_messages_per_sec = 0;
            config.ws_write_timeout_secs = write_timeout_secs;
            config.ws_batch_ms = 0;
            config.socket_send_buffer_bytes = Some(4 * 1024);
        },
        NodeSettings::default(),
    )
    .await;
    let (_seller, bidders, auction_id) =
        app.api().scene(&["ann", "bob"], json!({"starting_price": 1_000, "min_increment": 1})).await;
    let mut watcher = small_window_client(&app).await;
    watcher.subscribe(&auction_id).await;
    (app, bidders, auction_id, watcher)
}

/// A connection that takes no data at all: the write that cannot go through
/// within `--ws-write-timeout-secs` ends the connection, and the bidders and
/// the other watchers never wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_takes_nothing_is_dropped_at_the_write_timeout() {
    let (app, bidders, auction_id, _stuck) = behind_a_small_window(Backend::Sqlite, 1, None).await;
    assert_eq!(metric(&app, "gavel_ws_connections").await, 1.0);

    // REST bids until the stuck connection is gone: each is answered at once.
    let mut amount = 1_000;
    eventually(Duration::from_secs(30), "the stuck reader to be dropped", || {
        amount += 1;
        let bidder = &bidders[amount as usize % 2];
        let (api, auction_id) = (app.api(), auction_id.clone());
        let app = &app;
        async move {
            let (status, body) = api.bid(bidder, &auction_id, amount, None).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            (metric(app, "gavel_ws_connections").await == 0.0).then_some(())
        }
    })
    .await;
    app.stop().await;
}

/// A reader that keeps falling behind is resynchronised by snapshot a few
/// times, then closed with 1008 (more than five resyncs in a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_keeps_falling_behind_is_closed_with_1008() {
    use futures_util::StreamExt;
    let (app, bidders, auction_id, mut slow) = behind_a_small_window(Backend::Sqlite, 60, Some(2)).await;

    // Bids pour in over a WebSocket while the slow reader takes a message every 20 ms.
    let bidding = tokio::spawn({
        let (address, bidders, auction_id) = (app.address.clone(), bidders.clone(), auction_id.clone());
        async move {
            let mut clients = Vec::new();
            for bidder in &bidders {
                clients.push(WsClient::connect(&address, Some(&bidder.token)).await);
            }
            for seq in 1..=3_000u64 {
                let client = &mut clients[(seq % 2) as usize];
                let amount = 1_000 + seq as i64;
                client.send(json!({"type": "bid", "request_id": format!("b-{seq}"), "auction_id": auction_id, "amount": amount})).await;
                client.next_of("bid_result").await;
            }
        }
    });
    let mut snapshots = 0;
    let close = loop {
        let message = tokio::time::timeout(Duration::from_secs(30), slow.stream.next())
            .await
            .expect("the slow reader is closed within 30 s")
            .expect("a close frame before the end of the stream")
            .expect("no transport error");
        match message {
            Message::Close(frame) => break frame.expect("a close code"),
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                snapshots += usize::from(value["type"] == "snapshot");
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(snapshots >= 1, "resynchronised before being closed");
    assert!(resyncs(&app).await > 5.0);
    bidding.abort();
    app.stop().await;
}
