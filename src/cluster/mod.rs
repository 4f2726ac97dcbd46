//! Cluster mode: every replica's quota decisions go through one Redis, atomically. One Lua
//! script call per decision checks all of a job's keys (chat, user, app/s, app/min) against
//! Redis `TIME` and records the send in all of them or in none. Also: the replica heartbeat
//! (observed replica count), the replay of local sends after a Redis outage, and the release of
//! slots recorded for sends that never left (a decision whose answer was lost to a timeout, or a
//! grant that arrived after its job was gone): such a slot would otherwise stay spent for a
//! whole window — a minute of the app's 1000/min quota.
//!
//! Keys are `{<prefix>}:<kind>:<id>` sorted sets, kind `chat`, `user` or `app:<window>ms`
//! (score = the send's latest possible arrival in µs: see DECIDE_LUA). They all carry
//! the same hash tag, so a multi-key script is valid on Redis Cluster: every quota key lives in
//! one slot (one shard). Feishu's quotas cap the decision rate at tens per second per app, far
//! below what one Redis shard serves, and the chat quota must be shared by all apps, so no
//! finer tag (e.g. per app) is possible.
//!
//! Connections: [`crate::redis_conn`] (shared with the job store).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

pub use crate::config::{ClusterConfig, RedisFailurePolicy, RedisMode, redact_url};
use crate::metrics::Metrics;

mod budget;
pub mod gate;
pub mod partitions;
mod scripts;

pub use crate::redis_conn::{ClusterError, Lane, SharedRedis};
pub use budget::RedisBudgetCounter;

use crate::quota::micros;
use scripts::{
    BLOCK_LUA, DECIDE_LUA, HEARTBEAT_LUA, INSPECT_LUA, RELEASE_LUA, REPLAY_LUA, SETTLE_LUA,
};

/// Lost decisions remembered for release (each a few hundred bytes).
const MAX_UNKNOWN: usize = 10_000;
/// Answers waiting to be settled in Redis, at most (Redis slower than Feishu's quotas allow
/// sends: something is wrong; the oldest are dropped and count until their timeout).
const MAX_SETTLES: usize = 10_000;
/// Answers written back per SETTLE call.
const SETTLE_BATCH: usize = 256;
/// Pause before writing back a batch of answers again after Redis failed it.
const SETTLE_RETRY: Duration = Duration::from_millis(100);
/// How long the settler leaves new answers for a decision to carry (the next DECIDE applies
/// the answers waiting before it decides: no SETTLE call of their own). Other replicas see
/// those sends as in flight that much longer, which only ever makes them wait, never send.
const SETTLE_LINGER: Duration = Duration::from_millis(5);

/// One answer to write back: the send's keys, its member, when its answer came.
struct Settle {
    keys: Vec<SharedKey>,
    member: String,
    answered: Instant,
}

/// What Redis decided for one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Recorded in every key under `member`: send now.
    Granted { member: String },
    /// Nothing recorded; every key has room after `wait`; `key` (index) waits longest.
    Wait { wait: Duration, key: usize },
}

/// One key of a decision: its Redis name, limit and span (window + margin) in µs.
#[derive(Debug, Clone)]
pub struct SharedKey {
    pub name: String,
    pub limit: u32,
    pub span_us: u64,
}

/// The shared quota store.
pub struct RedisQuota {
    redis: Arc<SharedRedis>,
    decide: redis::Script,
    replay: redis::Script,
    heartbeat: redis::Script,
    settle: redis::Script,
    /// Answers waiting to be written back (one SETTLE call per batch, see [`Self::settle_later`]).
    settles: Mutex<VecDeque<Settle>>,
    settle_wake: Arc<tokio::sync::Notify>,
    block: redis::Script,
    release: redis::Script,
    /// Decisions whose answer was lost (timeout, broken connection): Redis may have recorded
    /// them. Released at the next heartbeat that succeeds. Bounded: past the bound the oldest
    /// stay spent (stricter, never looser).
    unknown: Mutex<VecDeque<(Vec<SharedKey>, String)>>,
    replica_id: String,
    observed_replicas: AtomicUsize,
    next_member: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Appends answers to a SETTLE or DECIDE call: their keys, and per answer (number of keys,
/// member, µs since the answer).
fn add_settles(inv: &mut redis::ScriptInvocation<'_>, batch: &[Settle]) {
    let now = Instant::now();
    for s in batch {
        for k in &s.keys {
            inv.key(&k.name);
        }
        inv.arg(s.keys.len())
            .arg(&s.member)
            .arg(micros(now.saturating_duration_since(s.answered)));
    }
}

impl RedisQuota {
    /// The quota store on `redis` (connections made on first use).
    pub fn new(redis: Arc<SharedRedis>, metrics: Arc<Metrics>) -> Self {
        Self {
            decide: redis::Script::new(DECIDE_LUA),
            replay: redis::Script::new(REPLAY_LUA),
            heartbeat: redis::Script::new(HEARTBEAT_LUA),
            settle: redis::Script::new(SETTLE_LUA),
            settles: Mutex::new(VecDeque::new()),
            settle_wake: Arc::new(tokio::sync::Notify::new()),
            block: redis::Script::new(BLOCK_LUA),
            release: redis::Script::new(RELEASE_LUA),
            unknown: Mutex::new(VecDeque::new()),
            replica_id: uuid::Uuid::new_v4().simple().to_string(),
            observed_replicas: AtomicUsize::new(0),
            next_member: AtomicU64::new(0),
            redis,
            metrics,
        }
    }

    pub fn config(&self) -> &ClusterConfig {
        self.redis.config()
    }

    /// The connections this store uses.
    pub fn shared(&self) -> &Arc<SharedRedis> {
        &self.redis
    }

    /// Redis key of a quota of `kind` (`chat`, `user`, `app:<window>ms`) and id `id` (one hash
    /// tag for all: see the module doc).
    pub fn key_name(&self, kind: &str, id: &str) -> String {
        format!("{{{}}}:{kind}:{id}", self.config().key_prefix)
    }

    /// One key of a decision: quota `kind` of `id`, its limit and span (window + margin, µs).
    pub fn shared_key(&self, kind: &str, id: &str, limit: u32, span_us: u64) -> SharedKey {
        SharedKey {
            name: self.key_name(kind, id),
            limit,
            span_us,
        }
    }

    /// Replicas to share the quotas with in local fallback: the observed count, else configured.
    pub fn replicas(&self) -> usize {
        match self.observed_replicas.load(Ordering::Relaxed) {
            0 => self.config().replicas.max(1),
            n => n,
        }
    }

    /// Runs one script call with the timeout; a failure drops the connection (reconnect next).
    async fn call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        self.redis.call_on(Lane::Quota, op, inv).await
    }

    /// One atomic decision for all `keys` (one round trip). A grant holds its slots for
    /// `hold` (the send timeout) unless its answer is settled earlier.
    pub async fn try_acquire(
        &self,
        keys: &[SharedKey],
        hold: Duration,
    ) -> Result<Decision, ClusterError> {
        let mut inv = self.decide.prepare_invoke();
        for k in keys {
            inv.key(&k.name);
        }
        let member = format!(
            "{}:{}",
            self.replica_id,
            self.next_member.fetch_add(1, Ordering::Relaxed)
        );
        inv.arg(&member).arg(micros(hold)).arg(keys.len());
        for k in keys {
            inv.arg(k.limit).arg(k.span_us);
        }
        // The answers waiting to be written back ride along (one slot: any decision may carry
        // any of them).
        let carried = self.take_settles();
        add_settles(&mut inv, &carried);
        let answer: Vec<i64> = match self.call("decide", inv).await {
            Ok(a) => a,
            Err(e) => {
                // Applying an answer twice is harmless: they go back to the settler.
                self.put_back_settles(carried);
                if !matches!(e, ClusterError::Protocol(_)) {
                    self.release_later(keys.to_vec(), member);
                }
                return Err(e);
            }
        };
        match answer.as_slice() {
            [1, _] => Ok(Decision::Granted { member }),
            [0, wait, key] => {
                let key = usize::try_from(*key - 1)
                    .unwrap_or(0)
                    .min(keys.len().saturating_sub(1));
                // Never trust a wait beyond the key's span (the script caps it too).
                let span = keys.get(key).map_or(1, |k| k.span_us.max(1));
                let wait = u64::try_from(*wait).unwrap_or(1).clamp(1, span);
                Ok(Decision::Wait {
                    wait: Duration::from_micros(wait),
                    key,
                })
            }
            other => Err(ClusterError::Protocol(format!("decide returned {other:?}"))),
        }
    }

    /// The send recorded as `member` on `keys` was answered at `answered`: queue the answer
    /// for the settler task ([`Self::run_settler`]), which writes batches in one call each.
    pub fn settle_later(&self, keys: Vec<SharedKey>, member: String, answered: Instant) {
        if keys.is_empty() {
            return;
        }
        let mut q = self.settles.lock();
        if q.len() >= MAX_SETTLES {
            // Redis is not keeping up: the oldest stay at their timeout (stricter, never looser).
            q.pop_front();
        }
        q.push_back(Settle {
            keys,
            member,
            answered,
        });
        drop(q);
        self.settle_wake.notify_one();
    }

    /// Writes queued answers back, a batch per Redis call, until the store is dropped. A failed
    /// batch is retried (a settle only ever moves a score earlier, to the answer instant, so a
    /// repeat is harmless); past `MAX_SETTLES` waiting answers the oldest are dropped and
    /// those sends count until their timeout (stricter, never looser).
    pub async fn run_settler(store: std::sync::Weak<Self>) {
        loop {
            let Some(s) = store.upgrade() else { return };
            let notify = s.settle_wake.clone();
            let wake = notify.notified();
            let idle = s.settles.lock().is_empty();
            drop(s);
            if idle {
                wake.await;
            }
            // A decision made meanwhile carries what came in (see DECIDE_LUA).
            tokio::time::sleep(SETTLE_LINGER).await;
            let Some(s) = store.upgrade() else { return };
            let batch = s.take_settles();
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = s.settle_batch(&batch).await {
                // The answers are still known: put them back (oldest first) and try again
                // shortly, or each of those sends would hold its slot until its timeout.
                tracing::debug!(error = %e, sends = batch.len(), "settling answers in Redis failed; retrying");
                s.put_back_settles(batch);
                drop(s);
                tokio::time::sleep(SETTLE_RETRY).await;
            }
        }
    }

    /// Up to a batch of the answers waiting, oldest first.
    fn take_settles(&self) -> Vec<Settle> {
        let mut q = self.settles.lock();
        let n = q.len().min(SETTLE_BATCH);
        q.drain(..n).collect()
    }

    /// Answers a failed call did not surely write: back at the front, in their order.
    fn put_back_settles(&self, batch: Vec<Settle>) {
        if batch.is_empty() {
            return;
        }
        let mut q = self.settles.lock();
        for settle in batch.into_iter().rev() {
            q.push_front(settle);
        }
        while q.len() > MAX_SETTLES {
            q.pop_front();
        }
        drop(q);
        self.settle_wake.notify_one();
    }

    async fn settle_batch(&self, batch: &[Settle]) -> Result<(), ClusterError> {
        let mut inv = self.settle.prepare_invoke();
        add_settles(&mut inv, batch);
        let _: i64 = self.call("settle", inv).await?;
        Ok(())
    }

    /// Forgets the send recorded as `member` (granted, but it never left). Returns how many
    /// keys held it.
    pub async fn release(&self, keys: &[SharedKey], member: &str) -> Result<u64, ClusterError> {
        let mut inv = self.release.prepare_invoke();
        for k in keys {
            inv.key(&k.name);
        }
        inv.arg(member);
        self.call("release", inv).await
    }

    /// Remembers a send Redis may hold that never left, for release at the next heartbeat
    /// that succeeds.
    pub fn release_later(&self, keys: Vec<SharedKey>, member: String) {
        let mut unknown = self.unknown.lock();
        if unknown.len() >= MAX_UNKNOWN {
            unknown.pop_front();
        }
        unknown.push_back((keys, member));
    }

    /// Releases the decisions whose answers were lost; stops at the first failure (the rest
    /// wait for the next heartbeat). Returns how many sends Redis had recorded for them.
    pub async fn release_unknown(&self) -> Result<u64, ClusterError> {
        let mut freed = 0;
        loop {
            let Some((keys, member)) = self.unknown.lock().pop_front() else {
                return Ok(freed);
            };
            match self.release(&keys, &member).await {
                Ok(n) => freed += u64::from(n > 0),
                Err(e) => {
                    self.unknown.lock().push_front((keys, member));
                    return Err(e);
                }
            }
        }
    }

    /// Feishu rejected for rate: treat `key` as spent for `wait` on every replica.
    pub async fn block(&self, key: &SharedKey, wait: Duration) -> Result<(), ClusterError> {
        let mut inv = self.block.prepare_invoke();
        inv.key(&key.name)
            .arg(key.limit)
            .arg(key.span_us)
            .arg(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX));
        let _: i64 = self.call("block", inv).await?;
        Ok(())
    }

    /// Writes sends made with local quotas (each one's latest possible arrival, µs relative to
    /// now) back into Redis, so the shared windows count them once Redis is used again.
    pub async fn replay(&self, key: &SharedKey, offsets_us: &[i64]) -> Result<(), ClusterError> {
        if offsets_us.is_empty() {
            return Ok(());
        }
        let mut inv = self.replay.prepare_invoke();
        inv.key(&key.name).arg(key.span_us).arg(format!(
            "{}:replay{}",
            self.replica_id,
            self.next_member.fetch_add(1, Ordering::Relaxed)
        ));
        for a in offsets_us {
            inv.arg(*a);
        }
        let _: i64 = self.call("replay", inv).await?;
        Ok(())
    }

    /// The shared counts of `keys` (introspection; nothing is changed): per key, the sends in
    /// its window and when it has room for one more.
    pub async fn inspect(&self, keys: &[SharedKey]) -> Result<Vec<(u32, Duration)>, ClusterError> {
        let script = redis::Script::new(INSPECT_LUA);
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(&k.name);
        }
        for k in keys {
            inv.arg(k.limit).arg(k.span_us);
        }
        let v: Vec<i64> = self.call("inspect", inv).await?;
        if v.len() != 2 * keys.len() {
            return Err(ClusterError::Protocol(format!(
                "inspect returned {} values",
                v.len()
            )));
        }
        Ok(v.chunks(2)
            .map(|p| {
                (
                    u32::try_from(p[0]).unwrap_or(u32::MAX),
                    Duration::from_micros(u64::try_from(p[1]).unwrap_or(0)),
                )
            })
            .collect())
    }

    /// Announces this replica and learns how many are alive.
    pub async fn beat(&self) -> Result<usize, ClusterError> {
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key(format!("{{{}}}:replicas", self.config().key_prefix))
            .arg(&self.replica_id);
        let n: i64 = self.call("heartbeat", inv).await?;
        let n = usize::try_from(n.max(1)).unwrap_or(1);
        self.observed_replicas.store(n, Ordering::Relaxed);
        self.metrics.set_replicas(n);
        if !self.unknown.lock().is_empty() {
            match self.release_unknown().await {
                Ok(0) => {}
                Ok(freed) => tracing::info!(
                    freed,
                    "released quota slots Redis had recorded for decisions whose answer was lost"
                ),
                Err(e) => {
                    tracing::debug!(error = %e, "releasing lost decisions failed; will retry")
                }
            }
        }
        Ok(n)
    }
}
