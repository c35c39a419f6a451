//! `GET /api/v1/auctions/{id}` is served from memory between changes: every
//! read after a 201, a cancel or the end must show it, whatever was cached.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Backend, HasApi, TestApp, eventually};
use crate::on_both_backends;

on_both_backends!(reads_see_every_change_at_once, reads_see_the_end_and_a_cancel);

async fn reads_see_every_change_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let (_, bidders, auction_id) =
        api.scene(&["alice", "bob"], json!({"starting_price": 100, "min_increment": 1})).await;
    for round in 0..40_i64 {
        // Read twice (the second from memory), then bid, then read again.
        for _ in 0..2 {
            assert_eq!(api.auction(&auction_id).await["seq"], round);
        }
        let (status, reply) = api.bid(&bidders[(round % 2) as usize], &auction_id, 100 + round, None).await;
        assert_eq!(status, StatusCode::CREATED, "{reply}");
        let auction = api.auction(&auction_id).await;
        assert_eq!(auction["seq"], round + 1, "the read after a 201 shows it: {auction}");
        assert_eq!(auction["current_price"], 100 + round);
        assert_eq!(auction["leader"]["username"], bidders[(round % 2) as usize].username);
    }
    app.stop().await;
}

async fn reads_see_the_end_and_a_cancel(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let (seller, bidders, ending) = api.scene(&["alice"], json!({"duration_secs": 2})).await;
    let (status, _) = api.bid(&bidders[0], &ending, 10_000, None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(api.auction(&ending).await["status"], "active");
    let ended = eventually(Duration::from_secs(10), "the read shows the end", || async {
        let auction = api.auction(&ending).await;
        (auction["status"] == "ended").then_some(auction)
    })
    .await;
    assert_eq!(ended["winner"]["username"], "alice");

    let cancelled = api.create_auction(&seller, crate::helpers::auction_body(json!({}))).await;
    let id = cancelled["id"].as_str().unwrap();
    assert_eq!(api.auction(id).await["status"], "active");
    let (status, body) = api.post(&format!("/api/v1/auctions/{id}/cancel"), Some(&seller.token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(api.auction(id).await["status"], "cancelled", "the read after the cancel shows it");
    app.stop().await;
}
