//! Auctions: create, read, list, cancel, and the caller's own bids. Creation
//! writes straight to the store (nothing to serialise with yet); cancel goes
//! through the auction's actor, since it must be ordered with bids.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gavel_actors::ports::{KeyRecord, shard_of};
use gavel_actors::{Money, Status};
use serde::Deserialize;
use serde_json::Number;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ApiContext;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, AuthUser, IdempotencyKeyHeader, MaybeAuthUser, NoFields, earlier_write, fingerprint,
    parse_id,
};
use super::views::{AuctionPage, AuctionView, MyBidView, MyBidsPage};
use crate::bidding::CancelRequest;
use crate::storage::{AuctionRow, DbError, NewAuction};

/// The furthest an auction may end, from now.
const MAX_AUCTION_SPAN_MS: i64 = 30 * 24 * 3600 * 1000;
/// A `start_at` this far in the past is a mistake, not clock skew.
const START_AT_PAST_TOLERANCE_MS: i64 = 60 * 1000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAuctionRequest {
    /// 1 to 200 characters.
    #[schema(example = "Leica M6", min_length = 1, max_length = 200, pattern = r"\S")]
    pub title: String,
    /// At most 10,000 characters.
    #[serde(default)]
    #[schema(max_length = 10000)]
    pub description: String,
    /// ISO 4217 code, three capital letters.
    #[schema(example = "EUR", pattern = "^[A-Z]{3}$")]
    pub currency: String,
    #[schema(value_type = i64, minimum = 1, maximum = 10000000000000_i64, example = 10000)]
    pub starting_price: Number,
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 10000000000000_i64)]
    pub reserve_price: Option<Number>,
    #[schema(value_type = i64, minimum = 1, maximum = 10000000000000_i64, example = 500)]
    pub min_increment: Number,
    /// RFC 3339; default now. At most 60 s in the past.
    #[schema(format = DateTime)]
    pub start_at: Option<String>,
    /// RFC 3339; give this or `duration_secs`. After the start, at most 30 days from now.
    #[schema(format = DateTime)]
    pub end_at: Option<String>,
    #[schema(minimum = 1, maximum = 2592000)]
    pub duration_secs: Option<i64>,
    #[schema(minimum = 0, maximum = 3600)]
    pub soft_close_secs: Option<i64>,
}

/// An amount named by a client: any JSON number, then `1..=10^13` integers only.
pub fn parse_amount(number: &Number, field: &str) -> Result<Money, ApiError> {
    number
        .as_i64()
        .and_then(|value| Money::parse(value).ok())
        .ok_or_else(|| ApiError::InvalidAmount(format!("{field} must be an integer from 1 to 10^13 minor units")))
}

fn parse_time(text: &str, field: &str) -> Result<i64, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.timestamp_millis())
        .map_err(|_| ApiError::InvalidRequest(format!("{field} must be an RFC 3339 timestamp")))
}

fn invalid(message: &str) -> ApiError {
    ApiError::InvalidRequest(message.to_owned())
}

fn validate(request: &CreateAuctionRequest, seller_id: Uuid, now_ms: i64) -> Result<NewAuction, ApiError> {
    let title_chars = request.title.chars().count();
    if request.title.trim().is_empty() || title_chars > 200 {
        return Err(invalid("title must be 1 to 200 characters"));
    }
    if request.title.contains('\0') || request.description.contains('\0') {
        return Err(invalid("title and description must not contain NUL characters"));
    }
    if request.description.chars().count() > 10_000 {
        return Err(invalid("description must be at most 10,000 characters"));
    }
    if request.currency.len() != 3 || !request.currency.bytes().all(|byte| byte.is_ascii_uppercase()) {
        return Err(invalid("currency must be an ISO 4217 code such as EUR"));
    }
    let starting_price = parse_amount(&request.starting_price, "starting_price")?;
    let reserve_price =
        request.reserve_price.as_ref().map(|reserve| parse_amount(reserve, "reserve_price")).transpose()?;
    let min_increment = parse_amount(&request.min_increment, "min_increment")?;
    let start_at_ms = match &request.start_at {
        None => now_ms,
        Some(text) => parse_time(text, "start_at")?,
    };
    if start_at_ms < now_ms - START_AT_PAST_TOLERANCE_MS {
        return Err(invalid("start_at must not be in the past"));
    }
    let start_at_ms = start_at_ms.max(now_ms);
    let end_at_ms = match (&request.end_at, request.duration_secs) {
        (Some(text), None) => parse_time(text, "end_at")?,
        (None, Some(duration_secs)) if (1..=MAX_AUCTION_SPAN_MS / 1000).contains(&duration_secs) => {
            start_at_ms + duration_secs * 1000
        }
        (None, Some(_)) => return Err(invalid("duration_secs must be 1 to 2592000 (30 days)")),
        (Some(_), Some(_)) => return Err(invalid("give end_at or duration_secs, not both")),
        (None, None) => return Err(invalid("end_at or duration_secs is required")),
    };
    if end_at_ms <= start_at_ms {
        return Err(invalid("end must be after start"));
    }
    if end_at_ms > now_ms + MAX_AUCTION_SPAN_MS {
        return Err(invalid("end must be at most 30 days from now"));
    }
    let soft_close_secs = match request.soft_close_secs {
        None => 0,
        Some(secs) if (0..=3600).contains(&secs) => secs as u32,
        Some(_) => return Err(invalid("soft_close_secs must be 0 to 3600")),
    };
    Ok(NewAuction {
        id: Uuid::now_v7(),
        seller_id,
        title: request.title.clone(),
        description: request.description.clone(),
        currency: request.currency.clone(),
        starting_price: starting_price.minor_units(),
        reserve_price: reserve_price.map(Money::minor_units),
        min_increment: min_increment.minor_units(),
        soft_close_secs,
        start_at_ms,
        end_at_ms,
        status: if start_at_ms > now_ms { Status::Scheduled } else { Status::Active },
    })
}

async fn load_row(context: &ApiContext, id: Uuid) -> ApiResult<AuctionRow> {
    context
        .db
        .auction(id)
        .await
        .map_err(|error| ApiError::internal("read auction", error))?
        .ok_or(ApiError::AuctionNotFound)
}

#[utoipa::path(post, path = "/api/v1/auctions", tag = "auctions", request_body = CreateAuctionRequest,
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "1..=64 printable ASCII", min_length = 1, max_length = 64, pattern = r"^[\x20-\x7e]{1,64}$")),
    responses(
        (status = 201, description = "created (the seller's view)", body = AuctionView),
        (status = 400, description = "INVALID_REQUEST", body = ErrorBody),
        (status = 401, description = "UNAUTHENTICATED", body = ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT: the body did not arrive within --http-body-timeout-secs", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INVALID_AMOUNT or IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn create_auction(
    State(context): State<ApiContext>,
    user: AuthUser,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(request): ApiJson<CreateAuctionRequest>,
) -> ApiResult<(StatusCode, Json<AuctionView>)> {
    let now_ms = context.now_ms();
    let canonical = serde_json::to_vec(&serde_json::json!({
        "title": request.title, "description": request.description, "currency": request.currency,
        "starting_price": request.starting_price, "reserve_price": request.reserve_price,
        "min_increment": request.min_increment, "start_at": request.start_at, "end_at": request.end_at,
        "duration_secs": request.duration_secs, "soft_close_secs": request.soft_close_secs,
    }))
    .unwrap_or_default();
    let request_fingerprint = fingerprint(&[b"create", &canonical]);
    if let Some(key) = &key
        && let Some(replay) = replay_create(&context, user.id, key, request_fingerprint).await?
    {
        return Ok(replay);
    }
    let auction = validate(&request, user.id, now_ms)?;
    let record = key.map(|key| KeyRecord { user_id: user.id, key, fingerprint: request_fingerprint });
    match context.db.insert_auction(&auction, record.as_ref(), now_ms).await {
        Ok(()) => {}
        // The same key raced us: answer as the first request did.
        Err(DbError::UniqueViolation) if record.is_some() => {
            let record = record.expect("checked");
            return replay_create(&context, user.id, &record.key, request_fingerprint)
                .await?
                .ok_or_else(|| ApiError::unavailable("idempotency key conflict"));
        }
        Err(error) => return Err(ApiError::internal("insert auction", error)),
    }
    let row = load_row(&context, auction.id).await?;
    if auction.status == Status::Active
        && let Ok(state) = row.to_state()
    {
        context.node.start_created(state).await;
    }
    let mut view = AuctionView::from_row(&row, Some(user.id), context.now_ms());
    if let Some(record) = &record {
        view = first_answer(&context, user.id, &record.key, view).await;
    }
    Ok((StatusCode::CREATED, Json(view)))
}

/// Records `view` as the first answer to the write made under `key`, for its
/// retries, unless one is recorded already, and returns the one recorded:
/// requests with the same key that raced each other (a retry while the first
/// was in flight) all answer alike. Best effort: where recording fails,
/// `view` (a later retry gets the auction as it is then).
async fn first_answer(context: &ApiContext, user_id: Uuid, key: &str, view: AuctionView) -> AuctionView {
    let Ok(body) = serde_json::to_string(&view) else { return view };
    match context.db.remember_response(user_id, key, &body).await {
        Ok(Some(recorded)) => serde_json::from_str(&recorded).unwrap_or(view),
        Ok(None) => view,
        Err(error) => {
            tracing::warn!(%error, "recording the first answer under its idempotency key failed");
            view
        }
    }
}

/// The first answer recorded under a key, if any.
fn recorded(stored: &crate::storage::KeyRow) -> Option<AuctionView> {
    serde_json::from_str(stored.response.as_deref()?).ok()
}

async fn replay_create(
    context: &ApiContext,
    user_id: Uuid,
    key: &str,
    request_fingerprint: u64,
) -> ApiResult<Option<(StatusCode, Json<AuctionView>)>> {
    let Some(stored) = earlier_write(context, user_id, Some(key), request_fingerprint, "create").await? else {
        return Ok(None);
    };
    if let Some(first) = recorded(&stored) {
        return Ok(Some((StatusCode::CREATED, Json(first))));
    }
    // The first request has not recorded its answer yet: this one's stands for both.
    let row = load_row(context, stored.auction_id).await?;
    let view = first_answer(context, user_id, key, AuctionView::from_row(&row, Some(user_id), context.now_ms())).await;
    Ok(Some((StatusCode::CREATED, Json(view))))
}

#[utoipa::path(get, path = "/api/v1/auctions/{id}", tag = "auctions",
    params(("id" = Uuid, Path, description = "auction id")),
    responses(
        (status = 200, description = "the auction; `reserve_price` only for its seller", body = AuctionView),
        (status = 400, description = "INVALID_REQUEST (not a UUID)", body = ErrorBody),
        (status = 401, description = "a token was sent and is invalid", body = ErrorBody),
        (status = 404, description = "AUCTION_NOT_FOUND", body = ErrorBody),
    ))]
pub async fn get_auction(
    State(context): State<ApiContext>,
    MaybeAuthUser(viewer): MaybeAuthUser,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<AuctionView>> {
    let id = parse_id(&id, "auction id")?;
    // Only this node's own auctions are cached: it sees every change of those
    // (after commit, before any answer), and none of the others'. Another
    // node's auction comes from its Redis snapshot when that is the store's
    // latest, from the store otherwise.
    let row = if context.node.leases.lease_for(shard_of(id)).is_none() {
        let snapshots = context.redis.as_deref().and_then(|redis| redis.snapshots());
        let current = crate::events::snapshots::current(&context.db, snapshots, id, false)
            .await
            .map_err(|error| ApiError::internal("read auction", error))?
            .ok_or(ApiError::AuctionNotFound)?;
        std::sync::Arc::new(current.row)
    } else {
        match context.read_cache.get(id) {
            Ok(row) => row,
            Err(ticket) => context.read_cache.fill(id, ticket, load_row(&context, id).await?),
        }
    };
    Ok(Json(AuctionView::from_row(&row, viewer.map(|viewer| viewer.id), context.now_ms())))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `active` (default), `scheduled`, `ended` or `cancelled`.
    #[param(pattern = "^(active|scheduled|ended|cancelled)$")]
    pub status: Option<String>,
    /// 1..=100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn encode_cursor(row: &AuctionRow, status: Status) -> String {
    let key_ms = if status == Status::Scheduled { row.start_at_ms } else { row.end_at_ms };
    URL_SAFE_NO_PAD.encode(format!("{key_ms}.{}", row.id))
}

fn decode_cursor(cursor: &str) -> Result<(i64, Uuid), ApiError> {
    let bad = || ApiError::InvalidRequest("cursor is not one this server gave out".to_owned());
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, id) = text.split_once('.').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, Uuid::try_parse(id).map_err(|_| bad())?))
}

pub fn check_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(20),
        Some(limit) if (1..=100).contains(&limit) => Ok(limit),
        Some(_) => Err(invalid("limit must be 1 to 100")),
    }
}

#[utoipa::path(get, path = "/api/v1/auctions", tag = "auctions", params(ListParams),
    responses(
        (status = 200, description = "a page; active auctions ending soonest first", body = AuctionPage),
        (status = 400, description = "INVALID_REQUEST", body = ErrorBody),
    ))]
pub async fn list_auctions(
    State(context): State<ApiContext>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<AuctionPage>> {
    let status = match params.status.as_deref() {
        None => Status::Active,
        Some(text) => {
            Status::parse(text).ok_or_else(|| invalid("status must be active, scheduled, ended or cancelled"))?
        }
    };
    let limit = check_limit(params.limit)?;
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let rows = context
        .db
        .list_auctions(status, after, limit)
        .await
        .map_err(|error| ApiError::internal("list auctions", error))?;
    let now_ms = context.now_ms();
    let next_cursor =
        (rows.len() == limit as usize).then(|| rows.last().map(|row| encode_cursor(row, status))).flatten();
    let items = rows.iter().map(|row| AuctionView::from_row(row, None, now_ms)).collect();
    Ok(Json(AuctionPage { items, next_cursor }))
}

#[utoipa::path(post, path = "/api/v1/auctions/{id}/cancel", tag = "auctions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "auction id"),
           ("Idempotency-Key" = Option<String>, Header, description = "1..=64 printable ASCII", min_length = 1, max_length = 64, pattern = r"^[\x20-\x7e]{1,64}$")),
    responses(
        (status = 200, description = "cancelled (the seller's view)", body = AuctionView),
        (status = 400, description = "INVALID_REQUEST (also a body other than none or `{}`)", body = ErrorBody),
        (status = 401, description = "UNAUTHENTICATED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not the seller", body = ErrorBody),
        (status = 404, description = "AUCTION_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "AUCTION_HAS_BIDS or AUCTION_NOT_ACTIVE", body = ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT: the body did not arrive within --http-body-timeout-secs", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn cancel_auction(
    State(context): State<ApiContext>,
    user: AuthUser,
    ApiPath(id): ApiPath,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    _: NoFields,
) -> ApiResult<Json<AuctionView>> {
    let id = parse_id(&id, "auction id")?;
    // A retry gets the first answer as it was.
    let fingerprint = crate::bidding::keys::cancel_fingerprint(id);
    if let Some(stored) = earlier_write(&context, user.id, key.as_deref(), fingerprint, "cancel").await?
        && let Some(first) = recorded(&stored)
    {
        return Ok(Json(first));
    }
    context.bidding.cancel(CancelRequest { auction_id: id, by: user.id, key: key.clone() }).await.result?;
    let row = load_row(&context, id).await?;
    let mut view = AuctionView::from_row(&row, Some(user.id), context.now_ms());
    if let Some(key) = &key {
        view = first_answer(&context, user.id, key, view).await;
    }
    Ok(Json(view))
}

#[utoipa::path(get, path = "/api/v1/users/me/bids", tag = "bids", security(("bearer" = [])),
    responses(
        (status = 200, description = "auctions the caller has bid on, most recently ending first (at most 100)", body = MyBidsPage),
        (status = 401, description = "UNAUTHENTICATED", body = ErrorBody),
    ))]
pub async fn my_bids(State(context): State<ApiContext>, user: AuthUser) -> ApiResult<Json<MyBidsPage>> {
    let rows = context.db.bids_of_user(user.id, 100).await.map_err(|error| ApiError::internal("my bids", error))?;
    let now_ms = context.now_ms();
    let items: Vec<MyBidView> = rows.iter().map(|row| MyBidView::from_row(row, user.id, now_ms)).collect();
    Ok(Json(MyBidsPage { items }))
}
