//! The Redis quota gate: the dispatcher's [`SharedGate`] in cluster mode. Decisions go to Redis (one script call per send, answered later through a
//! [`GateEvent`]); chats waiting on one shared key line up behind a probe; when Redis cannot
//! be reached the failure policy applies (this replica's share of every quota, or hold) until
//! a heartbeat reaches it again. Its state is published through a `watch` channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

mod outage;

use outage::{monitor, share_of};

use super::owned::{LocalHold, Split};
use super::partitions::{KnownSend, Partitions, Route};
use super::{ClusterError, Decision, Lane, RedisFailurePolicy, RedisQuota, SharedKey};
use crate::metrics::Metrics;
use crate::quota::{QuotaKey, QuotaSpec, QuotaTable};
use crate::scheduler::gate::{
    Clock, Decided, GateEvent, GateSetup, Grant, Head, Opaque, QuotaSource, SharedGate,
    StartSharedGate, Verdict, ask_table,
};

/// Decisions in flight per line. Measured (tests/cluster.rs, 3 replicas): 1 probe → 1.24 Redis
/// decisions per send, ~26 s drain; 3 probes → 1.78 per send, ~25 s. One is kept.
const LINE_PROBES: usize = 1;

/// A job whose quota decision Redis refused with an error about its keys asks again after this
/// (the rest of the replica keeps using Redis; the job's deadline still applies).
const KEY_ERROR_RETRY: Duration = Duration::from_secs(1);

/// How often a held (fail-closed or replaying) chat re-checks whether Redis is back, and how
/// often the heartbeat rechecks Redis while the gate is off it.
const HOLD_RECHECK: Duration = Duration::from_millis(250);

/// Heartbeat period while Redis answers.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How often a job whose partition this replica is about to claim asks again.
const CLAIM_RECHECK: Duration = Duration::from_millis(50);

/// Up to this much jitter on a line's reopening, so replicas waiting on one key do not wake in
/// lockstep (µs).
const LINE_JITTER_US: u64 = 2_000;

/// The gate's relation to Redis.
enum Mode {
    Up,
    /// Redis unreachable; local quotas (scaled, floored) or holding.
    Down,
    /// Redis back; the local sends are being written to it. Sends wait meanwhile (a few ms).
    Replaying,
}

/// Chats waiting on one shared key (typically an app quota). Only a few of them (the probes)
/// ask Redis at a time; each grant lets the next one go at once, a refusal makes all wait until
/// `until`. This keeps Redis round trips near one per send instead of one per waiting chat per
/// window.
struct Line {
    until: Instant,
    waiters: VecDeque<Arc<str>>,
    /// Waiters on the critical path of their app's drain (`Head::urgent`): they go first.
    urgent: VecDeque<Arc<str>>,
    probes: Vec<Arc<str>>,
}

impl Line {
    fn is_probe(&self, chat: &str) -> bool {
        self.probes.iter().any(|p| &**p == chat)
    }

    fn drop_probe(&mut self, chat: &str) {
        self.probes.retain(|p| &**p != chat);
    }
}

/// A decision Redis answered, for [`SharedGate::decided`].
struct Answer {
    split: Arc<Split>,
    local: Option<LocalHold>,
    result: Result<Decision, ClusterError>,
}

/// A grant: the send's member in its Redis keys, and its reservation here (partitioned).
struct SharedGrant {
    split: Arc<Split>,
    member: String,
    local: Option<LocalHold>,
}

/// The Redis gate (see the module doc).
pub struct RedisGate {
    store: Arc<RedisQuota>,
    /// Partitioned keys: this replica's partitions (their targets' windows are in `table`).
    parts: Option<Arc<Partitions>>,
    mode: Mode,
    /// The local fallback: this replica's share of every quota, floored at the outage start.
    /// Admission bounds come from it too (a full-size table while Redis is used, which holds
    /// the windows of this replica's partitions' targets when the keys are partitioned).
    table: QuotaTable,
    full_specs: Vec<QuotaSpec>,
    /// Each quota's kind as named in Redis keys: `chat`, `user`, `app:<window>ms`.
    kinds: Vec<String>,
    margin: Duration,
    /// How long a grant holds its slots before its answer is settled (the send timeout).
    hold: Duration,
    lines: HashMap<String, Line>,
    state: watch::Sender<QuotaSource>,
    events: mpsc::UnboundedSender<GateEvent>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

impl RedisGate {
    /// How the scheduler starts a Redis gate on `store` (with `parts` when its keys are
    /// partitioned).
    pub fn starter(
        store: Arc<RedisQuota>,
        parts: Option<Arc<Partitions>>,
        metrics: Arc<Metrics>,
    ) -> StartSharedGate {
        Box::new(move |setup| {
            let (gate, state) = Self::start(store, parts, setup, metrics);
            (Box::new(gate) as Box<dyn SharedGate>, state)
        })
    }

    /// Starts the heartbeat and the settler; events for the dispatcher go to `events`.
    pub fn start(
        store: Arc<RedisQuota>,
        parts: Option<Arc<Partitions>>,
        setup: GateSetup,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<QuotaSource>) {
        let GateSetup {
            specs,
            kinds,
            margin,
            hold,
            events,
            clock,
        } = setup;
        let (state, state_rx) = watch::channel(QuotaSource::Shared);
        metrics.set_redis_state(true, false);
        tokio::spawn(monitor(store.clone(), events.downgrade(), state_rx.clone()));
        tokio::spawn(RedisQuota::run_settler(Arc::downgrade(&store)));
        let gate = Self {
            table: QuotaTable::new(specs.clone(), margin, hold),
            parts: parts.filter(|_| store.partitioned()),
            store,
            mode: Mode::Up,
            full_specs: specs,
            kinds,
            margin,
            hold,
            lines: HashMap::new(),
            state,
            events,
            metrics,
            clock,
        };
        (gate, state_rx)
    }

    fn shared_key(&self, k: &QuotaKey) -> SharedKey {
        self.store.shared_key(
            &self.kinds[k.quota],
            &k.id,
            self.full_specs[k.quota].limit.get(),
            self.table.span(k.quota),
        )
    }

    /// Whether Redis holds `k`'s window (else this replica's table, partitioned).
    fn in_redis(&self, k: &QuotaKey) -> bool {
        self.store.holds(&self.kinds[k.quota])
    }

    /// The Redis side of `keys` (those Redis holds): named by each quota's kind (never its
    /// position in the config, so reordering `[quotas] app` keeps every live window where it
    /// was).
    pub fn shared_keys(&self, keys: &[QuotaKey]) -> Vec<SharedKey> {
        keys.iter()
            .filter(|k| self.in_redis(k))
            .map(|k| self.shared_key(k))
            .collect()
    }

    /// How `chat`'s job with `keys` is decided.
    fn split(&self, chat: &str, keys: &[QuotaKey]) -> Split {
        Split::new(chat, keys, self.parts.as_ref(), |k| {
            self.in_redis(k).then(|| self.shared_key(k))
        })
    }

    /// Forgets a granted send that will not leave (the slot would stay spent for a window).
    pub fn release(&self, keys: Arc<[SharedKey]>, member: String) {
        if keys.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.release(&keys, &member).await {
                tracing::debug!(error = %e, "releasing an unused grant failed; retried at the next heartbeat");
                store.release_later(keys.to_vec(), member);
            }
        });
    }

    /// Redis answered the decision for `chat`'s job; `head` says whether that job is still the
    /// chat's head (`None`: the chat has no job left).
    fn decided_answer(
        &mut self,
        chat: &Arc<str>,
        Answer {
            split,
            local,
            result,
        }: Answer,
        head: Option<bool>,
        now: Instant,
    ) -> Decided {
        let keys = split.shared.clone();
        let granted_here = matches!(result, Ok(Decision::Granted { .. })) && head == Some(true);
        let local = match local {
            // Not sent: the reservation here goes back.
            Some(l) if !granted_here => {
                l.undo(&mut self.table);
                None
            }
            l => l,
        };
        // Lines first: whatever happens to the chat, its probes must be handed on.
        let refused_on = match &result {
            Ok(Decision::Wait { wait, key }) => {
                let jitter = Duration::from_micros(rand::rng().random_range(0..=LINE_JITTER_US));
                Some((keys[*key].name.clone(), now + *wait + jitter))
            }
            _ => None,
        };
        for k in keys.iter() {
            match &refused_on {
                Some((name, until)) if *name == k.name => {
                    let line = self.lines.entry(name.clone()).or_insert_with(|| Line {
                        until: *until,
                        waiters: VecDeque::new(),
                        urgent: VecDeque::new(),
                        probes: Vec::new(),
                    });
                    line.until = line.until.max(*until);
                    line.drop_probe(chat);
                    if head.is_some() {
                        // The refused chat keeps its place at the front of the line.
                        line.waiters.push_front(chat.clone());
                    }
                }
                _ => {
                    if let Some(line) = self.lines.get_mut(&k.name) {
                        line.drop_probe(chat);
                    }
                }
            }
        }
        match result {
            Ok(Decision::Granted { member }) if head == Some(true) => {
                Decided::Send(Grant::Shared(Opaque::new(SharedGrant {
                    split,
                    member,
                    local,
                })))
            }
            // The head changed meanwhile (deadline, cancel) or is gone: nothing is sent for
            // this grant, so give the slot back.
            Ok(Decision::Granted { member }) => {
                self.release(keys, member);
                Decided::AskAgain
            }
            Ok(Decision::Wait { .. }) => Decided::InLine,
            // Redis is unreachable: the failure policy, for every chat.
            Err(e) if e.is_outage() => {
                self.down(&e.to_string());
                Decided::AskAgain
            }
            // Redis answered with an error about these keys (wrong type, a script error): only
            // the jobs that use them wait, and ask again a little later.
            Err(e) => {
                let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
                tracing::warn!(error = %e, keys = ?names, "Redis refused a quota decision; the job asks again");
                Decided::RetryAt(now + KEY_ERROR_RETRY)
            }
        }
    }

    /// Counts the sends handed over with partitions this replica claimed (their last
    /// owner's, see `cluster::partitions::handover`).
    fn count_handed(&mut self, handed: Vec<KnownSend>) {
        let quotas = self.table.specs().len();
        for send in handed.into_iter().filter(|s| s.quota < quotas) {
            let key = QuotaKey::new(send.quota, send.target);
            self.table
                .record_arrived(std::slice::from_ref(&key), self.clock.micros(send.at));
        }
    }

    /// A granted send was answered at `answered`: it counts until then in `counted` (indexes
    /// into the job's keys), and not at all in the others (a rate refusal, see the scheduler).
    fn settle_grant(
        &mut self,
        SharedGrant {
            split,
            member,
            local,
        }: SharedGrant,
        counted: &[usize],
        refused: &[usize],
        answered: Instant,
    ) {
        if let Some(l) = local {
            let p = l.partition();
            let (kept, in_flight) = l.settle(&mut self.table, counted, self.clock.micros(answered));
            if let Some(parts) = &self.parts {
                for k in kept {
                    parts.sent(p, k.quota, k.id, answered);
                }
            }
            drop(in_flight);
        }
        self.store
            .settle_later(split.shared_among(counted), member.clone(), answered);
        let refused = split.shared_among(refused);
        if !refused.is_empty() {
            self.release(refused.into(), member);
        }
    }
}

// === impl SharedGate ===

impl SharedGate for RedisGate {
    fn table(&self) -> &QuotaTable {
        &self.table
    }

    fn table_mut(&mut self) -> &mut QuotaTable {
        &mut self.table
    }

    /// Adds quotas after a live reload changed an app's list (`kinds`: their Redis names).
    fn add_quotas(&mut self, specs: &[QuotaSpec], kinds: &[String]) {
        self.full_specs.extend_from_slice(specs);
        self.kinds.extend_from_slice(kinds);
        let local = matches!(self.mode, Mode::Down)
            && self.store.config().on_failure == RedisFailurePolicy::Local;
        if local {
            // On the fallback: this replica's share, as `down` made the others.
            let replicas = self.store.replicas();
            let scaled: Vec<QuotaSpec> = specs.iter().map(|s| share_of(s, replicas)).collect();
            self.table.add_quotas(&scaled);
        } else {
            self.table.add_quotas(specs);
        }
    }

    /// May `chat`'s head job go now?
    fn ask(&mut self, chat: &Arc<str>, head: Head<'_>, now: Instant) -> Verdict {
        let Head {
            id: job_id,
            keys,
            memo,
            span,
            urgent,
        } = head;
        match (&self.mode, self.store.config().on_failure) {
            (Mode::Up, _) => {}
            // Replaying: local sends made now would miss the snapshot being written to Redis,
            // so wait the few milliseconds until it is done.
            // A Redis that refuses the credentials is a misconfiguration, not an outage: local
            // sends could add to the other replicas' in Feishu's windows, and waiting will
            // not fix it, so the reply fails at once, whatever the policy.
            (Mode::Down, _) if self.store.shared().refused(Lane::Quota) => {
                return Verdict::Unavailable;
            }
            // Held while Redis is out; but one not answered since start will not come back by
            // waiting for a reply's deadline: the reply fails at once.
            (Mode::Down, RedisFailurePolicy::FailClosed)
                if self.store.shared().unusable_for(Lane::Quota).is_some() =>
            {
                return Verdict::Unavailable;
            }
            (Mode::Replaying, _) | (Mode::Down, RedisFailurePolicy::FailClosed) => {
                return Verdict::WaitUntil(now + HOLD_RECHECK);
            }
            (Mode::Down, RedisFailurePolicy::Local) => {
                return ask_table(&mut self.table, self.clock, keys, now);
            }
        }
        let cached = memo
            .as_ref()
            .and_then(|m| m.downcast_ref::<Arc<Split>>())
            .cloned();
        let split = match cached {
            Some(s) => s,
            None => {
                let s = Arc::new(self.split(chat, keys));
                *memo = Some(Opaque::new(s.clone()));
                s
            }
        };
        // Partitioned: only the owner of the job's partition decides it, once the last
        // owner's sends have left the targets' windows.
        if let (Some(parts), Some(p)) = (&self.parts, split.partition) {
            let mut handed = Vec::new();
            let route = parts.route_taking(p, now, &mut handed);
            self.count_handed(handed);
            match route {
                Route::Elsewhere => return Verdict::Elsewhere,
                Route::Claiming => return Verdict::WaitUntil(now + CLAIM_RECHECK),
                Route::Here(o) if o.sendable_at > now => return Verdict::WaitUntil(o.sendable_at),
                Route::Here(_) => {}
            }
        }
        let shared = split.shared.clone();
        // Behind a closed line, or another chat is probing it: wait in that line.
        let blocked = shared.iter().find(|k| {
            self.lines.get(&k.name).is_some_and(|line| {
                !line.is_probe(chat) && (line.until > now || line.probes.len() >= LINE_PROBES)
            })
        });
        if let Some(k) = blocked {
            let line = self.lines.get_mut(&k.name).expect("found above");
            match urgent {
                true => line.urgent.push_back(chat.clone()),
                false => line.waiters.push_back(chat.clone()),
            }
            return Verdict::InLine;
        }
        // The targets' windows here first: free, and a refusal costs no Redis call.
        let local = match (&self.parts, split.partition) {
            (Some(parts), Some(p)) => {
                let Some(sending) = parts.begin_send(p, now) else {
                    // Lost since `route` (a beat ran): ask again.
                    return Verdict::WaitUntil(now);
                };
                let now_m = self.clock.micros(now);
                match LocalHold::reserve(&mut self.table, &split, keys, sending, now_m) {
                    Ok(l) => Some(l),
                    Err(at) => return Verdict::WaitUntil(self.clock.instant(at)),
                }
            }
            _ => None,
        };
        if shared.is_empty() {
            return Verdict::Send(Grant::Shared(Opaque::new(SharedGrant {
                split,
                member: String::new(),
                local,
            })));
        }
        for k in shared.iter() {
            if let Some(line) = self.lines.get_mut(&k.name)
                && !line.is_probe(chat)
            {
                line.probes.push(chat.clone());
            }
        }
        let (store, events, hold, chat) = (
            self.store.clone(),
            self.events.clone(),
            self.hold,
            chat.clone(),
        );
        let span = tracing::info_span!(parent: span, "redis.decide", otel.kind = "client", keys = shared.len(), granted = tracing::field::Empty, otel.status_code = tracing::field::Empty);
        tokio::spawn(async move {
            let result = store
                .try_acquire(&shared, hold)
                .instrument(span.clone())
                .await;
            record_decision(&span, &result);
            drop(span);
            let _ = events.send(GateEvent::Decided {
                chat_id: chat,
                job_id,
                answer: Opaque::new(Answer {
                    split,
                    local,
                    result,
                }),
            });
        });
        Verdict::Asked
    }

    fn decided(
        &mut self,
        chat: &Arc<str>,
        answer: Opaque,
        head: Option<bool>,
        now: Instant,
    ) -> Decided {
        match answer.downcast::<Answer>() {
            Ok(answer) => self.decided_answer(chat, answer, head, now),
            // Not one of this gate's answers (cannot happen): ask again.
            Err(_) => Decided::AskAgain,
        }
    }

    fn settle(&mut self, grant: Opaque, counted: &[usize], refused: &[usize], answered: Instant) {
        if let Ok(grant) = grant.downcast::<SharedGrant>() {
            self.settle_grant(grant, counted, refused, answered);
        }
    }

    /// Feishu refused a send for rate on `keys`: every replica backs off for `wait`.
    fn block(&self, keys: &[QuotaKey], wait: Duration) {
        if !matches!(self.mode, Mode::Up) {
            return;
        }
        let (store, shared) = (self.store.clone(), self.shared_keys(keys));
        tokio::spawn(async move {
            for k in &shared {
                if let Err(e) = store.block(k, wait).await {
                    tracing::debug!(error = %e, "blocking a key in Redis failed");
                }
            }
        });
    }

    /// Lines whose time has come: their first waiters may ask (and become the next probes).
    fn pump(&mut self, now: Instant) -> Vec<Arc<str>> {
        let mut release = Vec::new();
        self.lines.retain(|_, line| {
            if line.until > now {
                return true;
            }
            let free = LINE_PROBES.saturating_sub(line.probes.len());
            for _ in 0..free {
                match line.urgent.pop_front().or_else(|| line.waiters.pop_front()) {
                    Some(w) => release.push(w),
                    None => break,
                }
            }
            !(line.waiters.is_empty() && line.urgent.is_empty() && line.probes.is_empty())
        });
        release
    }

    /// The earliest instant a line needs attention.
    fn next_wake(&self) -> Option<Instant> {
        self.lines
            .values()
            .filter(|l| {
                l.probes.len() < LINE_PROBES && !(l.waiters.is_empty() && l.urgent.is_empty())
            })
            .map(|l| l.until)
            .min()
    }

    /// The heartbeat reached Redis (`true`) or not. Returns true when the gate is back on
    /// Redis (every waiting chat should ask again).
    fn health(&mut self, up: bool) -> bool {
        self.heartbeat(up)
    }

    /// The local sends were written back to Redis (or that failed). Returns true when the gate
    /// is back on Redis.
    fn replayed(&mut self, result: Result<(), String>) -> bool {
        self.replay_done(result)
    }
}

/// Puts Redis's answer on the decision's span.
fn record_decision(span: &tracing::Span, result: &Result<Decision, ClusterError>) {
    match result {
        Ok(Decision::Granted { .. }) => {
            span.record("granted", true);
        }
        Ok(Decision::Wait { .. }) => {
            span.record("granted", false);
        }
        Err(_) => {
            span.record("otel.status_code", "ERROR");
        }
    }
}
