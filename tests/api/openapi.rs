//! The OpenAPI document is generated from the handlers; these tests hold it to
//! what the server really answers: the routes of docs/API.md are all there,
//! Swagger UI is served from the binary, and schemathesis (from PyPI; installed
//! by scripts/test) fuzzes every operation, checking that no input yields a
//! 5xx, that every status and body is the documented one, and that requests
//! the schema forbids are refused.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{Backend, HasApi, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_lists_every_route_and_swagger_ui_is_served() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (status, document) = app.api().get("/api/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"), "OpenAPI 3.1: {}", document["openapi"]);
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            operations.insert(format!("{} {path}", method.to_uppercase()));
            let responses = operation["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path} documents its responses");
        }
    }
    let expected: BTreeSet<String> = [
        "POST /api/v1/auth/register",
        "POST /api/v1/auth/login",
        "GET /api/v1/users/me",
        "POST /api/v1/auctions",
        "GET /api/v1/auctions",
        "GET /api/v1/auctions/{id}",
        "POST /api/v1/auctions/{id}/cancel",
        "GET /api/v1/auctions/{id}/bids",
        "POST /api/v1/auctions/{id}/bids",
        "GET /api/v1/auctions/{id}/bids/highest",
        "GET /api/v1/users/me/bids",
        "GET /health",
        "GET /ready",
        "GET /metrics",
        "GET /api/v1/cluster",
        "GET /api/v1/cluster/auctions/{id}",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(operations, expected);
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());

    let swagger = app.client.get(app.url("/api/docs/")).send().await.unwrap();
    assert_eq!(swagger.status(), StatusCode::OK);
    let html = swagger.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "Swagger UI page: {}", &html[..html.len().min(200)]);
    let bundle = app.client.get(app.url("/api/docs/swagger-ui-bundle.js")).send().await.unwrap();
    assert_eq!(bundle.status(), StatusCode::OK, "Swagger UI's script is served from the binary");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_contract_violation() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let user = app.api().register("schema_user").await;
    let tests_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let mut command = tokio::process::Command::new("schemathesis");
    command
        .current_dir(tests_dir)
        .arg("--config-file")
        .arg("schemathesis.toml")
        .arg("run")
        .arg(app.url("/api/openapi.json"))
        .arg("--header")
        .arg(format!("Authorization: Bearer {}", user.token))
        .arg("--checks")
        .arg("all")
        .arg("--exclude-checks")
        .arg("ensure_resource_availability")
        .arg("--max-examples")
        .arg("25")
        .arg("--max-time")
        .arg("75")
        .arg("--continue-on-failure")
        .arg("--no-color")
        .kill_on_drop(true);
    let output = match command.output().await {
        Ok(output) => output,
        Err(error) => panic!("schemathesis is needed (scripts/test installs it: pip install schemathesis): {error}"),
    };
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found violations:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The server is still healthy after the fuzzing.
    let health = app.client.get(app.url("/health")).timeout(Duration::from_secs(5)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    app.stop().await;
}
