//! Accounts: register, log in, who am I.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::ApiContext;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, AuthUser, ClientAddress};
use super::views::{AuthView, UserView};
use crate::auth;
use crate::storage::DbError;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// `[a-z0-9_]{3,32}`
    #[schema(example = "alice", pattern = "^[a-z0-9_]{3,32}$")]
    pub username: String,
    /// 8 to 128 characters.
    #[schema(example = "correct horse battery", min_length = 8, max_length = 128)]
    pub password: String,
}

fn is_username(name: &str) -> bool {
    (3..=32).contains(&name.len())
        && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
}

fn validate(credentials: &Credentials) -> Result<(), ApiError> {
    if !is_username(&credentials.username) {
        return Err(ApiError::InvalidRequest("username must be 3 to 32 of a-z, 0-9 and _".to_owned()));
    }
    if !(8..=128).contains(&credentials.password.chars().count()) {
        return Err(ApiError::InvalidRequest("password must be 8 to 128 characters".to_owned()));
    }
    Ok(())
}

fn hashing_error(error: auth::HashingError) -> ApiError {
    match error {
        auth::HashingError::Busy => ApiError::unavailable("too many sign-ins at once"),
        auth::HashingError::Failed(error) => ApiError::internal("password hashing", error),
    }
}

#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = Credentials,
    responses(
        (status = 201, description = "registered", body = AuthView),
        (status = 400, description = "invalid username or password", body = ErrorBody),
        (status = 409, description = "USERNAME_TAKEN", body = ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT: the body did not arrive within --http-body-timeout-secs", body = ErrorBody),
        (status = 413, description = "body over 16 KiB", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many attempts from this address or for this username (see Retry-After)", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE: too many sign-ins at once (see Retry-After)", body = ErrorBody),
    ))]
pub async fn register(
    State(context): State<ApiContext>,
    ClientAddress(address): ClientAddress,
    ApiJson(credentials): ApiJson<Credentials>,
) -> ApiResult<(StatusCode, Json<AuthView>)> {
    validate(&credentials)?;
    context.sign_in_limits.check(address, &credentials.username, context.now_ms())?;
    let hash = context.passwords.hash(credentials.password).await.map_err(hashing_error)?;
    let id = Uuid::now_v7();
    let now_ms = context.now_ms();
    match context.db.insert_user(id, &credentials.username, &hash, now_ms).await {
        Ok(()) => {}
        Err(DbError::UniqueViolation) => return Err(ApiError::UsernameTaken),
        Err(DbError::Other(error)) => return Err(ApiError::internal("insert user", error)),
    }
    context.bidding.users.remember(id);
    let token = context.auth.issue(id, &credentials.username, now_ms / 1000);
    let user = UserView { id, username: credentials.username };
    Ok((StatusCode::CREATED, Json(AuthView { user, token })))
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = Credentials,
    responses(
        (status = 200, description = "logged in", body = AuthView),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, description = "INVALID_CREDENTIALS", body = ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT: the body did not arrive within --http-body-timeout-secs", body = ErrorBody),
        (status = 413, description = "body over 16 KiB", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED: too many attempts from this address or for this username (see Retry-After)", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE: too many sign-ins at once (see Retry-After)", body = ErrorBody),
    ))]
pub async fn login(
    State(context): State<ApiContext>,
    ClientAddress(address): ClientAddress,
    ApiJson(credentials): ApiJson<Credentials>,
) -> ApiResult<Json<AuthView>> {
    context.sign_in_limits.check(address, &credentials.username, context.now_ms())?;
    // No name outside the registration rules exists; no need to ask the store.
    if !is_username(&credentials.username) {
        return Err(ApiError::InvalidCredentials);
    }
    let user =
        context.db.user_by_name(&credentials.username).await.map_err(|error| ApiError::internal("find user", error))?;
    // An unknown name costs the same check as a wrong password: the answer's
    // time does not tell which names exist.
    let hash = user.as_ref().map(|user| user.password_hash.clone());
    let matches = context.passwords.verify(credentials.password, hash).await.map_err(hashing_error)?;
    let Some(user) = user.filter(|_| matches) else {
        return Err(ApiError::InvalidCredentials);
    };
    context.bidding.users.remember(user.id);
    let token = context.auth.issue(user.id, &user.username, context.now_ms() / 1000);
    Ok(Json(AuthView { user: UserView { id: user.id, username: user.username }, token }))
}

#[utoipa::path(get, path = "/api/v1/users/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "the caller", body = UserView),
        (status = 401, description = "UNAUTHENTICATED", body = ErrorBody),
    ))]
pub async fn me(State(context): State<ApiContext>, user: AuthUser) -> ApiResult<Json<UserView>> {
    // A token outlives nothing: a user deleted from the store is unauthenticated.
    let row = context.db.user_by_id(user.id).await.map_err(|error| ApiError::internal("find user", error))?;
    let row = row.ok_or(ApiError::Unauthenticated)?;
    Ok(Json(UserView { id: row.id, username: row.username }))
}
