//! The job store seam: what [`super::Jobs`] needs of a store ([`JobStore`]), of a store the
//! replicas share ([`Shared`]), and of the partition ownership such a store follows
//! ([`Ownership`]). `app.rs` picks the backend: the embedded redb file
//! (single node, [`super::store`]) or the Redis the replicas share ([`super::redis`]).

use std::collections::BTreeSet;
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
    /// Jobs the store may hold (all states); past it the oldest finished ones make room. A
    /// shared store holds a partition's share of it in each partition.
    pub max_jobs: u64,
    /// Open (not final) jobs one caller may have.
    pub per_caller: u64,
}

/// How a submit went.
#[derive(Debug)]
pub enum Stored {
    /// Stored (its `seq` assigned); `runs_here`: this process runs it (a shared store's
    /// partition owner picks it up by [`Shared::poll`]).
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

/// What a poll of a partition found: its open jobs (in order) and the cancels asked.
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
    /// windows). None: a shared store, whose jobs move between replicas with their partitions.
    fn recovery_scan(&self, since_ms: i64) -> Option<Result<RecoveryScan, StoreError>>;

    /// A shared store's partitions; None for a store only this process uses.
    fn shared(&self) -> Option<&dyn Shared>;
}

/// Which partitions' jobs this replica runs (`cluster::partitions`, through `app`).
pub trait Ownership: Send + Sync {
    /// This replica's member id (a new one after it lost its lease).
    fn me(&self) -> String;
    /// The partitions this replica owns now, with the epochs of their claims.
    fn owned(&self) -> Vec<(u16, u64)>;
}

/// A store the replicas share, its jobs kept by partition: the owner of a partition runs its
/// jobs, after taking them with its claim's epoch ([`Shared::fence`]).
pub trait Shared: Send + Sync {
    /// The partitions this replica owns now, with their epochs.
    fn owned(&self) -> Vec<(u16, u64)>;

    /// Takes partition `p`'s jobs at `epoch`: every later write of this replica to them
    /// carries it; false when a later claim took them already.
    fn fence(&self, p: u16, epoch: u64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// This replica stops running `p`'s jobs (it writes nothing to them any more).
    fn unfence(&self, p: u16);

    /// Partition `p`'s open jobs numbered after `after` (at most `limit`) and the cancels
    /// asked; None when this replica no longer runs it (another one fenced it).
    fn poll(
        &self,
        p: u16,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Option<Polled>, StoreError>>;

    /// Partitions with news for this replica (new jobs, cancels asked).
    fn news(&self) -> BoxFuture<'_, Result<BTreeSet<u16>, StoreError>>;

    /// Writes what waits to be batched (notices for other replicas, callers' counts given
    /// back); failures are dropped (they heal: sweeps, expiry).
    fn flush(&self) -> BoxFuture<'_, ()>;

    /// Asks the replica running queued job `seq` to cancel it; false when it is not open.
    fn ask_cancel(&self, seq: u64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Moves the open jobs of an earlier layout into their partitions; how many.
    fn adopt_legacy(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
}
