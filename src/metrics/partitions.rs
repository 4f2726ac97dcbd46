//! The metrics of partition ownership (`cluster::partitions`, cluster mode): partitions this
//! replica owns, partitions it claimed or released, and the times it found its lease ended.

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
}

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
        Self { owned, moves, lost }
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
}
