//! The middleware over every route, as one tower layer: the request's time
//! limit, request metrics by matched route (never the raw URL), bid outcome
//! counting, `Gavel-Node` on every response, and CORS for the origins of
//! `--cors-origins`.
//!
//! One layer with a future of its own type, rather than `from_fn` middleware:
//! those box a clone of the service under them and their futures on every
//! request, and the bid path pays for each request's work on two cores. The
//! metric handles are looked up once per route and status, not per request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tokio::time::Timeout;
use tower::{Layer, Service};

use super::error::ApiError;
use super::{ApiContext, BidOutcomeLabel, NODE_HEADER};
use crate::telemetry;

/// A request slower than this is answered 503 (a bid's own wait is shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

/// The route whose `POST`s are bids, counted by outcome.
const BID_ROUTE: &str = "/api/v1/auctions/{id}/bids";

#[derive(Clone)]
pub struct EdgeLayer {
    context: ApiContext,
}

impl EdgeLayer {
    pub fn new(context: ApiContext) -> EdgeLayer {
        EdgeLayer { context }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner, context: self.context.clone() }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    context: ApiContext,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> EdgeFuture<S::Future> {
        let started = Instant::now();
        let route =
            RouteMetrics::of(request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str));
        let is_write = request.method() == Method::POST;
        let is_bid = is_write && route.label == BID_ROUTE;
        let cors = cors_origin(&self.context, &request).map(|origin| {
            let preflight = request.method() == Method::OPTIONS
                && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
            Cors { origin, preflight }
        });
        let inner = if cors.as_ref().is_some_and(|cors| cors.preflight) {
            None
        } else {
            // The clone stays for the next request; the service made ready goes.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            Some(tokio::time::timeout(REQUEST_TIMEOUT, inner.call(request)))
        };
        EdgeFuture { inner, started, route, is_write, is_bid, cors, node_header: self.context.node_header.clone() }
    }
}

/// A request from an origin of `--cors-origins`.
struct Cors {
    origin: HeaderValue,
    /// `OPTIONS` with `Access-Control-Request-Method`: answered here, `204`.
    preflight: bool,
}

pin_project! {
    pub struct EdgeFuture<F> {
        // `None` for a CORS preflight, answered without the routes.
        #[pin]
        inner: Option<Timeout<F>>,
        started: Instant,
        route: &'static RouteMetrics,
        is_write: bool,
        is_bid: bool,
        cors: Option<Cors>,
        node_header: HeaderValue,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for EdgeFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.as_pin_mut() {
            None => StatusCode::NO_CONTENT.into_response(),
            Some(inner) => match std::task::ready!(inner.poll(cx)) {
                Ok(Ok(response)) => response,
                // A write may have been handed over already and still become durable.
                Err(_elapsed) => {
                    ApiError::Unavailable { reason: "request timed out".to_owned(), outcome_unknown: *this.is_write }
                        .into_response()
                }
            },
        };
        if let Some(cors) = this.cors.take() {
            add_cors_headers(&mut response, cors);
        }
        let elapsed = this.started.elapsed().as_secs_f64();
        this.route.requests(response.status().as_u16()).increment(1);
        this.route.duration.record(elapsed);
        if *this.is_bid {
            let outcome = response.extensions().get::<BidOutcomeLabel>().map_or("accepted", |label| label.0);
            bid_outcomes(outcome).increment(1);
            bid_latency().record(elapsed);
        }
        response.headers_mut().insert(NODE_HEADER, this.node_header.clone());
        Poll::Ready(Ok(response))
    }
}

/// The request's `Origin` when it is one of `--cors-origins` (none by
/// default): such a request may read the answer. Any other origin gets no
/// CORS header, so browsers keep their same-origin rule.
fn cors_origin(context: &ApiContext, request: &Request) -> Option<HeaderValue> {
    if context.cors_origins.is_empty() {
        return None;
    }
    let origin = request.headers().get(header::ORIGIN)?;
    let allowed = origin
        .to_str()
        .is_ok_and(|origin| context.cors_origins.iter().any(|allowed| allowed == "*" || allowed == origin));
    allowed.then(|| origin.clone())
}

/// A preflight is told what it may send; every other answer, which of our
/// headers the page may read.
fn add_cors_headers(response: &mut Response, cors: Cors) {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, cors.origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if cors.preflight {
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
}

/// A route's label and metric handles, made the first time the route is seen
/// and kept for the process: only matched route templates (and "unmatched")
/// arrive here, so the set is the router's, bounded.
struct RouteMetrics {
    label: &'static str,
    duration: metrics::Histogram,
    /// `gavel_http_requests_total` of this route, by status code.
    by_status: RwLock<HashMap<u16, &'static metrics::Counter>>,
}

impl RouteMetrics {
    fn of(route: &str) -> &'static RouteMetrics {
        static ROUTES: OnceLock<RwLock<HashMap<&'static str, &'static RouteMetrics>>> = OnceLock::new();
        kept(ROUTES.get_or_init(Default::default), route, || {
            let label: &'static str = Box::leak(route.to_owned().into_boxed_str());
            let made = RouteMetrics {
                label,
                duration: metrics::histogram!(telemetry::HTTP_REQUEST_DURATION_SECONDS, "route" => label),
                by_status: RwLock::default(),
            };
            (label, made)
        })
    }

    fn requests(&self, status: u16) -> &'static metrics::Counter {
        kept(&self.by_status, &status, || {
            let label = status_label(status);
            (status, metrics::counter!(telemetry::HTTP_REQUESTS_TOTAL, "route" => self.label, "status" => label))
        })
    }
}

/// The value kept for `key`, made (and kept for the process) the first time
/// `key` is seen. Keys come from bounded sets (routes, status codes, error
/// codes); after the first sight of each, only the shared read lock is taken.
fn kept<K, Q, V>(map: &RwLock<HashMap<K, &'static V>>, key: &Q, make: impl FnOnce() -> (K, V)) -> &'static V
where
    K: std::borrow::Borrow<Q> + Eq + std::hash::Hash,
    Q: Eq + std::hash::Hash + ?Sized,
{
    if let Some(known) = map.read().expect("metric handles lock").get(key) {
        return known;
    }
    let mut map = map.write().expect("metric handles lock");
    if let Some(known) = map.get(key) {
        return known;
    }
    let (key, value) = make();
    let value: &'static V = Box::leak(Box::new(value));
    map.insert(key, value);
    value
}

fn status_label(status: u16) -> &'static str {
    static LABELS: OnceLock<Vec<String>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..600).map(|code: u16| code.to_string()).collect());
    labels.get(status as usize).map_or("other", String::as_str)
}

/// `gavel_bids_total` by outcome: "accepted" or an error code (a bounded set).
fn bid_outcomes(outcome: &'static str) -> &'static metrics::Counter {
    static BY_OUTCOME: OnceLock<RwLock<HashMap<&'static str, &'static metrics::Counter>>> = OnceLock::new();
    kept(BY_OUTCOME.get_or_init(Default::default), outcome, || {
        (outcome, metrics::counter!(telemetry::BIDS_TOTAL, "outcome" => outcome))
    })
}

fn bid_latency() -> &'static metrics::Histogram {
    static LATENCY: OnceLock<metrics::Histogram> = OnceLock::new();
    LATENCY.get_or_init(|| metrics::histogram!(telemetry::BID_LATENCY_SECONDS))
}
