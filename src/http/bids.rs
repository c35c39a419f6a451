//! Bids: place one (a thin adapter over the bid service, `bidding/`, which
//! sends it to the auction's owner: the one place a bid is decided, for REST
//! and WebSocket alike, on any node), read the history, read the lead.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Number;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ApiContext;
use super::auctions::{check_limit, parse_amount};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, AuthUser, IdempotencyKeyHeader, parse_id};
use super::views::{BidPage, BidResultView, BidView, HighestBidView, UserView, timestamp};
use crate::bidding::BidRequest;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceBidRequest {
    #[schema(value_type = i64, minimum = 1, maximum = 10000000000000_i64, example = 12500)]
    pub amount: Number,
    /// A proxy maximum (≥ amount) the server bids up to for you.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 10000000000000_i64, example = 20000)]
    pub max_amount: Option<Number>,
}

/// The bid service's request for a bid from `user`, its amounts checked
/// (`1..=10^13`, `max_amount ≥ amount`); shared by REST and the WebSocket.
pub fn bid_request(
    user: &AuthUser,
    auction_id: Uuid,
    request: &PlaceBidRequest,
    key: Option<String>,
) -> ApiResult<BidRequest> {
    let amount = parse_amount(&request.amount, "amount")?;
    let max_amount = request.max_amount.as_ref().map(|max| parse_amount(max, "max_amount")).transpose()?;
    if max_amount.is_some_and(|max| max < amount) {
        return Err(ApiError::InvalidAmount("max_amount must be at least amount".to_owned()));
    }
    Ok(BidRequest {
        auction_id,
        bidder_id: user.id,
        bidder_username: user.username.clone(),
        amount: amount.minor_units(),
        max_amount: max_amount.map(|max| max.minor_units()),
        key,
    })
}

/// The `Gavel-Owner` header: the node that decided a bid.
pub const OWNER_HEADER: &str = "gavel-owner";

#[utoipa::path(post, path = "/api/v1/auctions/{id}/bids", tag = "bids", request_body = PlaceBidRequest,
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "auction id"),
           ("Idempotency-Key" = Option<String>, Header, description = "1..=64 printable ASCII", min_length = 1, max_length = 64, pattern = r"^[\x20-\x7e]{1,64}$")),
    responses(
        (status = 201, description = "accepted and durable", body = BidResultView),
        (status = 400, description = "INVALID_REQUEST", body = ErrorBody),
        (status = 401, description = "UNAUTHENTICATED", body = ErrorBody),
        (status = 403, description = "SELLER_CANNOT_BID", body = ErrorBody),
        (status = 404, description = "AUCTION_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "AUCTION_NOT_ACTIVE, BID_TOO_LOW or ALREADY_LEADING", body = ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT: the body did not arrive within --http-body-timeout-secs", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INVALID_AMOUNT or IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED (see Retry-After)", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE: not accepted (see Retry-After)", body = ErrorBody),
    ))]
pub async fn place_bid(
    State(context): State<ApiContext>,
    user: AuthUser,
    ApiPath(id): ApiPath,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(request): ApiJson<PlaceBidRequest>,
) -> ApiResult<Response> {
    let auction_id = parse_id(&id, "auction id")?;
    let bid = bid_request(&user, auction_id, &request, key)?;
    let decided = context.bidding.place(bid).await;
    let mut response = match decided.result {
        Ok(receipt) => (StatusCode::CREATED, Json(BidResultView::from(&receipt))).into_response(),
        Err(failure) => ApiError::from(failure).into_response(),
    };
    let owner = match &decided.decided_by {
        None => Some(context.node_header.clone()),
        Some(owner) => HeaderValue::from_str(owner).ok(),
    };
    if let Some(owner) = owner {
        response.headers_mut().insert(OWNER_HEADER, owner);
    }
    Ok(response)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// 1..=100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// Only bids with a lower `seq` (`next_before_seq` of the previous page).
    #[param(minimum = 1)]
    pub before_seq: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/auctions/{id}/bids", tag = "bids",
    params(("id" = Uuid, Path, description = "auction id"), HistoryParams),
    responses(
        (status = 200, description = "accepted bids, newest first", body = BidPage),
        (status = 400, description = "INVALID_REQUEST", body = ErrorBody),
        (status = 404, description = "AUCTION_NOT_FOUND", body = ErrorBody),
    ))]
pub async fn bid_history(
    State(context): State<ApiContext>,
    ApiPath(id): ApiPath,
    ApiQuery(params): ApiQuery<HistoryParams>,
) -> ApiResult<Json<BidPage>> {
    let auction_id = parse_id(&id, "auction id")?;
    let limit = check_limit(params.limit)?;
    let before_seq = params.before_seq.unwrap_or(i64::MAX);
    if before_seq < 1 {
        return Err(ApiError::InvalidRequest("before_seq must be at least 1".to_owned()));
    }
    let auction = context.db.auction(auction_id).await.map_err(|error| ApiError::internal("read auction", error))?;
    if auction.is_none() {
        return Err(ApiError::AuctionNotFound);
    }
    let rows =
        context.db.bids(auction_id, before_seq, limit).await.map_err(|error| ApiError::internal("read bids", error))?;
    let next_before_seq = match rows.last() {
        Some(last) if rows.len() == limit as usize && last.seq > 1 => Some(last.seq),
        _ => None,
    };
    Ok(Json(BidPage { items: rows.iter().map(BidView::from).collect(), next_before_seq }))
}

#[utoipa::path(get, path = "/api/v1/auctions/{id}/bids/highest", tag = "bids",
    params(("id" = Uuid, Path, description = "auction id")),
    responses(
        (status = 200, description = "the current lead", body = HighestBidView),
        (status = 400, description = "INVALID_REQUEST", body = ErrorBody),
        (status = 404, description = "AUCTION_NOT_FOUND or NO_BIDS", body = ErrorBody),
    ))]
pub async fn highest_bid(State(context): State<ApiContext>, ApiPath(id): ApiPath) -> ApiResult<Json<HighestBidView>> {
    let auction_id = parse_id(&id, "auction id")?;
    let auction = context.db.auction(auction_id).await.map_err(|error| ApiError::internal("read auction", error))?;
    let auction = auction.ok_or(ApiError::AuctionNotFound)?;
    if auction.seq == 0 {
        return Err(ApiError::NoBids);
    }
    let latest = context
        .db
        .bid(auction_id, auction.seq as u64)
        .await
        .map_err(|error| ApiError::internal("read bid", error))?
        .ok_or(ApiError::NoBids)?;
    Ok(Json(HighestBidView {
        auction_id,
        leader: UserView { id: latest.leader_id, username: latest.leader_username },
        current_price: auction.current_price,
        seq: latest.seq,
        placed_at: timestamp(latest.placed_at_ms),
    }))
}
