//! The bidder web page, embedded in the binary: `GET /` and, for a link
//! people can share, `GET /auctions/{id}` serve the same page; its script and
//! style sheet come from `/assets/`. No build step: the files in this folder
//! are what the browser runs (see docs/API.md "Web page").

use std::sync::OnceLock;

use axum::Router;
use axum::extract::{Path, RawQuery};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Scripts and styles only from this origin, no inline code, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/auctions/{id}", get(auction_page))
        .route("/assets/app.js", get(script))
        .route("/assets/app.css", get(style))
}

struct Assets {
    /// Changes whenever an asset does: the page asks for `?v=<version>`.
    version: String,
    index: String,
}

fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in INDEX_HTML.bytes().chain(APP_JS.bytes()).chain(APP_CSS.bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let version = format!("{hash:016x}");
        let index = INDEX_HTML.replace("{{VERSION}}", &version);
        Assets { version, index }
    })
}

async fn index() -> Response {
    page(StatusCode::OK)
}

/// The page for any auction id; one that cannot be an id is a 404 (the page
/// then says so), an unknown one is found out by the page itself.
async fn auction_page(Path(id): Path<String>) -> Response {
    let status = if uuid::Uuid::try_parse(&id).is_ok() { StatusCode::OK } else { StatusCode::NOT_FOUND };
    page(status)
}

fn page(status: StatusCode) -> Response {
    let index: &'static str = &assets().index;
    let mut response = (status, index).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(headers);
    response
}

async fn script(query: RawQuery, request_headers: HeaderMap) -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8", query, &request_headers)
}

async fn style(query: RawQuery, request_headers: HeaderMap) -> Response {
    asset(APP_CSS, "text/css; charset=utf-8", query, &request_headers)
}

/// Cached for good when asked for by this build's version, revalidated otherwise.
fn asset(body: &'static str, content_type: &'static str, RawQuery(query): RawQuery, request: &HeaderMap) -> Response {
    let assets = assets();
    let etag = format!("\"{}\"", assets.version);
    let versioned = query.as_deref() == Some(&format!("v={}", assets.version));
    let not_modified = request.get(header::IF_NONE_MATCH).is_some_and(|value| value.as_bytes() == etag.as_bytes());
    let mut response = if not_modified { StatusCode::NOT_MODIFIED.into_response() } else { body.into_response() };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if versioned { "public, max-age=31536000, immutable" } else { "no-cache" }),
    );
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    security_headers(headers);
    response
}

fn security_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}
