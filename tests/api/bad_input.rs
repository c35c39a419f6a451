//! Every malformed, oversized, out-of-range or unauthorised input gets its
//! documented 4xx JSON error, changes nothing, and leaves the server serving.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, HasApi, TestApp, auction_body};
use crate::on_both_backends;

on_both_backends!(bad_input_battery);

fn raw_request(app: &TestApp, path: &str, token: Option<&str>, body: &'static str) -> reqwest::RequestBuilder {
    let mut request = app.client.post(app.url(path)).header("content-type", "application/json").body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request
}

async fn expect_error(request: reqwest::RequestBuilder, status: StatusCode, code: &str, case: &str) {
    let response = request.send().await.unwrap_or_else(|error| panic!("{case}: {error}"));
    assert_eq!(response.status(), status, "{case}");
    let body: Value = response.json().await.unwrap_or_else(|error| panic!("{case}: body is not JSON: {error}"));
    assert_eq!(body["error"]["code"], code, "{case}: {body}");
    assert!(body["error"]["message"].is_string(), "{case}: {body}");
}

fn token_with(header: Value, claims: Value, signature: &str) -> String {
    format!("{}.{}.{signature}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()))
}

async fn bad_input_battery(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let api = app.api();
    let (seller, bidders, id) = api.scene(&["bob"], json!({})).await;
    let bob = &bidders[0];
    let bids = format!("/api/v1/auctions/{id}/bids");
    let token = Some(bob.token.as_str());

    let cases: &[(&str, &'static str, StatusCode, &str)] = &[
        ("malformed JSON", r#"{"amount": "#, StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("not JSON at all", "amount=5", StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("empty body", "", StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("wrong type", r#"{"amount": "12000"}"#, StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("array body", "[12000]", StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("unknown field", r#"{"amount": 12000, "bonus": 1}"#, StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("missing field", r#"{"max_amount": 12000}"#, StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("zero amount", r#"{"amount": 0}"#, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
        ("negative amount", r#"{"amount": -500}"#, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
        ("amount over 10^13", r#"{"amount": 10000000000001}"#, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
        (
            "huge amount",
            r#"{"amount": 99999999999999999999999999}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_AMOUNT",
        ),
        ("fractional amount", r#"{"amount": 12000.5}"#, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
        (
            "max below amount",
            r#"{"amount": 12000, "max_amount": 11000}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_AMOUNT",
        ),
        (
            "max out of range",
            r#"{"amount": 12000, "max_amount": 1e20}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_AMOUNT",
        ),
        ("amount beyond f64", r#"{"amount": 1e400}"#, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
    ];
    for (case, body, status, code) in cases {
        expect_error(raw_request(&app, &bids, token, body), *status, code, case).await;
    }

    // Ids that are not UUIDs, and UUIDs of nothing.
    expect_error(
        raw_request(&app, "/api/v1/auctions/not-a-uuid/bids", token, r#"{"amount": 12000}"#),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
        "bad uuid",
    )
    .await;
    let (status, body) = api.get("/api/v1/auctions/1234", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")));
    let (status, body) = api.get("/api/v1/auctions/%FF%FE/bids", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")), "{body}");
    let nothing = uuid::Uuid::now_v7();
    expect_error(
        raw_request(&app, &format!("/api/v1/auctions/{nothing}/bids"), token, r#"{"amount": 12000}"#),
        StatusCode::NOT_FOUND,
        "AUCTION_NOT_FOUND",
        "unknown auction",
    )
    .await;

    // Tokens: missing, garbage, forged, alg:none, expired, wrong scheme.
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": bob.id, "name": "bob", "iat": now, "exp": now + 3600});
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"not the server's secret, not at all"),
    )
    .unwrap();
    let alg_none = token_with(json!({"alg": "none", "typ": "JWT"}), claims.clone(), "");
    let tampered = {
        let parts: Vec<&str> = bob.token.split('.').collect();
        let other_claims = json!({"sub": seller.id, "name": "seller", "iat": now, "exp": now + 3600});
        format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(other_claims.to_string()), parts[2])
    };
    for (case, token) in [
        ("forged", forged.as_str()),
        ("alg none", alg_none.as_str()),
        ("garbage", "abc.def.ghi"),
        ("tampered", tampered.as_str()),
    ] {
        expect_error(
            raw_request(&app, &bids, Some(token), r#"{"amount": 12000}"#),
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            case,
        )
        .await;
    }
    expect_error(
        raw_request(&app, &bids, None, r#"{"amount": 12000}"#),
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "no token",
    )
    .await;
    let basic = app.client.post(app.url(&bids)).header("authorization", "Basic Ym9iOnB3").body(r#"{"amount": 12000}"#);
    expect_error(basic, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "basic auth").await;
    let (status, body) = api.get("/api/v1/users/me", Some(&alg_none)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("UNAUTHENTICATED")));

    // The seller bidding on their own auction.
    expect_error(
        raw_request(&app, &bids, Some(&seller.token), r#"{"amount": 12000}"#),
        StatusCode::FORBIDDEN,
        "SELLER_CANNOT_BID",
        "seller bids",
    )
    .await;

    // Bodies over 16 KiB, on bids and elsewhere.
    let big = format!(r#"{{"amount": 12000, "pad": "{}"}}"#, "x".repeat(17 * 1024));
    let oversized = app.client.post(app.url(&bids)).bearer_auth(&bob.token).body(big.clone());
    expect_error(oversized, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "oversized bid").await;
    let oversized = app.client.post(app.url("/api/v1/auth/register")).body(big);
    expect_error(oversized, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "oversized register").await;

    // A cancel takes no body, or `{}`: fields it does not define, and bodies
    // over 16 KiB, are refused as on every other write (they cancelled the auction).
    let cancel = format!("/api/v1/auctions/{id}/cancel");
    let seller_token = Some(seller.token.as_str());
    for (case, body) in [("cancel with a field", r#"{"reason": "changed my mind"}"#), ("cancel with an array", "[]")] {
        expect_error(raw_request(&app, &cancel, seller_token, body), StatusCode::BAD_REQUEST, "INVALID_REQUEST", case)
            .await;
    }
    let oversized =
        app.client.post(app.url(&cancel)).bearer_auth(&seller.token).body(format!("{{}}{}", " ".repeat(17 * 1024)));
    expect_error(oversized, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "oversized cancel").await;

    // Idempotency keys outside 1..=64 printable ASCII.
    let long_key = raw_request(&app, &bids, token, r#"{"amount": 12000}"#).header("Idempotency-Key", "k".repeat(65));
    expect_error(long_key, StatusCode::BAD_REQUEST, "INVALID_REQUEST", "65-char key").await;

    // Auction creation with each field out of bounds.
    let create_cases: &[(&str, Value, StatusCode, &str)] = &[
        ("empty title", json!({"title": ""}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("long title", json!({"title": "t".repeat(201)}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("bad currency", json!({"currency": "euro"}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("zero price", json!({"starting_price": 0}), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
        ("zero increment", json!({"min_increment": 0}), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_AMOUNT"),
        ("too long", json!({"duration_secs": 31 * 24 * 3600}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("no end", json!({"duration_secs": null}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        (
            "end before start",
            json!({"duration_secs": null, "end_at": "2001-01-01T00:00:00Z"}),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        ("bad time", json!({"duration_secs": null, "end_at": "tomorrow"}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("soft close too long", json!({"soft_close_secs": 3601}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("string price", json!({"starting_price": "100"}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("NUL in title", json!({"title": "a\u{0}b"}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        ("NUL in description", json!({"description": "x\u{0}"}), StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
    ];
    for (case, overrides, status, code) in create_cases {
        let (got, body) = api.post("/api/v1/auctions", Some(&seller.token), auction_body(overrides.clone())).await;
        assert_eq!((got, body["error"]["code"].as_str()), (*status, Some(*code)), "{case}: {body}");
    }
    let (status, body) =
        api.post("/api/v1/auth/login", None, json!({"username": "bo\u{0}b", "password": "password-123"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("INVALID_CREDENTIALS")));
    let (status, body) =
        api.post("/api/v1/auth/register", None, json!({"username": "No Spaces", "password": "password-123"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")));
    let (status, body) =
        api.post("/api/v1/auth/register", None, json!({"username": "shortpw", "password": "short"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")));

    // Query parameters.
    for query in ["limit=0", "limit=101", "limit=abc", "cursor=%%%", "status=open"] {
        let (status, body) = api.get(&format!("/api/v1/auctions?{query}"), None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")),
            "{query}: {body}"
        );
    }
    let (status, _) = api.get(&format!("{bids}?before_seq=-1"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Garbage on a raw socket: that connection is refused, nobody else notices.
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    socket.write_all(b"\x16\x03\x01\x00\xa5garbage that is not HTTP\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), socket.read_to_end(&mut answer))
        .await
        .expect("the server answers garbage and closes the connection at once, without waiting for more")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "garbage got: {answer}");

    // Nothing above changed the auction, and the server still serves.
    let after = api.auction(&id).await;
    assert_eq!(
        (after["bid_count"].as_i64(), after["current_price"].as_i64(), after["status"].as_str()),
        (Some(0), Some(10_000), Some("active"))
    );
    let (_, listed) = api.get("/api/v1/auctions", None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "no auction was created by bad input");
    let (status, _) = api.get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, placed) = api.bid(bob, &id, 12_000, None).await;
    assert_eq!(status, StatusCode::CREATED, "a good bid still works: {placed}");
    app.stop().await;
}

/// Details of the contract that are easy to get wrong: the auth scheme's case,
/// an absurd number in a WebSocket bid, extra fields on `ping`, and CORS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheme_case_absurd_numbers_extra_fields_and_cors() {
    use crate::ws_client::{Watcher, WsClient};

    let app = TestApp::spawn_with(
        Backend::Sqlite,
        |config| config.cors_origins = vec!["https://shop.example".to_owned()],
        gavel_actors::node::NodeSettings::default(),
    )
    .await;
    let api = app.api();
    let (_seller, bidders, id) = api.scene(&["bob"], json!({})).await;
    let bob = &bidders[0];

    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = app
            .client
            .get(app.url("/api/v1/users/me"))
            .header("Authorization", format!("{scheme} {}", bob.token))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "scheme {scheme}");
    }
    let response =
        app.client.get(app.url("/api/v1/users/me")).header("Authorization", format!("Basic {}", bob.token)).send();
    assert_eq!(response.await.unwrap().status(), StatusCode::UNAUTHORIZED);

    // A WebSocket bid with an amount too large to parse is answered as a bid.
    let mut socket = WsClient::connect(&app.address, Some(&bob.token)).await;
    socket
        .send_raw(tokio_tungstenite::tungstenite::Message::Text(
            format!(r#"{{"type":"bid","request_id":"r-1","auction_id":"{id}","amount":1e400}}"#).into(),
        ))
        .await;
    let answer = socket.next_of("bid_result").await;
    assert_eq!(
        (answer["request_id"].as_str(), answer["error"]["code"].as_str()),
        (Some("r-1"), Some("INVALID_AMOUNT"))
    );
    // Extra fields are refused on every message, `ping` included.
    socket.send(json!({"type": "ping", "x": 1})).await;
    let answer = socket.next_event().await;
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("INVALID_REQUEST")),
        "{answer}"
    );
    socket.send(json!({"type": "ping"})).await;
    assert_eq!(socket.next_event().await["type"], "pong", "the connection stays usable");

    // CORS: the configured origin may call the API from a browser; others may not.
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url(&format!("/api/v1/auctions/{id}/bids")))
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "https://shop.example");
    assert!(headers["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert!(headers["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    let read = app.client.get(app.url(&format!("/api/v1/auctions/{id}"))).header("Origin", "https://shop.example");
    let read = read.send().await.unwrap();
    assert_eq!(read.headers()["access-control-allow-origin"], "https://shop.example");
    assert!(read.headers()["access-control-expose-headers"].to_str().unwrap().contains("gavel-owner"));
    let other = app.client.get(app.url(&format!("/api/v1/auctions/{id}"))).header("Origin", "https://evil.example");
    let other = other.send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert!(!other.headers().contains_key("access-control-allow-origin"), "no CORS for other origins");
    app.stop().await;

    // By default no origin gets CORS headers.
    let plain = TestApp::spawn(Backend::Sqlite).await;
    let response = plain.client.get(plain.url("/health")).header("Origin", "https://shop.example").send();
    assert!(!response.await.unwrap().headers().contains_key("access-control-allow-origin"));
    plain.stop().await;
}

/// The node-to-node endpoint checks the cluster secret before it reads a
/// body. It read the body first, with no deadline of its own: anyone could
/// hold a connection there, trickling a body, for the edge's whole time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_endpoint_refuses_a_request_without_the_secret_before_its_body() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!("POST /internal/v1/writes HTTP/1.1\r\nHost: {address}\r\nContent-Length: 1000\r\n\r\n");
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    assert!(answer[..read].starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&answer[..read]));
    app.stop().await;
}

/// A write forwarded in another wire version (nodes of two releases during a
/// rolling upgrade) is refused before it is decided with `426`, told apart
/// from a malformed request (`400`), so the sending node can say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_forwarded_in_another_wire_version_is_refused_with_426() {
    use gavel::bidding::wire::{CancelRequest, Forwarded, WIRE_VERSION, WriteRequest};

    let secret = "s".repeat(32);
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        |config| config.cluster_secret = Some(gavel::auth::Secret::new("s".repeat(32))),
        gavel_actors::node::NodeSettings::default(),
    )
    .await;
    let request =
        WriteRequest::Cancel(CancelRequest { auction_id: uuid::Uuid::now_v7(), by: uuid::Uuid::now_v7(), key: None });
    let post = |version: u16| {
        let body =
            rmp_serde::to_vec_named(&Forwarded { version, from_node: "node-z".to_owned(), request: request.clone() });
        app.client
            .post(app.url("/internal/v1/writes"))
            .header("Gavel-Cluster-Secret", &secret)
            .header("Content-Type", "application/msgpack")
            .body(body.unwrap())
            .send()
    };
    assert_eq!(post(WIRE_VERSION + 1).await.unwrap().status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(post(WIRE_VERSION).await.unwrap().status(), StatusCode::OK, "the same write in this version is decided");
    let malformed = app
        .client
        .post(app.url("/internal/v1/writes"))
        .header("Gavel-Cluster-Secret", &secret)
        .body("not MessagePack")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}
