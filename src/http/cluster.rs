//! `GET /api/v1/cluster` and `GET /api/v1/cluster/auctions/{id}`: which nodes
//! are live and which shard each one owns, read from the store at the moment of
//! the request (any node gives the same answer).

use axum::Json;
use axum::extract::State;
use gavel_actors::ports::shard_of;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::ApiContext;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiPath, parse_id};
use super::views::timestamp;
use crate::cluster::{ClusterRows, LeaseRow, MemberRow};

#[derive(Serialize, ToSchema)]
pub struct ClusterView {
    /// The node that answered.
    pub node_id: String,
    /// The live nodes.
    pub nodes: Vec<NodeView>,
    /// Every shard's lease.
    pub shards: Vec<ShardView>,
}

#[derive(Serialize, ToSchema)]
pub struct NodeView {
    pub node_id: String,
    pub advertise_url: String,
    /// Shards whose unexpired lease it holds.
    pub shards: u32,
    pub last_seen: String,
}

#[derive(Serialize, ToSchema)]
pub struct ShardView {
    pub shard: u32,
    /// `null` while nobody has ever held it.
    pub owner: Option<String>,
    /// The fencing token: rises at every change of owner.
    pub epoch: i64,
    /// `null`: never (the single embedded node).
    pub expires_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AuctionOwnerView {
    pub auction_id: Uuid,
    pub shard: u32,
    /// `null` while nobody holds the shard.
    pub owner: Option<String>,
    pub epoch: i64,
}

fn owner_of(lease: &LeaseRow) -> Option<String> {
    (!lease.owner.is_empty()).then(|| lease.owner.clone())
}

fn expires_at(lease: &LeaseRow) -> Option<String> {
    (lease.expires_at_ms != i64::MAX).then(|| timestamp(lease.expires_at_ms))
}

async fn rows(context: &ApiContext) -> ApiResult<ClusterRows> {
    let rows = match context.cluster.shared_store() {
        Some(store) => store.read().await.map_err(|error| ApiError::internal("read the cluster", error))?,
        None => context
            .db
            .lease_rows()
            .await
            .map(|leases| {
                let now_ms = context.now_ms();
                let settings = context.cluster.settings();
                let me = MemberRow {
                    node_id: settings.node_id.clone(),
                    advertise_url: settings.advertise_url.clone(),
                    last_seen_ms: now_ms,
                };
                ClusterRows { now_ms, members: vec![me], leases }
            })
            .map_err(|error| ApiError::internal("read the cluster", error))?,
    };
    Ok(rows)
}

#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "the live nodes and every shard's lease", body = ClusterView),
        (status = 503, description = "UNAVAILABLE: the store cannot be read", body = ErrorBody),
    ))]
pub async fn cluster(State(context): State<ApiContext>) -> ApiResult<Json<ClusterView>> {
    let rows = rows(&context).await?;
    let held = |node_id: &str| {
        rows.leases.iter().filter(|lease| lease.owner == node_id && lease.expires_at_ms > rows.now_ms).count() as u32
    };
    let nodes = rows
        .members
        .iter()
        .filter(|member| context.cluster.is_live(member.last_seen_ms, rows.now_ms))
        .map(|member| NodeView {
            node_id: member.node_id.clone(),
            advertise_url: member.advertise_url.clone(),
            shards: held(&member.node_id),
            last_seen: timestamp(member.last_seen_ms),
        })
        .collect();
    let shards = rows
        .leases
        .iter()
        .map(|lease| ShardView {
            shard: lease.shard as u32,
            owner: owner_of(lease),
            epoch: lease.epoch,
            expires_at: expires_at(lease),
        })
        .collect();
    Ok(Json(ClusterView { node_id: context.node_id.clone(), nodes, shards }))
}

#[utoipa::path(get, path = "/api/v1/cluster/auctions/{id}", tag = "cluster",
    params(("id" = Uuid, Path, description = "auction id")),
    responses(
        (status = 200, description = "the auction's shard and its owner", body = AuctionOwnerView),
        (status = 400, description = "INVALID_REQUEST (not a UUID)", body = ErrorBody),
        (status = 404, description = "AUCTION_NOT_FOUND", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE: the store cannot be read", body = ErrorBody),
    ))]
pub async fn auction_owner(
    State(context): State<ApiContext>,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<AuctionOwnerView>> {
    let auction_id = parse_id(&id, "auction id")?;
    let auction = context.db.auction(auction_id).await.map_err(|error| ApiError::internal("read auction", error))?;
    if auction.is_none() {
        return Err(ApiError::AuctionNotFound);
    }
    let shard = shard_of(auction_id);
    let rows = context.db.lease_rows().await.map_err(|error| ApiError::internal("read leases", error))?;
    let lease = rows.iter().find(|lease| lease.shard as u32 == shard);
    Ok(Json(AuctionOwnerView {
        auction_id,
        shard,
        owner: lease.and_then(owner_of),
        epoch: lease.map_or(0, |lease| lease.epoch),
    }))
}
