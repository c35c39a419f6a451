//! The one error type of the HTTP layer. Every error leaves as
//! `{"error": {"code", "message", ...extra}}` with the status docs/API.md gives
//! it. Database and internal failures are logged in full and never leaked: the
//! client sees `503 UNAVAILABLE` (try again), never a stack of SQL.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gavel_actors::{Money, Rejection, Status};

use crate::bidding::WriteFailure;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

#[derive(Debug)]
pub enum ApiError {
    InvalidRequest(String),
    PayloadTooLarge,
    BodyTimeout,
    Unauthenticated,
    InvalidCredentials,
    Forbidden,
    UsernameTaken,
    AuctionNotFound,
    NoBids,
    RouteNotFound,
    MethodNotAllowed,
    AuctionNotActive { status: Status },
    SellerCannotBid,
    BidTooLow { min_bid: Money, current_price: Money },
    AlreadyLeading,
    AuctionHasBids,
    InvalidAmount(String),
    IdempotencyKeyReused,
    RateLimited { retry_after_secs: u64, of: Limited },
    Unavailable { reason: String, outcome_unknown: bool },
}

/// What a `429 RATE_LIMITED` limits (its message says which).
#[derive(Debug, Clone, Copy)]
pub enum Limited {
    Bids,
    SignIns,
}

/// The error envelope, for the OpenAPI document.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// UPPER_SNAKE code, stable for clients to match on.
    #[schema(example = "BID_TOO_LOW")]
    pub code: String,
    pub message: String,
    /// Extra fields some codes carry: `min_bid`, `current_price` (BID_TOO_LOW),
    /// `status` (AUCTION_NOT_ACTIVE), `field` (INVALID_REQUEST), `retry_after_secs`.
    #[serde(flatten)]
    #[schema(additional_properties)]
    pub extra: Map<String, Value>,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthenticated | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::SellerCannotBid => StatusCode::FORBIDDEN,
            ApiError::AuctionNotFound | ApiError::NoBids | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UsernameTaken
            | ApiError::AuctionNotActive { .. }
            | ApiError::BidTooLow { .. }
            | ApiError::AlreadyLeading
            | ApiError::AuctionHasBids => StatusCode::CONFLICT,
            ApiError::InvalidAmount(_) | ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "INVALID_REQUEST",
            ApiError::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ApiError::BodyTimeout => "REQUEST_TIMEOUT",
            ApiError::Unauthenticated => "UNAUTHENTICATED",
            ApiError::InvalidCredentials => "INVALID_CREDENTIALS",
            ApiError::Forbidden => "FORBIDDEN",
            ApiError::UsernameTaken => "USERNAME_TAKEN",
            ApiError::AuctionNotFound => "AUCTION_NOT_FOUND",
            ApiError::NoBids => "NO_BIDS",
            ApiError::RouteNotFound => "NOT_FOUND",
            ApiError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ApiError::AuctionNotActive { .. } => "AUCTION_NOT_ACTIVE",
            ApiError::SellerCannotBid => "SELLER_CANNOT_BID",
            ApiError::BidTooLow { .. } => "BID_TOO_LOW",
            ApiError::AlreadyLeading => "ALREADY_LEADING",
            ApiError::AuctionHasBids => "AUCTION_HAS_BIDS",
            ApiError::InvalidAmount(_) => "INVALID_AMOUNT",
            ApiError::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
            ApiError::Unavailable { .. } => "UNAVAILABLE",
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest(message) | ApiError::InvalidAmount(message) => message.clone(),
            ApiError::PayloadTooLarge => "request body is larger than 16 KiB".to_owned(),
            ApiError::BodyTimeout => "the request body did not arrive in time".to_owned(),
            ApiError::Unauthenticated => "a valid bearer token is required".to_owned(),
            ApiError::InvalidCredentials => "wrong username or password".to_owned(),
            ApiError::Forbidden => "only the seller may do this".to_owned(),
            ApiError::UsernameTaken => "that username is taken".to_owned(),
            ApiError::AuctionNotFound => "no such auction".to_owned(),
            ApiError::NoBids => "the auction has no bids yet".to_owned(),
            ApiError::RouteNotFound => "no such endpoint".to_owned(),
            ApiError::MethodNotAllowed => "method not allowed on this endpoint".to_owned(),
            ApiError::AuctionNotActive { status } => format!("the auction is {}", status.as_str()),
            ApiError::SellerCannotBid => "sellers cannot bid on their own auction".to_owned(),
            ApiError::BidTooLow { min_bid, .. } => format!("the minimum bid is {min_bid}"),
            ApiError::AlreadyLeading => "you already lead; raise your maximum to bid again".to_owned(),
            ApiError::AuctionHasBids => "an auction with bids cannot be cancelled".to_owned(),
            ApiError::IdempotencyKeyReused => "this Idempotency-Key was used for a different request".to_owned(),
            ApiError::RateLimited { of: Limited::Bids, .. } => "too many bids; slow down".to_owned(),
            ApiError::RateLimited { of: Limited::SignIns, .. } => {
                "too many sign-in attempts from this address or for this name; slow down".to_owned()
            }
            ApiError::Unavailable { reason, outcome_unknown: false } => {
                format!("cannot accept writes right now ({reason}); not accepted, retry later")
            }
            ApiError::Unavailable { reason, outcome_unknown: true } => {
                format!("{reason}; the outcome is not known yet, retry with the same Idempotency-Key")
            }
        }
    }

    pub fn internal(context: &str, error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, context, "internal failure");
        ApiError::Unavailable { reason: "storage unavailable".to_owned(), outcome_unknown: false }
    }

    pub fn unavailable(reason: impl Into<String>) -> ApiError {
        ApiError::Unavailable { reason: reason.into(), outcome_unknown: false }
    }

    /// The error's fields, `code`, `message` and the extra ones some codes
    /// carry: serialized straight to the response body, without first building
    /// a map of values (which took a rejected bid's answer more time than the
    /// rest of its body).
    fn detail_out(&self) -> DetailOut {
        let mut out = DetailOut {
            code: self.code(),
            current_price: None,
            message: self.message(),
            min_bid: None,
            outcome: None,
            retry_after_secs: None,
            status: None,
        };
        match self {
            ApiError::AuctionNotActive { status } => out.status = Some(status.as_str()),
            ApiError::BidTooLow { min_bid, current_price } => {
                out.min_bid = Some(min_bid.minor_units());
                out.current_price = Some(current_price.minor_units());
            }
            ApiError::RateLimited { retry_after_secs, .. } => out.retry_after_secs = Some(*retry_after_secs),
            ApiError::Unavailable { outcome_unknown: true, .. } => out.outcome = Some("unknown"),
            _ => {}
        }
        out
    }

    /// The body as the WebSocket and tests want it: `{code, message, ...extra}`.
    pub fn detail(&self) -> Value {
        serde_json::to_value(self.detail_out()).expect("an error's fields serialize")
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        match rejection {
            Rejection::AuctionNotActive { status } => ApiError::AuctionNotActive { status },
            Rejection::SellerCannotBid => ApiError::SellerCannotBid,
            Rejection::BidTooLow { min_bid, current_price } => ApiError::BidTooLow { min_bid, current_price },
            Rejection::AlreadyLeading => ApiError::AlreadyLeading,
            Rejection::InvalidAmount => ApiError::InvalidAmount("max_amount must be at least amount".to_owned()),
            Rejection::Forbidden => ApiError::Forbidden,
            Rejection::AuctionHasBids => ApiError::AuctionHasBids,
            // Only the actor's own timer issues Start/End; a client never sees this.
            Rejection::NotDue => ApiError::unavailable("lifecycle not due"),
        }
    }
}

impl From<WriteFailure> for ApiError {
    fn from(failure: WriteFailure) -> ApiError {
        match failure {
            WriteFailure::Unauthenticated => ApiError::Unauthenticated,
            WriteFailure::AuctionNotFound => ApiError::AuctionNotFound,
            WriteFailure::Rejected(rejection) => rejection.into(),
            WriteFailure::InvalidAmount => ApiError::InvalidAmount(
                "amounts must be integers from 1 to 10^13, max_amount at least amount".to_owned(),
            ),
            WriteFailure::KeyReused => ApiError::IdempotencyKeyReused,
            WriteFailure::RateLimited { retry_after_secs } => {
                ApiError::RateLimited { retry_after_secs, of: Limited::Bids }
            }
            WriteFailure::Unavailable(reason) => ApiError::unavailable(reason.to_string()),
            WriteFailure::OutcomeUnknown => ApiError::Unavailable {
                reason: "the write's outcome could not be confirmed".to_owned(),
                outcome_unknown: true,
            },
        }
    }
}

/// An error response's body, `{"error": {...}}`. The fields are in
/// alphabetical order, as they were when the body was a map of values.
#[derive(Serialize)]
struct ErrorOut {
    error: DetailOut,
}

#[derive(Serialize)]
struct DetailOut {
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_price: Option<i64>,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_bid: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_secs, .. } => Some(*retry_after_secs),
            ApiError::Unavailable { .. } => Some(1),
            _ => None,
        };
        let mut response = (status, Json(ErrorOut { error: self.detail_out() })).into_response();
        response.extensions_mut().insert(super::BidOutcomeLabel(self.code()));
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every error's body is `{"error": {code, message}}` plus exactly the
    /// extra fields docs/API.md gives its code, keys in alphabetical order as
    /// they always were; the WebSocket's `detail()` is the same object.
    #[test]
    fn every_error_body_carries_its_code_message_and_extra_fields() {
        let money = |minor| Money::parse(minor).expect("a valid amount");
        let errors = [
            (ApiError::InvalidRequest("limit must be 1 to 100 \"quoted\"".to_owned()), json!({})),
            (ApiError::PayloadTooLarge, json!({})),
            (ApiError::BodyTimeout, json!({})),
            (ApiError::Unauthenticated, json!({})),
            (ApiError::InvalidCredentials, json!({})),
            (ApiError::Forbidden, json!({})),
            (ApiError::UsernameTaken, json!({})),
            (ApiError::AuctionNotFound, json!({})),
            (ApiError::NoBids, json!({})),
            (ApiError::RouteNotFound, json!({})),
            (ApiError::MethodNotAllowed, json!({})),
            (ApiError::AuctionNotActive { status: Status::Ended }, json!({"status": "ended"})),
            (ApiError::SellerCannotBid, json!({})),
            (
                ApiError::BidTooLow { min_bid: money(12_600), current_price: money(12_500) },
                json!({"min_bid": 12_600, "current_price": 12_500}),
            ),
            (ApiError::AlreadyLeading, json!({})),
            (ApiError::AuctionHasBids, json!({})),
            (ApiError::InvalidAmount("amount must be at least 1".to_owned()), json!({})),
            (ApiError::IdempotencyKeyReused, json!({})),
            (ApiError::RateLimited { retry_after_secs: 7, of: Limited::Bids }, json!({"retry_after_secs": 7})),
            (ApiError::RateLimited { retry_after_secs: 60, of: Limited::SignIns }, json!({"retry_after_secs": 60})),
            (ApiError::Unavailable { reason: "the auction is busy".to_owned(), outcome_unknown: false }, json!({})),
            (
                ApiError::Unavailable { reason: "timed out".to_owned(), outcome_unknown: true },
                json!({"outcome": "unknown"}),
            ),
        ];
        for (error, extra) in errors {
            let mut expected = extra;
            expected["code"] = json!(error.code());
            expected["message"] = json!(error.message());
            let written = serde_json::to_string(&ErrorOut { error: error.detail_out() }).expect("serializes");
            let body: Value = serde_json::from_str(&written).expect("JSON");
            assert_eq!(body, json!({ "error": expected }), "{error:?}");
            assert_eq!(error.detail(), expected, "{error:?}");
        }
        let too_low = ApiError::BidTooLow { min_bid: money(12_600), current_price: money(12_500) };
        assert_eq!(
            serde_json::to_string(&ErrorOut { error: too_low.detail_out() }).expect("serializes"),
            format!(
                r#"{{"error":{{"code":"BID_TOO_LOW","current_price":12500,"message":"{}","min_bid":12600}}}}"#,
                too_low.message()
            )
        );
    }
}
