//! The lease manager: one task per node that, every tick (and whenever a peer
//! wakes it),
//!
//! 1. says the node is alive (its membership row, on the database's clock);
//! 2. renews every lease it holds, at the epoch it holds it. A lease missing
//!    from the answer was taken over: the node forgets it and retires the
//!    shard's actors (their writes in flight are refused by the store's epoch
//!    check and answered 503). A renewal vouches for the leases for one lease
//!    length minus a tick, measured from before it was sent; past that, with
//!    no renewal, the node takes no writes at all;
//! 3. spreads the shards over the live nodes (`assign`): a shard that should
//!    be elsewhere is handed over (stop taking writes for it, let its actors
//!    finish what they have in flight, then release the lease so the new owner
//!    takes it at once, and wake that node); a shard that should be here and is
//!    free (released, expired, or this node's own from a previous run) is taken,
//!    raising its epoch.
//!
//! A shard whose owner died is free once its lease expires: at most a lease
//! length after the owner's last renewal, plus a tick. A node whose
//! persistence actor failed (it takes no more writes) leaves at its next tick:
//! its shards move at once, and it forwards the writes it is sent.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use gavel_actors::ports::{SHARD_COUNT, ShardLease};
use tracing::{debug, info, warn};

use super::{Cluster, LeaseStore, LeaseStoreError, SECRET_HEADER, View};
use crate::telemetry;

impl Cluster {
    /// Joins the cluster: the first tick runs before this returns, so a node
    /// alone on its database owns every shard when it starts serving. Then the
    /// manager runs in the background until `leave`.
    pub async fn join(self: &Arc<Self>) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        if self.store.is_none() {
            return Ok(None);
        }
        self.tick().await?;
        let cluster = self.clone();
        Ok(Some(tokio::spawn(async move { cluster.run().await })))
    }

    async fn run(self: Arc<Self>) {
        let mut previous_members: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settings.tick) => {}
                () = self.wake.notified() => {}
                () = self.stopped.notified() => return,
            }
            let ticking = self.ticking.lock().await;
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if self.node.persistence_failed() {
                // It takes no more writes: held on, its shards would take none either.
                warn!("the persistence actor failed; leaving the cluster so that the other nodes take its shards");
                drop(ticking);
                self.leave().await;
                return;
            }
            let deadline = self.settings.lease / 2;
            match tokio::time::timeout(deadline, self.tick()).await {
                Ok(Ok(members)) => {
                    if members != previous_members {
                        info!(?members, "cluster membership changed");
                        self.poke_others(&members);
                        previous_members = members;
                    }
                }
                Ok(Err(error)) => {
                    metrics::counter!(telemetry::LEASE_RENEWALS_TOTAL, "outcome" => "failed").increment(1);
                    warn!(%error, "lease tick failed");
                }
                Err(_) => {
                    metrics::counter!(telemetry::LEASE_RENEWALS_TOTAL, "outcome" => "failed").increment(1);
                    warn!("lease tick timed out");
                }
            }
        }
    }

    fn shared(&self) -> &dyn LeaseStore {
        self.store.as_deref().expect("the manager runs only on a shared store")
    }

    /// One round of heartbeat, renewal and spreading; returns the live members.
    pub(super) async fn tick(self: &Arc<Self>) -> Result<Vec<String>, LeaseStoreError> {
        let store = self.shared();
        let me = self.settings.node_id.as_str();
        let lease_ms = self.settings.lease.as_millis() as i64;
        let started = tokio::time::Instant::now();
        store.heartbeat(me, &self.settings.advertise_url).await?;
        self.renew(started).await?;

        let rows = store.read().await?;
        let stopping = self.stopping.load(Ordering::Acquire);
        let mut live: Vec<String> = rows
            .members
            .iter()
            .filter(|member| self.is_live(member.last_seen_ms, rows.now_ms))
            .filter(|member| !(stopping && member.node_id == me))
            .map(|member| member.node_id.clone())
            .collect();
        live.sort();
        live.dedup();
        let desired = super::assign(&live);
        let desired_owner = |shard: u32| desired[shard as usize].map(|index| live[index].as_str());

        for lease in self.node.leases.held() {
            if let Some(owner) = desired_owner(lease.shard)
                && owner != me
            {
                let url = rows.members.iter().find(|member| member.node_id == owner).map(|m| m.advertise_url.clone());
                self.hand_over(lease, url);
            }
        }

        let wanted: Vec<u32> = (0..SHARD_COUNT)
            .filter(|&shard| desired_owner(shard) == Some(me) && self.node.leases.epoch_of(shard).is_none())
            .filter(|&shard| {
                rows.leases
                    .iter()
                    .find(|row| row.shard == shard as i32)
                    .is_none_or(|row| row.owner.is_empty() || row.owner == me || row.expires_at_ms <= rows.now_ms)
            })
            .collect();
        let mut taken = Vec::new();
        if !wanted.is_empty() {
            taken = store.take(me, &wanted, lease_ms).await?;
            for lease in &taken {
                self.node.leases.grant(lease.shard, lease.epoch);
            }
            if !taken.is_empty() {
                // Rows cached while another node owned these auctions may be stale.
                self.read_cache.clear();
                metrics::counter!(telemetry::SHARD_MOVES_TOTAL, "kind" => "acquired").increment(taken.len() as u64);
                info!(shards = taken.len(), "took shards");
            }
        }

        let mut view = View { read_at: Some(Instant::now()), now_ms: rows.now_ms, ..View::default() };
        for member in rows.members {
            view.members.insert(member.node_id.clone(), member);
        }
        for mut lease in rows.leases {
            if let Some(mine) = taken.iter().find(|taken| taken.shard as i32 == lease.shard) {
                lease.owner = me.to_owned();
                lease.epoch = mine.epoch;
                lease.expires_at_ms = rows.now_ms + lease_ms;
            }
            view.leases.insert(lease.shard, lease);
        }
        *self.view.write().unwrap_or_else(std::sync::PoisonError::into_inner) = view;
        *self.last_tick.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        metrics::gauge!(telemetry::SHARDS_OWNED).set(self.node.leases.held_count() as f64);
        Ok(live)
    }

    /// Renews every lease held; forgets (and retires) the ones taken over.
    async fn renew(self: &Arc<Self>, started: tokio::time::Instant) -> Result<(), LeaseStoreError> {
        let held = self.node.leases.held();
        let trust_for = self.settings.lease.saturating_sub(self.settings.tick);
        if held.is_empty() {
            self.node.leases.trust_until(started + trust_for);
            return Ok(());
        }
        let renewed: HashSet<u32> = self
            .shared()
            .renew(&self.settings.node_id, &held, self.settings.lease.as_millis() as i64)
            .await?
            .into_iter()
            .collect();
        self.node.leases.trust_until(started + trust_for);
        metrics::counter!(telemetry::LEASE_RENEWALS_TOTAL, "outcome" => "renewed").increment(renewed.len() as u64);
        for lease in held.into_iter().filter(|lease| !renewed.contains(&lease.shard)) {
            metrics::counter!(telemetry::LEASE_RENEWALS_TOTAL, "outcome" => "lost").increment(1);
            metrics::counter!(telemetry::SHARD_MOVES_TOTAL, "kind" => "lost").increment(1);
            warn!(shard = lease.shard, epoch = lease.epoch, "lease lost to another node");
            if self.node.leases.epoch_of(lease.shard) == Some(lease.epoch) {
                self.node.leases.revoke(lease.shard);
            }
            self.read_cache.clear();
            let node = self.node.clone();
            tokio::spawn(async move { node.retire_shard(lease).await });
        }
        Ok(())
    }

    /// Stops taking writes for the shard at once; once its actors have
    /// finished their writes in flight, releases the lease and wakes `to_url`.
    fn hand_over(self: &Arc<Self>, lease: ShardLease, to_url: Option<String>) {
        if self.node.leases.epoch_of(lease.shard) != Some(lease.epoch) {
            return;
        }
        self.node.leases.revoke(lease.shard);
        self.read_cache.clear();
        metrics::counter!(telemetry::SHARD_MOVES_TOTAL, "kind" => "released").increment(1);
        let cluster = self.clone();
        tokio::spawn(async move {
            cluster.node.retire_shard(lease).await;
            match cluster.shared().release(&cluster.settings.node_id, lease).await {
                Ok(_) => debug!(shard = lease.shard, "shard handed over"),
                Err(error) => warn!(shard = lease.shard, %error, "releasing a lease failed; it expires instead"),
            }
            if let Some(url) = to_url {
                cluster.poke(&url).await;
            }
        });
    }

    /// Hands every shard over while the node still finishes the requests it
    /// is in (a client may take up to the body deadline to send one): no more
    /// ticks, no more writes taken under its leases, its actors' writes in
    /// flight answered, then `leave`. A request still running is forwarded
    /// to the shard's new owner once that node has taken the shard.
    pub async fn step_down(self: &Arc<Self>) {
        if self.store.is_none() {
            return;
        }
        self.stop_ticking().await;
        let held = self.node.leases.held();
        for lease in &held {
            self.node.leases.revoke(lease.shard);
        }
        self.read_cache.clear();
        // Also the actors of leases a tick began to hand over: their writes
        // must be answered before `leave` releases every lease.
        let mut leases: HashSet<ShardLease> = held.into_iter().collect();
        leases.extend(self.node.live_leases());
        let retiring: Vec<_> = leases
            .into_iter()
            .map(|lease| {
                let node = self.node.clone();
                tokio::spawn(async move { node.retire_shard(lease).await })
            })
            .collect();
        for retired in retiring {
            let _ = retired.await;
        }
        self.leave().await;
    }

    /// No tick starts from now on, and the one under way (it may be taking
    /// shards) has ended when this returns.
    async fn stop_ticking(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_one();
        drop(self.ticking.lock().await);
    }

    /// Leaves the cluster once the node writes no more (it has drained, or
    /// handed its shards over, or its persistence actor failed): no more
    /// membership, every lease it owns in the store released at once, the
    /// other nodes woken to take the shards. A tick under way ends first (a
    /// heartbeat after this would make the node look live again, and the
    /// others would wait for it). Once only: a later call waits for the
    /// first to end (the first may be the manager's own, which the app stops
    /// once `leave` has returned).
    pub async fn leave(self: &Arc<Self>) {
        if self.store.is_none() {
            return;
        }
        self.left.get_or_init(|| self.leave_now()).await;
    }

    async fn leave_now(self: &Arc<Self>) {
        let store = self.shared();
        self.stop_ticking().await;
        let me = self.settings.node_id.as_str();
        for lease in self.node.leases.held() {
            self.node.leases.revoke(lease.shard);
        }
        match tokio::time::timeout(self.settings.lease, store.leave(me)).await {
            Ok(Ok(released)) => {
                metrics::counter!(telemetry::SHARD_MOVES_TOTAL, "kind" => "released").increment(released.len() as u64);
                info!(shards = released.len(), "left the cluster and released every shard");
            }
            Ok(Err(error)) => {
                warn!(%error, "leaving the cluster failed; the other nodes wait for the leases to expire")
            }
            Err(_) => warn!("leaving the cluster timed out; the other nodes wait for the leases to expire"),
        }
        let others: Vec<String> =
            self.members().into_iter().filter(|member| member.node_id != me).map(|m| m.advertise_url).collect();
        for url in &others {
            self.poke(url).await;
        }
    }

    fn poke_others(self: &Arc<Self>, members: &[String]) {
        let urls: Vec<String> = self
            .members()
            .into_iter()
            .filter(|member| member.node_id != self.settings.node_id && members.contains(&member.node_id))
            .map(|member| member.advertise_url)
            .collect();
        let cluster = self.clone();
        tokio::spawn(async move {
            for url in urls {
                cluster.poke(&url).await;
            }
        });
    }

    /// Asks the node at `url` to run its lease tick now (best effort).
    async fn poke(&self, url: &str) {
        let request = self
            .client
            .post(format!("{url}/internal/v1/cluster/wake"))
            .header(SECRET_HEADER, self.settings.secret.expose())
            .timeout(std::time::Duration::from_millis(500))
            .send();
        if let Err(error) = request.await {
            debug!(%url, %error, "waking a peer failed");
        }
    }
}
