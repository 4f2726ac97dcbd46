//! The cluster job store: jobs live in the Redis the replicas already share, each in the
//! partition of its queue (`cluster::partitions`: the chat, or `user:<id>`), on that
//! partition's slot (scripts and key layout in `jobs::redis_scripts`). A submit is one script
//! call on the partition's slot (idempotency key, number, record), after one on its caller's
//! slot when callers are bounded, answered after Redis applied it, and optionally after
//! `WAIT` saw it on replicas. The partition's owner runs its jobs in order: it takes them
//! with the epoch of its claim (FENCE), which fences every write, so a replica whose
//! partition moved writes nothing; a takeover moves partitions, never a replica's job list.
//! A replica that stores a job of a partition another member runs tells it through that
//! member's inbox. Writes nobody waits for (those inbox notices, callers' counts given back)
//! are batched per slot and go with the runner's next round, 50 ms at most.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use redis::{Script, ScriptInvocation, Value};

use super::record::JobRecord;
use super::redis_batch::Pending;
use super::redis_scripts::{
    ASK_CANCEL_LUA, EXPIRE_LUA, FENCE_LUA, GET_LUA, POLL_LUA, RELEASE_LUA, RESERVE_LUA, SUBMIT_LUA,
    UPDATE_LUA,
};
pub use super::seam::Polled;
use super::seam::{JobStore, Limits, OnCommit, Owner, Ownership, RecoveryScan, Shared, Stored};
use super::store::StoreError;
use crate::cluster::partitions::{PARTITIONS, partition_of};
pub use crate::config::RedisJobsConfig;
use crate::redis_conn::{ClusterError, Lane, SharedRedis, bytes as text, int};

/// A job's number: its partition (plus one; 0 is a job of the legacy layout) in the top
/// bits, its number within the partition below.
const PARTITION_SHIFT: u32 = 48;

/// Job number `n` of partition `p`.
pub fn job_seq(p: u16, n: u64) -> u64 {
    ((u64::from(p) + 1) << PARTITION_SHIFT) | n
}

/// The partition and number within it of job `seq`; None for a job of the legacy layout.
pub fn split_seq(seq: u64) -> Option<(u16, u64)> {
    let p = u16::try_from((seq >> PARTITION_SHIFT).checked_sub(1)?).ok()?;
    (p < PARTITIONS).then_some((p, seq & ((1 << PARTITION_SHIFT) - 1)))
}

/// How a submit went.
#[derive(Debug)]
pub enum Submitted {
    /// Stored as job `seq`; `owner`: the member running its partition's jobs ('' before one
    /// took them).
    New { seq: u64, owner: String },
    /// The same caller, app and uuid made this job already.
    Duplicate(Box<JobRecord>),
    /// The partition holds this many jobs, its share of the store, all of them open.
    Full(u64),
    /// The caller has this many open jobs, its bound.
    CallerFull(u64),
}

pub struct RedisJobStore {
    pub(super) redis: Arc<SharedRedis>,
    config: RedisJobsConfig,
    pub(super) ownership: Arc<dyn Ownership>,
    /// The tags callers' open-job sets are spread over.
    pub(super) caller_tags: Vec<String>,
    /// The epoch each partition's jobs were taken with here: every write carries it.
    fenced: Mutex<HashMap<u16, u64>>,
    /// Partitions this replica runs that its own submits stored jobs in (read at the next poll).
    pub(super) news: Mutex<BTreeSet<u16>>,
    /// What waits to be written in one call per slot ([`Shared::flush`]).
    pub(super) pending: Mutex<Pending>,
    submit: Script,
    pub(super) reserve: Script,
    pub(super) release: Script,
    fence: Script,
    update: Script,
    poll: Script,
    ask_cancel: Script,
    get: Script,
    expire: Script,
}

pub(super) fn store_err(e: ClusterError) -> StoreError {
    StoreError(e.to_string())
}

pub(super) fn bad(what: &str) -> StoreError {
    StoreError(format!("redis answered something unexpected to {what}"))
}

/// A record read back: its number comes from its key.
pub(super) fn record(seq: u64, bytes: &[u8]) -> Result<JobRecord, StoreError> {
    let mut rec = JobRecord::decode(bytes)?;
    rec.seq = seq;
    Ok(rec)
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    int(v).and_then(|s| u64::try_from(s).ok())
}

pub(super) fn as_string(v: &Value) -> Option<String> {
    text(v).map(|t| String::from_utf8_lossy(t).into_owned())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisJobStore {
    /// The store on `redis` (its connection is shared with the quota store), under the
    /// configured key prefix; `ownership` says which partitions' jobs this replica runs.
    pub fn new(
        redis: Arc<SharedRedis>,
        config: RedisJobsConfig,
        ownership: Arc<dyn Ownership>,
    ) -> Self {
        let caller_tags = crate::cluster::spread_tags(&redis.config().key_prefix);
        Self {
            redis,
            config,
            ownership,
            caller_tags,
            fenced: Mutex::new(HashMap::new()),
            news: Mutex::new(BTreeSet::new()),
            pending: Mutex::new(Pending::default()),
            submit: Script::new(SUBMIT_LUA),
            reserve: Script::new(RESERVE_LUA),
            release: Script::new(RELEASE_LUA),
            fence: Script::new(FENCE_LUA),
            update: Script::new(UPDATE_LUA),
            poll: Script::new(POLL_LUA),
            ask_cancel: Script::new(ASK_CANCEL_LUA),
            get: Script::new(GET_LUA),
            expire: Script::new(EXPIRE_LUA),
        }
    }

    /// This replica's member id (who runs a partition's jobs).
    pub fn replica(&self) -> String {
        self.ownership.me()
    }

    pub fn config(&self) -> RedisJobsConfig {
        self.config
    }

    fn base(&self, p: u16) -> String {
        format!("{{{}:p:{p}}}:jobs", self.redis.config().key_prefix)
    }

    /// Runs `inv` (op `op` in the metrics) on the job store's lane.
    pub(super) async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        inv: ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.redis
            .call_on(Lane::Jobs, op, inv)
            .await
            .map_err(store_err)
    }

    /// A call of `script` on the base `base` (routed by its `seq` key).
    pub(super) fn invoke_on<'a>(&self, script: &'a Script, base: &str) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(format!("{base}:seq")).arg(base);
        inv
    }

    /// A caller's set of open jobs, and which tag it is on.
    pub(super) fn caller_key(&self, caller: &str) -> (usize, String) {
        let b = crate::cluster::spread_bucket(caller);
        (
            b,
            format!("{{{}}}:jobs:caller:{caller}", self.caller_tags[b]),
        )
    }

    pub(super) fn inbox(&self, member: &str) -> String {
        format!(
            "{{{}:r:{member}}}:jobs:inbox",
            self.redis.config().key_prefix
        )
    }

    /// Stores `rec` (JSON, numbered by Redis) unless `key` made a job already, within
    /// `max_jobs` (no bound per caller).
    pub async fn submit(
        &self,
        rec: &JobRecord,
        key: &str,
        max_jobs: u64,
    ) -> Result<Submitted, StoreError> {
        let limits = Limits {
            max_jobs,
            per_caller: u64::MAX,
        };
        self.submit_within(rec, key, limits).await
    }

    /// [`Self::submit`] within `limits`: the caller below its bound of open jobs; the
    /// partition within its share of `max_jobs` (a [`PARTITIONS`]th, at least one), a full
    /// one first removing its oldest finished jobs and refusing only when all are open. A
    /// new job of a partition another member runs is announced in its inbox.
    pub async fn submit_within(
        &self,
        rec: &JobRecord,
        key: &str,
        limits: Limits,
    ) -> Result<Submitted, StoreError> {
        let bounded = limits.per_caller != u64::MAX;
        if bounded && let Some(open) = self.reserve(rec, key, limits.per_caller).await? {
            return Ok(Submitted::CallerFull(open));
        }
        let p = partition_of(&rec.reply.chat_id);
        let base = self.base(p);
        let share = limits.max_jobs.div_ceil(u64::from(PARTITIONS)).max(1);
        let mut inv = self.invoke_on(&self.submit, &base);
        inv.arg(key).arg(rec.encode()).arg(&rec.caller).arg(share);
        let v: Vec<Value> = self.run("job_submit", inv).await?;
        let n = || v.get(1).and_then(as_u64).ok_or(bad("submit"));
        let submitted = match v.first().and_then(int) {
            Some(1) => Submitted::New {
                seq: job_seq(p, n()?),
                owner: v.get(2).and_then(as_string).ok_or(bad("submit"))?,
            },
            Some(0) => Submitted::Duplicate(Box::new(record(
                job_seq(p, n()?),
                v.get(2).and_then(text).ok_or(bad("submit"))?,
            )?)),
            Some(-1) => Submitted::Full(n()?),
            _ => return Err(bad("submit")),
        };
        match &submitted {
            Submitted::New { owner, .. } => self.announce(p, owner),
            // The job it made is open: it counts (its entry was there).
            Submitted::Duplicate(known) if !known.state.is_final() => {}
            // Counted for nothing (the job it made is final, or there is no room): given back.
            _ if bounded => self.release(&rec.caller, key),
            _ => {}
        }
        if let (Submitted::New { .. } | Submitted::Duplicate(_), n @ 1..) =
            (&submitted, self.config.wait_replicas)
        {
            self.wait_for_replicas(n).await?;
        }
        Ok(submitted)
    }

    /// `WAIT n`: this connection's writes reached `n` Redis replicas (or the submit is not
    /// confirmed: the caller submits again with the same uuid, which finds the job).
    async fn wait_for_replicas(&self, n: u32) -> Result<(), StoreError> {
        let timeout = ms(self.redis.config().redis_timeout);
        let mut cmd = redis::cmd("WAIT");
        // Redis checks blocked clients' timeouts about every 100 ms: leave room for that.
        cmd.arg(n).arg((timeout / 2).max(1));
        let acked: i64 = self
            .redis
            .command_on(Lane::Jobs, "job_wait", &cmd)
            .await
            .map_err(store_err)?;
        if acked < i64::from(n) {
            return Err(StoreError(format!(
                "stored on the Redis primary but {acked} of {n} replicas confirmed it in time; \
                 submit again with the same uuid"
            )));
        }
        Ok(())
    }

    /// This replica takes partition `p`'s jobs with the epoch of its claim: false when a
    /// later claim took them.
    pub async fn fence(&self, p: u16, epoch: u64) -> Result<bool, StoreError> {
        let mut inv = self.invoke_on(&self.fence, &self.base(p));
        inv.arg(self.ownership.me()).arg(epoch);
        let n: i64 = self.run("job_fence", inv).await?;
        if n == 1 {
            self.fenced.lock().insert(p, epoch);
        }
        Ok(n == 1)
    }

    /// This replica no longer runs `p`'s jobs.
    pub fn unfence(&self, p: u16) {
        self.fenced.lock().remove(&p);
    }

    /// The epoch `p`'s jobs were taken with here.
    fn epoch(&self, p: u16) -> Option<u64> {
        self.fenced.lock().get(&p).copied()
    }

    /// Writes `rec` if this replica still runs its partition; false when another one took it
    /// over (or the job is final already).
    pub async fn update(&self, rec: &JobRecord) -> Result<bool, StoreError> {
        let Some((p, n)) = split_seq(rec.seq) else {
            // A legacy job is moved before it runs.
            return Ok(false);
        };
        let Some(epoch) = self.epoch(p) else {
            return Ok(false);
        };
        let done = rec.state.is_final();
        let mut inv = self.invoke_on(&self.update, &self.base(p));
        inv.arg(self.ownership.me())
            .arg(epoch)
            .arg(n)
            .arg(rec.encode())
            .arg(u8::from(done));
        let v: Vec<Value> = self.run("job_update", inv).await?;
        match v.as_slice() {
            [ok, ..] if int(ok) == Some(0) => Ok(false),
            [_, caller, key] if done => {
                let (caller, key) = (as_string(caller), as_string(key));
                if let (Some(caller), Some(key)) = (caller, key)
                    && !caller.is_empty()
                {
                    self.release(&caller, &key);
                }
                Ok(true)
            }
            [_] => Ok(true),
            _ => Err(bad("update")),
        }
    }

    /// Partition `p`'s open jobs numbered after `after` (at most `limit`) and the cancels
    /// asked; None when this replica no longer runs `p` (its write fence moved on).
    pub async fn poll(
        &self,
        p: u16,
        after: u64,
        limit: usize,
    ) -> Result<Option<Polled>, StoreError> {
        let Some(epoch) = self.epoch(p) else {
            return Ok(None);
        };
        let after = split_seq(after).map_or(0, |(_, n)| n);
        let mut inv = self.invoke_on(&self.poll, &self.base(p));
        inv.arg(self.ownership.me())
            .arg(epoch)
            .arg(after)
            .arg(limit);
        let v: Vec<Value> = self.run("job_poll", inv).await?;
        let count = v.first().and_then(int).ok_or(bad("poll"))?;
        let Ok(count) = usize::try_from(count) else {
            return Ok(None);
        };
        let jobs_end = 1 + 2 * count;
        let jobs = v
            .get(1..jobs_end)
            .ok_or(bad("poll"))?
            .chunks(2)
            .map(|pair| {
                let n = pair.first().and_then(as_u64).ok_or(bad("poll"))?;
                record(
                    job_seq(p, n),
                    pair.get(1).and_then(text).ok_or(bad("poll"))?,
                )
            })
            .collect::<Result<_, _>>()?;
        let cancels = v[jobs_end..]
            .iter()
            .filter_map(as_u64)
            .map(|n| job_seq(p, n))
            .collect();
        Ok(Some(Polled { jobs, cancels }))
    }

    /// The partitions with news for this replica: jobs stored or cancels asked by others
    /// (its inbox) and by its own submits.
    pub async fn news(&self) -> Result<BTreeSet<u16>, StoreError> {
        let mut cmd = redis::cmd("LPOP");
        cmd.arg(self.inbox(&self.ownership.me())).arg(1000);
        let told: Option<Vec<u16>> = self
            .redis
            .command_on(Lane::Jobs, "job_news", &cmd)
            .await
            .map_err(store_err)?;
        let mut news = std::mem::take(&mut *self.news.lock());
        news.extend(told.unwrap_or_default());
        Ok(news)
    }

    /// Asks the runner of `seq` to cancel it; false when it is final (or unknown).
    pub async fn ask_cancel(&self, seq: u64) -> Result<bool, StoreError> {
        let Some((p, n)) = self.resolve(seq).await? else {
            return Ok(false);
        };
        let mut inv = self.invoke_on(&self.ask_cancel, &self.base(p));
        inv.arg(n);
        let v: Vec<Value> = self.run("job_cancel", inv).await?;
        match v.as_slice() {
            [ok] if int(ok) == Some(0) => Ok(false),
            [_, owner] => {
                let owner = as_string(owner).ok_or(bad("cancel"))?;
                self.announce(p, &owner);
                // A cancel is answered while the caller waits: told at once.
                self.flush().await;
                Ok(true)
            }
            _ => Err(bad("cancel")),
        }
    }

    /// Where job `seq` is: its partition and number there (a legacy job's, once it moved).
    async fn resolve(&self, seq: u64) -> Result<Option<(u16, u64)>, StoreError> {
        Ok(match split_seq(seq) {
            Some(at) => Some(at),
            None => self
                .legacy_get(seq)
                .await?
                .and_then(|l| l.moved)
                .and_then(split_seq),
        })
    }

    /// Job `seq` and who runs it (None once final).
    pub async fn get(&self, seq: u64) -> Result<Option<(JobRecord, Option<String>)>, StoreError> {
        let (p, n) = match split_seq(seq) {
            Some(at) => at,
            None => match self.legacy_get(seq).await? {
                None => return Ok(None),
                Some(l) => match l.moved.and_then(split_seq) {
                    Some(at) => at,
                    // Not moved yet: a replica moves it soon (and runs it then).
                    None => {
                        let owner = l.open.then(String::new);
                        return Ok(Some((l.rec, owner)));
                    }
                },
            },
        };
        let mut inv = self.invoke_on(&self.get, &self.base(p));
        inv.arg(n);
        let v: Vec<Value> = self.run("job_get", inv).await?;
        match v.as_slice() {
            [] => Ok(None),
            [rec, owner] => {
                let owner = as_string(owner).ok_or(bad("get"))?;
                let rec = record(job_seq(p, n), text(rec).ok_or(bad("get"))?)?;
                Ok(Some((rec, (!owner.is_empty()).then_some(owner))))
            }
            _ => Err(bad("get")),
        }
    }

    /// Removes up to `limit` jobs final for longer than `keep` from each partition this
    /// replica runs, and from the legacy layout; (removed, jobs stored in them).
    pub async fn expire(&self, keep: Duration, limit: usize) -> Result<(usize, u64), StoreError> {
        let mut bases: Vec<String> = {
            let fenced = self.fenced.lock();
            fenced.keys().map(|p| self.base(*p)).collect()
        };
        bases.push(self.legacy_base());
        let (mut gone, mut stored) = (0, 0);
        for base in bases {
            let mut inv = self.invoke_on(&self.expire, &base);
            inv.arg(ms(keep)).arg(limit);
            let v: Vec<i64> = self.run("job_expire", inv).await?;
            let [g, s] = v.as_slice() else {
                return Err(bad("expire"));
            };
            gone += usize::try_from(*g).unwrap_or(0);
            stored += u64::try_from(*s).unwrap_or(0);
        }
        Ok((gone, stored))
    }
}

// === impl JobStore ===

impl JobStore for RedisJobStore {
    fn submit(
        &self,
        rec: JobRecord,
        key: String,
        limits: Limits,
        _start: OnCommit,
    ) -> BoxFuture<'_, Result<Stored, StoreError>> {
        // The partition's owner (this replica or another) picks it up from the store, in
        // the store's order.
        Box::pin(async move {
            let me = self.ownership.me();
            Ok(match self.submit_within(&rec, &key, limits).await? {
                Submitted::New { seq, owner } => Stored::New {
                    rec: JobRecord { seq, ..rec },
                    runs_here: owner == me,
                },
                Submitted::Duplicate(known) => Stored::Duplicate(*known),
                Submitted::Full(stored) => Stored::Full(stored),
                Submitted::CallerFull(open) => Stored::CallerFull(open),
            })
        })
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<(JobRecord, Owner)>, StoreError>> {
        Box::pin(async move {
            let me = self.ownership.me();
            Ok(RedisJobStore::get(self, seq).await?.map(|(rec, owner)| {
                let owner = match owner {
                    None => Owner::Nobody,
                    Some(o) if o == me => Owner::Here,
                    Some(_) => Owner::Elsewhere,
                };
                (rec, owner)
            }))
        })
    }

    fn update(&self, rec: JobRecord) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { RedisJobStore::update(self, &rec).await })
    }

    fn expire(
        &self,
        keep: Duration,
        limit: usize,
    ) -> BoxFuture<'_, Result<(usize, u64), StoreError>> {
        Box::pin(RedisJobStore::expire(self, keep, limit))
    }

    fn count(&self) -> Option<u64> {
        None
    }

    fn file_bytes(&self) -> Option<u64> {
        None
    }

    fn recovery_scan(&self, _since_ms: i64) -> Option<Result<RecoveryScan, StoreError>> {
        None
    }

    fn shared(&self) -> Option<&dyn Shared> {
        Some(self)
    }
}

impl Shared for RedisJobStore {
    fn owned(&self) -> Vec<(u16, u64)> {
        self.ownership.owned()
    }

    fn fence(&self, p: u16, epoch: u64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(RedisJobStore::fence(self, p, epoch))
    }

    fn unfence(&self, p: u16) {
        RedisJobStore::unfence(self, p)
    }

    fn poll(
        &self,
        p: u16,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Option<Polled>, StoreError>> {
        Box::pin(RedisJobStore::poll(self, p, after, limit))
    }

    fn news(&self) -> BoxFuture<'_, Result<BTreeSet<u16>, StoreError>> {
        Box::pin(RedisJobStore::news(self))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(RedisJobStore::flush(self))
    }

    fn ask_cancel(&self, seq: u64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(RedisJobStore::ask_cancel(self, seq))
    }

    fn adopt_legacy(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(RedisJobStore::adopt_legacy(self))
    }
}
