//! The quota seam: before sending a chat's head job the dispatcher asks a [`QuotaGate`], and
//! it tells the gate how each send ended. Single node: the local [`QuotaTable`]. Cluster mode:
//! the Redis gate ([`crate::cluster::gate::RedisGate`]), which owns its failure policy and
//! answers some questions later, through a [`GateEvent`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::gate::RedisGate;
use crate::cluster::{ClusterError, Decision, SharedKey};
use crate::quota::{Micros, QuotaKey, QuotaSpec, QuotaTable, micros};

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
#[derive(Debug, Clone)]
pub enum Grant {
    /// In the local table, decided at this instant.
    Local { decided: Micros },
    /// In Redis, under `member` in every key.
    Shared {
        keys: Arc<[SharedKey]>,
        member: String,
    },
}

/// What the gate says about a chat's head job.
pub enum Verdict {
    /// Recorded in every quota: send now.
    Send(Grant),
    /// Not before this instant: ask again then.
    WaitUntil(Instant),
    /// Redis was asked; the answer comes as [`GateEvent::Decided`] (the chat waits, busy).
    Asked,
    /// Parked in a line behind a shared key; the gate's `pump` releases it.
    InLine,
}

/// What the Redis gate's tasks report to the dispatcher.
pub enum GateEvent {
    /// Redis answered a decision for the head job `job_id` of `chat_id`.
    Decided {
        chat_id: Arc<str>,
        job_id: u64,
        keys: Arc<[SharedKey]>,
        result: Result<Decision, ClusterError>,
    },
    /// The heartbeat reached Redis (true) or not (false).
    Health(bool),
    /// Local sends were written back to Redis after an outage (or that failed).
    Replayed(Result<(), String>),
}

/// The head job a gate is asked about.
pub struct Head<'a> {
    pub id: u64,
    pub keys: &'a [QuotaKey],
    /// Cluster mode: its Redis key names, built on the first ask and kept for the next.
    pub shared_keys: &'a mut Option<Arc<[SharedKey]>>,
    /// The job's span: a Redis decision is a `redis.decide` span under it.
    pub span: &'a tracing::Span,
}

/// A decision of a local table (single node, or the Redis gate's fallback).
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
    Redis(Box<RedisGate>),
}

impl QuotaGate {
    /// The local table: the quotas (single node), or the fallback and admission bounds.
    pub fn table(&self) -> &QuotaTable {
        match self {
            QuotaGate::Local(t) => t,
            QuotaGate::Redis(g) => g.table(),
        }
    }

    fn table_mut(&mut self) -> &mut QuotaTable {
        match self {
            QuotaGate::Local(t) => t,
            QuotaGate::Redis(g) => g.table_mut(),
        }
    }

    /// Adds quotas (a live reload changed an app's list): `kinds` name them in Redis keys.
    pub fn add_quotas(&mut self, specs: &[QuotaSpec], kinds: &[String]) {
        match self {
            QuotaGate::Local(t) => {
                t.add_quotas(specs);
            }
            QuotaGate::Redis(g) => g.add_quotas(specs, kinds),
        }
    }

    /// Key `to` starts with what `from` counted here (see [`QuotaTable::copy_key`]); in
    /// Redis a quota of the same kind is the same key already.
    pub fn copy_key(&mut self, from: &QuotaKey, to: &QuotaKey) {
        self.table_mut().copy_key(from, to);
    }

    /// May `chat`'s head job be sent now?
    pub fn ask(&mut self, clock: Clock, chat: &Arc<str>, head: Head<'_>, now: Instant) -> Verdict {
        match self {
            QuotaGate::Local(t) => ask_table(t, clock, head.keys, now),
            QuotaGate::Redis(g) => g.ask(chat, head, now),
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
            Grant::Shared { keys, member } => {
                if let QuotaGate::Redis(g) = self {
                    g.settle_shared(&keys, member, &counted, &refused, answered);
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
        if let QuotaGate::Redis(g) = self {
            g.block(keys, wait);
        }
    }

    /// Chats released from lines (cluster mode) that may ask now.
    pub fn pump(&mut self, now: Instant) -> Vec<Arc<str>> {
        match self {
            QuotaGate::Local(_) => Vec::new(),
            QuotaGate::Redis(g) => g.pump(now),
        }
    }

    pub fn next_wake(&self) -> Option<Instant> {
        match self {
            QuotaGate::Local(_) => None,
            QuotaGate::Redis(g) => g.next_wake(),
        }
    }

    /// Forgets idle keys; returns how many keys the table still tracks.
    pub fn sweep(&mut self, clock: Clock, now: Instant) -> usize {
        let t = self.table_mut();
        t.forget_idle(clock.micros(now));
        t.live_keys()
    }
}
