//! Bids: place one (through the auction's actor: the one place a bid is
//! decided, for REST and WebSocket alike), read the history, read the lead.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use gavel_actors::auction::idempotency::IdempotencyKey;
use gavel_actors::auction_actor::{KeyedRequest, WriteOutcome};
use gavel_actors::{BidCommand, Event, UserRef};
use serde::Deserialize;
use serde_json::Number;
use tracing::Instrument;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ApiContext;
use super::auctions::{check_limit, node_error, parse_amount};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, AuthUser, IdempotencyKeyHeader, earlier_write, fingerprint, parse_id,
};
use super::views::{BidPage, BidResultView, BidView, HighestBidView, UserView, timestamp};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceBidRequest {
    #[schema(value_type = i64, minimum = 1, maximum = 10000000000000_i64, example = 12500)]
    pub amount: Number,
    /// A proxy maximum (≥ amount) the server bids up to for you.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 10000000000000_i64, example = 20000)]
    pub max_amount: Option<Number>,
}

/// Places a bid for `user`; shared by REST and the WebSocket. Runs in a
/// `bid` span (auction, bidder, then seq and outcome) that the auction's actor
/// and the commit carry on: request → actor → commit → fan-out.
pub async fn place(
    context: &ApiContext,
    user: &AuthUser,
    auction_id: Uuid,
    request: &PlaceBidRequest,
    key: Option<String>,
) -> ApiResult<BidResultView> {
    let span = tracing::debug_span!(
        "bid",
        %auction_id,
        bidder = %user.id,
        seq = tracing::field::Empty,
        outcome = tracing::field::Empty
    );
    let result = place_in_span(context, user, auction_id, request, key).instrument(span.clone()).await;
    match &result {
        Ok(accepted) => {
            span.record("seq", accepted.seq);
            span.record("outcome", "accepted");
        }
        Err(error) => {
            span.record("outcome", error.code());
        }
    }
    result
}

async fn place_in_span(
    context: &ApiContext,
    user: &AuthUser,
    auction_id: Uuid,
    request: &PlaceBidRequest,
    key: Option<String>,
) -> ApiResult<BidResultView> {
    let amount = parse_amount(&request.amount, "amount")?;
    let max_amount = request.max_amount.as_ref().map(|max| parse_amount(max, "max_amount")).transpose()?;
    if max_amount.is_some_and(|max| max < amount) {
        return Err(ApiError::InvalidAmount("max_amount must be at least amount".to_owned()));
    }
    let max_text = max_amount.map(|max| max.minor_units().to_string()).unwrap_or_default();
    let request_fingerprint =
        fingerprint(&[b"bid", auction_id.as_bytes(), amount.minor_units().to_string().as_bytes(), max_text.as_bytes()]);
    if let Some(stored) = earlier_write(context, user.id, key.as_deref(), request_fingerprint, "bid").await? {
        return replay(context, stored.auction_id, stored.seq.unwrap_or(0) as u64).await;
    }
    // A replay above is the first request's answer, not a new bid: not counted.
    if let Err(retry_after_secs) = context.rate_limiter.check(user.id, context.now_ms()) {
        return Err(ApiError::RateLimited { retry_after_secs });
    }
    let command =
        BidCommand { bidder: UserRef { id: user.id, username: user.username.as_str().into() }, amount, max_amount };
    let keyed =
        key.map(|key| KeyedRequest { key: IdempotencyKey { user_id: user.id, key }, fingerprint: request_fingerprint });
    let outcome = context.node.place_bid(auction_id, command, keyed).await.map_err(node_error)?;
    match outcome {
        WriteOutcome::Accepted { event: Event::BidPlaced(placed), .. } => {
            Ok(BidResultView::from_event(auction_id, &placed))
        }
        WriteOutcome::Accepted { .. } => Err(ApiError::unavailable("unexpected outcome")),
        WriteOutcome::Replay { seq } => replay(context, auction_id, seq).await,
        WriteOutcome::Rejected(rejection) => Err(rejection.into()),
        WriteOutcome::KeyReused => Err(ApiError::IdempotencyKeyReused),
        WriteOutcome::Unavailable { reason } => Err(ApiError::unavailable(reason)),
    }
}

async fn replay(context: &ApiContext, auction_id: Uuid, seq: u64) -> ApiResult<BidResultView> {
    let row = context.db.bid(auction_id, seq).await.map_err(|error| ApiError::internal("read bid", error))?;
    let row = row.ok_or_else(|| ApiError::unavailable("the first request's bid is not readable yet"))?;
    Ok(BidResultView::from_row(&row))
}

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
) -> ApiResult<(StatusCode, Json<BidResultView>)> {
    let auction_id = parse_id(&id, "auction id")?;
    let result = place(&context, &user, auction_id, &request, key).await?;
    Ok((StatusCode::CREATED, Json(result)))
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
