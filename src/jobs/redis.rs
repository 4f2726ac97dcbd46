//! The cluster job store: jobs live in the Redis the replicas already share (the scripts and
//! key layout are in `jobs::redis_scripts`). A submit is one script call (idempotency key,
//! number, record, owner) answered after Redis applied it, and optionally after `WAIT` saw it
//! on replicas. Each open job has one owner, the replica that runs it, holding a lease it
//! renews; when a lease ends (the replica was killed, or handed its jobs off while stopping),
//! another replica claims all of that replica's jobs at once and runs them in order, with
//! their uuids. Writes are fenced: a replica that lost its jobs cannot overwrite their state.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::{Script, ScriptInvocation, Value};

use super::record::JobRecord;
use super::redis_scripts::{
    ASK_CANCEL_LUA, CLAIM_LUA, EXPIRE_LUA, GET_LUA, HANDOFF_LUA, LEASE_LUA, POLL_LUA, SUBMIT_LUA,
    UPDATE_LUA,
};
pub use super::seam::Polled;
use super::seam::{JobStore, Leases, Limits, OnCommit, Owner, RecoveryScan, Stored};
use super::store::StoreError;
pub use crate::config::RedisJobsConfig;
use crate::redis_conn::{ClusterError, Lane, SharedRedis, bytes as text, int};

/// How a submit went.
#[derive(Debug)]
pub enum Submitted {
    /// Stored as job `seq`, run by `owner`.
    New { seq: u64, owner: String },
    /// The same caller, app and uuid made this job already.
    Duplicate(Box<JobRecord>),
    /// The store holds `stored` jobs, its bound, all of them open.
    Full(u64),
    /// The caller has this many open jobs, its bound.
    CallerFull(u64),
}

pub struct RedisJobStore {
    redis: Arc<SharedRedis>,
    base: String,
    seq_key: String,
    replica: String,
    config: RedisJobsConfig,
    submit: Script,
    update: Script,
    poll: Script,
    lease: Script,
    claim: Script,
    handoff: Script,
    ask_cancel: Script,
    get: Script,
    expire: Script,
}

fn store_err(e: ClusterError) -> StoreError {
    StoreError(e.to_string())
}

fn bad(what: &str) -> StoreError {
    StoreError(format!("redis answered something unexpected to {what}"))
}

/// A record read back: its number comes from its key.
fn record(seq: u64, bytes: &[u8]) -> Result<JobRecord, StoreError> {
    let mut rec = JobRecord::decode(bytes)?;
    rec.seq = seq;
    Ok(rec)
}

/// `{seq, rec}` pairs as the poll script returns them.
fn pairs(values: &[Value], what: &str) -> Result<Vec<JobRecord>, StoreError> {
    values
        .chunks(2)
        .map(|p| match p {
            [s, r] => {
                let seq = int(s)
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or(bad(what))?;
                record(seq, text(r).ok_or(bad(what))?)
            }
            _ => Err(bad(what)),
        })
        .collect()
}

impl RedisJobStore {
    /// The store on `redis` (its connection is shared with the quota store), under the
    /// configured key prefix.
    pub fn new(redis: Arc<SharedRedis>, config: RedisJobsConfig) -> Self {
        let base = format!("{{{}:jobs}}", redis.config().key_prefix);
        Self {
            seq_key: format!("{base}:seq"),
            base,
            redis,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            config,
            submit: Script::new(SUBMIT_LUA),
            update: Script::new(UPDATE_LUA),
            poll: Script::new(POLL_LUA),
            lease: Script::new(LEASE_LUA),
            claim: Script::new(CLAIM_LUA),
            handoff: Script::new(HANDOFF_LUA),
            ask_cancel: Script::new(ASK_CANCEL_LUA),
            get: Script::new(GET_LUA),
            expire: Script::new(EXPIRE_LUA),
        }
    }

    /// This replica's name in the store.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn config(&self) -> RedisJobsConfig {
        self.config
    }

    /// A call of `script` with the routing key and the base as first argument.
    fn invoke<'a>(&'a self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(&self.seq_key).arg(&self.base);
        inv
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

    /// [`Self::submit`] within `limits`: the caller below its bound of open jobs; a full
    /// store first removes its oldest finished jobs, and refuses only when all are open.
    pub async fn submit_within(
        &self,
        rec: &JobRecord,
        key: &str,
        limits: Limits,
    ) -> Result<Submitted, StoreError> {
        let mut inv = self.invoke(&self.submit);
        inv.arg(key)
            .arg(rec.encode())
            .arg(&rec.reply.chat_id)
            .arg(&self.replica)
            .arg(limits.max_jobs)
            .arg(u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(&rec.caller)
            .arg(limits.per_caller);
        let v: Vec<Value> = self
            .redis
            .call_on(Lane::Jobs, "job_submit", inv)
            .await
            .map_err(store_err)?;
        let seq = || {
            v.get(1)
                .and_then(int)
                .and_then(|s| u64::try_from(s).ok())
                .ok_or(bad("submit"))
        };
        let submitted = match v.first().and_then(int) {
            Some(1) => Submitted::New {
                seq: seq()?,
                owner: v
                    .get(2)
                    .and_then(text)
                    .map(|o| String::from_utf8_lossy(o).into_owned())
                    .ok_or(bad("submit"))?,
            },
            Some(0) => Submitted::Duplicate(Box::new(record(
                seq()?,
                v.get(2).and_then(text).ok_or(bad("submit"))?,
            )?)),
            Some(-1) => Submitted::Full(seq()?),
            Some(-2) => Submitted::CallerFull(seq()?),
            _ => return Err(bad("submit")),
        };
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
        let timeout = self.redis.config().redis_timeout;
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut cmd = redis::cmd("WAIT");
        // Redis checks blocked clients' timeouts about every 100 ms: leave room for that.
        cmd.arg(n).arg((ms / 2).max(1));
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

    /// Writes `rec` if this replica still owns it; false when another one took it over.
    pub async fn update(&self, rec: &JobRecord) -> Result<bool, StoreError> {
        let mut inv = self.invoke(&self.update);
        inv.arg(rec.seq)
            .arg(&self.replica)
            .arg(rec.encode())
            .arg(u8::from(rec.state.is_final()));
        let n: i64 = self
            .redis
            .call_on(Lane::Jobs, "job_update", inv)
            .await
            .map_err(store_err)?;
        Ok(n == 1)
    }

    /// The jobs this replica owns numbered after `after` (at most `limit`), and the cancels
    /// asked of it.
    pub async fn poll(&self, after: u64, limit: usize) -> Result<Polled, StoreError> {
        let mut inv = self.invoke(&self.poll);
        inv.arg(&self.replica).arg(after).arg(limit);
        let v: Vec<Value> = self
            .redis
            .call_on(Lane::Jobs, "job_poll", inv)
            .await
            .map_err(store_err)?;
        let n = v
            .first()
            .and_then(int)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(bad("poll"))?;
        let jobs_end = 1 + 2 * n;
        let jobs = pairs(v.get(1..jobs_end).ok_or(bad("poll"))?, "poll")?;
        let cancels = v[jobs_end..]
            .iter()
            .filter_map(|c| int(c).and_then(|s| u64::try_from(s).ok()))
            .collect();
        Ok(Polled { jobs, cancels })
    }

    /// Extends this replica's lease (`register`: also when it has none). False: it had been
    /// declared dead and its jobs were taken over.
    pub async fn renew(&self, register: bool) -> Result<bool, StoreError> {
        let mut inv = self.invoke(&self.lease);
        inv.arg(&self.replica)
            .arg(u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(u8::from(register));
        let n: i64 = self
            .redis
            .call_on(Lane::Jobs, "job_lease", inv)
            .await
            .map_err(store_err)?;
        Ok(n == 1)
    }

    /// Takes over the jobs of replicas whose lease ended; how many. They are this replica's
    /// now: [`Self::poll`] from the start finds them.
    pub async fn claim(&self) -> Result<u64, StoreError> {
        let mut inv = self.invoke(&self.claim);
        inv.arg(&self.replica);
        self.redis
            .call_on(Lane::Jobs, "job_claim", inv)
            .await
            .map_err(store_err)
    }

    /// Ends this replica's lease now (it is stopping): the others take its jobs.
    pub async fn hand_off(&self) -> Result<(), StoreError> {
        let mut inv = self.invoke(&self.handoff);
        inv.arg(&self.replica);
        let _: i64 = self
            .redis
            .call_on(Lane::Jobs, "job_handoff", inv)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// Asks the owner of `seq` to cancel it; false when it has no owner (it is final).
    pub async fn ask_cancel(&self, seq: u64) -> Result<bool, StoreError> {
        let mut inv = self.invoke(&self.ask_cancel);
        inv.arg(seq);
        let n: i64 = self
            .redis
            .call_on(Lane::Jobs, "job_cancel", inv)
            .await
            .map_err(store_err)?;
        Ok(n == 1)
    }

    /// Job `seq` and its owner (None once final).
    pub async fn get(&self, seq: u64) -> Result<Option<(JobRecord, Option<String>)>, StoreError> {
        let mut inv = self.invoke(&self.get);
        inv.arg(seq);
        let v: Vec<Value> = self
            .redis
            .call_on(Lane::Jobs, "job_get", inv)
            .await
            .map_err(store_err)?;
        match v.as_slice() {
            [] => Ok(None),
            [rec, owner] => {
                let owner = text(owner).ok_or(bad("get"))?;
                let owner =
                    (!owner.is_empty()).then(|| String::from_utf8_lossy(owner).into_owned());
                Ok(Some((record(seq, text(rec).ok_or(bad("get"))?)?, owner)))
            }
            _ => Err(bad("get")),
        }
    }

    /// Removes up to `limit` jobs final for longer than `keep`; (removed, jobs stored).
    pub async fn expire(&self, keep: Duration, limit: usize) -> Result<(usize, u64), StoreError> {
        let mut inv = self.invoke(&self.expire);
        inv.arg(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX))
            .arg(limit);
        let v: Vec<i64> = self
            .redis
            .call_on(Lane::Jobs, "job_expire", inv)
            .await
            .map_err(store_err)?;
        match v.as_slice() {
            [gone, stored] => Ok((
                usize::try_from(*gone).unwrap_or(0),
                u64::try_from(*stored).unwrap_or(0),
            )),
            _ => Err(bad("expire")),
        }
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
        // The job's owner (this replica, or the one running its chat) picks it up from the
        // store, in the store's order.
        Box::pin(async move {
            Ok(match self.submit_within(&rec, &key, limits).await? {
                Submitted::New { seq, owner } => Stored::New {
                    rec: JobRecord { seq, ..rec },
                    runs_here: owner == self.replica,
                },
                Submitted::Duplicate(known) => Stored::Duplicate(*known),
                Submitted::Full(stored) => Stored::Full(stored),
                Submitted::CallerFull(open) => Stored::CallerFull(open),
            })
        })
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<(JobRecord, Owner)>, StoreError>> {
        Box::pin(async move {
            Ok(RedisJobStore::get(self, seq).await?.map(|(rec, owner)| {
                let owner = match owner {
                    None => Owner::Nobody,
                    Some(o) if o == self.replica => Owner::Here,
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

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }
}

impl Leases for RedisJobStore {
    fn lease(&self) -> Duration {
        self.config.lease
    }

    fn renew(&self, register: bool) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(RedisJobStore::renew(self, register))
    }

    fn claim(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(RedisJobStore::claim(self))
    }

    fn poll(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Polled, StoreError>> {
        Box::pin(RedisJobStore::poll(self, after, limit))
    }

    fn ask_cancel(&self, seq: u64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(RedisJobStore::ask_cancel(self, seq))
    }

    fn hand_off(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(RedisJobStore::hand_off(self))
    }
}
