//! The Redis gate's partitioned side (keys spread over slots: `RedisQuota::partitioned`).
//! A job's keys split in two: its queue's own target window (a chat, a message, a card),
//! which the replica owning the target's partition keeps in its local table, and the rest
//! (the app's windows, a named user's), decided in Redis. A send reserves its target locally
//! first (free), then asks Redis; a refusal gives the local reservation back. The partition
//! counts the send in flight until its answer ([`Sending`]), so it is handed over only when
//! nothing sent from here can still arrive.

use std::sync::Arc;

use super::SharedKey;
use super::partitions::{Partitions, Sending, partition_of};
use crate::quota::{Micros, QuotaKey, QuotaTable};

/// How a job's keys are decided: which are kept here, which in Redis.
pub(super) struct Split {
    /// Indexes (into the job's keys) of the windows this replica keeps (partitioned mode).
    pub local: Vec<usize>,
    /// The keys decided in Redis.
    pub shared: Arc<[SharedKey]>,
    /// Each shared key's index into the job's keys.
    pub shared_idx: Vec<usize>,
    /// The partition of the job's queue (partitioned mode).
    pub partition: Option<u16>,
}

impl Split {
    /// Splits a job of queue `chat` with `keys`: `shared_key` is `Some` for the keys Redis
    /// holds; the others are kept here when `parts` is given.
    pub fn new(
        chat: &str,
        keys: &[QuotaKey],
        parts: Option<&Arc<Partitions>>,
        shared_key: impl Fn(&QuotaKey) -> Option<SharedKey>,
    ) -> Self {
        let mut local = Vec::new();
        let mut shared = Vec::new();
        let mut shared_idx = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match shared_key(k) {
                Some(s) => {
                    shared.push(s);
                    shared_idx.push(i);
                }
                None => local.push(i),
            }
        }
        Self {
            local,
            shared: shared.into(),
            shared_idx,
            partition: parts.map(|_| partition_of(chat)),
        }
    }

    /// The shared keys among the job's keys `idx` (indexes into the job's keys).
    pub fn shared_among(&self, idx: &[usize]) -> Vec<SharedKey> {
        self.shared_idx
            .iter()
            .zip(self.shared.iter())
            .filter(|(i, _)| idx.contains(i))
            .map(|(_, k)| k.clone())
            .collect()
    }
}

/// A send's reservation of its target windows here, and its place among its partition's
/// sends in flight.
pub(super) struct LocalHold {
    /// The job's keys kept here, with their indexes into the job's keys.
    keys: Vec<(usize, QuotaKey)>,
    decided: Micros,
    sending: Sending,
}

impl LocalHold {
    /// Reserves `split`'s local keys of `keys` at `now` in `table` for a send counted in
    /// flight by `sending`; `Err(when)` when one of them has no room before then.
    pub fn reserve(
        table: &mut QuotaTable,
        split: &Split,
        keys: &[QuotaKey],
        sending: Sending,
        now: Micros,
    ) -> Result<Self, Micros> {
        let keys: Vec<(usize, QuotaKey)> =
            split.local.iter().map(|&i| (i, keys[i].clone())).collect();
        let plain: Vec<QuotaKey> = keys.iter().map(|(_, k)| k.clone()).collect();
        table.try_acquire(&plain, now)?;
        Ok(Self {
            keys,
            decided: now,
            sending,
        })
    }

    /// The send will not leave: its reservation is given back.
    pub fn undo(self, table: &mut QuotaTable) {
        let plain: Vec<QuotaKey> = self.keys.into_iter().map(|(_, k)| k).collect();
        table.unrecord(&plain, self.decided);
    }

    /// The partition the send went to.
    pub fn partition(&self) -> u16 {
        self.sending.partition()
    }

    /// The send was answered at `answered`: it counts until then in the keys among
    /// `counted` (indexes into the job's keys), not at all in the others. Returns the keys
    /// it counts in, and its place in flight (dropped once the partition's log has it: a
    /// partition handed over in between would miss it).
    pub fn settle(
        self,
        table: &mut QuotaTable,
        counted: &[usize],
        answered: Micros,
    ) -> (Vec<QuotaKey>, Sending) {
        let (kept, refused): (Vec<_>, Vec<_>) = self
            .keys
            .into_iter()
            .partition(|(i, _)| counted.contains(i));
        let plain = |v: Vec<(usize, QuotaKey)>| -> Vec<QuotaKey> {
            v.into_iter().map(|(_, k)| k).collect()
        };
        let kept = plain(kept);
        table.settle(&kept, self.decided, answered);
        table.unrecord(&plain(refused), self.decided);
        (kept, self.sending)
    }
}
