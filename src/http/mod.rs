//! The HTTP edge: routes of docs/API.md, the OpenAPI document generated from
//! the handlers (`/api/openapi.json`), Swagger UI (`/api/docs`, served from the
//! binary), health, readiness and metrics. Each request has a time limit and a
//! 16 KiB body limit; every error is JSON.

pub mod auctions;
pub mod bids;
pub mod cluster;
pub mod error;
pub mod extract;
pub mod internal;
pub mod ops;
pub mod users;
pub mod views;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
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
use crate::telemetry;
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

/// A request slower than this is answered 503 (a bid's own wait is shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

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
        .layer(middleware::from_fn_with_state(context.clone(), cors))
        .layer(middleware::from_fn_with_state(context.clone(), observe))
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::Extension(body_timeout))
        .with_state(context)
}

/// The `Gavel-Node` header: the node that answered.
pub const NODE_HEADER: &str = "gavel-node";

/// Time limit, request metrics by matched route (never the raw URL), bid
/// outcome counting, and `Gavel-Node` on every response.
async fn observe(State(context): State<ApiContext>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |path| intern_route(path.as_str()));
    let is_write = request.method() == axum::http::Method::POST;
    let is_bid = is_write && route == "/api/v1/auctions/{id}/bids";
    let mut response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        // A write may have been handed over already and still become durable.
        Err(_) => {
            ApiError::Unavailable { reason: "request timed out".to_owned(), outcome_unknown: is_write }.into_response()
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let status = status_label(response.status().as_u16());
    metrics::counter!(telemetry::HTTP_REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
    metrics::histogram!(telemetry::HTTP_REQUEST_DURATION_SECONDS, "route" => route).record(elapsed);
    if is_bid {
        let outcome = response.extensions().get::<BidOutcomeLabel>().map_or("accepted", |label| label.0);
        metrics::counter!(telemetry::BIDS_TOTAL, "outcome" => outcome).increment(1);
        metrics::histogram!(telemetry::BID_LATENCY_SECONDS).record(elapsed);
    }
    response.headers_mut().insert(NODE_HEADER, context.node_header.clone());
    response
}

/// CORS for the origins of `--cors-origins` (none by default): a preflight
/// (`OPTIONS` with `Access-Control-Request-Method`) from one of them is
/// answered `204` with what it may send; every answer to one of them says it
/// may read it, and which of our headers. Any other origin gets no CORS
/// header, so browsers keep their same-origin rule.
async fn cors(State(context): State<ApiContext>, request: Request, next: Next) -> Response {
    use axum::http::{HeaderValue, Method, StatusCode, header};
    let origin = request.headers().get(header::ORIGIN).cloned().filter(|origin| {
        origin
            .to_str()
            .is_ok_and(|origin| context.cors_origins.iter().any(|allowed| allowed == "*" || allowed == origin))
    });
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(request).await };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, idempotency-key"),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    } else {
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("gavel-node, gavel-owner, retry-after"),
        );
    }
    response
}

/// Route labels as `&'static str`, so labelling a request allocates nothing.
/// Only matched route templates arrive here: the set is the router's, bounded.
fn intern_route(route: &str) -> &'static str {
    static ROUTES: std::sync::OnceLock<std::sync::RwLock<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    // Every route is seen once and read ever after: a shared read lock, no contention.
    if let Some(known) = routes.read().expect("route label lock").get(route) {
        return known;
    }
    let mut routes = routes.write().expect("route label lock");
    if let Some(known) = routes.get(route) {
        return known;
    }
    let leaked: &'static str = Box::leak(route.to_owned().into_boxed_str());
    routes.insert(leaked);
    leaked
}

fn status_label(status: u16) -> &'static str {
    static LABELS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..600).map(|code: u16| code.to_string()).collect());
    labels.get(status as usize).map_or("other", String::as_str)
}

/// Set on error responses so the metrics layer can count bids by rejection code.
#[derive(Clone, Copy)]
pub struct BidOutcomeLabel(pub &'static str);
