//! The scheduler: per-chat FIFO queues, fair dispatch among ready chats, the rolling-window
//! quotas, deadlines, retries that keep their place in line, and the shutdown drain.
//!
//! One dispatcher task owns all queue and quota state (no locks on the hot path); gRPC handlers
//! talk to it through a channel and wait on a oneshot per job. Sends run in their own tasks and
//! report back. Time is tokio's clock, so tests run it paused (virtual time).

use std::sync::Arc;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::{QueueConfig, QuotaConfig, RetryConfig};
use crate::feishu::{Api, AppIndex, Call, SentMessage, Upstream};
use crate::metrics::Metrics;

mod admission;
mod error;
mod forward;
pub mod gate;
pub mod gone;
mod handle;
pub mod inspect;
mod layout;
mod outcome;
mod queue;
pub mod reconfigure;
mod send;
mod spans;

use send::Attempt;

pub use error::{GatewayError, PeerFailure};
pub use forward::{Forward, Routed};
pub use gate::QuotaSource;
use gate::{Clock, Decided, GateEvent, Head, QuotaGate, Verdict};
pub use handle::Held;
pub use layout::{Lane, Target, card_queue, message_queue, user_queue};
use queue::{Dropped, Job, Queues};

/// Quota ids in the [`QuotaTable`]: chat, user, message, card, then the app quotas in config
/// order.
const CHAT_QUOTA: usize = 0;
const USER_QUOTA: usize = 1;
const MESSAGE_QUOTA: usize = 2;
const CARD_QUOTA: usize = 3;
const FIRST_APP_QUOTA: usize = 4;

/// How often idle quota keys are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Commands taken per wake-up before dispatching (a burst of submits is queued first, so
/// chats are served oldest first rather than in arrival order of single commands).
const COMMAND_BATCH: usize = 256;
/// The dispatcher looks again at least this often with nothing to do.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// How often a job that another replica decides, and that has no router to go back to, asks
/// again (it waits for its partition to come here, or for its deadline).
const NO_ROUTER_RECHECK: Duration = Duration::from_millis(250);

/// A call ready to be queued (a reply, a send, an update, a recall): validated, its app and
/// target known.
#[derive(Debug)]
pub struct JobSpec {
    /// Who asked (index into [`SchedulerConfig::callers`]): its queue share applies.
    pub caller: usize,
    /// Fingerprint of the credential it asked with (empty: anonymous): a reload that removes
    /// the caller, or rotates that credential out, fails the job `CALLER_REMOVED`.
    pub credential: Arc<str>,
    /// The request's share of the intake budget (a guard the transport gives), dropped once
    /// the job is queued or refused (`None` for jobs that did not come through gRPC).
    pub intake: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// Told when the job's first attempt starts (async jobs record SENDING).
    pub on_send: Option<oneshot::Sender<()>>,
    pub app: AppIndex,
    /// Configured app name (logs, metrics).
    pub app_name: Arc<str>,
    /// Feishu app_id (the app quota key: several names may share one app_id).
    pub app_id: Arc<str>,
    /// The queue it waits in, in order: the chat for a reply or a send to a chat,
    /// [`user_queue`] for a send to a user, [`message_queue`] for an update or a recall.
    pub chat_id: Arc<str>,
    /// The user's quota it counts in (a reply naming the user, a send to a user).
    pub user_id: Option<Arc<str>>,
    /// Which per-target quotas it counts in.
    pub target: Target,
    /// How it competes with its app's other jobs (a stream's typing yields, its end goes
    /// first).
    pub lane: Lane,
    pub request: Call,
    /// The uuid the caller gave, when Feishu gets one derived from it (`request.uuid`):
    /// what the caller is told, and what a cancel names. None: the same as `request.uuid`.
    pub caller_uuid: Option<String>,
    /// The caller's deadline, if it set one.
    pub deadline: Option<Instant>,
    /// The span the job's queue waits and attempts are children of: the gRPC call's, or
    /// `reply_job` for a job this process did not take the submit of (`Span::none()`: none).
    pub span: tracing::Span,
}

/// A send made before this process started (known from the job store after a restart): it
/// counts in the quota windows like one of ours.
#[derive(Debug, Clone)]
pub struct PastSend {
    pub app_id: Arc<str>,
    pub api: Api,
    pub chat_id: Arc<str>,
    pub user_id: Option<Arc<str>>,
    pub target: Target,
    /// The latest it can have reached Feishu.
    pub arrived_by: Instant,
}

/// A call Feishu accepted (or, for an update, one a newer update made unnecessary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub message: SentMessage,
    pub uuid: String,
    pub attempts: u32,
    /// Time from acceptance to the first send.
    pub queued: Duration,
    /// An update that never went to Feishu: a newer update of the same message came while
    /// it waited (latest wins).
    pub superseded: bool,
}

pub type JobResult = Result<Delivered, GatewayError>;

enum Command {
    Submit(Box<Job>),
    SendDone {
        job: Box<Job>,
        result: Attempt,
        /// When the answer (or the timeout) came back: the latest the request can have arrived.
        answered: Instant,
    },
    Shutdown {
        grace: Duration,
    },
    /// A caller waiting for a reply to this chat went away: its job leaves the queue now.
    Abandoned {
        chat_id: Arc<str>,
    },
    /// Take the queued job with this uuid out of its chat, if it is still waiting (not sent,
    /// not in flight); it finishes with `GatewayError::Cancelled`.
    Cancel {
        chat_id: Arc<str>,
        uuid: String,
        done: oneshot::Sender<bool>,
    },
    /// Sends a previous process made (restart): they count in the local windows.
    Seed(Vec<PastSend>),
    /// A caller holds this many more (or fewer) jobs and bytes outside the queues (a
    /// stream's text): they count in its queue share.
    Hold {
        caller: usize,
        jobs: isize,
        bytes: isize,
    },
    /// Introspection: one chat as it stands.
    InspectChat {
        chat_id: Arc<str>,
        done: oneshot::Sender<inspect::ChatSnapshot>,
    },
    /// Introspection: one app's quota windows and queued replies.
    InspectApp {
        app: AppIndex,
        app_id: Arc<str>,
        done: oneshot::Sender<inspect::AppSnapshot>,
    },
    /// Introspection: one caller's queued replies and their bytes.
    InspectCaller {
        caller: usize,
        done: oneshot::Sender<(usize, usize)>,
    },
    /// A live reload (answered once applied).
    Reconfigure(Box<reconfigure::Reconfigure>, oneshot::Sender<()>),
    /// Tests: the dispatcher panics (a bug), to check that its death is visible.
    #[cfg(test)]
    Crash,
}

/// Handle to the dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Command>,
    /// Messages Feishu said are gone (shared with the dispatcher).
    gone: Arc<gone::GoneMessages>,
    accepting: Arc<AtomicBool>,
    drained: watch::Receiver<bool>,
    quota_source: watch::Receiver<QuotaSource>,
    /// False once the dispatcher task died (a panic): nothing is sent any more.
    alive: watch::Receiver<bool>,
    /// Where jobs of queues other replicas own go (set once, in cluster mode with peers).
    forward: Arc<std::sync::OnceLock<Arc<dyn Forward>>>,
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
    /// Each caller's limits by [`JobSpec::caller`]; a caller not listed has no share limit.
    pub callers: Vec<crate::config::CallerLimits>,
}

impl SchedulerConfig {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            quotas: config.quotas.clone(),
            queue: config.queue.clone(),
            retry: config.retry.clone(),
            send_timeout: config.feishu.request_timeout.saturating_mul(2),
            callers: config.auth.limits_by_id(),
        }
    }
}

// === impl Dispatcher ===

/// The async driver: owns the queues and the quota gate, spawns sends and decisions, and
/// turns their results back into queue and gate changes.
struct Dispatcher {
    config: SchedulerConfig,
    /// Where quota decisions come from: the local table, or the shared gate.
    gate: QuotaGate,
    queues: Queues,
    /// Which quotas each job's keys are in (per-app lists included).
    layout: Arc<layout::QuotaLayout>,
    /// Bumped when a live reload changes `layout` (see `Job::keys_gen`).
    layout_gen: u64,
    /// Apps a live reload removed (index → name): their replies are not sent any more.
    removed_apps: std::collections::HashMap<AppIndex, String>,
    /// What each caller owns, by id, since a live reload (empty before one: every caller owns
    /// its work). Replies a caller no longer owns are not sent any more.
    owners: Vec<crate::config::Ownership>,
    /// Messages Feishu said are gone: replies to them fail without a call.
    gone: Arc<gone::GoneMessages>,
    /// Single node: app slots kept for the urgent chats of each app_id (see
    /// `Dispatcher::mark_urgent_chats`); the other chats leave that many free.
    reserves: std::collections::HashMap<Arc<str>, u32>,
    /// Chats waiting because of an app's reserve, by app_id: tried again as soon as the reserve
    /// shrinks (their timer is for the window's end).
    reserve_waiters: std::collections::HashMap<Arc<str>, std::collections::HashSet<Arc<str>>>,
    clock: Clock,
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
                        for _ in 0..COMMAND_BATCH {
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
                self.queues.shrink();
                self.metrics.set_quota_keys(live);
                next_sweep = now + SWEEP_EVERY;
            }
            for job in self.queues.expire(self.clock.micros(now)) {
                fail_deadline(job);
            }
            if let Some(until) = self.draining_until
                && now >= until
            {
                self.fail_all_queued();
            }
            self.dispatch(now);
            self.metrics.set_queued(self.queues.queued());
            self.metrics.set_queued_bytes(self.queues.queued_bytes());
            if self.draining_until.is_some()
                && self.queues.queued() == 0
                && self.queues.in_flight() == 0
            {
                let _ = self.drained.send(true);
            }
        }
        let _ = self.drained.send(true);
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + IDLE_WAKE;
        if let Some(m) = self.queues.next_wake(self.clock.micros(now)) {
            wake = wake.min(self.clock.instant(m));
        }
        if let Some(until) = self.draining_until {
            wake = wake.min(until);
        }
        if let Some(g) = self.gate.next_wake() {
            wake = wake.min(g);
        }
        wake
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(job) => self.admit(*job),
            Command::SendDone {
                job,
                result,
                answered,
            } => self.send_done(*job, result, answered),
            Command::Shutdown { grace } => {
                let until = Instant::now() + grace;
                self.draining_until = Some(self.draining_until.map_or(until, |u| u.min(until)));
            }
            #[cfg(test)]
            Command::Crash => panic!("dispatcher crash requested by a test"),
            Command::Seed(mut sends) => self.seed(&mut sends),
            Command::Hold {
                caller,
                jobs,
                bytes,
            } => self.queues.hold(caller, jobs, bytes),
            Command::Abandoned { chat_id } => {
                for job in self.queues.take_abandoned(&chat_id) {
                    self.metrics.request(
                        job.spec.request.api().as_str(),
                        &job.spec.app_name,
                        "cancelled",
                        "none",
                    );
                }
            }
            Command::Cancel {
                chat_id,
                uuid,
                done,
            } => {
                let job = self.queues.take_queued(&chat_id, &uuid);
                let found = job.is_some();
                if let Some(job) = job {
                    job.finish(Err(GatewayError::Cancelled));
                }
                let _ = done.send(found);
            }
            Command::InspectChat { chat_id, done } => {
                let _ = done.send(self.inspect_chat(&chat_id));
            }
            Command::InspectApp { app, app_id, done } => {
                let _ = done.send(self.inspect_app(app, &app_id));
            }
            Command::InspectCaller { caller, done } => {
                let _ = done.send(self.queues.caller_queued(caller));
            }
            Command::Reconfigure(r, done) => {
                self.reconfigure(*r);
                let _ = done.send(());
            }
        }
    }

    // --- dispatch ---

    /// Asks the gate for every chat whose head may go now, oldest ready first.
    fn dispatch(&mut self, now: Instant) {
        self.mark_urgent_chats(now);
        for chat in self.gate.pump(now) {
            self.queues.schedule_now(&chat);
        }
        let now_m = self.clock.micros(now);
        let mut dropped = Vec::new();
        while let Some(chat_id) = self.queues.next_ready(now_m, &mut dropped) {
            let urgent = self.queues.is_urgent(&chat_id);
            if !urgent && let Some(at) = self.kept_for_urgent(&chat_id, now) {
                self.queues.schedule_at(&chat_id, self.clock.micros(at));
                continue;
            }
            let head = self
                .queues
                .head_mut(&chat_id)
                .expect("ready chat has a head");
            if self.gone.is_gone(head.spec.request.message_id()) {
                // Feishu said its message is gone since it was queued: not asked again.
                let job = self
                    .queues
                    .pop_for_send(&chat_id)
                    .expect("chat with a head");
                self.queues.sent(&chat_id, None);
                let e = GatewayError::MessageGone {
                    message_id: job.spec.request.message_id().to_owned(),
                    attempts: job.attempts,
                    uuid: job.uuid(),
                };
                job.finish(Err(e));
                continue;
            }
            let verdict = self.gate.ask(
                self.clock,
                &chat_id,
                Head {
                    id: head.id,
                    keys: &head.keys,
                    memo: &mut head.gate_memo,
                    span: &head.spec.span,
                    urgent,
                },
                now,
            );
            match verdict {
                Verdict::Send(grant) => self.start_send(&chat_id, now, grant),
                Verdict::WaitUntil(at) => self.queues.schedule_at(&chat_id, self.clock.micros(at)),
                // Waits (busy) for the shared store's answer: `gate_event`.
                Verdict::Asked => self.queues.mark_busy(&chat_id),
                // Parked behind a shared key; `gate.pump` schedules it again.
                Verdict::InLine => self.queues.park(&chat_id),
                Verdict::Elsewhere => self.hand_back(&chat_id, now),
                // Not sent: the chat's next job asks in its turn.
                Verdict::Unavailable => {
                    let job = self
                        .queues
                        .pop_for_send(&chat_id)
                        .expect("chat with a head");
                    self.queues.sent(&chat_id, None);
                    let (attempts, uuid) = (job.attempts, job.uuid());
                    tracing::info!(chat_id = %chat_id, uuid = %uuid, "the shared quotas cannot be used as configured; the reply fails UNAVAILABLE");
                    job.finish(Err(GatewayError::SharedQuotasUnavailable {
                        attempts,
                        uuid,
                    }));
                }
            }
        }
        for (job, why) in dropped {
            match why {
                Dropped::Cancelled => self.metrics.request(
                    job.spec.request.api().as_str(),
                    &job.spec.app_name,
                    "cancelled",
                    "none",
                ),
                Dropped::Deadline => fail_deadline(job),
            }
        }
    }

    /// Another replica decides `chat_id`'s jobs: its head goes back to its router (the chat's
    /// next job follows when it becomes the head), or waits when it has none.
    fn hand_back(&mut self, chat_id: &Arc<str>, now: Instant) {
        let head = self
            .queues
            .head_mut(chat_id)
            .expect("ready chat has a head");
        let at = match (&head.back, head.stay_until) {
            // Nowhere to go (queued before forwarding started): it waits for the partition.
            (None, _) => Some(now + NO_ROUTER_RECHECK),
            (Some(_), Some(t)) if t > now => Some(t),
            _ => None,
        };
        if let Some(at) = at {
            self.queues.schedule_at(chat_id, self.clock.micros(at));
            return;
        }
        let mut job = self.queues.pop_for_send(chat_id).expect("chat with a head");
        self.queues.sent(chat_id, None);
        let back = job.back.take().expect("checked above");
        // The router gone means its caller went away: nothing to tell.
        let _ = back.send(Box::new(job.spec));
    }

    /// The shared gate reported back.
    fn gate_event(&mut self, ev: GateEvent) {
        let QuotaGate::Shared(gate) = &mut self.gate else {
            return;
        };
        let now = Instant::now();
        let recovered = match ev {
            GateEvent::Health(up) => gate.health(up),
            GateEvent::Replayed(result) => gate.replayed(result),
            GateEvent::Decided {
                chat_id,
                job_id,
                answer,
            } => {
                let head = self.queues.decided(&chat_id, job_id);
                match gate.decided(&chat_id, answer, head, now) {
                    Decided::Send(grant) => self.start_send(&chat_id, now, grant),
                    Decided::InLine => self.queues.park(&chat_id),
                    Decided::RetryAt(at) => {
                        self.queues.retry_head_at(&chat_id, self.clock.micros(at));
                    }
                    Decided::AskAgain => self.queues.schedule_now(&chat_id),
                }
                self.queues.forget_if_idle(&chat_id);
                false
            }
        };
        if recovered {
            // Back on the shared store: chats parked on a local-quota timer (the fallback's floor can
            // park them for a whole minute window) or a hold recheck ask the shared store now instead.
            self.queues.wake_all();
        }
    }

    fn fail_all_queued(&mut self) {
        let jobs = self.queues.drain();
        let failed = jobs.len();
        for job in jobs {
            let (attempts, uuid) = (job.attempts, job.uuid());
            job.finish(Err(GatewayError::ShuttingDown { attempts, uuid }));
        }
        if failed > 0 {
            tracing::warn!(
                failed,
                "shutdown grace ended; failed the replies still queued with UNAVAILABLE"
            );
        }
    }
}

fn fail_deadline(job: Job) {
    tracing::info!(operation = job.spec.request.api().as_str(), message_id = %job.spec.request.message_id(), chat_id = %job.spec.chat_id, uuid = %job.spec.request.uuid(), attempts = job.attempts, "deadline reached before send; dropped unsent");
    let (attempts, uuid) = (job.attempts, job.uuid());
    job.finish(Err(GatewayError::DeadlineBeforeSend { attempts, uuid }));
}

#[cfg(test)]
mod tests;
