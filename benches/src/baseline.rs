//! The designs people build instead of gavel, each small and faithful, behind
//! the same HTTP API subset the load generator drives:
//!
//! - `pg_row_lock`: one transaction per bid: `SELECT … FOR UPDATE` on the
//!   auction row, check, insert the bid, update the row, commit, answer.
//! - `redis_lock`: `SET lock NX PX` around read-check-write of the auction in
//!   Redis, answer, and a write-behind queue (a Redis list) drained to
//!   Postgres by a background task.
//! - `redis_lua`: one atomic Lua script checks and writes the auction in Redis
//!   and queues the bid; answer; the same write-behind to Postgres.
//!
//! The rules are those of docs/API.md for bids without `max_amount` (the load
//! sends none) and without reserve or soft close: the auction must not have
//! ended; the first bid needs the starting price, a challenger the price plus
//! the increment and takes the lead only above the leader's maximum (else the
//! price rises to min(M, amount + inc)); the leader bidding higher raises their
//! maximum; every accepted bid takes the next `seq`. Tokens are HS256 JWTs checked on every bid, as gavel does.
//! Registration stores no password: it is setup, not measured.
//!
//! ```text
//! gavel-baseline --design redis_lua --listen 127.0.0.1:18190 \
//!     --database-url postgres://postgres@127.0.0.1/bench --redis-url redis://127.0.0.1:6379
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fred::prelude::{
    Builder, ClientLike, Expiration, HashesInterface, KeysInterface, ListInterface, LuaInterface, Pool, SetOptions,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

/// Every call to Postgres or Redis gives up after this long (the bid is 503).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a bid waits for the `redis_lock` lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Longer than the locked section's worst case (two calls of at most
/// `CALL_TIMEOUT`); the write also checks the lock is still held.
const LOCK_TTL_MS: i64 = 25_000;
/// Write-behind batches, as such workers usually take them.
const DRAIN_BATCH: usize = 1_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Design {
    PgRowLock,
    RedisLock,
    RedisLua,
}

struct Shared {
    design: Design,
    pg: PgPool,
    redis: Option<Pool>,
    prefix: String,
    lua_sha: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

type Ctx = Arc<Shared>;

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: gavel-baseline --design pg_row_lock|redis_lock|redis_lua --listen HOST:PORT \
         --database-url postgres://… [--redis-url redis://…]"
    );
    std::process::exit(2)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// The allocator gavel uses: the comparison is of designs, not of allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut design, mut listen, mut database_url, mut redis_url) = (None, None, None, None);
    let mut redis_connections = 8;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--design" => {
                design = Some(match value.as_str() {
                    "pg_row_lock" => Design::PgRowLock,
                    "redis_lock" => Design::RedisLock,
                    "redis_lua" => Design::RedisLua,
                    _ => usage(),
                })
            }
            "--listen" => listen = Some(value.parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            "--database-url" => database_url = Some(value),
            "--redis-url" => redis_url = Some(value),
            "--redis-connections" => redis_connections = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(design), Some(listen), Some(database_url)) = (design, listen, database_url) else { usage() };

    let pg = PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(CALL_TIMEOUT)
        .connect(&database_url)
        .await
        .expect("connect to Postgres");
    sqlx::raw_sql(SCHEMA).execute(&pg).await.expect("create the schema");

    let prefix = format!("gavelbench:{}:", Uuid::now_v7().simple());
    let (redis, lua_sha) = if design == Design::PgRowLock {
        (None, String::new())
    } else {
        let url = redis_url.unwrap_or_else(|| usage());
        let config = fred::prelude::Config::from_url(&url).expect("a redis:// URL");
        let pool = Builder::from_config(config)
            .with_performance_config(|performance| performance.default_command_timeout = CALL_TIMEOUT)
            .build_pool(redis_connections)
            .expect("a Redis pool");
        pool.init().await.expect("connect to Redis");
        let sha: String = pool.next().script_load(BID_SCRIPT).await.expect("load the Lua script");
        (Some(pool), sha)
    };
    let secret = Uuid::now_v7().as_bytes().repeat(2);
    let shared = Arc::new(Shared {
        design,
        pg,
        redis,
        prefix,
        lua_sha,
        encoding: EncodingKey::from_secret(&secret),
        decoding: DecodingKey::from_secret(&secret),
        validation: Validation::new(Algorithm::HS256),
    });
    if shared.redis.is_some() {
        tokio::spawn(write_behind(shared.clone()));
    }

    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auctions", post(create_auction))
        .route("/api/v1/auctions/{id}", get(get_auction))
        .route("/api/v1/auctions/{id}/bids", post(place_bid).get(durable_bids))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    eprintln!("gavel-baseline {design:?} listening on {listen}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await
        .expect("serve");
    if let Some(redis) = &shared.redis {
        // Redis keeps this run's keys in memory only; leave nothing behind.
        let keys: Vec<String> =
            redis.next().custom(fred::cmd!("KEYS"), vec![format!("{}*", shared.prefix)]).await.unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis.next().del(keys).await;
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (id uuid PRIMARY KEY, username text UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS auctions (
    id uuid PRIMARY KEY, seller uuid NOT NULL, starting_price bigint NOT NULL,
    min_increment bigint NOT NULL, end_at_ms bigint NOT NULL, current_price bigint NOT NULL,
    leader uuid, leader_max bigint NOT NULL DEFAULT 0, seq bigint NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bids (
    auction_id uuid NOT NULL, seq bigint NOT NULL, bidder uuid NOT NULL, amount bigint NOT NULL,
    placed_ms bigint NOT NULL, PRIMARY KEY (auction_id, seq));
";

/// The write-behind record of an accepted bid, and of the auction after it.
fn queue_entry(id: Uuid, bidder: &str, amount: i64, now: i64, after: &Outcome) -> String {
    format!("{id}|{}|{bidder}|{amount}|{now}|{}|{}|{}", after.seq, after.price, after.leader, after.leader_max)
}

/// KEYS: lock, auction hash, queue. ARGV: owner, price, leader, leader_max,
/// seq, queue entry. Writes only while the lock is still ours.
const LOCKED_WRITE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'current_price', ARGV[2], 'leader', ARGV[3], 'leader_max', ARGV[4], 'seq', ARGV[5])
redis.call('LPUSH', KEYS[3], ARGV[6])
return 1
";

/// KEYS: the auction's hash, the write-behind queue. ARGV: auction id,
/// bidder, amount, now (ms). The same rules as `decide`, in one atomic step.
const BID_SCRIPT: &str = r"
local a = redis.call('HMGET', KEYS[1], 'starting_price', 'min_increment', 'end_at_ms', 'current_price', 'leader', 'leader_max', 'seq')
if not a[1] then return {'AUCTION_NOT_FOUND'} end
local amount = tonumber(ARGV[3])
if tonumber(ARGV[4]) >= tonumber(a[3]) then return {'AUCTION_NOT_ACTIVE'} end
local price, leader, max = tonumber(a[4]), a[5], tonumber(a[6])
local leading = 1
if leader == '' then
  if amount < tonumber(a[1]) then return {'BID_TOO_LOW'} end
  price, leader, max = amount, ARGV[2], amount
elseif leader == ARGV[2] then
  if amount <= max then return {'ALREADY_LEADING'} end
  max = amount
elseif amount < price + tonumber(a[2]) then
  return {'BID_TOO_LOW'}
elseif amount > max then
  price, leader, max = amount, ARGV[2], amount
else
  price = math.min(max, amount + tonumber(a[2]))
  leading = 0
end
local seq = tonumber(a[7]) + 1
redis.call('HSET', KEYS[1], 'current_price', price, 'leader', leader, 'leader_max', max, 'seq', seq)
redis.call('LPUSH', KEYS[2], ARGV[1] .. '|' .. seq .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. price .. '|' .. leader .. '|' .. max)
return {'OK', tostring(seq), tostring(price), leader, tostring(leading)}
";

/// A refusal: the status and the error code of the usual error body.
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": {"code": self.1, "message": self.1}}))).into_response()
    }
}

fn error(status: StatusCode, code: &'static str) -> Response {
    Refusal(status, code).into_response()
}

fn unavailable() -> Refusal {
    Refusal(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
}

async fn within<T, E>(call: impl Future<Output = Result<T, E>>) -> Result<T, Refusal> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        _ => Err(unavailable()),
    }
}

fn bidder(ctx: &Shared, headers: &HeaderMap) -> Result<Uuid, Refusal> {
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or(Refusal(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"))?;
    let claims = jsonwebtoken::decode::<Claims>(token, &ctx.decoding, &ctx.validation)
        .map_err(|_| Refusal(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"))?;
    Uuid::parse_str(&claims.claims.sub).map_err(|_| Refusal(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"))
}

#[derive(Deserialize)]
struct RegisterRequest {
    username: String,
}

async fn register(State(ctx): State<Ctx>, Json(request): Json<RegisterRequest>) -> Response {
    let id = Uuid::now_v7();
    let inserted = within(
        sqlx::query("INSERT INTO users (id, username) VALUES ($1, $2)")
            .bind(id)
            .bind(&request.username)
            .execute(&ctx.pg),
    )
    .await;
    if let Err(refusal) = inserted {
        return refusal.into_response();
    }
    let claims = Claims { sub: id.to_string(), exp: (now_ms() / 1000 + 7 * 86_400) as u64 };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &ctx.encoding).expect("sign");
    (StatusCode::CREATED, Json(json!({"user": {"id": id, "username": request.username}, "token": token})))
        .into_response()
}

#[derive(Deserialize)]
struct CreateAuction {
    starting_price: i64,
    min_increment: i64,
    duration_secs: i64,
}

async fn create_auction(State(ctx): State<Ctx>, headers: HeaderMap, Json(request): Json<Value>) -> Response {
    let seller = match bidder(&ctx, &headers) {
        Ok(seller) => seller,
        Err(refusal) => return refusal.into_response(),
    };
    let Ok(request) = serde_json::from_value::<CreateAuction>(request) else {
        return error(StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    };
    let id = Uuid::now_v7();
    let end_at_ms = now_ms() + request.duration_secs * 1000;
    let inserted = within(
        sqlx::query(
            "INSERT INTO auctions (id, seller, starting_price, min_increment, end_at_ms, current_price) \
             VALUES ($1, $2, $3, $4, $5, $3)",
        )
        .bind(id)
        .bind(seller)
        .bind(request.starting_price)
        .bind(request.min_increment)
        .bind(end_at_ms)
        .execute(&ctx.pg),
    )
    .await;
    if let Err(refusal) = inserted {
        return refusal.into_response();
    }
    if let Some(redis) = &ctx.redis {
        let fields = vec![
            ("starting_price", request.starting_price.to_string()),
            ("min_increment", request.min_increment.to_string()),
            ("end_at_ms", end_at_ms.to_string()),
            ("current_price", request.starting_price.to_string()),
            ("leader", String::new()),
            ("leader_max", "0".to_owned()),
            ("seq", "0".to_owned()),
        ];
        if let Err(refusal) = within(redis.next().hset::<i64, _, _>(ctx.auction_key(id), fields)).await {
            return refusal.into_response();
        }
    }
    (StatusCode::CREATED, Json(json!({"id": id, "current_price": request.starting_price, "seq": 0, "bid_count": 0})))
        .into_response()
}

impl Shared {
    fn auction_key(&self, id: Uuid) -> String {
        format!("{}auction:{id}", self.prefix)
    }

    fn lock_key(&self, id: Uuid) -> String {
        format!("{}lock:{id}", self.prefix)
    }

    fn queue_key(&self) -> String {
        format!("{}writebehind", self.prefix)
    }
}

/// The live state: the row in Postgres for `pg_row_lock`, the hash in Redis otherwise.
async fn get_auction(State(ctx): State<Ctx>, Path(id): Path<Uuid>) -> Response {
    let state = match &ctx.redis {
        None => within(
            sqlx::query_as::<_, (i64, Option<Uuid>, i64)>(
                "SELECT current_price, leader, seq FROM auctions WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&ctx.pg),
        )
        .await
        .map(|row| row.map(|(price, leader, seq)| (price, leader.map(|id| id.to_string()), seq))),
        Some(redis) => within(
            redis
                .next()
                .hmget::<Vec<Option<String>>, _, _>(ctx.auction_key(id), vec!["current_price", "leader", "seq"]),
        )
        .await
        .map(|fields| match fields.as_slice() {
            [Some(price), leader, Some(seq)] => Some((
                price.parse().unwrap_or(0),
                leader.clone().filter(|leader| !leader.is_empty()),
                seq.parse().unwrap_or(0),
            )),
            _ => None,
        }),
    };
    match state {
        Err(refusal) => refusal.into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "AUCTION_NOT_FOUND"),
        Ok(Some((price, leader, seq))) => Json(json!({
            "id": id, "current_price": price, "leader": leader.map(|id| json!({"id": id})),
            "seq": seq, "bid_count": seq, "status": "active",
        }))
        .into_response(),
    }
}

/// The newest bid that is in Postgres: what would survive a crash.
async fn durable_bids(State(ctx): State<Ctx>, Path(id): Path<Uuid>) -> Response {
    match within(
        sqlx::query_as::<_, (i64, i64)>("SELECT seq, amount FROM bids WHERE auction_id = $1 ORDER BY seq DESC LIMIT 1")
            .bind(id)
            .fetch_optional(&ctx.pg),
    )
    .await
    {
        Err(refusal) => refusal.into_response(),
        Ok(newest) => Json(json!({
            "items": newest.map(|(seq, amount)| vec![json!({"seq": seq, "amount": amount})]).unwrap_or_default(),
        }))
        .into_response(),
    }
}

#[derive(Deserialize)]
struct BidRequest {
    amount: i64,
}

enum Verdict {
    Accepted(Outcome),
    Rejected(StatusCode, &'static str),
}

/// The auction after an accepted bid.
struct Outcome {
    price: i64,
    leader: String,
    leader_max: i64,
    seq: i64,
    leading: bool,
}

async fn place_bid(State(ctx): State<Ctx>, Path(id): Path<Uuid>, headers: HeaderMap, body: String) -> Response {
    let bidder = match bidder(&ctx, &headers) {
        Ok(bidder) => bidder,
        Err(refusal) => return refusal.into_response(),
    };
    let Ok(BidRequest { amount }) = serde_json::from_str(&body) else {
        return error(StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    };
    let verdict = match ctx.design {
        Design::PgRowLock => bid_row_lock(&ctx, id, bidder, amount).await,
        Design::RedisLock => bid_redis_lock(&ctx, id, bidder, amount).await,
        Design::RedisLua => bid_redis_lua(&ctx, id, bidder, amount).await,
    };
    match verdict {
        Err(refusal) => refusal.into_response(),
        Ok(Verdict::Rejected(status, code)) => error(status, code),
        Ok(Verdict::Accepted(after)) => (
            StatusCode::CREATED,
            Json(json!({
                "auction_id": id, "accepted": true, "leading": after.leading, "current_price": after.price,
                "leader": {"id": after.leader}, "your_max": amount, "seq": after.seq, "bid_count": after.seq,
            })),
        )
            .into_response(),
    }
}

/// The auction as read under whatever serialises its bids.
struct Live {
    starting: i64,
    increment: i64,
    end_at_ms: i64,
    price: i64,
    leader: Option<String>,
    leader_max: i64,
    seq: i64,
}

/// The rules (see the module comment) on `live`: the auction after the bid,
/// or the rejection.
fn decide(live: &Live, bidder: &str, amount: i64, now: i64) -> Result<Outcome, (StatusCode, &'static str)> {
    let too_low = (StatusCode::CONFLICT, "BID_TOO_LOW");
    if now >= live.end_at_ms {
        return Err((StatusCode::CONFLICT, "AUCTION_NOT_ACTIVE"));
    }
    let seq = live.seq + 1;
    let take_lead = Outcome { price: amount, leader: bidder.to_owned(), leader_max: amount, seq, leading: true };
    match live.leader.as_deref() {
        None if amount < live.starting => Err(too_low),
        None => Ok(take_lead),
        Some(leader) if leader == bidder => {
            if amount <= live.leader_max {
                return Err((StatusCode::CONFLICT, "ALREADY_LEADING"));
            }
            Ok(Outcome { price: live.price, leader: leader.to_owned(), leader_max: amount, seq, leading: true })
        }
        Some(_) if amount < live.price + live.increment => Err(too_low),
        Some(_) if amount > live.leader_max => Ok(take_lead),
        Some(leader) => Ok(Outcome {
            price: live.leader_max.min(amount + live.increment),
            leader: leader.to_owned(),
            leader_max: live.leader_max,
            seq,
            leading: false,
        }),
    }
}

async fn bid_row_lock(ctx: &Shared, id: Uuid, bidder: Uuid, amount: i64) -> Result<Verdict, Refusal> {
    let mut tx = within(ctx.pg.begin()).await?;
    let row = within(
        sqlx::query_as::<_, (i64, i64, i64, i64, Option<Uuid>, i64, i64)>(
            "SELECT starting_price, min_increment, end_at_ms, current_price, leader, leader_max, seq \
             FROM auctions WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx),
    )
    .await?;
    let Some((starting, increment, end_at_ms, price, leader, leader_max, seq)) = row else {
        return Ok(Verdict::Rejected(StatusCode::NOT_FOUND, "AUCTION_NOT_FOUND"));
    };
    let live = Live { starting, increment, end_at_ms, price, leader: leader.map(|id| id.to_string()), leader_max, seq };
    // The clock is read once the row is ours: waiting for the lock takes time.
    let now = now_ms();
    let after = match decide(&live, &bidder.to_string(), amount, now) {
        Ok(after) => after,
        // Dropping the transaction rolls it back.
        Err((status, code)) => return Ok(Verdict::Rejected(status, code)),
    };
    within(
        sqlx::query("INSERT INTO bids (auction_id, seq, bidder, amount, placed_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(after.seq)
            .bind(bidder)
            .bind(amount)
            .bind(now)
            .execute(&mut *tx),
    )
    .await?;
    within(
        sqlx::query("UPDATE auctions SET current_price = $2, leader = $3, leader_max = $4, seq = $5 WHERE id = $1")
            .bind(id)
            .bind(after.price)
            .bind(Uuid::parse_str(&after.leader).unwrap_or_default())
            .bind(after.leader_max)
            .bind(after.seq)
            .execute(&mut *tx),
    )
    .await?;
    within(tx.commit()).await?;
    Ok(Verdict::Accepted(after))
}

async fn bid_redis_lock(ctx: &Shared, id: Uuid, bidder: Uuid, amount: i64) -> Result<Verdict, Refusal> {
    let redis = ctx.redis.as_ref().expect("redis designs have Redis");
    let lock = ctx.lock_key(id);
    let owner = Uuid::now_v7().to_string();
    let give_up = tokio::time::Instant::now() + LOCK_WAIT;
    let mut attempt: u32 = 0;
    loop {
        let taken: Option<String> = within(redis.next().set(
            &lock,
            owner.as_str(),
            Some(Expiration::PX(LOCK_TTL_MS)),
            Some(SetOptions::NX),
            false,
        ))
        .await?;
        if taken.is_some() {
            break;
        }
        if tokio::time::Instant::now() >= give_up {
            return Err(unavailable());
        }
        // Jittered exponential backoff from 0.5 ms up to 8 ms: short, which
        // is generous to this design (lock libraries often wait far longer).
        attempt += 1;
        let ceiling_us = (500u64 << attempt.min(4)).min(8_000);
        let jitter = (u64::from(attempt).wrapping_mul(2_654_435_761) ^ u64::from(owner.as_bytes()[35])) % ceiling_us;
        tokio::time::sleep(Duration::from_micros(ceiling_us / 2 + jitter / 2)).await;
    }
    let result = locked_read_check_write(ctx, redis, id, &lock, &owner, bidder, amount).await;
    // Release only our own lock (it may have expired and been taken).
    let _: Result<i64, _> = within(redis.next().eval(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        vec![lock],
        vec![owner],
    ))
    .await;
    result
}

async fn locked_read_check_write(
    ctx: &Shared,
    redis: &Pool,
    id: Uuid,
    lock: &str,
    owner: &str,
    bidder: Uuid,
    amount: i64,
) -> Result<Verdict, Refusal> {
    let key = ctx.auction_key(id);
    let fields: Vec<Option<String>> = within(redis.next().hmget(
        &key,
        vec!["starting_price", "min_increment", "end_at_ms", "current_price", "leader", "leader_max", "seq"],
    ))
    .await?;
    let number = |index: usize| fields.get(index).cloned().flatten().and_then(|text| text.parse::<i64>().ok());
    let (Some(starting), Some(increment), Some(end_at_ms), Some(price), Some(leader_max), Some(seq)) =
        (number(0), number(1), number(2), number(3), number(5), number(6))
    else {
        return Ok(Verdict::Rejected(StatusCode::NOT_FOUND, "AUCTION_NOT_FOUND"));
    };
    let leader = fields.get(4).cloned().flatten().filter(|leader| !leader.is_empty());
    let live = Live { starting, increment, end_at_ms, price, leader, leader_max, seq };
    let bidder = bidder.to_string();
    let now = now_ms();
    let after = match decide(&live, &bidder, amount, now) {
        Ok(after) => after,
        Err((status, code)) => return Ok(Verdict::Rejected(status, code)),
    };
    // The write and its queue entry in one step, and only while the lock is
    // still ours: an expired lock must not let two bids take one seq.
    let written: i64 = within(redis.next().eval(
        LOCKED_WRITE_SCRIPT,
        vec![lock.to_owned(), key, ctx.queue_key()],
        vec![
            owner.to_owned(),
            after.price.to_string(),
            after.leader.clone(),
            after.leader_max.to_string(),
            after.seq.to_string(),
            queue_entry(id, &bidder, amount, now, &after),
        ],
    ))
    .await?;
    if written != 1 {
        return Err(unavailable());
    }
    Ok(Verdict::Accepted(after))
}

async fn bid_redis_lua(ctx: &Shared, id: Uuid, bidder: Uuid, amount: i64) -> Result<Verdict, Refusal> {
    let redis = ctx.redis.as_ref().expect("redis designs have Redis");
    let reply: Vec<String> = within(redis.next().evalsha(
        &ctx.lua_sha,
        vec![ctx.auction_key(id), ctx.queue_key()],
        vec![id.to_string(), bidder.to_string(), amount.to_string(), now_ms().to_string()],
    ))
    .await?;
    let field = |index: usize| reply.get(index).and_then(|value| value.parse::<i64>().ok());
    Ok(match reply.first().map(String::as_str) {
        Some("OK") => match (field(1), field(2), reply.get(3), field(4)) {
            (Some(seq), Some(price), Some(leader), Some(leading)) => {
                Verdict::Accepted(Outcome { price, leader: leader.clone(), leader_max: 0, seq, leading: leading == 1 })
            }
            _ => return Err(unavailable()),
        },
        Some("AUCTION_NOT_FOUND") => Verdict::Rejected(StatusCode::NOT_FOUND, "AUCTION_NOT_FOUND"),
        Some("AUCTION_NOT_ACTIVE") => Verdict::Rejected(StatusCode::CONFLICT, "AUCTION_NOT_ACTIVE"),
        Some("ALREADY_LEADING") => Verdict::Rejected(StatusCode::CONFLICT, "ALREADY_LEADING"),
        Some("BID_TOO_LOW") => Verdict::Rejected(StatusCode::CONFLICT, "BID_TOO_LOW"),
        _ => return Err(unavailable()),
    })
}

/// A batch of queue entries, column by column, for `UNNEST`.
#[derive(Default)]
struct Columns(Vec<Uuid>, Vec<i64>, Vec<Uuid>, Vec<i64>, Vec<i64>, Vec<i64>, Vec<Uuid>, Vec<i64>);

/// Drains the queue to Postgres in batches, oldest first: bids acknowledged
/// from Redis become durable here, some time later.
async fn write_behind(ctx: Ctx) {
    let redis = ctx.redis.as_ref().expect("redis designs have Redis");
    loop {
        let popped: Result<Option<Vec<String>>, _> =
            within(redis.next().rpop(ctx.queue_key(), Some(DRAIN_BATCH))).await;
        let entries = match popped {
            Ok(Some(entries)) if !entries.is_empty() => entries,
            Ok(_) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut columns = Columns::default();
        for entry in &entries {
            let parts: Vec<&str> = entry.split('|').collect();
            if let [auction, seq, bidder, amount, at, price, leader, leader_max] = parts.as_slice() {
                columns.0.push(Uuid::parse_str(auction).unwrap_or_default());
                columns.1.push(seq.parse().unwrap_or(0));
                columns.2.push(Uuid::parse_str(bidder).unwrap_or_default());
                columns.3.push(amount.parse().unwrap_or(0));
                columns.4.push(at.parse().unwrap_or(0));
                columns.5.push(price.parse().unwrap_or(0));
                columns.6.push(Uuid::parse_str(leader).unwrap_or_default());
                columns.7.push(leader_max.parse().unwrap_or(0));
            }
        }
        // A worker that loses its batch to a failed insert loses acknowledged
        // bids: retry the same batch until it lands.
        loop {
            let written = within(
                sqlx::query(
                    "WITH new AS (SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::bigint[], \
                         $5::bigint[], $6::bigint[], $7::uuid[], $8::bigint[]) \
                         AS b(auction_id, seq, bidder, amount, placed_ms, price, leader, leader_max)), \
                     ins AS (INSERT INTO bids SELECT auction_id, seq, bidder, amount, placed_ms FROM new \
                         ON CONFLICT DO NOTHING) \
                     UPDATE auctions a SET current_price = l.price, leader = l.leader, \
                         leader_max = l.leader_max, seq = l.seq \
                     FROM (SELECT DISTINCT ON (auction_id) * FROM new ORDER BY auction_id, seq DESC) l \
                     WHERE a.id = l.auction_id AND a.seq < l.seq",
                )
                .bind(&columns.0)
                .bind(&columns.1)
                .bind(&columns.2)
                .bind(&columns.3)
                .bind(&columns.4)
                .bind(&columns.5)
                .bind(&columns.6)
                .bind(&columns.7)
                .execute(&ctx.pg),
            )
            .await;
            if written.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(leader: Option<&str>, price: i64, leader_max: i64) -> Live {
        Live {
            starting: 100,
            increment: 10,
            end_at_ms: 1_000,
            price,
            leader: leader.map(str::to_owned),
            leader_max,
            seq: 3,
        }
    }

    #[test]
    fn the_rules_of_docs_api_for_bids_without_a_maximum() {
        let rejected = |result: Result<Outcome, (StatusCode, &'static str)>| result.err().map(|(_, code)| code);
        // Rule 1: the first bid needs the starting price.
        assert_eq!(rejected(decide(&live(None, 100, 0), "a", 99, 0)), Some("BID_TOO_LOW"));
        let first = decide(&live(None, 100, 0), "a", 100, 0).unwrap();
        assert_eq!((first.price, first.leader.as_str(), first.leader_max, first.seq), (100, "a", 100, 4));
        // Rule 2: a challenger needs P + inc, and leads only above M.
        assert_eq!(rejected(decide(&live(Some("a"), 100, 150), "b", 109, 0)), Some("BID_TOO_LOW"));
        let behind = decide(&live(Some("a"), 100, 150), "b", 120, 0).unwrap();
        assert_eq!((behind.price, behind.leader.as_str(), behind.leading), (130, "a", false));
        let capped = decide(&live(Some("a"), 100, 150), "b", 150, 0).unwrap();
        assert_eq!((capped.price, capped.leader.as_str(), capped.leading), (150, "a", false), "ties go to the leader");
        let ahead = decide(&live(Some("a"), 100, 150), "b", 151, 0).unwrap();
        assert_eq!((ahead.price, ahead.leader.as_str(), ahead.leader_max, ahead.leading), (151, "b", 151, true));
        // Rule 3: the leader raises their maximum, the price stays.
        assert_eq!(rejected(decide(&live(Some("a"), 100, 150), "a", 150, 0)), Some("ALREADY_LEADING"));
        let raised = decide(&live(Some("a"), 100, 150), "a", 200, 0).unwrap();
        assert_eq!((raised.price, raised.leader_max, raised.seq), (100, 200, 4));
        // The end.
        assert_eq!(rejected(decide(&live(None, 100, 0), "a", 500, 1_000)), Some("AUCTION_NOT_ACTIVE"));
    }
}
