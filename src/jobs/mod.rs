//! Async reply jobs (DESIGN §5, §9): `SubmitReply` stores a job before it answers, a task per
//! job runs it through the same scheduler as `Reply` (quotas, per-chat order, caller shares)
//! and records how it ended; after a restart the jobs not final are run again in the order
//! they were accepted, with their uuids, so Feishu dedupes a send whose answer was lost.

pub mod record;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::broadcast;

use crate::error::GatewayError;
use crate::scheduler::{JobSpec, Scheduler};
pub use record::{JobRecord, State, StoredError, StoredReply, job_id, now_ms, parse_job_id};
pub use store::{JobStore, StoreError};

/// Default and largest ttl of a job: Feishu dedupes a uuid for an hour, so a job must never be
/// sent later than ~55 min after it was first tried.
pub const MAX_TTL: Duration = Duration::from_secs(3000);

/// Finished jobs stay readable this long.
pub const KEEP_FINISHED: Duration = Duration::from_secs(24 * 3600 + 3600);

/// The jobs of this process: the store and the tasks running them.
pub struct Jobs {
    store: JobStore,
    /// Jobs the store may hold (all states); beyond it SubmitReply is RESOURCE_EXHAUSTED.
    max_jobs: u64,
    metrics: Arc<crate::metrics::Metrics>,
    scheduler: Scheduler,
    updates: broadcast::Sender<JobRecord>,
    /// The runtime the job tasks run on (a job starts on the store's writer thread).
    runtime: tokio::runtime::Handle,
}

impl Jobs {
    /// Must be called on the runtime the jobs will run on.
    pub fn new(
        store: JobStore,
        max_jobs: u64,
        scheduler: Scheduler,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let (updates, _) = broadcast::channel(4096);
        Arc::new(Self {
            store,
            max_jobs,
            metrics,
            scheduler,
            updates,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// Stores `rec` (durably) unless the same caller, app and uuid made a job already, and
    /// starts it. Returns the stored job and whether it was a duplicate. Jobs reach the
    /// scheduler in the order the store accepted them (per-chat order).
    pub async fn submit(
        self: &Arc<Self>,
        rec: JobRecord,
        spec: JobSpec,
    ) -> Result<(JobRecord, bool), GatewayError> {
        let stored = self.store.count();
        if stored >= self.max_jobs {
            return Err(GatewayError::QueueFull {
                scope: "job_store",
                queued: usize::try_from(stored).unwrap_or(usize::MAX),
                retry_after: Duration::from_secs(60),
            });
        }
        let key = rec.idempotency_key();
        let jobs = self.clone();
        let then: store::OnCommit = Box::new(move |stored: &JobRecord| {
            jobs.start(stored.clone(), spec);
        });
        let r = self.store.insert(rec, key, Some(then)).await;
        self.refresh_metrics(false);
        r.map_err(|e| GatewayError::JobStore(e.0))
    }

    /// Exports the store's size (`file`: also its bytes on disk, a syscall).
    pub fn refresh_metrics(&self, file: bool) {
        self.metrics.set_jobs_stored(self.store.count());
        if file {
            self.metrics.set_job_store_bytes(self.store.file_bytes());
        }
    }

    /// Hands a stored job to the scheduler now (its place in line) and follows it to its end
    /// in a task of its own.
    pub fn start(self: &Arc<Self>, mut rec: JobRecord, mut spec: JobSpec) {
        let (on_send, sending) = tokio::sync::oneshot::channel();
        spec.on_send = Some(on_send);
        let mut result = self.scheduler.submit(spec);
        let jobs = self.clone();
        self.runtime.spawn(async move {
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
        });
    }

    async fn finish(&self, mut rec: JobRecord, result: crate::scheduler::JobResult) {
        rec.updated_ms = now_ms();
        match result {
            Ok(d) => {
                rec.state = State::Delivered;
                rec.attempts = d.attempts;
                rec.result = Some(crate::grpc::to_response(d).encode_to_vec());
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
        let status = e.to_status();
        rec.state = State::Failed;
        rec.updated_ms = now_ms();
        if let GatewayError::Upstream { attempts, .. }
        | GatewayError::DeadlineBeforeSend { attempts, .. }
        | GatewayError::ShuttingDown { attempts, .. }
        | GatewayError::Internal { attempts, .. } = e
        {
            rec.attempts = *attempts;
        }
        rec.error = Some(StoredError {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: status.details().to_vec(),
        });
    }

    /// Writes a state change and tells watchers. A write that keeps failing is logged: the
    /// job then runs again after a restart, with its uuid (Feishu posts it once).
    pub async fn record(&self, rec: JobRecord) {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=5 {
            match self.store.update(rec.clone()).await {
                Ok(()) => break,
                Err(e) if attempt == 5 => {
                    tracing::error!(job = %rec.job_id(), error = %e, "could not record the job's state");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        let _ = self.updates.send(rec);
    }

    /// Cancels `rec` if the scheduler still holds it unsent; the cancelled record, or None
    /// when it is already being sent (or finished).
    pub async fn cancel(&self, mut rec: JobRecord) -> Option<JobRecord> {
        let chat: Arc<str> = rec.reply.chat_id.as_str().into();
        if !self.scheduler.cancel(chat, rec.reply.uuid.clone()).await {
            return None;
        }
        rec.state = State::Cancelled;
        rec.updated_ms = now_ms();
        self.record(rec.clone()).await;
        Some(rec)
    }

    /// State changes of every job, from now on.
    pub fn updates(&self) -> broadcast::Receiver<JobRecord> {
        self.updates.subscribe()
    }

    /// Runs again the jobs a previous process left unfinished, in the order they were
    /// stored; `spec_of` rebuilds each one's scheduler job (an error fails it). First, the
    /// sends of the last `lookback` (the longest quota window and a send's hold) are counted
    /// in the windows again: the previous process's sends still count at Feishu. A job that
    /// was being sent counts until `hold` after it started (its request may still arrive).
    pub async fn recover(
        self: &Arc<Self>,
        lookback: Duration,
        hold: Duration,
        spec_of: impl Fn(&JobRecord) -> Result<JobSpec, GatewayError>,
        app_id_of: impl Fn(&str) -> Option<Arc<str>>,
    ) -> Result<usize, StoreError> {
        let now = now_ms();
        let since = now - i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX);
        let (jobs, recent) = self.store.recovery_scan(since)?;
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
            let Some(app_id) = app_id_of(&rec.reply.app) else {
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
                    chat_id: rec.reply.chat_id.as_str().into(),
                    user_id: rec.reply.user_id.as_deref().map(Into::into),
                    arrived_by: at,
                });
            }
        }
        self.scheduler.seed(past);
        let n = jobs.len();
        for mut rec in jobs {
            match spec_of(&rec) {
                Ok(spec) => self.start(rec, spec),
                Err(e) => {
                    self.fail(&mut rec, &e);
                    self.record(rec).await;
                }
            }
        }
        if n > 0 {
            tracing::info!(jobs = n, "resumed the jobs left unfinished");
        }
        Ok(n)
    }
}
