//! The scheduler: per-chat FIFO queues, fair dispatch among ready chats, the rolling-window
//! quotas, deadlines, retries that keep their place in line, and the shutdown drain.
//!
//! One dispatcher task owns all queue and quota state (no locks on the hot path); gRPC handlers
//! talk to it through a channel and wait on a oneshot per job. Sends run in their own tasks and
//! report back. Time is tokio's clock, so tests run it paused (virtual time).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{QueueConfig, QuotaConfig, RetryConfig};
use crate::error::GatewayError;
use crate::feishu::{AppIndex, RetryReason, SendRequest, SentMessage, Upstream, UpstreamError};
use crate::metrics::Metrics;
use crate::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable, micros};

/// Quota ids in the [`QuotaTable`]: chat, user, then the app quotas in config order.
const CHAT_QUOTA: usize = 0;
const USER_QUOTA: usize = 1;
const FIRST_APP_QUOTA: usize = 2;

/// How often idle quota keys are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A reply ready to be queued: validated, its app and chat known.
#[derive(Debug)]
pub struct JobSpec {
    pub app: AppIndex,
    /// Configured app name (logs, metrics).
    pub app_name: Arc<str>,
    /// Feishu app_id (the app quota key: several names may share one app_id).
    pub app_id: Arc<str>,
    pub chat_id: Arc<str>,
    pub user_id: Option<Arc<str>>,
    pub request: SendRequest,
    /// The caller's deadline, if it set one.
    pub deadline: Option<Instant>,
}

/// A reply Feishu accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub message: SentMessage,
    pub uuid: String,
    pub attempts: u32,
    /// Time from acceptance to the first send.
    pub queued: Duration,
}

pub type JobResult = Result<Delivered, GatewayError>;

struct Job {
    id: u64,
    spec: JobSpec,
    keys: Vec<QuotaKey>,
    /// Not sent at or after this instant (deadline minus the send budget).
    send_by: Option<Instant>,
    /// Backoff: not sent before this instant.
    not_before: Instant,
    accepted_at: Instant,
    first_send_at: Option<Instant>,
    attempts: u32,
    done: oneshot::Sender<JobResult>,
}

impl Job {
    fn finish(self, result: JobResult) {
        // The caller may have gone (cancelled); nothing to tell then.
        let _ = self.done.send(result);
    }

    fn uuid(&self) -> String {
        self.spec.request.uuid.clone()
    }
}

#[derive(Default)]
struct ChatQueue {
    jobs: VecDeque<Job>,
    /// The head job is being sent (the rest wait: per-chat order).
    busy: bool,
    /// Ticket of the latest schedule entry (runnable or timer); stale entries are ignored.
    ticket: u64,
    /// In the runnable list or the timer heap with `ticket`.
    scheduled: bool,
}

enum Command {
    Submit(Job),
    SendDone {
        job: Job,
        result: Result<SentMessage, UpstreamError>,
    },
    Shutdown {
        grace: Duration,
    },
}

/// Handle to the dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Command>,
    accepting: Arc<AtomicBool>,
    drained: watch::Receiver<bool>,
}

/// Knobs of the scheduler, taken from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub quotas: QuotaConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
}

// === impl Scheduler ===

impl Scheduler {
    /// Starts the dispatcher task on the current runtime.
    pub fn start(
        config: SchedulerConfig,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (drained_tx, drained) = watch::channel(false);
        let accepting = Arc::new(AtomicBool::new(true));
        let mut specs: Vec<QuotaSpec> = vec![config.quotas.chat, config.quotas.user];
        specs.extend(config.quotas.app.iter().copied());
        let dispatcher = Dispatcher {
            quotas: QuotaTable::new(specs, config.quotas.safety_margin),
            app_quota_count: config.quotas.app.len(),
            config,
            origin: Instant::now(),
            chats: HashMap::new(),
            runnable: VecDeque::new(),
            timers: BinaryHeap::new(),
            deadlines: BinaryHeap::new(),
            queued: 0,
            in_flight: 0,
            next_id: 0,
            next_ticket: 0,
            draining_until: None,
            upstream,
            metrics,
            tx: tx.downgrade(),
            drained: drained_tx,
        };
        tokio::spawn(dispatcher.run(rx));
        Self {
            tx,
            accepting,
            drained,
        }
    }

    /// Queues a job; the receiver yields its final result. Refusals (queue full, deadline
    /// unreachable, shutting down) arrive through the receiver too, at once.
    pub fn submit(&self, spec: JobSpec) -> oneshot::Receiver<JobResult> {
        let (done, rx) = oneshot::channel();
        let uuid = spec.request.uuid.clone();
        if !self.accepting.load(Ordering::Acquire) {
            let _ = done.send(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
            return rx;
        }
        let now = Instant::now();
        let job = Job {
            id: 0,
            keys: Vec::new(),
            send_by: None,
            not_before: now,
            accepted_at: now,
            first_send_at: None,
            attempts: 0,
            spec,
            done,
        };
        if let Err(mpsc::error::SendError(Command::Submit(job))) =
            self.tx.send(Command::Submit(job))
        {
            job.finish(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
        }
        rx
    }

    /// Submits and waits for the result.
    pub async fn reply(&self, spec: JobSpec) -> JobResult {
        let uuid = spec.request.uuid.clone();
        self.submit(spec)
            .await
            .unwrap_or(Err(GatewayError::ShuttingDown { attempts: 0, uuid }))
    }

    /// Stops accepting, keeps sending for `grace`, then fails what is left with UNAVAILABLE.
    /// Resolves when nothing is queued or in flight any more.
    pub async fn shutdown(&self, grace: Duration) {
        self.accepting.store(false, Ordering::Release);
        let _ = self.tx.send(Command::Shutdown { grace });
        let mut drained = self.drained.clone();
        let _ = drained.wait_for(|d| *d).await;
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}

// === impl Dispatcher ===

struct Dispatcher {
    config: SchedulerConfig,
    quotas: QuotaTable,
    app_quota_count: usize,
    origin: Instant,
    chats: HashMap<Arc<str>, ChatQueue>,
    /// Chats whose head may be sendable now, oldest first (fairness).
    runnable: VecDeque<(Arc<str>, u64)>,
    /// Chats waiting for quota or backoff: (ready at, ticket, chat).
    timers: BinaryHeap<Reverse<(Micros, u64, Arc<str>)>>,
    /// Queued jobs with a deadline: (send_by, job id, chat).
    deadlines: BinaryHeap<Reverse<(Micros, u64, Arc<str>)>>,
    queued: usize,
    in_flight: usize,
    next_id: u64,
    next_ticket: u64,
    draining_until: Option<Instant>,
    upstream: Arc<dyn Upstream>,
    metrics: Arc<Metrics>,
    tx: mpsc::WeakUnboundedSender<Command>,
    drained: watch::Sender<bool>,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        loop {
            let wake = self.next_wake().min(next_sweep);
            tokio::select! {
                biased;
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd);
                        // Take whatever else is waiting before dispatching (batching).
                        for _ in 0..256 {
                            match rx.try_recv() {
                                Ok(cmd) => self.handle(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone: fail what is queued; sends in flight settle
                    // their own callers (`finish_orphan`).
                    None => {
                        self.fail_all_queued();
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            if now >= next_sweep {
                let forgotten = self.quotas.forget_idle(self.micros(now));
                if forgotten > 0 && self.chats.is_empty() && self.chats.capacity() > 1024 {
                    self.chats.shrink_to_fit();
                }
                self.metrics.set_quota_keys(self.quotas.live_keys());
                next_sweep = now + SWEEP_EVERY;
            }
            self.expire_deadlines(now);
            if let Some(until) = self.draining_until
                && now >= until
            {
                self.fail_all_queued();
            }
            self.dispatch(now);
            self.metrics.set_queued(self.queued);
            if self.draining_until.is_some() && self.queued == 0 && self.in_flight == 0 {
                let _ = self.drained.send(true);
            }
        }
        let _ = self.drained.send(true);
    }

    fn micros(&self, t: Instant) -> Micros {
        micros(t.saturating_duration_since(self.origin))
    }

    fn instant(&self, m: Micros) -> Instant {
        self.origin + Duration::from_micros(m)
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let t = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let d = self.deadlines.peek().map(|Reverse((t, _, _))| *t);
        let m = [t, d].into_iter().flatten().min();
        let mut wake = m.map_or(far, |m| self.instant(m));
        if let Some(until) = self.draining_until {
            wake = wake.min(until);
        }
        if !self.runnable.is_empty() {
            wake = Instant::now();
        }
        wake
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(job) => self.admit(job),
            Command::SendDone { job, result } => self.send_done(job, result),
            Command::Shutdown { grace } => {
                let until = Instant::now() + grace;
                self.draining_until = Some(self.draining_until.map_or(until, |u| u.min(until)));
            }
        }
    }

    // --- admission ---

    fn admit(&mut self, mut job: Job) {
        if self.draining_until.is_some() {
            let uuid = job.uuid();
            return job.finish(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
        }
        let q = &self.config.queue;
        if self.queued >= q.max_total {
            let per_s = self.app_rate_per_sec().max(1.0);
            let retry_after =
                Duration::from_secs_f64((self.queued as f64 / per_s).clamp(1.0, 600.0));
            return job.finish(Err(GatewayError::QueueFull {
                scope: "gateway",
                queued: self.queued,
                retry_after,
            }));
        }
        let chat_id = job.spec.chat_id.clone();
        let (ahead, busy) = self
            .chats
            .get(&chat_id)
            .map_or((0, false), |c| (c.jobs.len(), c.busy));
        if ahead >= q.max_per_chat {
            let chat = self.config.quotas.chat;
            let windows = ahead as f64 / f64::from(chat.limit.get());
            let retry_after = chat.window.mul_f64(windows.clamp(1.0, 600.0));
            return job.finish(Err(GatewayError::QueueFull {
                scope: "chat",
                queued: ahead,
                retry_after,
            }));
        }
        job.keys = self.keys_of(&job.spec);
        let now = Instant::now();
        if let Some(deadline) = job.spec.deadline {
            let send_by = deadline.checked_sub(q.min_send_budget).unwrap_or(deadline);
            // Lower bound on the first send: the jobs ahead in this chat, every quota of the job.
            let position = (ahead + usize::from(busy)) as u64 + 1;
            let earliest = job
                .keys
                .iter()
                .map(|k| {
                    let nth = if k.quota == CHAT_QUOTA { position } else { 1 };
                    self.quotas.nth_ready_at(k, nth)
                })
                .max()
                .unwrap_or(0);
            let earliest = self.instant(earliest).max(now);
            if send_by <= now {
                let uuid = job.uuid();
                return job.finish(Err(GatewayError::DeadlineBeforeSend { attempts: 0, uuid }));
            }
            if earliest >= send_by {
                return job.finish(Err(GatewayError::DeadlineUnreachable {
                    earliest_in: earliest - now,
                    deadline_in: deadline.saturating_duration_since(now),
                }));
            }
            job.send_by = Some(send_by);
        }
        job.id = self.next_id;
        self.next_id += 1;
        if let Some(send_by) = job.send_by {
            let m = self.micros(send_by);
            self.deadlines.push(Reverse((m, job.id, chat_id.clone())));
        }
        self.queued += 1;
        let chat = self.chats.entry(chat_id.clone()).or_default();
        chat.jobs.push_back(job);
        if !chat.busy && !chat.scheduled {
            self.schedule_now(&chat_id);
        }
    }

    fn keys_of(&self, spec: &JobSpec) -> Vec<QuotaKey> {
        let mut keys = Vec::with_capacity(FIRST_APP_QUOTA + self.app_quota_count);
        keys.push(QuotaKey::new(CHAT_QUOTA, spec.chat_id.clone()));
        if let Some(u) = &spec.user_id {
            keys.push(QuotaKey::new(USER_QUOTA, u.clone()));
        }
        for i in 0..self.app_quota_count {
            keys.push(QuotaKey::new(FIRST_APP_QUOTA + i, spec.app_id.clone()));
        }
        keys
    }

    /// The tightest per-second rate of the app quotas (for retry estimates).
    fn app_rate_per_sec(&self) -> f64 {
        self.config
            .quotas
            .app
            .iter()
            .map(|q| f64::from(q.limit.get()) / q.window.as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    }

    // --- scheduling ---

    fn schedule_now(&mut self, chat_id: &Arc<str>) {
        let ticket = self.bump_ticket(chat_id);
        self.runnable.push_back((chat_id.clone(), ticket));
    }

    fn schedule_at(&mut self, chat_id: &Arc<str>, at: Micros) {
        let ticket = self.bump_ticket(chat_id);
        self.timers.push(Reverse((at, ticket, chat_id.clone())));
    }

    fn bump_ticket(&mut self, chat_id: &Arc<str>) -> u64 {
        self.next_ticket += 1;
        let chat = self.chats.get_mut(chat_id).expect("scheduled chat exists");
        chat.ticket = self.next_ticket;
        chat.scheduled = true;
        self.next_ticket
    }

    fn dispatch(&mut self, now: Instant) {
        let now_m = self.micros(now);
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now_m {
                break;
            }
            let Reverse((_, ticket, chat)) = self.timers.pop().expect("peeked");
            self.runnable.push_back((chat, ticket));
        }
        while let Some((chat_id, ticket)) = self.runnable.pop_front() {
            self.try_send_head(&chat_id, ticket, now, now_m);
        }
    }

    fn try_send_head(&mut self, chat_id: &Arc<str>, ticket: u64, now: Instant, now_m: Micros) {
        let Some(chat) = self.chats.get_mut(chat_id) else {
            return;
        };
        if chat.ticket != ticket || !chat.scheduled {
            return; // stale entry
        }
        chat.scheduled = false;
        if chat.busy {
            return;
        }
        // Drop heads whose caller is gone or whose time is up.
        while let Some(head) = chat.jobs.front() {
            if head.done.is_closed() {
                let job = chat.jobs.pop_front().expect("front");
                self.queued -= 1;
                self.metrics
                    .request(&job.spec.app_name, "cancelled", "none");
                continue;
            }
            if head.send_by.is_some_and(|s| s <= now) {
                let job = chat.jobs.pop_front().expect("front");
                self.queued -= 1;
                Self::fail_deadline(job);
                continue;
            }
            break;
        }
        let Some(head) = chat.jobs.front() else {
            self.chats.remove(chat_id);
            return;
        };
        let wait_until = if head.not_before > now {
            Err(micros(
                head.not_before.saturating_duration_since(self.origin),
            ))
        } else {
            self.quotas.try_acquire(&head.keys, now_m)
        };
        if let Err(at) = wait_until {
            return self.schedule_at(chat_id, at);
        }
        let mut job = chat.jobs.pop_front().expect("front");
        chat.busy = true;
        self.queued -= 1;
        self.in_flight += 1;
        job.attempts += 1;
        if job.first_send_at.is_none() {
            job.first_send_at = Some(now);
            self.metrics.queue_wait(now - job.accepted_at);
        }
        self.spawn_send(job);
    }

    fn spawn_send(&self, job: Job) {
        let upstream = self.upstream.clone();
        let metrics = self.metrics.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            metrics.in_flight(1);
            let result = upstream.reply(job.spec.app, &job.spec.request).await;
            metrics.in_flight(-1);
            match tx.upgrade() {
                Some(tx) => {
                    if let Err(mpsc::error::SendError(Command::SendDone { job, result })) =
                        tx.send(Command::SendDone { job, result })
                    {
                        finish_orphan(job, result);
                    }
                }
                None => finish_orphan(job, result),
            }
        });
    }

    fn send_done(&mut self, job: Job, result: Result<SentMessage, UpstreamError>) {
        self.in_flight -= 1;
        let chat_id = job.spec.chat_id.clone();
        let now = Instant::now();
        let outcome = match result {
            Ok(message) => {
                tracing::debug!(message_id = %job.spec.request.message_id, chat_id = %chat_id, uuid = %job.spec.request.uuid, log_id = %message.log_id, attempts = job.attempts, "reply delivered");
                let delivered = Delivered {
                    queued: job.first_send_at.unwrap_or(now) - job.accepted_at,
                    uuid: job.uuid(),
                    attempts: job.attempts,
                    message,
                };
                job.finish(Ok(delivered));
                None
            }
            Err(error) => match error.retry_reason() {
                Some(reason) => self.plan_retry(job, error, reason, now),
                None => {
                    tracing::info!(message_id = %job.spec.request.message_id, chat_id = %chat_id, uuid = %job.spec.request.uuid, log_id = %error.log_id(), %error, "reply failed");
                    let (attempts, uuid) = (job.attempts, job.uuid());
                    job.finish(Err(GatewayError::Upstream {
                        error,
                        attempts,
                        uuid,
                    }));
                    None
                }
            },
        };
        let Some(chat) = self.chats.get_mut(&chat_id) else {
            // The chat entry lives while its head is in flight.
            return;
        };
        chat.busy = false;
        if let Some(retry) = outcome {
            // The retried job keeps its place at the head of its chat.
            chat.jobs.push_front(retry);
            self.queued += 1;
        }
        if chat.jobs.is_empty() {
            self.chats.remove(&chat_id);
        } else {
            self.schedule_now(&chat_id);
        }
    }

    /// Decides whether a retryable failure is retried; returns the job to requeue.
    fn plan_retry(
        &mut self,
        mut job: Job,
        error: UpstreamError,
        reason: RetryReason,
        now: Instant,
    ) -> Option<Job> {
        self.metrics.retry(reason);
        let now_m = self.micros(now);
        if reason.is_rate_rejection() {
            // We kept our quotas and Feishu still said "too fast": someone else spends them.
            // Treat the keys as spent for a window (or Feishu's reset) so we back off as one.
            self.metrics.rate_rejection(&job.spec.app_name, reason);
            tracing::warn!(app = %job.spec.app_name, chat_id = %job.spec.chat_id, log_id = %error.log_id(), code = ?error.code(), "unexpected upstream rate rejection; cooling the quota down");
            let keys: Vec<QuotaKey> = job
                .keys
                .iter()
                .filter(|k| (reason == RetryReason::Frequency) == (k.quota >= FIRST_APP_QUOTA))
                .cloned()
                .collect();
            for k in &keys {
                let window = self.quotas.specs()[k.quota].window;
                let wait = error.retry_after().unwrap_or(window).max(window);
                self.quotas.block_until(k, now_m + micros(wait));
            }
        }
        let backoff = self.backoff(job.attempts, error.retry_after());
        let not_before = now + backoff;
        let out_of_time = job.send_by.is_some_and(|s| not_before >= s);
        if job.attempts >= self.config.retry.max_attempts
            || out_of_time
            || self.draining_until.is_some_and(|u| not_before >= u)
        {
            tracing::info!(message_id = %job.spec.request.message_id, chat_id = %job.spec.chat_id, uuid = %job.spec.request.uuid, attempts = job.attempts, %error, "retries exhausted");
            let (attempts, uuid) = (job.attempts, job.uuid());
            job.finish(Err(GatewayError::Upstream {
                error,
                attempts,
                uuid,
            }));
            return None;
        }
        tracing::debug!(message_id = %job.spec.request.message_id, uuid = %job.spec.request.uuid, attempt = job.attempts, ?backoff, reason = reason.as_str(), "retrying");
        job.not_before = not_before;
        Some(job)
    }

    /// Exponential backoff with full jitter; never shorter than what Feishu asked for.
    fn backoff(&self, attempts: u32, asked: Option<Duration>) -> Duration {
        let r = &self.config.retry;
        let exp = r
            .base_delay
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
            .min(r.max_delay);
        let jittered = Duration::from_micros(rand::rng().random_range(0..=micros(exp)));
        asked.map_or(jittered, |a| a.max(jittered))
    }

    // --- deadlines and shutdown ---

    fn expire_deadlines(&mut self, now: Instant) {
        let now_m = self.micros(now);
        while let Some(Reverse((at, _, _))) = self.deadlines.peek() {
            if *at > now_m {
                break;
            }
            let Reverse((_, id, chat_id)) = self.deadlines.pop().expect("peeked");
            let Some(chat) = self.chats.get_mut(&chat_id) else {
                continue;
            };
            // In flight jobs are not in `jobs`; they finish on their own.
            if let Some(pos) = chat.jobs.iter().position(|j| j.id == id) {
                let job = chat.jobs.remove(pos).expect("position is valid");
                self.queued -= 1;
                Self::fail_deadline(job);
                if chat.jobs.is_empty() && !chat.busy {
                    self.chats.remove(&chat_id);
                }
            }
        }
    }

    fn fail_deadline(job: Job) {
        tracing::info!(message_id = %job.spec.request.message_id, chat_id = %job.spec.chat_id, uuid = %job.spec.request.uuid, attempts = job.attempts, "deadline reached before send; dropped unsent");
        let (attempts, uuid) = (job.attempts, job.uuid());
        job.finish(Err(GatewayError::DeadlineBeforeSend { attempts, uuid }));
    }

    fn fail_all_queued(&mut self) {
        let mut failed = 0;
        for chat in self.chats.values_mut() {
            for job in chat.jobs.drain(..) {
                let (attempts, uuid) = (job.attempts, job.uuid());
                job.finish(Err(GatewayError::ShuttingDown { attempts, uuid }));
                failed += 1;
            }
        }
        self.chats.retain(|_, c| c.busy);
        self.queued = 0;
        if failed > 0 {
            tracing::warn!(
                failed,
                "shutdown grace ended; failed the replies still queued with UNAVAILABLE"
            );
        }
    }
}

/// The dispatcher is gone (runtime shutting down): settle the job from its own result.
fn finish_orphan(job: Job, result: Result<SentMessage, UpstreamError>) {
    let (attempts, uuid) = (job.attempts, job.uuid());
    let r = match result {
        Ok(message) => Ok(Delivered {
            queued: job.first_send_at.unwrap_or(job.accepted_at) - job.accepted_at,
            uuid: uuid.clone(),
            attempts,
            message,
        }),
        Err(error) => Err(GatewayError::Upstream {
            error,
            attempts,
            uuid,
        }),
    };
    job.finish(r);
}
