//! The HTTP edge: routes of docs/API.md, the OpenAPI document generated from
//! the handlers (`/api/openapi.json`), Swagger UI (`/api/docs`, served from the
//! binary), health, readiness and metrics. Each request has a time limit and a
//! 16 KiB body limit; every error is JSON.

pub mod auctions;
pub mod bids;
pub mod cluster;
pub mod edge;
pub mod error;
pub mod extract;
pub mod internal;
pub mod ops;
pub mod users;
pub mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use gavel_actors::node::Node;
use gavel_actors::ports::Clock;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::Auth;
use crate::bidding::Bidding;
use crate::cluster::Cluster;
use crate::storage::Db;
use error::ApiError;

/// Everything a handler may use; cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    inner: Arc<ContextInner>,
}

pub struct ContextInner {
    pub db: Db,
    pub node: Arc<Node>,
    pub auth: Auth,
    /// Password hashing, bounded to one at a time per core.
    pub passwords: crate::auth::PasswordHashing,
    /// Every bid and cancel goes through here (REST, WebSocket, forwarded).
    pub bidding: Arc<Bidding>,
    pub cluster: Arc<Cluster>,
    pub clock: Arc<dyn Clock>,
    pub metrics: PrometheusHandle,
    pub node_id: String,
    /// Auction rows between changes, for `GET /api/v1/auctions/{id}`.
    pub read_cache: Arc<crate::read_cache::ReadCache>,
    /// `Gavel-Node`, made once.
    pub node_header: axum::http::HeaderValue,
    /// Cross-node events, when `--redis-url` is given.
    pub redis: Option<Arc<crate::events::redis::RedisEvents>>,
    /// `--cors-origins`: web origins allowed to call the API from a browser.
    pub cors_origins: Vec<String>,
    /// Sign-ins (register, login) per client address and per username.
    pub sign_in_limits: SignInLimits,
    /// `--trust-forwarded-for`: the client's address is the last one in
    /// `X-Forwarded-For` (the balancer's view), not the peer's.
    pub trust_forwarded_for: bool,
}

/// How often one client address, and one username, may try to register or
/// sign in (each attempt hashes a password: the node's most expensive work).
pub struct SignInLimits {
    pub per_address: crate::ratelimit::RateLimiter<std::net::IpAddr>,
    pub per_username: crate::ratelimit::RateLimiter<String>,
}

impl SignInLimits {
    /// `per_address` and `per_username` attempts a minute; 0: no limit.
    pub fn new(per_address: u32, per_username: u32) -> SignInLimits {
        SignInLimits {
            per_address: crate::ratelimit::RateLimiter::per_minute(per_address),
            per_username: crate::ratelimit::RateLimiter::per_minute(per_username),
        }
    }

    /// Takes one attempt for the address and one for the (case-folded)
    /// username; `429 RATE_LIMITED` when either is used up.
    pub fn check(&self, address: std::net::IpAddr, username: &str, now_ms: i64) -> Result<(), ApiError> {
        self.per_address
            .check(address, now_ms)
            .and_then(|()| self.per_username.check(username.to_lowercase(), now_ms))
            .map_err(|retry_after_secs| ApiError::RateLimited { retry_after_secs, of: error::Limited::SignIns })
    }
}

impl std::ops::Deref for ApiContext {
    type Target = ContextInner;
    fn deref(&self) -> &ContextInner {
        &self.inner
    }
}

impl ApiContext {
    pub fn new(inner: ContextInner) -> ApiContext {
        ApiContext { inner: Arc::new(inner) }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "gavel", description = "A real-time auction server. Money is integer minor units of the auction's currency."),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Accounts and tokens"),
        (name = "auctions", description = "Auctions"),
        (name = "bids", description = "Bids"),
        (name = "operations", description = "Health, readiness, metrics"),
        (name = "cluster", description = "Which node owns what"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The routes and the OpenAPI document they produce.
pub fn api() -> (Router<ApiContext>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(users::register))
        .routes(routes!(users::login))
        .routes(routes!(users::me))
        .routes(routes!(auctions::create_auction, auctions::list_auctions))
        .routes(routes!(auctions::get_auction))
        .routes(routes!(auctions::cancel_auction))
        .routes(routes!(auctions::my_bids))
        .routes(routes!(bids::place_bid, bids::bid_history))
        .routes(routes!(bids::highest_bid))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::metrics))
        .routes(routes!(cluster::cluster))
        .routes(routes!(cluster::auction_owner))
        .split_for_parts()
}

/// The node's router: the API, `websocket` (the `/ws` route, from `ws`),
/// the page, the internal routes, and the middleware over all of them.
pub fn router(context: ApiContext, body_timeout: extract::BodyTimeout, websocket: Router<ApiContext>) -> Router {
    let (api_routes, openapi) = api();
    api_routes
        .merge(websocket)
        .merge(crate::web::routes())
        .merge(internal::routes())
        .merge(SwaggerUi::new("/api/docs").url("/api/openapi.json", openapi))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(edge::EdgeLayer::new(context.clone()))
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::Extension(body_timeout))
        .with_state(context)
}

/// The `Gavel-Node` header: the node that answered (set in `edge`).
pub const NODE_HEADER: &str = "gavel-node";

/// Set on error responses so the metrics layer can count bids by rejection code.
#[derive(Clone, Copy)]
pub struct BidOutcomeLabel(pub &'static str);
