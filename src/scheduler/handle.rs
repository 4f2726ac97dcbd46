//! The scheduler's handle: starting the dispatcher, and what callers ask of it (submit,
//! reply, cancel, seed, shutdown, health).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::GatewayError;
use super::gate::{Clock, GateSetup, QuotaGate, QuotaSource, StartSharedGate};
use super::layout::QuotaLayout;
use super::queue::{Job, Queues};
use super::{
    Command, Dispatcher, JobResult, JobSpec, PastSend, Routed, Scheduler, SchedulerConfig,
};
use crate::feishu::Upstream;
use crate::metrics::Metrics;
use crate::quota::QuotaTable;

/// Gone messages remembered at most (two generations of half).
const GONE_CAPACITY: usize = 100_000;

/// Tells the dispatcher when a waiting caller goes away (its future is dropped).
struct AbandonOnDrop {
    tx: mpsc::UnboundedSender<Command>,
    /// `None` once the result arrived.
    chat_id: Option<Arc<str>>,
}

impl AbandonOnDrop {
    /// The result came: nothing to tell.
    fn disarm(mut self) {
        self.chat_id = None;
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(chat_id) = self.chat_id.take() {
            let _ = self.tx.send(Command::Abandoned { chat_id });
        }
    }
}

/// What a caller holds outside the queues (a stream's text): it counts in the caller's
/// queue share, as one job and its bytes, until dropped ([`Scheduler::hold`]).
pub struct Held {
    tx: mpsc::UnboundedSender<Command>,
    caller: usize,
    bytes: usize,
}

impl Held {
    /// The holder now holds `bytes`.
    pub fn set(&mut self, bytes: usize) {
        if bytes != self.bytes {
            let delta = bytes as isize - self.bytes as isize;
            self.bytes = bytes;
            let _ = self.tx.send(Command::Hold {
                caller: self.caller,
                jobs: 0,
                bytes: delta,
            });
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Hold {
            caller: self.caller,
            jobs: -1,
            bytes: -(self.bytes as isize),
        });
    }
}

impl Scheduler {
    /// Counts what `caller` holds outside the queues (a stream's text) in its queue share:
    /// one job, and the bytes [`Held::set`] says, until the guard is dropped.
    pub fn hold(&self, caller: usize) -> Held {
        let _ = self.tx.send(Command::Hold {
            caller,
            jobs: 1,
            bytes: 0,
        });
        Held {
            tx: self.tx.clone(),
            caller,
            bytes: 0,
        }
    }

    /// Starts the dispatcher task on the current runtime.
    pub fn start(
        config: SchedulerConfig,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_with(config, upstream, metrics, None)
    }

    /// Starts the dispatcher; with `shared`, quota decisions go through the gate it starts
    /// (cluster mode: quotas the replicas share).
    pub fn start_with(
        config: SchedulerConfig,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
        shared: Option<StartSharedGate>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (drained_tx, drained) = watch::channel(false);
        let accepting = Arc::new(AtomicBool::new(true));
        let layout = Arc::new(QuotaLayout::new(&config.quotas));
        let specs = layout.specs.clone();
        let clock = Clock::starting_now();
        let (margin, hold) = (config.quotas.safety_margin, config.send_timeout);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (gate, quota_source) = match shared {
            None => (
                QuotaGate::Local(QuotaTable::new(specs, margin, hold)),
                watch::channel(QuotaSource::Local).1,
            ),
            Some(start) => {
                let (gate, state) = start(GateSetup {
                    specs,
                    kinds: layout.kinds.clone(),
                    margin,
                    hold,
                    events: events_tx,
                    clock,
                });
                (QuotaGate::Shared(gate), state)
            }
        };
        let gone = Arc::new(super::gone::GoneMessages::new(GONE_CAPACITY));
        let dispatcher = Dispatcher {
            gone: gone.clone(),
            gate,
            queues: Queues::default(),
            layout,
            layout_gen: 0,
            removed_apps: Default::default(),
            owners: Vec::new(),
            reserves: Default::default(),
            reserve_waiters: Default::default(),
            config,
            clock,
            draining_until: None,
            upstream,
            metrics,
            tx: tx.downgrade(),
            drained: drained_tx,
        };
        let task = tokio::spawn(dispatcher.run(rx, events));
        let (alive_tx, alive) = watch::channel(true);
        tokio::spawn(async move {
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!(
                    "the scheduler's dispatcher panicked: no reply can be sent any more; health \
                     now fails so the process is restarted"
                );
                let _ = alive_tx.send(false);
            }
        });
        Self {
            tx,
            gone,
            accepting,
            drained,
            quota_source,
            alive,
            forward: Arc::default(),
        }
    }

    /// From now on, jobs of queues another replica owns go there (once; later calls are
    /// ignored).
    pub fn set_forward(&self, forward: Arc<dyn super::Forward>) {
        let _ = self.forward.set(forward);
    }

    /// Whether Feishu said `message_id` is gone (recalled or deleted) within the last
    /// `gone::GONE_FOR`: a call on it fails `MESSAGE_GONE` without asking Feishu.
    pub fn message_gone(&self, message_id: &str) -> bool {
        self.gone.is_gone(message_id)
    }

    /// Feishu said `message_id` is gone (a lookup outside the dispatcher learned it).
    pub fn remember_gone(&self, message_id: &str) {
        self.gone.remember(message_id);
    }

    /// Whether the dispatcher still runs (false after it panicked).
    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Resolves when the dispatcher has died (never, while it runs).
    pub async fn died(&self) {
        let mut alive = self.alive.clone();
        let _ = alive.wait_for(|a| !*a).await;
        if *alive.borrow() {
            // The sender is gone without a death (the scheduler ended normally).
            std::future::pending::<()>().await;
        }
    }

    /// Whether new jobs are taken (false once shutdown began; only `Lane::Final` ones are
    /// then).
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Where quota decisions come from right now.
    pub fn quota_source(&self) -> QuotaSource {
        *self.quota_source.borrow()
    }

    /// Queues a job; the receiver yields its final result. Refusals (queue full, deadline
    /// unreachable, shutting down) arrive through the receiver too, at once. While shutting
    /// down only `Lane::Final` jobs are taken: streams close their cards in the grace period.
    pub fn submit(&self, spec: JobSpec) -> oneshot::Receiver<JobResult> {
        self.submit_to(spec, true)
    }

    /// [`Self::submit`], queued here whoever owns the queue (a job another replica forwarded).
    pub fn submit_here(&self, spec: JobSpec) -> oneshot::Receiver<JobResult> {
        self.submit_to(spec, false)
    }

    fn submit_to(&self, spec: JobSpec, may_forward: bool) -> oneshot::Receiver<JobResult> {
        self.submit_with(spec, may_forward, None)
    }

    /// Submits `spec` (to its owner when `may_forward`); `back` is where it goes if another
    /// replica turns out to decide its chat, not before the instant given.
    fn submit_with(
        &self,
        spec: JobSpec,
        may_forward: bool,
        back: Option<(oneshot::Sender<Box<JobSpec>>, Option<Instant>)>,
    ) -> oneshot::Receiver<JobResult> {
        let (mut done, rx) = oneshot::channel();
        let uuid = spec
            .caller_uuid
            .clone()
            .unwrap_or_else(|| spec.request.uuid().to_owned());
        if !self.accepting.load(Ordering::Acquire) && spec.lane != super::Lane::Final {
            let _ = done.send(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
            return rx;
        }
        let spec = match self.forward.get().filter(|_| may_forward) {
            Some(f) => match f.forward(Box::new(spec)) {
                Ok(result) => {
                    // The waiter gone (caller cancelled, deadline): drop the peer call too.
                    tokio::spawn(async move {
                        tokio::select! {
                            r = result => { let _ = done.send(r); }
                            () = done.closed() => {}
                        }
                    });
                    return rx;
                }
                Err(spec) => *spec,
            },
            None => spec,
        };
        let now = Instant::now();
        let mut job = Job::new(spec, done, now);
        if let Some((back, stay_until)) = back {
            job.back = Some(back);
            job.stay_until = stay_until;
        }
        if let Err(mpsc::error::SendError(Command::Submit(job))) =
            self.tx.send(Command::Submit(Box::new(job)))
        {
            job.finish(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
        }
        rx
    }

    /// Submits and waits for the result. Dropping the future (the caller cancelled) takes the
    /// job out of its chat's queue at once, unless it is already being sent.
    pub async fn reply(&self, spec: JobSpec) -> JobResult {
        self.queue(spec).await
    }

    /// Submits now (the job takes its place in line at once) and returns its result to
    /// come. Dropping the future takes the job out of its chat's queue, unless it is already
    /// being sent.
    pub fn queue(&self, spec: JobSpec) -> impl Future<Output = JobResult> + Send + 'static {
        self.queue_to(spec, true)
    }

    /// [`Self::queue`], queued here whoever owns the queue (a job another replica forwarded).
    pub fn queue_here(&self, spec: JobSpec) -> impl Future<Output = JobResult> + Send + 'static {
        self.queue_to(spec, false)
    }

    /// `spec`'s uuid as its caller knows it, and the guard that takes it out of its queue
    /// when its waiter goes away.
    fn abandon_guard(&self, spec: &JobSpec) -> (String, AbandonOnDrop) {
        let uuid = spec
            .caller_uuid
            .clone()
            .unwrap_or_else(|| spec.request.uuid().to_owned());
        let guard = AbandonOnDrop {
            tx: self.tx.clone(),
            chat_id: Some(spec.chat_id.clone()),
        };
        (uuid, guard)
    }

    fn queue_to(
        &self,
        spec: JobSpec,
        may_forward: bool,
    ) -> impl Future<Output = JobResult> + Send + 'static {
        let (uuid, guard) = self.abandon_guard(&spec);
        let result = self.submit_to(spec, may_forward);
        async move {
            let result = result.await;
            guard.disarm();
            result.unwrap_or(Err(GatewayError::ShuttingDown { attempts: 0, uuid }))
        }
    }

    /// [`Self::queue_here`] for a router (`grpc::peer`): when another replica turns out to
    /// decide the job's chat (this one does not own its partition, or no more), the job
    /// comes back as [`Routed::Back`] to be routed again, not before `stay_until` (a router
    /// that just failed to reach the owner keeps it here a moment).
    pub fn queue_routed(
        &self,
        spec: JobSpec,
        stay_until: Option<Instant>,
    ) -> impl Future<Output = Routed> + Send + 'static {
        let (uuid, guard) = self.abandon_guard(&spec);
        let (back, back_rx) = oneshot::channel();
        let result = self.submit_with(spec, false, Some((back, stay_until)));
        async move {
            let routed = tokio::select! {
                biased;
                Ok(spec) = back_rx => Routed::Back(spec),
                r = result => Routed::Done(
                    r.unwrap_or(Err(GatewayError::ShuttingDown { attempts: 0, uuid })),
                ),
            };
            guard.disarm();
            routed
        }
    }

    /// Counts sends a previous process made in the local windows (single node: after a
    /// restart they are what Feishu's windows still hold; the shared store knows them in cluster mode).
    pub fn seed(&self, sends: Vec<PastSend>) {
        if !sends.is_empty() {
            let _ = self.tx.send(Command::Seed(sends));
        }
    }

    /// Takes the job with `uuid` out of `chat_id`'s queue if it has not been sent yet; whether
    /// it was (false: in flight, finished, or unknown).
    pub async fn cancel(&self, chat_id: Arc<str>, uuid: String) -> bool {
        if let Some(asked) = self.forward.get().and_then(|f| f.cancel(&chat_id, &uuid)) {
            return asked.await;
        }
        self.cancel_here(chat_id, uuid).await
    }

    /// [`Self::cancel`] in this replica's queues (asked by the replica a job came from).
    pub async fn cancel_here(&self, chat_id: Arc<str>, uuid: String) -> bool {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Cancel {
            chat_id,
            uuid,
            done,
        });
        rx.await.unwrap_or(false)
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
