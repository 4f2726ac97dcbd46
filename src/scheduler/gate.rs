//! The quota seam: before sending a chat's head job the dispatcher asks a [`QuotaGate`], and
//! it tells the gate how each send ended. Single node: the local [`QuotaTable`]. Cluster mode:
//! a [`SharedGate`] (quotas the replicas share; `app.rs` wires Redis's), which owns its
//! failure policy and answers some questions later, through a [`GateEvent`]. What a shared
//! gate needs to remember about a job, a grant or an answer travels as an [`Opaque`] value
//! the dispatcher only hands back: nothing here knows how the shared quotas are stored.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable, micros};

/// A value a shared gate gives the dispatcher to hand back later, unopened (a job's shared
/// key names, a grant, a decision's answer).
pub struct Opaque(Box<dyn Any + Send>);

impl Opaque {
    pub fn new<T: Any + Send>(value: T) -> Self {
        Self(Box::new(value))
    }

    /// The value, if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }

    /// The value, if it is a `T` (else the same `Opaque` back).
    pub fn downcast<T: Any>(self) -> Result<T, Self> {
        self.0.downcast().map(|b| *b).map_err(Self)
    }
}

impl std::fmt::Debug for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opaque")
    }
}

/// Where quota decisions come from (see [`super::Scheduler::quota_source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSource {
    /// Single node: local quotas.
    Local,
    /// Cluster mode, the shared store answering.
    Shared,
    /// The shared store is down: local quotas scaled to this replica's share.
    Fallback,
    /// The shared store is down, policy fail_closed: holding jobs.
    Holding,
}

/// Quota instants start this far from zero, so "a window before now" is representable from
/// the first moment (quota arithmetic saturates at zero).
const CLOCK_OFFSET: Micros = 24 * 3600 * 1_000_000;

/// Converts tokio instants to the quota table's microseconds and back.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn starting_now() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    pub fn micros(&self, t: Instant) -> Micros {
        CLOCK_OFFSET + micros(t.saturating_duration_since(self.origin))
    }

    pub fn instant(&self, m: Micros) -> Instant {
        self.origin + Duration::from_micros(m.saturating_sub(CLOCK_OFFSET))
    }
}

/// A send the quotas recorded; settled when its answer comes back.
#[derive(Debug)]
pub enum Grant {
    /// In the local table, decided at this instant.
    Local { decided: Micros },
    /// In the shared gate's store (what it needs to settle it).
    Shared(Opaque),
}

/// What the gate says about a chat's head job.
pub enum Verdict {
    /// Recorded in every quota: send now.
    Send(Grant),
    /// Not before this instant: ask again then.
    WaitUntil(Instant),
    /// The shared store was asked; the answer comes as [`GateEvent::Decided`] (the chat
    /// waits, busy).
    Asked,
    /// Parked in a line behind a shared key; the gate's `pump` releases it.
    InLine,
    /// The shared quotas cannot be used as configured (waiting would not bring them back):
    /// the job fails now.
    Unavailable,
    /// Another replica decides this chat's jobs (it owns the chat's partition): the job goes
    /// back to whoever routed it here (see [`super::Scheduler::queue_routed`]).
    Elsewhere,
}

/// What a shared gate's tasks report to the dispatcher.
pub enum GateEvent {
    /// The shared store answered a decision for the head job `job_id` of `chat_id`
    /// (`answer`: for [`SharedGate::decided`]).
    Decided {
        chat_id: Arc<str>,
        job_id: u64,
        answer: Opaque,
    },
    /// The heartbeat reached the shared store (true) or not (false).
    Health(bool),
    /// Local sends were written back to the shared store after an outage (or that failed).
    Replayed(Result<(), String>),
}

/// What happens to a chat after the shared store answered a decision for its head job.
pub enum Decided {
    /// Recorded: send the head job.
    Send(Grant),
    /// Parked in the line of the key that refused; [`SharedGate::pump`] releases it.
    InLine,
    /// Ask again at this instant (the store refused these keys with an error).
    RetryAt(Instant),
    /// Ask again now (the store is off, or the head changed and the grant was given back).
    AskAgain,
}

/// Quotas the replicas share (cluster mode). Keeps a local [`QuotaTable`] for its fallback
/// and for admission's bounds.
pub trait SharedGate: Send {
    /// The local table (fallback quotas; admission bounds).
    fn table(&self) -> &QuotaTable;
    fn table_mut(&mut self) -> &mut QuotaTable;
    /// Adds quotas after a live reload changed an app's list (`kinds`: their names).
    fn add_quotas(&mut self, specs: &[QuotaSpec], kinds: &[String]);
    /// May `chat`'s head job go now?
    fn ask(&mut self, chat: &Arc<str>, head: Head<'_>, now: Instant) -> Verdict;
    /// The store answered the decision for `chat`'s job; `head` says whether that job is
    /// still the chat's head (`None`: the chat has no job left).
    fn decided(
        &mut self,
        chat: &Arc<str>,
        answer: Opaque,
        head: Option<bool>,
        now: Instant,
    ) -> Decided;
    /// The send granted by `grant` was answered at `answered`: it counts until then in the
    /// keys `counted` (indexes into the job's keys), and not at all in `refused`.
    fn settle(&mut self, grant: Opaque, counted: &[usize], refused: &[usize], answered: Instant);
    /// Feishu refused a send for rate on `keys`: every replica backs off for `wait`.
    fn block(&self, keys: &[QuotaKey], wait: Duration);
    /// Chats released from lines that may ask now.
    fn pump(&mut self, now: Instant) -> Vec<Arc<str>>;
    /// The earliest instant a line needs attention.
    fn next_wake(&self) -> Option<Instant>;
    /// The heartbeat reached the store (`true`) or not. True when the gate is back on the
    /// store (every waiting chat should ask again).
    fn health(&mut self, up: bool) -> bool;
    /// The local sends were written back (or that failed). True when the gate is back on
    /// the store.
    fn replayed(&mut self, result: Result<(), String>) -> bool;
}

/// What a shared gate is started with (by the dispatcher, which owns the events channel and
/// the clock).
pub struct GateSetup {
    /// Every quota's spec, by quota id.
    pub specs: Vec<QuotaSpec>,
    /// Every quota's kind (`chat`, `user`, `app:<window>ms`), by quota id.
    pub kinds: Vec<String>,
    pub margin: Duration,
    /// How long a grant holds its slots before its answer is settled (the send timeout).
    pub hold: Duration,
    pub events: mpsc::UnboundedSender<GateEvent>,
    pub clock: Clock,
}

/// Starts a shared gate (wired by `app.rs`); with it, the gate's published
/// [`QuotaSource`].
pub type StartSharedGate =
    Box<dyn FnOnce(GateSetup) -> (Box<dyn SharedGate>, watch::Receiver<QuotaSource>) + Send>;

/// The head job a gate is asked about.
pub struct Head<'a> {
    pub id: u64,
    pub keys: &'a [QuotaKey],
    /// Cluster mode: what the shared gate keeps of the job between asks (its key names).
    pub memo: &'a mut Option<Opaque>,
    /// The job's span: a shared decision is a span under it.
    pub span: &'a tracing::Span,
    /// Its chat is on the critical path of its app's drain (`Queues::set_urgent`): a line
    /// lets it go before the chats that are not.
    pub urgent: bool,
}

/// When the app keys among `keys` leave `reserve` slots free after one more send (None: now).
pub(super) fn reserved(
    table: &QuotaTable,
    clock: Clock,
    keys: &[QuotaKey],
    reserve: u32,
    now: Instant,
) -> Option<Instant> {
    let now_m = clock.micros(now);
    keys.iter()
        .filter(|k| k.quota >= super::FIRST_APP_QUOTA)
        .map(|k| table.room_at(k, reserve.saturating_add(1), now_m))
        .max()
        .filter(|&at| at > now_m && at != Micros::MAX)
        .map(|at| clock.instant(at))
}

/// A decision of a local table (single node, or a shared gate's fallback).
pub fn ask_table(table: &mut QuotaTable, clock: Clock, keys: &[QuotaKey], now: Instant) -> Verdict {
    let now_m = clock.micros(now);
    match table.try_acquire(keys, now_m) {
        Ok(()) => Verdict::Send(Grant::Local { decided: now_m }),
        Err(at) => Verdict::WaitUntil(clock.instant(at)),
    }
}

/// The dispatcher's one source of quota decisions.
pub enum QuotaGate {
    Local(QuotaTable),
    Shared(Box<dyn SharedGate>),
}

impl QuotaGate {
    /// The local table: the quotas (single node), or the fallback and admission bounds.
    pub fn table(&self) -> &QuotaTable {
        match self {
            QuotaGate::Local(t) => t,
            QuotaGate::Shared(g) => g.table(),
        }
    }

    fn table_mut(&mut self) -> &mut QuotaTable {
        match self {
            QuotaGate::Local(t) => t,
            QuotaGate::Shared(g) => g.table_mut(),
        }
    }

    /// Adds quotas (a live reload changed an app's list): `kinds` name them in shared keys.
    pub fn add_quotas(&mut self, specs: &[QuotaSpec], kinds: &[String]) {
        match self {
            QuotaGate::Local(t) => {
                t.add_quotas(specs);
            }
            QuotaGate::Shared(g) => g.add_quotas(specs, kinds),
        }
    }

    /// Key `to` starts with what `from` counted here (see [`QuotaTable::copy_key`]); in the
    /// shared store a quota of the same kind is the same key already.
    pub fn copy_key(&mut self, from: &QuotaKey, to: &QuotaKey) {
        self.table_mut().copy_key(from, to);
    }

    /// May `chat`'s head job be sent now?
    pub fn ask(&mut self, clock: Clock, chat: &Arc<str>, head: Head<'_>, now: Instant) -> Verdict {
        match self {
            QuotaGate::Local(t) => ask_table(t, clock, head.keys, now),
            QuotaGate::Shared(g) => g.ask(chat, head, now),
        }
    }

    /// The send granted by `grant` on `keys` came back at `answered`. It counts in every key
    /// but those for which `refused(key)` (Feishu's check for them turned it away).
    pub fn settle(
        &mut self,
        clock: Clock,
        grant: Grant,
        keys: &[QuotaKey],
        refused: impl Fn(&QuotaKey) -> bool,
        answered: Instant,
    ) {
        let (counted, refused): (Vec<usize>, Vec<usize>) =
            (0..keys.len()).partition(|&i| !refused(&keys[i]));
        match grant {
            Grant::Local { decided } => {
                let pick = |idx: &[usize]| -> Vec<QuotaKey> {
                    idx.iter().map(|&i| keys[i].clone()).collect()
                };
                let t = self.table_mut();
                t.settle(&pick(&counted), decided, clock.micros(answered));
                t.unrecord(&pick(&refused), decided);
            }
            Grant::Shared(grant) => {
                if let QuotaGate::Shared(g) = self {
                    g.settle(grant, &counted, &refused, answered);
                }
            }
        }
    }

    /// Feishu refused a send for rate on `keys`: silent until `now + wait`, here and (cluster
    /// mode) on every replica.
    pub fn block(&mut self, clock: Clock, keys: &[QuotaKey], wait: Duration, now: Instant) {
        let until = clock.micros(now + wait);
        for k in keys {
            self.table_mut().block_until(k, until);
        }
        if let QuotaGate::Shared(g) = self {
            g.block(keys, wait);
        }
    }

    /// Chats released from lines (cluster mode) that may ask now.
    pub fn pump(&mut self, now: Instant) -> Vec<Arc<str>> {
        match self {
            QuotaGate::Local(_) => Vec::new(),
            QuotaGate::Shared(g) => g.pump(now),
        }
    }

    pub fn next_wake(&self) -> Option<Instant> {
        match self {
            QuotaGate::Local(_) => None,
            QuotaGate::Shared(g) => g.next_wake(),
        }
    }

    /// Forgets idle keys; returns how many keys the table still tracks.
    pub fn sweep(&mut self, clock: Clock, now: Instant) -> usize {
        let t = self.table_mut();
        t.forget_idle(clock.micros(now));
        t.live_keys()
    }
}
