//! Extractors that turn every malformed input into the documented error
//! instead of axum's plain-text rejections: JSON bodies (16 KiB at most,
//! unknown fields refused), query strings, path ids, bearer tokens and the
//! `Idempotency-Key` header.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::ApiContext;
use super::error::ApiError;
pub use crate::bidding::keys::fingerprint;
use crate::bidding::keys::{self, KeyCheck};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// How long a request's body may take to arrive once its head has (the
/// router puts it in every request's extensions; `--http-body-timeout-secs`).
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub std::time::Duration);

impl Default for BodyTimeout {
    fn default() -> BodyTimeout {
        BodyTimeout(std::time::Duration::from_secs(10))
    }
}

/// A JSON body. The content type is not checked (clients often omit it); the
/// bytes must be one JSON value of the expected shape, arrived within the
/// body deadline (`408 REQUEST_TIMEOUT` otherwise; hyper then closes the
/// connection, whose body is unread).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(request, state).await?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|error| {
            // A number beyond what JSON parsing represents (`1e400`) is an
            // absurd amount, not malformed JSON: every number field is an amount
            // or a bounded count, and both refuse it.
            if error.to_string().starts_with("number out of range") {
                ApiError::InvalidAmount(format!("a number is out of range: {error}"))
            } else {
                ApiError::InvalidRequest(format!("invalid JSON body: {error}"))
            }
        })
    }
}

/// The body, whole, within the body deadline and `MAX_BODY_BYTES`.
pub(crate) async fn read_body<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    let deadline = request.extensions().get::<BodyTimeout>().copied().unwrap_or_default();
    let read = tokio::time::timeout(deadline.0, Bytes::from_request(request, state));
    let bytes = read.await.map_err(|_| ApiError::BodyTimeout)?.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::InvalidRequest(format!("could not read the body: {}", rejection.body_text()))
        }
    })?;
    if bytes.len() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(bytes)
}

/// The body of a write that takes no fields: empty, `null`, or the empty
/// object `{}`. Anything else is refused as any body with unknown fields is
/// (`400 INVALID_REQUEST`; over 16 KiB, `413`).
pub struct NoFields;

impl<S: Send + Sync> FromRequest<S> for NoFields {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoFields);
        }
        match serde_json::from_slice::<Option<serde_json::Map<String, serde_json::Value>>>(&bytes) {
            Ok(None) => Ok(NoFields),
            Ok(Some(fields)) if fields.is_empty() => Ok(NoFields),
            Ok(Some(fields)) => Err(ApiError::InvalidRequest(format!(
                "unknown field `{}`: this request takes no body, or `{{}}`",
                fields.keys().next().map_or("", String::as_str)
            ))),
            Err(error) => Err(ApiError::InvalidRequest(format!("this request takes no body, or `{{}}`: {error}"))),
        }
    }
}

/// A query string; malformed or out-of-type parameters are `400 INVALID_REQUEST`.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::InvalidRequest(format!("invalid query: {}", rejection.body_text())))
    }
}

/// The one path parameter of a route, with malformed percent-encoding answered
/// as `400 INVALID_REQUEST` in the usual JSON error body.
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::InvalidRequest(format!("invalid path: {}", rejection.body_text())))
    }
}

/// Parses an id from the path; anything but a UUID is `400 INVALID_REQUEST`.
pub fn parse_id(text: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text).map_err(|_| ApiError::InvalidRequest(format!("{what} must be a UUID")))
}

pub use crate::auth::AuthUser;

/// The caller, from a valid `Authorization: Bearer` token.
impl FromRequestParts<ApiContext> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, context: &ApiContext) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).ok_or(ApiError::Unauthenticated)?;
        // The scheme is case-insensitive (RFC 7235): `Bearer`, `bearer`, `BEARER`.
        let (scheme, token) =
            header.to_str().ok().and_then(|value| value.split_once(' ')).ok_or(ApiError::Unauthenticated)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthenticated);
        }
        context.auth.verify(token.trim(), context.now_ms() / 1000).ok_or(ApiError::Unauthenticated)
    }
}

/// The caller if a token was sent; a token that is sent must be valid.
pub struct MaybeAuthUser(pub Option<AuthUser>);

impl FromRequestParts<ApiContext> for MaybeAuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, context: &ApiContext) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key(axum::http::header::AUTHORIZATION) {
            return Ok(MaybeAuthUser(None));
        }
        AuthUser::from_request_parts(parts, context).await.map(|user| MaybeAuthUser(Some(user)))
    }
}

/// The `Idempotency-Key` header: 1..=64 printable ASCII characters.
pub struct IdempotencyKeyHeader(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKeyHeader(None));
        };
        let invalid =
            || ApiError::InvalidRequest("Idempotency-Key must be 1 to 64 printable ASCII characters".to_owned());
        let key = value.to_str().map_err(|_| invalid())?;
        if key.is_empty() || key.len() > 64 || !key.bytes().all(|byte| (0x20..=0x7e).contains(&byte)) {
            return Err(invalid());
        }
        Ok(IdempotencyKeyHeader(Some(key.to_owned())))
    }
}

/// The write an earlier request with this `Idempotency-Key` made, if any. The
/// same key on a different request (another `kind` of write, another body) is
/// `422 IDEMPOTENCY_KEY_REUSED`.
pub async fn earlier_write(
    context: &ApiContext,
    user_id: Uuid,
    key: Option<&str>,
    request_fingerprint: u64,
    kind: &str,
) -> Result<Option<crate::storage::KeyRow>, ApiError> {
    match keys::check(&context.db, user_id, key, request_fingerprint, kind).await {
        Ok(KeyCheck::Fresh) => Ok(None),
        Ok(KeyCheck::Replay(stored)) => Ok(Some(stored)),
        Ok(KeyCheck::Reused) => Err(ApiError::IdempotencyKeyReused),
        Err(error) => Err(ApiError::internal("read key", error)),
    }
}

/// The client's address: the peer's, or with `--trust-forwarded-for` the
/// last address in `X-Forwarded-For` (the one the balancer in front saw; the
/// ones before it are the client's own say).
pub struct ClientAddress(pub std::net::IpAddr);

impl FromRequestParts<ApiContext> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, context: &ApiContext) -> Result<Self, Self::Rejection> {
        let forwarded = context
            .trust_forwarded_for
            .then(|| parts.headers.get_all("x-forwarded-for").iter().next_back())
            .flatten()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .and_then(|last| last.trim().parse().ok());
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|info| info.0.ip());
        Ok(ClientAddress(forwarded.or(peer).unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))))
    }
}
