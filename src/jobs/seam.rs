//! The job store seam: what [`super::Jobs`] needs of a store ([`JobStore`]), and of a store
//! the replicas share ([`Leases`]). `app.rs` picks the backend: the embedded redb file
//! (single node, [`super::store`]) or the Redis the replicas share ([`super::redis`]).

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::record::JobRecord;
use super::store::StoreError;

/// What runs on a newly stored job once it is durable (a store only this process uses: the
/// job starts here, in store order; keep it short).
pub type OnCommit = Box<dyn FnOnce(&JobRecord) + Send>;

/// What a restart resumes: the jobs not final yet, in store order, and the final ones
/// attempted lately (they count in Feishu's windows).
pub type RecoveryScan = (Vec<JobRecord>, Vec<JobRecord>);

/// The bounds a submit is checked against, atomically with storing it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Jobs the store may hold (all states); past it the oldest finished ones make room.
    pub max_jobs: u64,
    /// Open (not final) jobs one caller may have.
    pub per_caller: u64,
}

/// How a submit went.
#[derive(Debug)]
pub enum Stored {
    /// Stored (its `seq` assigned); `runs_here`: this process runs it (a shared store's
    /// owner picks it up by [`Leases::poll`]).
    New { rec: JobRecord, runs_here: bool },
    /// The same caller, app and uuid made this job already.
    Duplicate(JobRecord),
    /// The store holds this many jobs, its bound, all of them open.
    Full(u64),
    /// The caller has this many open jobs, its bound.
    CallerFull(u64),
}

/// Who runs a stored job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This process.
    Here,
    /// Another replica.
    Elsewhere,
    /// Nobody (final).
    Nobody,
}

/// What a poll found: new jobs this replica owns (in order) and the cancels asked of it.
#[derive(Debug, Default)]
pub struct Polled {
    pub jobs: Vec<JobRecord>,
    pub cancels: Vec<u64>,
}

/// Where jobs are kept.
pub trait JobStore: Send + Sync + 'static {
    /// Stores `rec` unless a job with `key` exists, within `limits`: its caller (`rec.caller`)
    /// below its bound of open jobs, and room in the store, made by removing the oldest
    /// finished jobs when it is full. Answers once the job is durable; a new job this process
    /// runs is given to `start` first.
    fn submit(
        &self,
        rec: JobRecord,
        key: String,
        limits: Limits,
        start: OnCommit,
    ) -> BoxFuture<'_, Result<Stored, StoreError>>;

    /// Job `seq` and who runs it.
    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<(JobRecord, Owner)>, StoreError>>;

    /// Writes a job's new state; false when this process no longer runs it (another replica
    /// took it over: nothing is written).
    fn update(&self, rec: JobRecord) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Removes up to `limit` jobs final for longer than `keep` (0: none, only counts);
    /// (removed, jobs stored).
    fn expire(
        &self,
        keep: Duration,
        limit: usize,
    ) -> BoxFuture<'_, Result<(usize, u64), StoreError>>;

    /// Jobs stored now, when known without asking (the size metric after a submit).
    fn count(&self) -> Option<u64>;

    /// Size of the store's file, when it has one.
    fn file_bytes(&self) -> Option<u64>;

    /// For a restart (a store only this process uses): the jobs not final yet, in store
    /// order, and the final ones attempted since `since_ms` (they count in Feishu's
    /// windows). None: a shared store, whose jobs move between replicas by lease.
    fn recovery_scan(&self, since_ms: i64) -> Option<Result<RecoveryScan, StoreError>>;

    /// A shared store's leases; None for a store only this process uses.
    fn leases(&self) -> Option<&dyn Leases>;
}

/// A store the replicas share: each runs the jobs it holds a lease on.
pub trait Leases: Send + Sync {
    /// A replica not renewing its lease for this long loses its jobs to another one.
    fn lease(&self) -> Duration;

    /// Extends this replica's lease (`register`: also when it has none). False: it had been
    /// declared dead and its jobs were taken over.
    fn renew(&self, register: bool) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Takes over the jobs of replicas whose lease ended; how many.
    fn claim(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// The jobs this replica owns numbered after `after` (at most `limit`), and the cancels
    /// asked of it.
    fn poll(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Polled, StoreError>>;

    /// Asks the replica running queued job `seq` to cancel it; false when it is not queued.
    fn ask_cancel(&self, seq: u64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Ends this replica's lease now (it is stopping): the others take its jobs.
    fn hand_off(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}
