//! Async reply jobs (DESIGN §5, §9): `SubmitReply` stores a job before it answers, a task per
//! job runs it through the same scheduler as `Reply` (quotas, per-chat order, caller shares)
//! and records how it ended; after a restart the jobs not final are run again in the order
//! they were accepted, with their uuids, so Feishu dedupes a send whose answer was lost.

mod legacy;
pub mod record;
pub mod redis;
mod redis_batch;
mod redis_scripts;
mod runner;
pub mod seam;
pub mod spec;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast, watch};

use crate::scheduler::GatewayError;
use crate::scheduler::{Delivered, JobSpec, Scheduler};
pub use record::{
    JobRecord, SendTo, State, StoredError, StoredReply, job_id, now_ms, parse_job_id,
};
pub use redis::{RedisJobStore, RedisJobsConfig, job_seq, split_seq};
pub use seam::{JobStore as Store, Limits, OnCommit, Owner, Ownership, Polled, Shared, Stored};
pub use spec::Specs;
pub use store::{JobStore, StoreError};

/// Default and largest ttl of a job: Feishu dedupes a uuid for an hour, so a job must never be
/// sent later than ~55 min after it was first tried.
pub const MAX_TTL: Duration = Duration::from_secs(3000);

/// Finished jobs stay readable this long.
pub const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600 + 3600);

/// How long after it was stored a job whose caller (or credential) this replica does not know
/// waits for a reload that names it before it fails `CALLER_REMOVED`: replicas learn a new
/// configuration minutes apart (Kubernetes refreshes a mounted ConfigMap about once a minute,
/// plus its cache), and a caller added on one may submit a job another runs.
pub const UNKNOWN_CALLER_GRACE: Duration = Duration::from_secs(180);

/// How a job's end is written into its record: in the API's own terms (the encoded answer,
/// the error's status), so GetReply shows what Reply would have returned. The api layer
/// provides it (`grpc::JobAnswers`): nothing here knows gRPC.
pub trait Answers: Send + Sync {
    /// The stored answer of a delivered reply.
    fn delivered(&self, d: Delivered) -> Vec<u8>;
    /// A failed job's stored status.
    fn failed(&self, e: &GatewayError) -> StoredError;
}

/// The jobs of this process: the store and the tasks running them.
pub struct Jobs {
    /// Where they are kept (`app.rs` picks it: [`JobStore`] or [`RedisJobStore`]).
    store: Arc<dyn Store>,
    /// Jobs the store may hold, and open jobs per caller (see [`Limits`]).
    limits: Limits,
    metrics: Arc<crate::metrics::Metrics>,
    scheduler: Scheduler,
    answers: Arc<dyn Answers>,
    /// Replaced by a live reload ([`Jobs::reconfigure`]).
    specs: parking_lot::RwLock<Specs>,
    updates: broadcast::Sender<JobRecord>,
    /// Jobs this process runs: seq → (chat, uuid), until their final state is recorded.
    running: Mutex<HashMap<u64, (Arc<str>, String)>>,
    /// Jobs of ours waiting for a reload that names their caller ([`UNKNOWN_CALLER_GRACE`]).
    deferred: Mutex<std::collections::HashSet<u64>>,
    /// Told when `running` becomes empty.
    idle: Notify,
    /// Held while jobs are started or cancelled, so that a cancel never falls between reading
    /// a job and handing it to the scheduler.
    starting: tokio::sync::Mutex<()>,
    /// A new job of ours was stored (cluster mode: poll now).
    poke: Notify,
    /// Set when the process stops: no job starts any more.
    stopping: watch::Sender<bool>,
    /// Held by [`Jobs::run`] while it runs.
    alive: tokio::sync::Mutex<()>,
    /// The runtime the job tasks run on (a job starts on the store's writer thread).
    runtime: tokio::runtime::Handle,
}

impl Jobs {
    /// Must be called on the runtime the jobs will run on.
    pub fn new(
        store: Arc<dyn Store>,
        limits: Limits,
        scheduler: Scheduler,
        specs: Specs,
        metrics: Arc<crate::metrics::Metrics>,
        answers: Arc<dyn Answers>,
    ) -> Arc<Self> {
        let (updates, _) = broadcast::channel(4096);
        Arc::new(Self {
            store,
            limits,
            metrics,
            scheduler,
            answers,
            specs: parking_lot::RwLock::new(specs),
            updates,
            running: Mutex::new(HashMap::new()),
            deferred: Mutex::new(Default::default()),
            idle: Notify::new(),
            starting: tokio::sync::Mutex::new(()),
            poke: Notify::new(),
            stopping: watch::Sender::new(false),
            alive: tokio::sync::Mutex::new(()),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Stores `rec` (durably) unless the same caller, app and uuid made a job already, and
    /// starts it. Returns the stored job and whether it was a duplicate. Jobs reach the
    /// scheduler in the order the store accepted them (per-chat order).
    pub async fn submit(
        self: &Arc<Self>,
        rec: JobRecord,
        spec: JobSpec,
    ) -> Result<(JobRecord, bool), GatewayError> {
        let full = |stored: u64| GatewayError::QueueFull {
            scope: "job_store",
            queued: usize::try_from(stored).unwrap_or(usize::MAX),
            retry_after: Duration::from_secs(60),
        };
        let key = rec.idempotency_key();
        let jobs = self.clone();
        // A store only this process uses starts the job at once, in store order; a shared
        // store's jobs are picked up by their owner's poll.
        let start: OnCommit = Box::new(move |stored: &JobRecord| {
            jobs.start(stored.clone(), spec);
        });
        let stored = self.store.submit(rec, key, self.limits, start).await;
        if let Some(n) = self.store.count() {
            self.metrics.set_jobs_stored(n);
        }
        match stored.map_err(|e| GatewayError::JobStore(e.0))? {
            Stored::New { rec, runs_here } => {
                if runs_here && self.store.shared().is_some() {
                    self.poke.notify_one();
                }
                Ok((rec, false))
            }
            Stored::Duplicate(known) => Ok((known, true)),
            Stored::Full(stored) => Err(full(stored)),
            // This caller's share of the store is taken; the others still have theirs.
            Stored::CallerFull(open) => Err(GatewayError::QueueFull {
                scope: "caller_jobs",
                queued: usize::try_from(open).unwrap_or(usize::MAX),
                retry_after: Duration::from_secs(60),
            }),
        }
    }

    /// A live reload: stored jobs are rebuilt against these apps and callers from now on, and
    /// the jobs waiting for their caller to be known are decided again. (Queued jobs of a
    /// caller the reload removed have been failed by the scheduler already.)
    pub async fn reconfigure(self: &Arc<Self>, specs: Specs) {
        *self.specs.write() = specs;
        let waiting: Vec<u64> = self.deferred.lock().iter().copied().collect();
        for seq in waiting {
            self.decide_again(seq, false).await;
        }
    }

    /// Job `seq`, if stored.
    pub async fn get(&self, seq: u64) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.store.get(seq).await?.map(|(rec, _)| rec))
    }

    /// Hands a stored job to the scheduler now (its place in line) and follows it to its end
    /// in a task of its own.
    pub fn start(self: &Arc<Self>, mut rec: JobRecord, mut spec: JobSpec) {
        let (on_send, sending) = tokio::sync::oneshot::channel();
        spec.on_send = Some(on_send);
        // The job outlives the submit call: its waits and attempts get a span of their own.
        spec.span = spec::job_span(&rec);
        {
            let mut running = self.running.lock();
            running.insert(rec.seq, (spec.chat_id.clone(), rec.reply.uuid.clone()));
            self.metrics.set_jobs_running(running.len());
        }
        // In cluster mode a job runs where its partition is owned, this replica: it is never
        // forwarded, and leaves when the partition does (the next owner reads it).
        let mut result = if self.store.shared().is_some() {
            self.scheduler.submit_here(spec)
        } else {
            self.scheduler.submit(spec)
        };
        let jobs = self.clone();
        self.runtime.spawn(async move {
            let seq = rec.seq;
            let uuid = rec.reply.uuid.clone();
            let result = tokio::select! {
                biased;
                Ok(()) = sending => {
                    if rec.state == State::Queued {
                        rec.state = State::Sending;
                        rec.updated_ms = now_ms();
                        jobs.record(rec.clone()).await;
                    }
                    (&mut result).await
                }
                r = &mut result => r,
            };
            let result = result.unwrap_or(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
            jobs.finish(rec, result).await;
            jobs.forget(seq);
        });
    }

    /// `seq` no longer runs here.
    fn forget(&self, seq: u64) {
        let mut running = self.running.lock();
        running.remove(&seq);
        self.metrics.set_jobs_running(running.len());
        if running.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// Starts `rec` unless it runs here already or is final; a job that cannot run any more
    /// (its app is gone, its caller revoked, its ttl over) fails. A job stored after this
    /// configuration was loaded, by a caller it does not know, waits for a reload that names
    /// it, at most until [`UNKNOWN_CALLER_GRACE`] after it was stored (`last_chance`: that
    /// time has come).
    async fn resume(self: &Arc<Self>, rec: JobRecord) {
        self.resume_as(rec, false).await
    }

    async fn resume_as(self: &Arc<Self>, mut rec: JobRecord, last_chance: bool) {
        let seq = rec.seq;
        if rec.state.is_final()
            || self.running.lock().contains_key(&seq)
            || self.deferred.lock().contains(&seq)
        {
            return;
        }
        let (spec, knows) = {
            let specs = self.specs.read();
            (specs.of(&rec), specs.knows_of(&rec))
        };
        match spec {
            Ok(spec) => self.start(rec, spec),
            Err(GatewayError::CallerRemoved { .. }) if !knows && !last_chance => {
                {
                    let mut deferred = self.deferred.lock();
                    deferred.insert(seq);
                    self.metrics.set_jobs_awaiting_caller(deferred.len());
                }
                tracing::info!(job = %rec.job_id(), caller = %rec.caller, "a stored job's caller or credential is not known here yet: waiting for a reload that names it");
                let ms = rec.created_ms
                    + i64::try_from(UNKNOWN_CALLER_GRACE.as_millis()).unwrap_or(i64::MAX)
                    - now_ms();
                let wait = Duration::from_millis(ms.max(0).unsigned_abs());
                let jobs = self.clone();
                self.runtime.spawn(async move {
                    tokio::time::sleep(wait).await;
                    jobs.decide_again(seq, true).await;
                });
            }
            Err(e) => {
                self.fail(&mut rec, &e);
                self.record(rec).await;
            }
        }
    }

    /// Decides again about deferred job `seq`, as stored now (a cancel, or another replica
    /// taking it over, may have come since).
    fn decide_again(self: &Arc<Self>, seq: u64, last_chance: bool) -> BoxFuture<'static, ()> {
        let jobs = self.clone();
        Box::pin(async move {
            let _starting = jobs.starting.lock().await;
            {
                let mut deferred = jobs.deferred.lock();
                let waiting = deferred.remove(&seq);
                jobs.metrics.set_jobs_awaiting_caller(deferred.len());
                if !waiting || *jobs.stopping.borrow() {
                    return;
                }
            }
            let mut delay = Duration::from_millis(250);
            loop {
                match jobs.store.get(seq).await {
                    Ok(Some((rec, Owner::Here))) => return jobs.resume_as(rec, last_chance).await,
                    Ok(_) => return,
                    // Still ours in the store: a restart or takeover decides it if this never does.
                    Err(e) if delay >= Duration::from_secs(8) => {
                        tracing::error!(error = %e, "could not read a job waiting for its caller to be known; it is decided after a restart or takeover");
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        })
    }

    async fn finish(&self, mut rec: JobRecord, result: crate::scheduler::JobResult) {
        rec.updated_ms = now_ms();
        match result {
            Ok(d) => {
                rec.state = State::Delivered;
                rec.attempts = d.attempts;
                rec.result = Some(self.answers.delivered(d));
            }
            // CancelReply recorded it.
            Err(GatewayError::Cancelled) => return,
            Err(GatewayError::ShuttingDown { .. }) => {
                // Not a verdict on the job: it stays queued in the store and runs again after
                // the restart.
                return;
            }
            Err(e) => self.fail(&mut rec, &e),
        }
        self.record(rec).await;
    }

    /// Marks `rec` failed with `e`'s status.
    pub fn fail(&self, rec: &mut JobRecord, e: &GatewayError) {
        rec.state = State::Failed;
        rec.updated_ms = now_ms();
        if let GatewayError::Upstream { attempts, .. }
        | GatewayError::DeadlineBeforeSend { attempts, .. }
        | GatewayError::ShuttingDown { attempts, .. }
        | GatewayError::Internal { attempts, .. } = e
        {
            rec.attempts = *attempts;
        }
        rec.error = Some(self.answers.failed(e));
    }

    /// Writes a state change and tells watchers. A write that fails is retried for about a
    /// minute (a Redis failover), then logged: the job then runs again after a restart or
    /// takeover, with its uuid (Feishu posts it once). In cluster mode nothing is written when
    /// another replica has taken the job over; false then.
    pub async fn record(&self, rec: JobRecord) -> bool {
        let mut delay = Duration::from_millis(50);
        let mut waited = Duration::ZERO;
        loop {
            let written = self.store.update(rec.clone()).await;
            match written {
                Ok(true) => break,
                Ok(false) => {
                    tracing::info!(job = %rec.job_id(), "not recording the job's state: another replica has taken it over");
                    return false;
                }
                Err(e) if waited >= Duration::from_secs(60) => {
                    tracing::error!(job = %rec.job_id(), error = %e, "could not record the job's state");
                    return false;
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    waited += delay;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        let _ = self.updates.send(rec);
        true
    }

    /// Cancels job `seq` if it is still queued: the cancelled record; None when it is being
    /// sent or is final (or unknown). In cluster mode a job run by another replica is asked
    /// of that replica, which answers through the store within `wait`.
    pub async fn cancel(
        self: &Arc<Self>,
        seq: u64,
        wait: Duration,
    ) -> Result<Option<JobRecord>, GatewayError> {
        let store_err = |e: StoreError| GatewayError::JobStore(e.0);
        let Some(shared) = self.store.shared() else {
            return self.cancel_here(seq).await.map_err(store_err);
        };
        let Some((rec, owner)) = self.store.get(seq).await.map_err(store_err)? else {
            return Ok(None);
        };
        match owner {
            _ if rec.state != State::Queued => return Ok(None),
            Owner::Nobody => return Ok(None),
            Owner::Here => {
                return self.cancel_here(seq).await.map_err(store_err);
            }
            Owner::Elsewhere => {}
        }
        if !shared.ask_cancel(seq).await.map_err(store_err)? {
            return Ok(None);
        }
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            match self.store.get(seq).await.map_err(store_err)? {
                Some((rec, _)) if rec.state == State::Cancelled => return Ok(Some(rec)),
                Some((rec, _)) if rec.state != State::Queued => return Ok(None),
                None => return Ok(None),
                Some(_) if tokio::time::Instant::now() >= until => {
                    return Err(GatewayError::JobStore(
                        "the replica running the job did not answer the cancel in time; ask again"
                            .into(),
                    ));
                }
                Some(_) => {}
            }
        }
    }

    /// Cancels job `seq` run (or about to be run) by this process, if still queued.
    async fn cancel_here(self: &Arc<Self>, seq: u64) -> Result<Option<JobRecord>, StoreError> {
        let _starting = self.starting.lock().await;
        let Some(mut rec) = self.get(seq).await? else {
            return Ok(None);
        };
        if rec.state != State::Queued {
            return Ok(None);
        }
        let queued = self.running.lock().get(&seq).cloned();
        if let Some((chat, uuid)) = queued
            && !self.scheduler.cancel_here(chat, uuid).await
        {
            return Ok(None);
        }
        rec.state = State::Cancelled;
        rec.updated_ms = now_ms();
        Ok(self.record(rec.clone()).await.then_some(rec))
    }

    /// State changes of every job, from now on.
    pub fn updates(&self) -> broadcast::Receiver<JobRecord> {
        self.updates.subscribe()
    }

    /// Runs again the jobs a previous process left unfinished, in the order they were
    /// stored (single node; an app gone or a ttl over fails the job). First, the
    /// sends of the last `lookback` (the longest quota window and a send's hold) are counted
    /// in the windows again: the previous process's sends still count at Feishu. A job that
    /// was being sent counts until `hold` after it started (its request may still arrive).
    pub async fn recover(
        self: &Arc<Self>,
        lookback: Duration,
        hold: Duration,
    ) -> Result<usize, StoreError> {
        let now = now_ms();
        let since = now - i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX);
        let Some(scan) = self.store.recovery_scan(since) else {
            // A shared store: the quota windows are shared too, and jobs move with their partitions.
            return Ok(0);
        };
        let (jobs, recent) = scan?;
        let instant_of = |ms: i64| {
            let ago = Duration::from_millis((now - ms).max(0).unsigned_abs());
            let t = tokio::time::Instant::now();
            t.checked_sub(ago).unwrap_or(t)
        };
        let mut past = Vec::new();
        for rec in jobs
            .iter()
            .filter(|r| r.state == State::Sending)
            .chain(&recent)
        {
            let Some(app_id) = self.specs.read().app_id(&rec.reply.app) else {
                continue;
            };
            let (at, times) = if rec.state == State::Sending {
                (instant_of(rec.updated_ms) + hold, 1)
            } else {
                (instant_of(rec.updated_ms), rec.attempts.min(6))
            };
            for _ in 0..times {
                past.push(crate::scheduler::PastSend {
                    app_id: app_id.clone(),
                    api: rec.reply.api(),
                    chat_id: rec.reply.chat_id.as_str().into(),
                    user_id: rec.reply.user_id.as_deref().map(Into::into),
                    target: rec.reply.target(),
                    arrived_by: at,
                });
            }
        }
        self.scheduler.seed(past);
        let n = jobs.len();
        for rec in jobs {
            self.resume(rec).await;
        }
        if n > 0 {
            tracing::info!(jobs = n, "resumed the jobs left unfinished");
        }
        Ok(n)
    }
}
