//! The metrics of partition ownership (`cluster::partitions`, cluster mode): partitions this
//! replica owns, partitions it claimed or released, the times it found its lease ended; and the
//! jobs forwarded between replicas (`grpc::peer`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Metrics;
use super::labels::OutcomeLabel;

/// The partitions' metrics, registered with the others.
pub(super) struct PartitionMetrics {
    owned: Gauge,
    moves: Family<OutcomeLabel, Counter>,
    lost: Counter,
    peer_jobs: Family<PeerLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    direction: &'static str,
    outcome: &'static str,
}

/// How a job forwarded between replicas went: `ok` (its result came back, whatever it was),
/// `unreachable` (the owner did not answer: queued here instead), `refused` (a peer call
/// without the cluster's secret, or a job this replica could not read), `moved` (the replica
/// asked does not own the job's partition, or no longer: routed again).
pub const PEER_OUTCOMES: [&str; 4] = ["ok", "unreachable", "refused", "moved"];

impl PartitionMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let owned = Gauge::default();
        registry.register(
            "feishu_reply_partitions_owned",
            "Target partitions (of 256) this replica owns (cluster mode)",
            owned.clone(),
        );
        let moves = Family::<OutcomeLabel, Counter>::default();
        for outcome in ["claimed", "released"] {
            let _ = moves.get_or_create(&OutcomeLabel { outcome });
        }
        registry.register(
            "feishu_reply_partition_moves",
            "Target partitions this replica claimed (free, or their owner's lease ended) or released (another replica should own them)",
            moves.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "feishu_reply_partition_leases_lost",
            "Times this replica found its partition lease ended (stalled or cut off from Redis longer than the lease) and dropped every partition",
            lost.clone(),
        );
        let peer_jobs = Family::<PeerLabels, Counter>::default();
        for direction in ["out", "in"] {
            for outcome in PEER_OUTCOMES {
                let _ = peer_jobs.get_or_create(&PeerLabels { direction, outcome });
            }
        }
        registry.register(
            "feishu_reply_peer_jobs",
            "Jobs forwarded to the replica that owns their queue (out) or taken from another replica (in), by outcome: ok, unreachable (queued here instead), refused, moved (routed again: the replica did not own the job's partition)",
            peer_jobs.clone(),
        );
        Self {
            owned,
            moves,
            lost,
            peer_jobs,
        }
    }
}

impl Metrics {
    pub fn set_partitions_owned(&self, n: usize) {
        self.partitions
            .owned
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn partitions_moved(&self, claimed: u64, released: u64) {
        let add = |outcome, n| {
            if n > 0 {
                self.partitions
                    .moves
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc_by(n);
            }
        };
        add("claimed", claimed);
        add("released", released);
    }

    pub fn partitions_lost(&self) {
        self.partitions.lost.inc();
    }

    /// A job forwarded (`out`: to its owner; `in`: from another replica); `outcome` one of
    /// `ok`, `unreachable`, `refused`.
    pub fn peer_job(&self, out: bool, outcome: &'static str) {
        let direction = if out { "out" } else { "in" };
        self.partitions
            .peer_jobs
            .get_or_create(&PeerLabels { direction, outcome })
            .inc();
    }
}
