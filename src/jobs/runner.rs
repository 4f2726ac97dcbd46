//! The job store's background work: in cluster mode following the partitions this replica
//! owns, picking up their jobs and the cancels asked; in both modes expiry and the size
//! metrics; and what the process leaves when it stops.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::redis::split_seq;
use super::{Jobs, KEEP_FINISHED, Shared};

/// How often a replica reads its inbox and follows its partitions (a submit to this replica
/// looks at once).
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How often every partition run here is read again from its first open job (a notice lost:
/// its sender died between storing a job and telling the owner).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often jobs of the single-slot layout are looked for (an upgrade).
const ADOPT_EVERY: Duration = Duration::from_secs(60);
/// Jobs read per poll.
const POLL_BATCH: usize = 512;
/// How often finished jobs past [`KEEP_FINISHED`] are removed, and the size refreshed.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
const METRICS_EVERY: Duration = Duration::from_secs(10);
/// Longest pause between rounds while Redis fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Jobs removed per expiry call (Redis: one script call each).
const EXPIRE_BATCH: usize = 1000;

impl Jobs {
    /// Runs the background work until [`Jobs::stop`].
    pub async fn run(self: Arc<Self>) {
        let _alive = self.alive.lock().await;
        let mut stopping = self.stopping.subscribe();
        let maintain = {
            let jobs = self.clone();
            async move { jobs.maintain().await }
        };
        let work = async {
            match self.store.shared() {
                None => std::future::pending::<()>().await,
                Some(shared) => self.run_cluster(shared).await,
            }
        };
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => {}
            () = maintain => {}
            () = work => {}
        }
    }

    /// Expiry and size metrics, for ever.
    async fn maintain(&self) {
        let mut next_expire = Instant::now();
        let mut tick = tokio::time::interval(METRICS_EVERY);
        loop {
            tick.tick().await;
            let expire = Instant::now() >= next_expire;
            if expire {
                next_expire = Instant::now() + EXPIRE_EVERY;
            }
            // A shared store counts per partition (a call each): only with the expiry.
            if !expire && self.store.shared().is_some() {
                continue;
            }
            let limit = if expire { EXPIRE_BATCH } else { 0 };
            loop {
                match self.store.expire(KEEP_FINISHED, limit).await {
                    Ok((gone, stored)) => {
                        self.metrics.set_jobs_stored(stored);
                        if gone < EXPIRE_BATCH || limit == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "expiring finished jobs failed");
                        break;
                    }
                }
            }
            if let Some(bytes) = self.store.file_bytes() {
                self.metrics.set_job_store_bytes(bytes);
            }
        }
    }

    /// Cluster mode: run the jobs of the partitions this replica owns, in order. A partition
    /// gained is taken with its claim's epoch (a write fence) and read from its first open
    /// job; one lost has its jobs here dropped (not sent yet: they stay queued in the store
    /// for its next owner). Partitions are read again when another replica (or this one)
    /// stored a job or asked a cancel there, and all of them every [`SWEEP_EVERY`].
    async fn run_cluster(self: &Arc<Self>, store: &dyn Shared) {
        // Per partition run here: the epoch it was taken with and the last job number read.
        let mut mine: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
        // Claims whose fence a later claim had passed already: not tried again.
        let mut stale: BTreeMap<u16, u64> = BTreeMap::new();
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut next_adopt = Instant::now();
        // Consecutive failed rounds: while Redis is unreachable, ask it less and less often.
        let mut failures = 0u32;
        loop {
            let now = Instant::now();
            let mut failed = false;
            let owned: BTreeMap<u16, u64> = store.owned().into_iter().collect();
            let lost: Vec<u16> = mine
                .iter()
                .filter(|(p, (epoch, _))| owned.get(p) != Some(epoch))
                .map(|(p, _)| *p)
                .collect();
            for p in lost {
                mine.remove(&p);
                self.leave_partition(store, p).await;
            }
            stale.retain(|p, epoch| owned.get(p) == Some(epoch));
            let mut read = BTreeSet::new();
            for (p, epoch) in owned {
                if mine.contains_key(&p) || stale.contains_key(&p) {
                    continue;
                }
                match store.fence(p, epoch).await {
                    Ok(true) => {
                        tracing::debug!(partition = p, epoch, "took a partition's jobs");
                        mine.insert(p, (epoch, 0));
                        read.insert(p);
                    }
                    Ok(false) => {
                        stale.insert(p, epoch);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, partition = p, "taking a partition's jobs failed");
                        failed = true;
                    }
                }
            }
            store.flush().await;
            match store.news().await {
                Ok(news) => read.extend(news.into_iter().filter(|p| mine.contains_key(p))),
                Err(e) => {
                    tracing::debug!(error = %e, "reading this replica's inbox failed");
                    failed = true;
                }
            }
            let sweep = now >= next_sweep;
            if sweep {
                // From the first open job: one that stopped running here unrecorded (cut
                // off by a shutdown, say) is started again.
                next_sweep = now + SWEEP_EVERY;
                for (p, run) in &mut mine {
                    run.1 = 0;
                    read.insert(*p);
                }
            }
            if now >= next_adopt && !failed {
                next_adopt = now + ADOPT_EVERY;
                match store.adopt_legacy().await {
                    Ok(0) => {}
                    Ok(jobs) => {
                        tracing::info!(
                            jobs,
                            "moved jobs of the single-slot layout into their partitions"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "moving jobs of the single-slot layout failed")
                    }
                }
            }
            for p in read {
                let Some((_, after)) = mine.get(&p).copied() else {
                    continue;
                };
                match self.poll(store, p, after).await {
                    Ok(Some((last, found))) => {
                        if after == 0 && found > 0 && !sweep {
                            // Its first read: the jobs its last owner left.
                            self.metrics.jobs_taken_over(found);
                        }
                        if let Some(run) = mine.get_mut(&p) {
                            run.1 = last;
                        }
                    }
                    Ok(None) => {
                        // Released meanwhile (a move), or taken while this replica still
                        // thinks it owns it (it was stalled or cut off).
                        let epoch = mine.get(&p).map(|run| run.0);
                        if store.owned().iter().any(|o| Some(o.1) == epoch && o.0 == p) {
                            tracing::warn!(
                                partition = p,
                                "another replica took this partition's jobs; dropping them here"
                            );
                            self.metrics.job_lease_lost();
                        }
                        mine.remove(&p);
                        self.leave_partition(store, p).await;
                    }
                    Err(()) => failed = true,
                }
            }
            failures = if failed { failures + 1 } else { 0 };
            let pause = if failed {
                backoff(failures)
            } else {
                POLL_EVERY
            };
            tokio::select! {
                () = self.poke.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// This replica no longer runs partition `p`'s jobs: nothing more is written to them,
    /// and its jobs here that are not being sent leave their queues.
    async fn leave_partition(&self, store: &dyn Shared, p: u16) {
        tracing::debug!(partition = p, "left a partition's jobs");
        store.unfence(p);
        self.drop_running(|seq| split_seq(seq).map(|(q, _)| q) == Some(p))
            .await;
    }

    /// Starts partition `p`'s jobs numbered after `after` and cancels what was asked;
    /// returns the last job number seen and how many jobs were read (None: another replica
    /// runs `p` now; Err: Redis failed, the jobs read before it are started and skipped when
    /// read again).
    async fn poll(
        self: &Arc<Self>,
        store: &dyn Shared,
        p: u16,
        mut after: u64,
    ) -> Result<Option<(u64, u64)>, ()> {
        let mut read = 0;
        loop {
            let starting = self.starting.lock().await;
            let polled = match store.poll(p, after, POLL_BATCH).await {
                Ok(Some(polled)) => polled,
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::debug!(error = %e, partition = p, "reading a partition's jobs failed");
                    return Err(());
                }
            };
            let n = polled.jobs.len();
            read += u64::try_from(n).unwrap_or(u64::MAX);
            for rec in polled.jobs {
                after = after.max(rec.seq);
                self.resume(rec).await;
            }
            drop(starting);
            for seq in polled.cancels {
                if let Err(e) = self.cancel_here(seq).await {
                    tracing::warn!(error = %e, "cancelling a job asked by another replica failed");
                }
            }
            if n < POLL_BATCH {
                return Ok(Some((after, read)));
            }
        }
    }

    /// Cancels the jobs this process runs that `which` names (another replica runs them now,
    /// or will): queued ones leave their queues; sends in flight finish, and their results
    /// are not written.
    /// Newest first: a chat's job that cannot be cancelled any more (being sent) has every
    /// earlier one of the chat sent or being sent, so the ones cancelled, run again by their
    /// next owner in store order, still go out after it.
    async fn drop_running(&self, which: impl Fn(u64) -> bool) {
        let mut running: Vec<_> = self
            .running
            .lock()
            .iter()
            .filter(|(seq, _)| which(**seq))
            .map(|(seq, job)| (*seq, job.clone()))
            .collect();
        running.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for (_, (chat, uuid)) in running {
            self.scheduler.cancel_here(chat, uuid).await;
        }
    }

    /// The process is stopping and the scheduler has drained: stop starting jobs, and wait
    /// (at most `wait`) for the running ones to record how they ended. In cluster mode this
    /// replica has left its partitions already: their next owners take the jobs left queued.
    pub async fn stop(&self, wait: Duration) {
        self.stopping.send_replace(true);
        // The background work has ended (no poll starts a job after this).
        drop(self.alive.lock().await);
        // Cluster mode: the jobs not sent yet leave their queues and stay queued in the store
        // for their partitions' next owners, rather than this one draining its backlog while
        // stopping; only sends in flight are waited for.
        if self.store.shared().is_some() {
            self.drop_running(|_| true).await;
        }
        let idle = async {
            loop {
                let notified = self.idle.notified();
                if self.running.lock().is_empty() {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(wait, idle).await.is_err() {
            tracing::warn!(
                jobs = self.running.lock().len(),
                "jobs still running at shutdown"
            );
        }
    }
}

/// Pause after `failures` failed rounds in a row: 250 ms, doubling, at most [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    (Duration::from_millis(250) * (1 << exp)).min(MAX_BACKOFF)
}
