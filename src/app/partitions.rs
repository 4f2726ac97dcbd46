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
use crate::scheduler::{Scheduler, SchedulerConfig};

/// The job store runs the jobs of this replica's partitions.
pub(super) struct JobOwnership(pub Arc<Partitions>);

impl crate::jobs::Ownership for JobOwnership {
    fn me(&self) -> String {
        self.0.me()
    }

    fn owned(&self) -> Vec<(u16, u64)> {
        self.0.owned_epochs(tokio::time::Instant::now())
    }
}

/// The partitions this replica takes part in, and the tasks that keep them.
pub(super) struct Running {
    parts: Arc<Partitions>,
    renew: JoinHandle<()>,
    peers: Option<crate::grpc::peer::Peers>,
}

/// This replica's share of the target partitions in cluster mode (`None` otherwise). Made
/// before the scheduler: with peers configured its quota gate decides only for them.
pub(super) fn make(
    config: &Config,
    store: Option<&Arc<RedisQuota>>,
    metrics: &Arc<Metrics>,
) -> Option<Arc<Partitions>> {
    let (Some(redis), Some(c)) = (store, &config.cluster) else {
        return None;
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
        SchedulerConfig::from_config(config).send_timeout,
        metrics.clone(),
    );
    if let Some(p) = &c.peers {
        parts = parts.with_addr(p.advertise.clone());
    }
    Some(Arc::new(parts))
}

/// Starts renewing `parts`, and forwarding when peers are configured (the peer listener is
/// bound here: a port taken fails the start).
pub(super) async fn start(
    config: &Config,
    parts: Option<Arc<Partitions>>,
    service: &Arc<ReplyService>,
    scheduler: &Scheduler,
    metrics: &Arc<Metrics>,
) -> Result<Option<Running>, AppError> {
    let (Some(parts), Some(c)) = (parts, &config.cluster) else {
        return Ok(None);
    };
    let peers = match &c.peers {
        Some(p) => {
            let listener =
                TcpListener::bind(p.listen)
                    .await
                    .map_err(|source| AppError::PeerListen {
                        addr: p.listen,
                        source,
                    })?;
            tracing::info!(listen = %p.listen, advertise = %p.advertise, "cluster mode: jobs go to the replica owning their chat, which keeps its windows");
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
    /// Shutdown begins: this replica stops deciding for its partitions, and once their
    /// sends in flight are answered the others take them, so they stop forwarding jobs here
    /// while it drains. Its queued jobs go back to their routers: one that came from a peer
    /// is routed again by its sender; one that came in here stays in the job store (async)
    /// or fails UNAVAILABLE (retryable). The peer listener keeps serving the jobs it holds.
    pub(super) async fn leave(&self) {
        self.renew.abort();
        match self.parts.leave().await {
            Ok(()) => {
                if let Some(peers) = &self.peers {
                    peers.left().await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "handing partitions over failed; they move when the lease ends");
            }
        }
    }

    /// Drained: the peer listener stops.
    pub(super) fn stop(self) {
        if let Some(p) = self.peers {
            p.stop();
        }
    }
}
