//! Node-to-node endpoints, not part of the public API: `POST
//! /internal/v1/writes` (a write forwarded to its auction's owner, MessagePack
//! in and out, `bidding/wire.rs`) and `POST /internal/v1/cluster/wake` (run
//! the lease tick now). Both need the cluster secret in `Gavel-Cluster-Secret`;
//! without it they answer 401 like any unauthenticated request.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::ApiContext;
use super::error::ApiError;
use crate::bidding::wire::{Forwarded, ForwardedReply, WIRE_VERSION};
use crate::cluster::SECRET_HEADER;

/// When a write in another wire version was last logged (see `now_and_then`).
static VERSION_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn routes() -> Router<ApiContext> {
    Router::new().route("/internal/v1/writes", post(writes)).route("/internal/v1/cluster/wake", post(wake))
}

fn authenticated(context: &ApiContext, headers: &HeaderMap) -> bool {
    headers.get(SECRET_HEADER).is_some_and(|secret| context.cluster.authenticates(secret.as_bytes()))
}

/// Decides a forwarded write here, as if it had been received here, and
/// answers with the outcome: this node's own verdict, `NotOwner` included.
/// The secret is checked before the body is read (within the body deadline
/// and size, as any request's): without it, nothing is waited for.
async fn writes(State(context): State<ApiContext>, request: Request) -> Response {
    if !authenticated(&context, request.headers()) {
        return ApiError::Unauthenticated.into_response();
    }
    let body = match crate::http::extract::read_body(request, &()).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let forwarded: Forwarded = match rmp_serde::from_slice(&body) {
        Ok(forwarded) => forwarded,
        Err(error) => return ApiError::InvalidRequest(format!("not a forwarded write: {error}")).into_response(),
    };
    if forwarded.version != WIRE_VERSION {
        // Nodes of two releases (a rolling upgrade): refused before deciding,
        // and told apart from a bad request, so the sender can say so.
        if crate::telemetry::now_and_then(&VERSION_WARNED) {
            tracing::warn!(
                theirs = forwarded.version,
                ours = WIRE_VERSION,
                from = %forwarded.from_node,
                "writes forwarded in another wire version are refused (a rolling upgrade?)"
            );
        }
        let message = format!("wire version {} is not {WIRE_VERSION}", forwarded.version);
        let mut response = ApiError::InvalidRequest(message).into_response();
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        return response;
    }
    let result = context.bidding.decide_forwarded(forwarded.request).await;
    let reply = ForwardedReply { version: WIRE_VERSION, owner: context.node_id.clone(), result };
    match rmp_serde::to_vec_named(&reply) {
        Ok(bytes) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/msgpack")], bytes).into_response(),
        Err(error) => ApiError::internal("encode forwarded reply", error).into_response(),
    }
}

async fn wake(State(context): State<ApiContext>, headers: HeaderMap) -> Response {
    if !authenticated(&context, &headers) {
        return ApiError::Unauthenticated.into_response();
    }
    context.cluster.wake();
    StatusCode::NO_CONTENT.into_response()
}
