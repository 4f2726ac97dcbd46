//! Cluster mode's target partitions as `serve` starts and stops them: this replica's share
//! (`cluster::partitions`), and with `[cluster] peer_listen` the forwarding of jobs to the
//! replica that owns their queue (`grpc::peer`).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::AppError;
use crate::cluster::RedisQuota;
use crate::cluster::partitions::Partitions;
use crate::config::Config;
use crate::grpc::ReplyService;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// The partitions this replica takes part in, and the tasks that keep them.
pub(super) struct Running {
    parts: Arc<Partitions>,
    renew: JoinHandle<()>,
    peers: Option<JoinHandle<()>>,
}

/// Starts renewing this replica's share in cluster mode (`None` otherwise), and forwarding
/// when peers are configured (the peer listener is bound here: a port taken fails the start).
pub(super) async fn start(
    config: &Config,
    store: Option<&Arc<RedisQuota>>,
    service: &Arc<ReplyService>,
    scheduler: &Scheduler,
    metrics: &Arc<Metrics>,
) -> Result<Option<Running>, AppError> {
    let (Some(redis), Some(c)) = (store, &config.cluster) else {
        return Ok(None);
    };
    let q = &config.quotas;
    let window = [q.chat, q.user, q.message, q.card]
        .iter()
        .map(|s| s.window)
        .max()
        .unwrap_or_default();
    let mut parts = Partitions::new(
        redis.shared().clone(),
        c.jobs.lease,
        window + q.safety_margin,
        metrics.clone(),
    );
    if let Some(p) = &c.peers {
        parts = parts.with_addr(p.advertise.clone());
    }
    let parts = Arc::new(parts);
    let peers = match &c.peers {
        Some(p) => {
            let listener =
                TcpListener::bind(p.listen)
                    .await
                    .map_err(|source| AppError::PeerListen {
                        addr: p.listen,
                        source,
                    })?;
            tracing::info!(listen = %p.listen, advertise = %p.advertise, "cluster mode: jobs go to the replica owning their chat");
            Some(crate::grpc::peer::start(
                listener,
                parts.clone(),
                service.clone(),
                scheduler.clone(),
                metrics.clone(),
            ))
        }
        None => None,
    };
    Ok(Some(Running {
        renew: tokio::spawn(parts.clone().run()),
        parts,
        peers,
    }))
}

impl Running {
    /// Shutdown begins: the others take this replica's partitions now, so they stop
    /// forwarding jobs here while it drains (a job forwarded meanwhile comes back and is
    /// queued by its sender). The peer listener keeps serving the jobs it holds.
    pub(super) async fn leave(&self) {
        self.renew.abort();
        if let Err(e) = self.parts.leave().await {
            tracing::debug!(error = %e, "handing partitions over failed; they move when the lease ends");
        }
    }

    /// Drained: the peer listener stops.
    pub(super) fn stop(self) {
        if let Some(t) = self.peers {
            t.abort();
        }
    }
}
