//! Operations endpoints: liveness, readiness (can this node make writes
//! durable?), and Prometheus metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiContext;
use super::error::ErrorBody;
use super::views::StatusView;
use crate::telemetry;

#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "the process serves", body = StatusView)))]
pub async fn health() -> Json<StatusView> {
    Json(StatusView { status: "ok".to_owned(), degraded: Vec::new() })
}

#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "the node can serve: its store answers and (in a cluster) its membership is current", body = StatusView),
        (status = 503, description = "UNAVAILABLE, with the reason", body = ErrorBody),
    ))]
pub async fn ready(State(context): State<ApiContext>) -> Response {
    let not_ready = |reason: &str| {
        let body = json!({"error": {"code": "UNAVAILABLE", "message": format!("not ready: {reason}")}});
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response()
    };
    if context.node.persistence_failed() {
        return not_ready("the persistence actor failed; restart the node");
    }
    if !context.node.is_accepting() {
        return not_ready("shutting down");
    }
    if context.node.commits_failing() {
        return not_ready("commits are failing (the store is unreachable or refuses writes); they are being retried");
    }
    if !context.cluster.is_serving() {
        return not_ready("cluster membership not confirmed (the lease store cannot be reached)");
    }
    // Redis carries events between nodes, never bids: its absence degrades, it does not stop.
    let degraded = match &context.redis {
        Some(redis) if !redis.is_up() => vec!["redis".to_owned()],
        _ => Vec::new(),
    };
    match tokio::time::timeout(Duration::from_secs(2), context.db.ping()).await {
        Ok(Ok(())) => Json(StatusView { status: "ready".to_owned(), degraded }).into_response(),
        Ok(Err(_)) => not_ready("store unreachable"),
        Err(_) => not_ready("store timed out"),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(context): State<ApiContext>) -> Response {
    let queue = &context.node.persistence_queue;
    metrics::gauge!(telemetry::PERSISTENCE_QUEUE_DEPTH).set(queue.in_use() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], context.metrics.render()).into_response()
}
