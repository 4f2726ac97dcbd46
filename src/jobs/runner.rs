//! The job store's background work: in cluster mode the lease, takeovers, picking up the jobs
//! this replica owns and the cancels asked of it; in both modes expiry and the size metrics;
//! and the hand-off when the process stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Jobs, KEEP_FINISHED, Leases};

/// How often a replica looks for new jobs of its own (a submit to this replica looks at once).
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Jobs read per poll.
const POLL_BATCH: usize = 512;
/// How often a replica looks for replicas whose lease ended.
const CLAIM_EVERY: Duration = Duration::from_millis(500);
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
            match self.store.leases() {
                None => std::future::pending::<()>().await,
                Some(leases) => self.run_cluster(leases).await,
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

    /// Cluster mode: hold a lease, take over the jobs of replicas whose lease ended, and run
    /// the jobs this replica owns, in order.
    async fn run_cluster(self: &Arc<Self>, store: &dyn Leases) {
        let lease = store.lease();
        let renew_every = lease / 4;
        let mut registered = false;
        let mut next_renew = Instant::now();
        let mut next_claim = Instant::now();
        let mut after = 0u64;
        // Consecutive failed rounds: while Redis is unreachable, ask it less and less often
        // (every connection attempt costs, and the quota gate has its own heartbeat).
        let mut failures = 0u32;
        loop {
            let now = Instant::now();
            let mut failed = false;
            if now >= next_renew {
                match store.renew(!registered).await {
                    Ok(true) => {
                        registered = true;
                        next_renew = now + renew_every;
                    }
                    Ok(false) => {
                        tracing::warn!(
                            "this replica's job lease ended and its jobs were taken over; dropping them"
                        );
                        self.metrics.job_lease_lost();
                        self.drop_running().await;
                        registered = false;
                        next_renew = now;
                        // Whatever this replica is given from now on is new to it.
                        after = 0;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the job lease failed");
                        failed = true;
                        next_renew = now + backoff(failures + 1);
                    }
                }
            }
            if registered && !failed {
                if now >= next_claim {
                    next_claim = now + CLAIM_EVERY;
                    if self.claim(store).await {
                        // Jobs numbered before `after` are ours now (or may be, when the
                        // answer was lost): look through every job we own; those running here
                        // are skipped.
                        after = 0;
                    }
                }
                match self.poll(store, after).await {
                    Ok(last) => after = last,
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

    /// Takes over the jobs of replicas whose lease ended; true when it took some, or may have
    /// (the call failed: Redis may have done it without us hearing the answer).
    async fn claim(&self, store: &dyn Leases) -> bool {
        match store.claim().await {
            Ok(0) => false,
            Ok(jobs) => {
                self.metrics.jobs_taken_over(jobs);
                tracing::info!(jobs, "took over the jobs of a replica whose lease ended");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "looking for jobs to take over failed");
                true
            }
        }
    }

    /// Starts this replica's new jobs (numbered after `after`) and cancels what was asked;
    /// returns the last job number seen (Err: Redis failed; the jobs read before it are
    /// started, and skipped when read again).
    async fn poll(self: &Arc<Self>, store: &dyn Leases, mut after: u64) -> Result<u64, ()> {
        loop {
            let starting = self.starting.lock().await;
            let polled = match store.poll(after, POLL_BATCH).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "polling for jobs failed");
                    return Err(());
                }
            };
            let n = polled.jobs.len();
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
                return Ok(after);
            }
        }
    }

    /// Cancels every job this process runs (another replica owns them now, or will): queued
    /// ones leave their queues; sends in flight finish, and their results are not written.
    /// Newest first: a chat's job that cannot be cancelled any more (being sent) has every
    /// earlier one of the chat sent or being sent, so the ones cancelled, run again by their
    /// next owner in store order, still go out after it.
    async fn drop_running(&self) {
        let mut running: Vec<_> = self
            .running
            .lock()
            .iter()
            .map(|(seq, job)| (*seq, job.clone()))
            .collect();
        running.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for (_, (chat, uuid)) in running {
            self.scheduler.cancel(chat, uuid).await;
        }
    }

    /// The process is stopping and the scheduler has drained: stop starting jobs, wait (at
    /// most `wait`) for the running ones to record how they ended, then, in cluster mode, end
    /// the lease so that another replica takes the jobs left queued at once.
    pub async fn stop(&self, wait: Duration) {
        self.stopping.send_replace(true);
        // The background work has ended (no lease renewal can follow the hand-off).
        drop(self.alive.lock().await);
        // Cluster mode: the jobs not sent yet leave their queues (here, or at the replica
        // owning their chat) and stay queued in the store for the replica that takes them
        // over, rather than this one waiting for a backlog elsewhere to drain; only sends in
        // flight are waited for.
        if self.store.leases().is_some() {
            self.drop_running().await;
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
        if let Some(store) = self.store.leases() {
            match store.hand_off().await {
                Ok(()) => tracing::info!("handed this replica's queued jobs to the others"),
                Err(e) => {
                    tracing::warn!(error = %e, "handing the jobs off failed; they are taken over when the lease ends")
                }
            }
        }
    }
}

/// Pause after `failures` failed rounds in a row: 250 ms, doubling, at most [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    (Duration::from_millis(250) * (1 << exp)).min(MAX_BACKOFF)
}
