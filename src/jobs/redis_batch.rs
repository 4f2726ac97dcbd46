//! The cluster job store's writes on other slots than the job's partition: a caller's count
//! of open jobs (checked before a submit, given back when the job ends) and the notices that
//! tell a partition's owner of new jobs. What nobody waits for is batched per slot
//! ([`Pending`]): carried by the next call on that slot, or by the runner's next round.

use std::collections::{BTreeMap, BTreeSet};

use super::record::JobRecord;
use super::redis::{RedisJobStore, bad, store_err};
use super::store::StoreError;
use crate::redis_conn::Lane;

/// Writes that wait for the next call on their slot, or the runner's next round (50 ms): one
/// call carries many.
#[derive(Default)]
pub(super) struct Pending {
    /// Per caller tag: (caller's set, job) given back.
    releases: BTreeMap<usize, Vec<(String, String)>>,
    /// Per member: partitions it is told of.
    announces: BTreeMap<String, BTreeSet<u16>>,
}

impl RedisJobStore {
    /// Counts `key` in its caller's open jobs: None, or the caller's open jobs when at
    /// `bound`. The jobs given back on the same slot go first, in the same call.
    pub(super) async fn reserve(
        &self,
        rec: &JobRecord,
        key: &str,
        bound: u64,
    ) -> Result<Option<u64>, StoreError> {
        // Counts until a minute after the job's expiry at the latest (by then it is final).
        let until = rec.expires_ms.saturating_add(60_000).max(0);
        let (tag, set) = self.caller_key(&rec.caller);
        let back = self
            .pending
            .lock()
            .releases
            .remove(&tag)
            .unwrap_or_default();
        let mut inv = self.reserve.prepare_invoke();
        inv.key(set).arg(key).arg(bound).arg(until);
        for (set, job) in &back {
            inv.key(set).arg(job);
        }
        let v: Result<Vec<i64>, _> = self.redis.call_on(Lane::Jobs, "job_reserve", inv).await;
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                // Given back at the next call (twice does no harm).
                self.pending
                    .lock()
                    .releases
                    .entry(tag)
                    .or_default()
                    .extend(back);
                return Err(store_err(e));
            }
        };
        match v.as_slice() {
            [1] => Ok(None),
            [-2, open] => Ok(Some(u64::try_from(*open).unwrap_or(0))),
            _ => Err(bad("reserve")),
        }
    }

    /// Job `key` of `caller` no longer counts in its open jobs: given back with the next
    /// call on its slot.
    pub(super) fn release(&self, caller: &str, key: &str) {
        let (tag, set) = self.caller_key(caller);
        self.pending
            .lock()
            .releases
            .entry(tag)
            .or_default()
            .push((set, key.to_owned()));
    }

    /// A job was stored in `p`, run by `owner`: it is told (this replica: its next poll reads
    /// `p`; another: in its inbox at the next flush). A lost notice is found by the owner's
    /// sweep.
    pub(super) fn announce(&self, p: u16, owner: &str) {
        if owner.is_empty() {
            // Nobody took the partition yet: whoever does reads it then.
        } else if *owner == self.ownership.me() {
            self.news.lock().insert(p);
        } else {
            self.pending
                .lock()
                .announces
                .entry(owner.to_owned())
                .or_default()
                .insert(p);
        }
    }

    /// Writes what waits: the jobs given back (one call per caller tag) and the news for
    /// other members (one call per member). A failed write is dropped: a job given back
    /// stops counting at its expiry, a lost notice is found by the owner's sweep.
    pub async fn flush(&self) {
        let Pending {
            releases,
            announces,
        } = std::mem::take(&mut *self.pending.lock());
        for jobs in releases.into_values() {
            let mut inv = self.release.prepare_invoke();
            for (set, job) in &jobs {
                inv.key(set).arg(job);
            }
            if let Err(e) = self
                .redis
                .call_on::<i64>(Lane::Jobs, "job_release", inv)
                .await
            {
                tracing::debug!(error = %e, "giving back callers' job counts failed; they stop counting at the jobs' expiry");
            }
        }
        for (owner, parts) in announces {
            let mut cmd = redis::cmd("RPUSH");
            cmd.arg(self.inbox(&owner))
                .arg(parts.into_iter().collect::<Vec<_>>());
            if let Err(e) = self
                .redis
                .command_on::<i64>(Lane::Jobs, "job_announce", &cmd)
                .await
            {
                tracing::debug!(error = %e, "telling a partition's owner of new jobs failed; its sweep finds them");
            }
        }
    }
}
