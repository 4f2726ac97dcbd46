//! Cluster mode: every replica's quota decisions go through one Redis, atomically. One Lua
//! script call per decision checks all of a job's keys (chat, user, app/s, app/min) against
//! Redis `TIME` and records the send in all of them or in none. Also: the replica heartbeat
//! (observed replica count), the replay of local sends after a Redis outage, and the release of
//! slots recorded for sends that never left (a decision whose answer was lost to a timeout, or a
//! grant that arrived after its job was gone): such a slot would otherwise stay spent for a
//! whole window — a minute of the app's 1000/min quota.
//!
//! Keys are sorted sets named `{<tag>}:<kind>:<id>`, kind `chat`, `user`, `message`, `card`,
//! `app:<window>ms` or `typing:<window>ms` (score = the send's latest possible arrival in µs:
//! see DECIDE_LUA). A script's keys must share a slot on Redis Cluster, so the tags are:
//! - **One slot** (no peers): every key on `{<prefix>}`, one shard carries every decision.
//! - **Partitioned** (`[cluster] owner_windows`, with peers; ARCHITECTURE.md "Scaling out over a Redis
//!   Cluster"): chat, message and card windows are kept in the memory of the replica owning
//!   their partition ([`partitions`], [`gate`]); an app's keys are on one of 12 app tags
//!   spread evenly over the slots (`{<prefix>:app:<b>.<n>}`), a user's on its partition's
//!   `{<prefix>:p:<n>}`. A decision is one script call per slot
//!   it touches: the app's, plus the user's partition when the job names a user (reserved
//!   first, released when the app refuses). Answers are batched per slot (`cluster::settles`).
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
mod owned;
pub mod partitions;
mod scripts;
mod settles;

pub use crate::redis_conn::{ClusterError, Lane, SharedRedis};
pub use budget::RedisBudgetCounter;

use crate::quota::micros;
use scripts::{
    BLOCK_LUA, DECIDE_LUA, HEARTBEAT_LUA, INSPECT_LUA, RELEASE_LUA, REPLAY_LUA, SETTLE_LUA,
};
use settles::{Settle, Settles, add_settles, by_slot};

/// Lost decisions remembered for release (each a few hundred bytes).
const MAX_UNKNOWN: usize = 10_000;
/// Pause before writing back a batch of answers again after Redis failed it.
const SETTLE_RETRY: Duration = Duration::from_millis(100);
/// What Redis decided for one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Recorded in every key under `member`: send now.
    Granted { member: String },
    /// Nothing recorded; every key has room after `wait`; `key` (index) waits longest.
    Wait { wait: Duration, key: usize },
}

/// One key of a decision: its Redis name, its slot group (the hash tag: keys of one group
/// share a Redis Cluster slot), limit and span (window + margin) in µs.
#[derive(Debug, Clone)]
pub struct SharedKey {
    pub name: String,
    pub slot: Arc<str>,
    pub limit: u32,
    pub span_us: u64,
}

/// Hash tags the apps' keys are spread over when the keys are partitioned (each app's keys
/// on one of them). Fewer, larger slots than one per app: an answer can only be written back
/// along with answers on the same slot, so each slot costs a replica about one SETTLE call
/// whenever its apps go quiet (BENCHMARKS.md "Spread over a Redis Cluster"). 24 divides
/// evenly over 1, 2, 3, 4, 6, 8, 12 or 24 masters ([`app_tags`]).
const APP_SLOTS: usize = 12;

/// Redis Cluster's slot of a hash tag (CRC16/XMODEM modulo 16384, as every cluster client
/// computes it).
fn cluster_slot(tag: &str) -> usize {
    usize::from(crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes())) % 16384
}

/// The [`APP_SLOTS`] app hash tags under `prefix`: tag `b` lands in the middle half of the
/// `b`-th of [`APP_SLOTS`] equal ranges of the 16384 slots, so a cluster whose masters split
/// the slots into equal ranges (as `redis-cli --cluster create` does) over a divisor of
/// [`APP_SLOTS`] masters holds as many of them on each master. The same on every replica.
fn app_tags(prefix: &str) -> Vec<String> {
    (0..APP_SLOTS)
        .map(|b| {
            let (start, end) = (b * 16384 / APP_SLOTS, (b + 1) * 16384 / APP_SLOTS);
            let quarter = (end - start) / 4;
            (0u32..)
                .map(|n| format!("{prefix}:app:{b}.{n}"))
                .find(|t| (start + quarter..end - quarter).contains(&cluster_slot(t)))
                .expect("CRC16 reaches every range")
        })
        .collect()
}

/// Which of the [`APP_SLOTS`] tags an app's keys use (by its app_id; `<app_id>/<api>`
/// windows go with the app's).
fn app_bucket(app_key: &str) -> usize {
    let app_id = app_key.split('/').next().unwrap_or(app_key);
    let d = ring::digest::digest(&ring::digest::SHA256, app_id.as_bytes());
    usize::from(u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]])) % APP_SLOTS
}

/// The hash tags keys are spread over by an id (the apps' windows, the job store's callers):
/// 12 tags, as many on each master of a cluster whose masters split the slots evenly.
pub fn spread_tags(prefix: &str) -> Vec<String> {
    app_tags(prefix)
}

/// Which of [`spread_tags`] the keys of `id` use.
pub fn spread_bucket(id: &str) -> usize {
    app_bucket(id)
}

/// Quota kinds whose windows the owner of their partition keeps in memory when the keys are
/// partitioned: no Redis key of theirs is used.
const OWNED_KINDS: [&str; 3] = ["chat", "message", "card"];

/// The shared quota store.
pub struct RedisQuota {
    redis: Arc<SharedRedis>,
    /// Keys spread over slots (`[cluster] owner_windows`): app keys on their app's slot,
    /// user keys on their partition's, chat, message and card windows in their owner's memory.
    /// Else every key on the one slot `{<prefix>}`.
    partitioned: bool,
    /// The app hash tags ([`app_tags`]), when partitioned.
    app_tags: Vec<String>,
    decide: redis::Script,
    replay: redis::Script,
    heartbeat: redis::Script,
    settle: redis::Script,
    /// Answers waiting to be written back (one SETTLE call per batch and slot, see
    /// [`Self::settle_later`]).
    settles: Mutex<Settles>,
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

impl RedisQuota {
    /// The quota store on `redis` (connections made on first use). Its keys are partitioned
    /// with `[cluster] owner_windows` (see [`Self::partitioned`]).
    pub fn new(redis: Arc<SharedRedis>, metrics: Arc<Metrics>) -> Self {
        let partitioned = redis
            .config()
            .peers
            .as_ref()
            .is_some_and(|p| p.owner_windows);
        Self {
            partitioned,
            app_tags: match partitioned {
                true => app_tags(&redis.config().key_prefix),
                false => Vec::new(),
            },
            decide: redis::Script::new(DECIDE_LUA),
            replay: redis::Script::new(REPLAY_LUA),
            heartbeat: redis::Script::new(HEARTBEAT_LUA),
            settle: redis::Script::new(SETTLE_LUA),
            settles: Mutex::new(Settles::default()),
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

    /// Whether the keys are spread over slots (`owner_windows`): app keys on one of
    /// 12 tags `{<prefix>:app:<b>.<n>}`, user keys on their partition's `{<prefix>:p:<n>}`, and no Redis
    /// key for chats, messages and cards (their partition's owner keeps their windows).
    pub fn partitioned(&self) -> bool {
        self.partitioned
    }

    /// Whether quotas of `kind` are counted in Redis (else in their partition owner's memory).
    pub fn holds(&self, kind: &str) -> bool {
        !(self.partitioned && OWNED_KINDS.contains(&kind))
    }

    /// The hash tag of a key of quota `kind` and id `id` (without braces).
    fn slot_of(&self, kind: &str, id: &str) -> String {
        let prefix = &self.config().key_prefix;
        if !self.partitioned {
            return prefix.clone();
        }
        match kind {
            "user" => {
                let queue = crate::scheduler::user_queue(id);
                format!("{prefix}:p:{}", partitions::partition_of(&queue))
            }
            _ => self.app_tags[app_bucket(id)].clone(),
        }
    }

    /// Redis key of a quota of `kind` (`chat`, `user`, `app:<window>ms`, `budget`) and id `id`.
    /// One hash tag for all, or (partitioned) the app's or the user partition's.
    pub fn key_name(&self, kind: &str, id: &str) -> String {
        format!("{{{}}}:{kind}:{id}", self.slot_of(kind, id))
    }

    /// Redis key of an app's `kind` record `rest` (a budget period), on the app's slot.
    pub fn app_key_name(&self, kind: &str, app_id: &str, rest: impl std::fmt::Display) -> String {
        format!("{{{}}}:{kind}:{app_id}:{rest}", self.slot_of("app", app_id))
    }

    /// One key of a decision: quota `kind` of `id`, its limit and span (window + margin, µs).
    pub fn shared_key(&self, kind: &str, id: &str, limit: u32, span_us: u64) -> SharedKey {
        let slot = self.slot_of(kind, id);
        SharedKey {
            name: format!("{{{slot}}}:{kind}:{id}"),
            slot: slot.into(),
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

    /// One decision for all `keys`: one atomic script call per slot they are on, in the order
    /// the slots first appear (a user's partition, then the app). A grant holds its slots for
    /// `hold` (the send timeout) unless its answer is settled earlier. When a later slot
    /// refuses, what the earlier ones granted is released.
    pub async fn try_acquire(
        self: &Arc<Self>,
        keys: &[SharedKey],
        hold: Duration,
    ) -> Result<Decision, ClusterError> {
        let member = format!(
            "{}:{}",
            self.replica_id,
            self.next_member.fetch_add(1, Ordering::Relaxed)
        );
        let groups = by_slot(keys.to_vec());
        let mut granted: Vec<SharedKey> = Vec::new();
        for (slot, group) in &groups {
            let answer = self.decide_on(slot, group, &member, hold).await;
            match answer {
                Ok(None) => granted.extend(group.iter().cloned()),
                Ok(Some((wait, i))) => {
                    self.release_soon(granted, &member);
                    // The key's index in `keys`.
                    let name = &group[i.min(group.len() - 1)].name;
                    let key = keys.iter().position(|k| &k.name == name).unwrap_or(0);
                    return Ok(Decision::Wait { wait, key });
                }
                Err(e) => {
                    if !granted.is_empty() {
                        self.release_later(granted, member.clone());
                    }
                    if !matches!(e, ClusterError::Protocol(_)) {
                        self.release_later(group.clone(), member);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Decision::Granted { member })
    }

    /// One DECIDE on `slot` for `keys` (all on it) under `member`: `None` when granted, else
    /// how long to wait and which of `keys` waits longest. Carries `slot`'s waiting answers.
    async fn decide_on(
        &self,
        slot: &Arc<str>,
        keys: &[SharedKey],
        member: &str,
        hold: Duration,
    ) -> Result<Option<(Duration, usize)>, ClusterError> {
        let mut inv = self.decide.prepare_invoke();
        for k in keys {
            inv.key(&k.name);
        }
        inv.arg(member).arg(micros(hold)).arg(keys.len());
        for k in keys {
            inv.arg(k.limit).arg(k.span_us);
        }
        // The answers waiting on this slot ride along (see DECIDE_LUA).
        let carried = self.settles.lock().take(slot);
        add_settles(&mut inv, &carried);
        let answer: Vec<i64> = match self.call("decide", inv).await {
            Ok(a) => a,
            Err(e) => {
                // Applying an answer twice is harmless: they go back to the settler.
                self.put_back_settles(slot, carried);
                return Err(e);
            }
        };
        match answer.as_slice() {
            [1, _] => Ok(None),
            [0, wait, key] => {
                let key = usize::try_from(*key - 1)
                    .unwrap_or(0)
                    .min(keys.len().saturating_sub(1));
                // Never trust a wait beyond the key's span (the script caps it too).
                let span = keys.get(key).map_or(1, |k| k.span_us.max(1));
                let wait = u64::try_from(*wait).unwrap_or(1).clamp(1, span);
                // Full windows: this replica's answers on the slot matter to the others now.
                let busy_until = Instant::now() + Duration::from_micros(span);
                self.settles.lock().mark_busy(slot, busy_until);
                Ok(Some((Duration::from_micros(wait), key)))
            }
            other => Err(ClusterError::Protocol(format!("decide returned {other:?}"))),
        }
    }

    /// Releases `keys`' record of `member` in the background (for the next heartbeat when
    /// that fails).
    fn release_soon(self: &Arc<Self>, keys: Vec<SharedKey>, member: &str) {
        if keys.is_empty() {
            return;
        }
        let store = self.clone();
        let member = member.to_owned();
        tokio::spawn(async move {
            if store.release(&keys, &member).await.is_err() {
                store.release_later(keys, member);
            }
        });
    }

    /// The send recorded as `member` on `keys` was answered at `answered`: queue the answer
    /// for the settler task ([`Self::run_settler`]), which writes batches in one call each
    /// per slot (or a decision on the slot carries them).
    pub fn settle_later(&self, keys: Vec<SharedKey>, member: String, answered: Instant) {
        if keys.is_empty() {
            return;
        }
        self.settles.lock().push(keys, &member, answered);
        self.settle_wake.notify_one();
    }

    /// Writes queued answers back, a batch per slot and Redis call, until the store is
    /// dropped. A failed batch is retried (a settle only ever moves a score earlier, to the
    /// answer instant, so a repeat is harmless); past the bound on waiting answers the oldest
    /// are dropped and those sends count until their timeout (stricter, never looser).
    pub async fn run_settler(store: std::sync::Weak<Self>) {
        loop {
            let Some(s) = store.upgrade() else { return };
            let notify = s.settle_wake.clone();
            let wake = notify.notified();
            let next = s.settles.lock().next_due(Instant::now());
            drop(s);
            match next {
                None => wake.await,
                // A decision on the slot made meanwhile carries what came in (see
                // DECIDE_LUA); each slot's answers are written once the oldest has waited.
                // New answers, or a slot turning busy, may bring that forward.
                Some(t) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(t) => {}
                        () = wake => {}
                    }
                }
            }
            let Some(s) = store.upgrade() else { return };
            let slots = s.settles.lock().due(Instant::now());
            let mut failed = false;
            for slot in slots {
                let batch = s.settles.lock().take(&slot);
                if batch.is_empty() {
                    continue;
                }
                if let Err(e) = s.settle_batch(&batch).await {
                    // The answers are still known: put them back (oldest first) and try
                    // again shortly, or each of those sends would hold its slot until its
                    // timeout.
                    tracing::debug!(error = %e, sends = batch.len(), "settling answers in Redis failed; retrying");
                    s.put_back_settles(&slot, batch);
                    failed = true;
                }
            }
            drop(s);
            if failed {
                tokio::time::sleep(SETTLE_RETRY).await;
            }
        }
    }

    /// Answers a failed call did not surely write: back at the front, in their order.
    fn put_back_settles(&self, slot: &Arc<str>, batch: Vec<Settle>) {
        if batch.is_empty() {
            return;
        }
        self.settles.lock().put_back(slot, batch);
        self.settle_wake.notify_one();
    }

    async fn settle_batch(&self, batch: &[Settle]) -> Result<(), ClusterError> {
        let mut inv = self.settle.prepare_invoke();
        add_settles(&mut inv, batch);
        let _: i64 = self.call("settle", inv).await?;
        Ok(())
    }

    /// Forgets the send recorded as `member` (granted, but it never left): one call per slot
    /// of `keys`. Returns how many keys held it.
    pub async fn release(&self, keys: &[SharedKey], member: &str) -> Result<u64, ClusterError> {
        let mut n = 0;
        for (_, group) in by_slot(keys.to_vec()) {
            let mut inv = self.release.prepare_invoke();
            for k in &group {
                inv.key(&k.name);
            }
            inv.arg(member);
            n += self.call::<u64>("release", inv).await?;
        }
        Ok(n)
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
        let mut counts = vec![(0, Duration::ZERO); keys.len()];
        for (_, group) in by_slot(keys.to_vec()) {
            let mut inv = script.prepare_invoke();
            for k in &group {
                inv.key(&k.name);
            }
            for k in &group {
                inv.arg(k.limit).arg(k.span_us);
            }
            let v: Vec<i64> = self.call("inspect", inv).await?;
            if v.len() != 2 * group.len() {
                return Err(ClusterError::Protocol(format!(
                    "inspect returned {} values",
                    v.len()
                )));
            }
            for (k, p) in group.iter().zip(v.chunks(2)) {
                let count = (
                    u32::try_from(p[0]).unwrap_or(u32::MAX),
                    Duration::from_micros(u64::try_from(p[1]).unwrap_or(0)),
                );
                for (i, key) in keys.iter().enumerate() {
                    if key.name == k.name {
                        counts[i] = count;
                    }
                }
            }
        }
        Ok(counts)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_tags_spread_evenly_over_the_slots_and_apps_over_the_tags() {
        let tags = app_tags("gw");
        assert_eq!(tags.len(), APP_SLOTS);
        // Redis Cluster's own slot of a known key (CLUSTER KEYSLOT foo = 12182).
        assert_eq!(cluster_slot("foo"), 12182);
        for masters in [1, 2, 3, 4, 6, 12] {
            let mut per = vec![0; masters];
            for t in &tags {
                per[cluster_slot(t) * masters / 16384] += 1;
            }
            assert!(
                per.iter().all(|&n| n == APP_SLOTS / masters),
                "{masters}: {per:?}"
            );
        }
        let mut per_tag = vec![0; APP_SLOTS];
        for a in 0..2400 {
            per_tag[app_bucket(&format!("cli_{a}"))] += 1;
        }
        let mean = 2400 / APP_SLOTS;
        assert!(
            per_tag
                .iter()
                .all(|&n| n * 10 >= mean * 7 && n * 10 <= mean * 13),
            "{per_tag:?}"
        );
        assert_eq!(app_bucket("cli_1/send"), app_bucket("cli_1"));
    }
}
