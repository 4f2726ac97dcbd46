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

pub use crate::cluster::gate::ClusterState;
use crate::cluster::gate::{Decided, RedisGate};
use crate::cluster::{RedisQuota, SharedKey};
use crate::config::{QueueConfig, QuotaConfig, RetryConfig};
use crate::error::GatewayError;
use crate::feishu::{AppIndex, RetryReason, SendRequest, SentMessage, Upstream, UpstreamError};
use crate::metrics::Metrics;
use crate::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable, micros};

pub mod gate;

use gate::{Clock, GateEvent, Grant, QuotaGate, Verdict};

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
    /// The quota grant of the attempt in flight (settled at its answer).
    grant: Option<Grant>,
    /// Cluster mode: the Redis names of `keys`, built on the first decision and reused by
    /// every later one (line checks, retries).
    shared_keys: Option<Arc<[SharedKey]>>,
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
        job: Box<Job>,
        result: Result<SentMessage, UpstreamError>,
        /// When the answer (or the timeout) came back: the latest the request can have arrived.
        answered: Instant,
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
    cluster: watch::Receiver<ClusterState>,
}

/// Knobs of the scheduler, taken from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub quotas: QuotaConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
    /// Bound on one upstream call (a token fetch and the post, each limited by the request
    /// timeout). A send whose answer has not come back holds its quota slots this long: past
    /// it the call is abandoned, so the request can no longer arrive.
    pub send_timeout: Duration,
}

impl SchedulerConfig {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            quotas: config.quotas.clone(),
            queue: config.queue.clone(),
            retry: config.retry.clone(),
            send_timeout: config.feishu.request_timeout.saturating_mul(2),
        }
    }
}

// === impl Scheduler ===

impl Scheduler {
    /// Starts the dispatcher task on the current runtime.
    pub fn start(
        config: SchedulerConfig,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_with(config, upstream, metrics, None)
    }

    /// Starts the dispatcher; with `store`, quota decisions go through Redis (cluster mode).
    pub fn start_with(
        config: SchedulerConfig,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
        store: Option<Arc<RedisQuota>>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (drained_tx, drained) = watch::channel(false);
        let accepting = Arc::new(AtomicBool::new(true));
        let mut specs: Vec<QuotaSpec> = vec![config.quotas.chat, config.quotas.user];
        specs.extend(config.quotas.app.iter().copied());
        let clock = Clock::starting_now();
        let (margin, hold) = (config.quotas.safety_margin, config.send_timeout);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (gate, cluster) = match store {
            None => (
                QuotaGate::Local(QuotaTable::new(specs, margin, hold)),
                watch::channel(ClusterState::Local).1,
            ),
            Some(store) => {
                let mut kinds = vec!["chat".to_owned(), "user".to_owned()];
                let app_windows = config.quotas.app.iter().map(|q| q.window.as_millis());
                kinds.extend(app_windows.map(|ms| format!("app:{ms}ms")));
                let (gate, state) = RedisGate::start(
                    store,
                    specs,
                    kinds,
                    margin,
                    hold,
                    events_tx,
                    metrics.clone(),
                    clock,
                );
                (QuotaGate::Redis(Box::new(gate)), state)
            }
        };
        let dispatcher = Dispatcher {
            gate,
            app_quota_count: config.quotas.app.len(),
            config,
            clock,
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
        tokio::spawn(dispatcher.run(rx, events));
        Self {
            tx,
            accepting,
            drained,
            cluster,
        }
    }

    /// Where quota decisions come from right now.
    pub fn cluster_state(&self) -> ClusterState {
        *self.cluster.borrow()
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
            grant: None,
            shared_keys: None,
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
}

// === impl Dispatcher ===

struct Dispatcher {
    config: SchedulerConfig,
    /// Where quota decisions come from: the local table, or Redis.
    gate: QuotaGate,
    app_quota_count: usize,
    clock: Clock,
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
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<GateEvent>,
    ) {
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        loop {
            let wake = self.next_wake().min(next_sweep);
            tokio::select! {
                biased;
                Some(ev) = events.recv() => {
                    self.gate_event(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.gate_event(ev);
                    }
                }
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
                let live = self.gate.sweep(self.clock, now);
                if self.chats.is_empty() && self.chats.capacity() > 1024 {
                    self.chats.shrink_to_fit();
                }
                self.metrics.set_quota_keys(live);
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
        self.clock.micros(t)
    }

    fn instant(&self, m: Micros) -> Instant {
        self.clock.instant(m)
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
        if let Some(g) = self.gate.next_wake() {
            wake = wake.min(g);
        }
        if !self.runnable.is_empty() {
            wake = Instant::now();
        }
        wake
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(job) => self.admit(job),
            Command::SendDone {
                job,
                result,
                answered,
            } => self.send_done(*job, result, answered),
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
                    self.gate.table().nth_ready_at(k, nth)
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
        for chat in self.gate.pump(now) {
            if self.chats.contains_key(&chat) {
                self.schedule_now(&chat);
            }
        }
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now_m {
                break;
            }
            let Reverse((_, ticket, chat)) = self.timers.pop().expect("peeked");
            self.runnable.push_back((chat, ticket));
        }
        while let Some((chat_id, ticket)) = self.runnable.pop_front() {
            self.try_send_head(&chat_id, ticket, now);
        }
    }

    fn try_send_head(&mut self, chat_id: &Arc<str>, ticket: u64, now: Instant) {
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
        if head.not_before > now {
            let at = self.clock.micros(head.not_before);
            return self.schedule_at(chat_id, at);
        }
        let head = chat.jobs.front_mut().expect("head");
        let (job_id, keys) = (head.id, head.keys.clone());
        let verdict = self.gate.ask(
            self.clock,
            chat_id,
            job_id,
            &keys,
            &mut head.shared_keys,
            now,
        );
        match verdict {
            Verdict::Send(grant) => self.start_send(chat_id, now, grant),
            Verdict::WaitUntil(at) => self.schedule_at(chat_id, self.clock.micros(at)),
            // The chat waits (busy) for Redis's answer: `gate_event`.
            Verdict::Asked => chat.busy = true,
            // Parked behind a shared key; `gate.pump` schedules it again.
            Verdict::InLine => {
                self.bump_ticket(chat_id);
            }
        }
    }

    /// Pops the head of `chat_id` (its quota already recorded) and sends it.
    fn start_send(&mut self, chat_id: &Arc<str>, now: Instant, grant: Grant) {
        let chat = self.chats.get_mut(chat_id).expect("chat with a head");
        let mut job = chat.jobs.pop_front().expect("front");
        job.grant = Some(grant);
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

    /// The Redis gate reported back.
    fn gate_event(&mut self, ev: GateEvent) {
        let QuotaGate::Redis(gate) = &mut self.gate else {
            return;
        };
        let now = Instant::now();
        let recovered = match ev {
            GateEvent::Health(up) => gate.health(up),
            GateEvent::Replayed(result) => gate.replayed(result),
            GateEvent::Decided {
                chat_id,
                job_id,
                keys,
                result,
            } => {
                let head = self.chats.get_mut(&chat_id).and_then(|c| {
                    c.busy = false;
                    c.jobs.front().map(|j| j.id == job_id)
                });
                match gate.decided(&chat_id, keys, result, head, now) {
                    Decided::Send(grant) => self.start_send(&chat_id, now, grant),
                    Decided::InLine => {
                        if head.is_some() {
                            self.bump_ticket(&chat_id);
                        }
                    }
                    Decided::RetryAt(at) => {
                        if let Some(h) = self
                            .chats
                            .get_mut(&chat_id)
                            .and_then(|c| c.jobs.front_mut())
                        {
                            h.not_before = at;
                            self.schedule_at(&chat_id, self.clock.micros(at));
                        }
                    }
                    Decided::AskAgain => {
                        if head.is_some() {
                            self.schedule_now(&chat_id);
                        }
                    }
                }
                if self
                    .chats
                    .get(&chat_id)
                    .is_some_and(|c| c.jobs.is_empty() && !c.busy)
                {
                    self.chats.remove(&chat_id);
                }
                false
            }
        };
        if recovered {
            self.reschedule_waiting();
        }
    }

    /// Back on Redis: chats parked on a local-quota timer (the fallback's floor can park
    /// them for a whole minute window) or a hold recheck ask Redis now instead. Their old
    /// timer entries go stale (ticket).
    fn reschedule_waiting(&mut self) {
        let waiting: Vec<Arc<str>> = self
            .chats
            .iter()
            .filter(|(_, c)| !c.busy && !c.jobs.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.schedule_now(&id);
        }
    }

    fn spawn_send(&self, job: Job) {
        let upstream = self.upstream.clone();
        let metrics = self.metrics.clone();
        let tx = self.tx.clone();
        let send_timeout = self.config.send_timeout;
        tokio::spawn(async move {
            metrics.in_flight(1);
            let call = upstream.reply(job.spec.app, &job.spec.request);
            let result = match tokio::time::timeout(send_timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Network {
                    kind: "timeout",
                    detail: format!("no answer within {send_timeout:?}"),
                }),
            };
            let answered = Instant::now();
            metrics.in_flight(-1);
            match tx.upgrade() {
                Some(tx) => {
                    if let Err(mpsc::error::SendError(Command::SendDone { job, result, .. })) = tx
                        .send(Command::SendDone {
                            job: Box::new(job),
                            result,
                            answered,
                        })
                    {
                        finish_orphan(*job, result);
                    }
                }
                None => finish_orphan(job, result),
            }
        });
    }

    /// Counts the attempt that just came back by its arrival bound: it arrived by `answered`,
    /// except where Feishu refused it for rate (see [`refused_by`]): there it did not count.
    fn settle(&mut self, job: &mut Job, refused: Option<RetryReason>, answered: Instant) {
        if let Some(grant) = job.grant.take() {
            let refused = |k: &QuotaKey| refused.is_some_and(|r| refused_by(r, k));
            self.gate
                .settle(self.clock, grant, &job.keys, refused, answered);
        }
    }

    fn send_done(
        &mut self,
        mut job: Job,
        result: Result<SentMessage, UpstreamError>,
        answered: Instant,
    ) {
        self.in_flight -= 1;
        let refused = match &result {
            Err(e) => e.retry_reason().filter(|r| r.is_rate_rejection()),
            Ok(_) => None,
        };
        self.settle(&mut job, refused, answered);
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
        if reason.is_rate_rejection() {
            // We kept our quotas and Feishu still said "too fast": someone else spends them.
            // Treat the keys as spent for a window (or Feishu's reset) so we back off as one.
            self.metrics.rate_rejection(&job.spec.app_name, reason);
            tracing::warn!(app = %job.spec.app_name, chat_id = %job.spec.chat_id, log_id = %error.log_id(), code = ?error.code(), "unexpected upstream rate rejection; cooling the quota down");
            let keys: Vec<QuotaKey> = job
                .keys
                .iter()
                .filter(|k| refused_by(reason, k))
                .cloned()
                .collect();
            // Feishu's reset when it gave one, else the shortest window among the keys (the
            // per-minute app quota must not silence the app for a minute on a per-second hit).
            // A reset is trusted up to the longest window: no rolling window needs longer.
            let specs = self.gate.table().specs();
            let windows = keys.iter().map(|k| specs[k.quota].window);
            let shortest = windows.clone().min().unwrap_or_default();
            let longest = windows.max().unwrap_or_default();
            let wait = error.retry_after().map_or(shortest, |r| r.min(longest));
            self.gate.block(self.clock, &keys, wait, now);
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

/// Whether `key` belongs to the quota layer that refused a send Feishu rejected for `reason`.
///
/// The accounting choice for refused sends (README, "How sends are counted"): Feishu checks
/// the app quotas at its open-platform gateway (99991400 / HTTP 429) before the request
/// reaches the messaging service, which checks the chat and user quotas (230020). A request
/// is not admitted by the layer that refused it (sliding-log, fixed-window and token-bucket
/// limiters alike do not count what they turn away), so it leaves those keys; it passed the
/// layers before, so it stays counted there (the app keys of a 230020). One refusal thus never
/// keeps a slot of the 1000/min ring for a minute.
fn refused_by(reason: RetryReason, key: &QuotaKey) -> bool {
    match reason {
        RetryReason::Frequency => key.quota >= FIRST_APP_QUOTA,
        RetryReason::RateLimited => key.quota < FIRST_APP_QUOTA,
        _ => false,
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

#[cfg(test)]
mod tests {
    //! Scheduler logic on tokio's paused clock with a scripted in-process upstream.
    use super::*;
    use crate::config::Config;
    use crate::feishu::BoxFuture;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Script {
        /// Answers for a message_id, in order; afterwards success.
        answers: HashMap<String, VecDeque<UpstreamError>>,
        sent: Vec<(Duration, String, String, String)>,
    }

    struct ScriptedUpstream {
        origin: Instant,
        latency: Duration,
        script: Mutex<Script>,
    }

    impl ScriptedUpstream {
        fn new(latency: Duration) -> Arc<Self> {
            Arc::new(Self {
                origin: Instant::now(),
                latency,
                script: Mutex::default(),
            })
        }
        fn fail(&self, message_id: &str, errors: Vec<UpstreamError>) {
            self.script
                .lock()
                .answers
                .insert(message_id.into(), errors.into());
        }
        /// (virtual time since start, message_id, chat_id, uuid) of every attempt.
        fn sent(&self) -> Vec<(Duration, String, String, String)> {
            self.script.lock().sent.clone()
        }
    }

    impl Upstream for ScriptedUpstream {
        fn reply<'a>(
            &'a self,
            _app: AppIndex,
            req: &'a SendRequest,
        ) -> BoxFuture<'a, Result<SentMessage, UpstreamError>> {
            Box::pin(async move {
                let answer = {
                    let mut s = self.script.lock();
                    let chat = req.content.clone();
                    s.sent.push((
                        self.origin.elapsed(),
                        req.message_id.clone(),
                        chat,
                        req.uuid.clone(),
                    ));
                    s.answers
                        .get_mut(&req.message_id)
                        .and_then(VecDeque::pop_front)
                };
                tokio::time::sleep(self.latency).await;
                match answer {
                    Some(e) => Err(e),
                    None => Ok(SentMessage {
                        message_id: format!("om_r_{}", req.message_id),
                        ..Default::default()
                    }),
                }
            })
        }
        fn message_chat<'a>(
            &'a self,
            _app: AppIndex,
            id: &'a str,
        ) -> BoxFuture<'a, Result<String, UpstreamError>> {
            Box::pin(async move { Ok(format!("oc_{id}")) })
        }
    }

    fn feishu_err(http: u16, code: i64) -> UpstreamError {
        UpstreamError::Feishu {
            http,
            code,
            msg: "scripted".into(),
            log_id: "L".into(),
            retry_after: None,
        }
    }

    fn scheduler(upstream: Arc<ScriptedUpstream>, tweak: impl FnOnce(&mut Config)) -> Scheduler {
        let mut c = Config::defaults();
        tweak(&mut c);
        Scheduler::start(
            SchedulerConfig::from_config(&c),
            upstream,
            Arc::new(Metrics::new()),
        )
    }

    /// A job whose `content` carries its chat id (so the scripted upstream can report it).
    fn job(message_id: &str, chat: &str, deadline: Option<Duration>) -> JobSpec {
        JobSpec {
            app: 0,
            app_name: "default".into(),
            app_id: "cli_test".into(),
            chat_id: chat.into(),
            user_id: None,
            request: SendRequest {
                message_id: message_id.into(),
                content: chat.into(),
                msg_type: "text",
                reply_in_thread: false,
                uuid: format!("uuid-{message_id}"),
            },
            deadline: deadline.map(|d| Instant::now() + d),
        }
    }

    fn assert_never_more_than(sends: &[Duration], n: usize, window: Duration) {
        let mut s = sends.to_vec();
        s.sort();
        for w in s.windows(n + 1) {
            assert!(
                w[n] - w[0] >= window,
                "{} sends within {:?}",
                n + 1,
                w[n] - w[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn order_within_a_chat_survives_retries_and_uuid_is_stable() {
        let up = ScriptedUpstream::new(Duration::from_millis(30));
        up.fail(
            "om_2",
            vec![
                feishu_err(400, 230049),
                feishu_err(503, 1),
                UpstreamError::Network {
                    kind: "timeout",
                    detail: "x".into(),
                },
            ],
        );
        let s = scheduler(up.clone(), |_| {});
        let rxs: Vec<_> = (1..=6)
            .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let d = rx.await.unwrap().unwrap();
            assert_eq!(d.attempts, if i == 1 { 4 } else { 1 });
        }
        let order: Vec<String> = up.sent().into_iter().map(|s| s.1).collect();
        assert_eq!(
            order,
            [
                "om_1", "om_2", "om_2", "om_2", "om_2", "om_3", "om_4", "om_5", "om_6"
            ]
        );
        let uuids: Vec<String> = up
            .sent()
            .into_iter()
            .filter(|s| s.1 == "om_2")
            .map(|s| s.3)
            .collect();
        assert!(uuids.iter().all(|u| u == "uuid-om_2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_saturated_chat_never_delays_other_chats() {
        let up = ScriptedUpstream::new(Duration::from_millis(10));
        let s = scheduler(up.clone(), |_| {});
        let hot: Vec<_> = (0..40)
            .map(|i| s.submit(job(&format!("om_h{i}"), "oc_hot", None)))
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let started = Instant::now();
        let cold: Vec<_> = (0..5)
            .map(|i| s.submit(job(&format!("om_c{i}"), &format!("oc_c{i}"), None)))
            .collect();
        for rx in cold {
            rx.await.unwrap().unwrap();
        }
        // The cold chats went out at once (one upstream latency), not after the hot backlog.
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        for rx in hot {
            rx.await.unwrap().unwrap();
        }
        let hot_sends: Vec<Duration> = up
            .sent()
            .into_iter()
            .filter(|s| s.2 == "oc_hot")
            .map(|s| s.0)
            .collect();
        assert_eq!(hot_sends.len(), 40);
        assert_never_more_than(&hot_sends, 5, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn burst_of_1000_distinct_chats_drains_at_the_app_limit() {
        let up = ScriptedUpstream::new(Duration::from_millis(40));
        let s = scheduler(up.clone(), |_| {});
        let start = Instant::now();
        let rxs: Vec<_> = (0..1000)
            .map(|i| s.submit(job(&format!("om_{i}"), &format!("oc_{i}"), None)))
            .collect();
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
        let drain = start.elapsed();
        let sends: Vec<Duration> = up.sent().into_iter().map(|s| s.0).collect();
        assert_eq!(sends.len(), 1000);
        assert_never_more_than(&sends, 50, Duration::from_secs(1));
        // 20 bursts of 50, one second (+20 ms margin) apart: the last goes at ~19.4 s.
        assert!(drain < Duration::from_secs(20), "drained in {drain:?}");
        assert!(drain > Duration::from_secs(19), "drained in {drain:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_whose_deadline_passes_in_the_queue_is_never_sent() {
        let up = ScriptedUpstream::new(Duration::from_millis(10));
        // om_g0 meets Feishu's app frequency limit and must wait 3 s: the chat waits with it.
        up.fail(
            "om_g0",
            vec![UpstreamError::Feishu {
                http: 429,
                code: 99991400,
                msg: "freq".into(),
                log_id: "L".into(),
                retry_after: Some(Duration::from_secs(3)),
            }],
        );
        let s = scheduler(up.clone(), |_| {});
        let first: Vec<_> = (0..5)
            .map(|i| s.submit(job(&format!("om_f{i}"), "oc_a", None)))
            .collect();
        let _queued: Vec<_> = (0..5)
            .map(|i| s.submit(job(&format!("om_g{i}"), "oc_a", None)))
            .collect();
        for rx in first {
            rx.await.unwrap().unwrap();
        }
        // Chat quota spent until t≈1.02 s and 5 more queued: a 6th cannot go before ~2.04 s.
        let tight = s
            .reply(job("om_tight", "oc_a", Some(Duration::from_millis(1500))))
            .await;
        assert!(
            matches!(tight, Err(GatewayError::DeadlineUnreachable { .. })),
            "{tight:?}"
        );
        // 2.5 s is feasible on quota alone, so it is admitted; then om_g0's 429 delays the chat.
        let late = s.submit(job("om_late", "oc_a", Some(Duration::from_millis(2500))));
        let r = late.await.unwrap();
        assert!(
            matches!(r, Err(GatewayError::DeadlineBeforeSend { attempts: 0, .. })),
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            up.sent()
                .iter()
                .all(|s| s.1 != "om_late" && s.1 != "om_tight")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_max_attempts_with_the_last_error() {
        let up = ScriptedUpstream::new(Duration::from_millis(5));
        up.fail("om_x", (0..10).map(|_| feishu_err(400, 230020)).collect());
        let s = scheduler(up.clone(), |c| c.retry.max_attempts = 3);
        let r = s.reply(job("om_x", "oc_x", None)).await;
        match r {
            Err(GatewayError::Upstream {
                attempts: 3, error, ..
            }) => assert_eq!(error.code(), Some(230020)),
            other => panic!("{other:?}"),
        }
        // 230020 cooled the chat down: attempts are at least a window apart.
        let t: Vec<Duration> = up.sent().into_iter().map(|s| s.0).collect();
        assert!(
            t[1] - t[0] >= Duration::from_secs(1) && t[2] - t[1] >= Duration::from_secs(1),
            "{t:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn final_errors_are_not_retried_and_the_chat_moves_on() {
        let up = ScriptedUpstream::new(Duration::from_millis(5));
        up.fail("om_1", vec![feishu_err(400, 230002)]);
        let s = scheduler(up.clone(), |_| {});
        let a = s.submit(job("om_1", "oc_a", None));
        let b = s.submit(job("om_2", "oc_a", None));
        assert!(matches!(
            a.await.unwrap(),
            Err(GatewayError::Upstream { attempts: 1, .. })
        ));
        assert_eq!(b.await.unwrap().unwrap().attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_bounds_refuse_with_retry_info() {
        let up = ScriptedUpstream::new(Duration::from_millis(5));
        let s = scheduler(up.clone(), |c| {
            c.queue.max_per_chat = 10;
            c.queue.max_total = 12;
        });
        // All submitted before the dispatcher runs (paused, single-threaded runtime).
        let mut rxs: Vec<_> = (0..11)
            .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
            .collect();
        let over_chat = rxs.pop().unwrap();
        rxs.extend((0..3).map(|i| s.submit(job(&format!("om_b{i}"), &format!("oc_b{i}"), None))));
        let over_total = rxs.pop().unwrap().await.unwrap();
        let over_chat = over_chat.await.unwrap();
        assert!(
            matches!(
                over_chat,
                Err(GatewayError::QueueFull { scope: "chat", .. })
            ),
            "{over_chat:?}"
        );
        assert!(
            matches!(
                over_total,
                Err(GatewayError::QueueFull {
                    scope: "gateway",
                    ..
                })
            ),
            "{over_total:?}"
        );
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_sends_during_grace_then_fails_the_rest_unavailable() {
        let up = ScriptedUpstream::new(Duration::from_millis(10));
        let s = scheduler(up.clone(), |_| {});
        // 30 replies to one chat need ~5 s; the grace is 2 s.
        let rxs: Vec<_> = (0..30)
            .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.shutdown(Duration::from_secs(2)).await;
        let refused = s.reply(job("om_new", "oc_b", None)).await;
        assert!(matches!(refused, Err(GatewayError::ShuttingDown { .. })));
        let mut ok = 0;
        for rx in rxs {
            match rx.await.unwrap() {
                Ok(_) => ok += 1,
                Err(GatewayError::ShuttingDown { attempts: 0, .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        // Sent in the grace period: bursts at 0, 1.02, ~2.04 (cut) → 10 or 15.
        assert!((10..=15).contains(&ok), "{ok} delivered");
        assert_eq!(up.sent().len(), ok);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_callers_are_not_sent() {
        let up = ScriptedUpstream::new(Duration::from_millis(10));
        let s = scheduler(up.clone(), |_| {});
        let keep: Vec<_> = (0..5)
            .map(|i| s.submit(job(&format!("om_{i}"), "oc_a", None)))
            .collect();
        drop(s.submit(job("om_gone", "oc_a", None)));
        let last = s.submit(job("om_last", "oc_a", None));
        for rx in keep {
            rx.await.unwrap().unwrap();
        }
        last.await.unwrap().unwrap();
        assert!(up.sent().iter().all(|s| s.1 != "om_gone"));
    }
}
