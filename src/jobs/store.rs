//! The single-node job store: one redb file under `GATEWAY_DATA_DIR`. Writes go through one
//! writer thread that commits whatever has piled up in one transaction (group commit: many
//! concurrent submits share one fsync); a submit is answered after its commit. Reads are
//! snapshots (redb MVCC) and never wait for the writer.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::record::JobRecord;
pub use super::seam::OnCommit;
use super::seam::{JobStore as Store, Limits, Owner, RecoveryScan, Shared, Stored};

/// seq → the job record (JSON).
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs_v1");
/// idempotency key (caller, app, uuid) → seq.
const IDEM: TableDefinition<&str, u64> = TableDefinition::new("idem_v1");

/// Beside the store file once a store was created there: an empty or missing store file next
/// to it is a lost store, not a new one.
const CREATED_MARKER: &str = "jobs.redb.created";

/// Writes the marker durably (temp file, fsync, rename, fsync of the directory).
fn write_marker(marker: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    let fail = |e: std::io::Error| err(format!("{}: {e}", marker.display()));
    let tmp = marker.with_extension("created.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(b"A job store was created in this directory. If jobs.redb is missing or empty, jobs were lost: the gateway refuses to start until it is restored or --reset-job-store is given.\n")
        .and_then(|()| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, marker).map_err(fail)?;
    if let Some(dir) = marker.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)?;
    }
    Ok(())
}

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

enum Op {
    /// Store a new job unless its idempotency key is known; answers (record, duplicate).
    /// `then` runs on the new record once committed, in the order jobs were stored.
    Insert {
        rec: Box<JobRecord>,
        key: String,
        limits: Option<Limits>,
        then: Option<OnCommit>,
        done: oneshot::Sender<Result<Stored, StoreError>>,
    },
    /// Overwrite a job's record (state changes).
    Update {
        rec: Box<JobRecord>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Remove finished jobs updated before `before_ms` (and their keys).
    Expire {
        before_ms: i64,
        done: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct JobStore {
    db: Arc<Database>,
    tx: mpsc::Sender<Op>,
    /// Jobs stored (kept by the writer).
    count: Arc<AtomicU64>,
    path: std::path::PathBuf,
}

impl JobStore {
    /// Opens (or creates) `dir/jobs.redb` and starts the writer thread. A store that is
    /// empty or missing where one was created before (`jobs.redb.created` beside it says so)
    /// is refused unless `reset` (`--reset-job-store`): its unfinished jobs would be lost
    /// without a word.
    pub fn open(dir: &Path, reset: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        let path = dir.join("jobs.redb");
        let marker = dir.join(CREATED_MARKER);
        let had_store = marker.exists();
        let state = match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 => None,
            Ok(_) => Some("empty"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing"),
            Err(e) => return Err(err(format!("{}: {e}", path.display()))),
        };
        match (had_store, state, reset) {
            (true, Some(state), false) => {
                return Err(err(format!(
                    "{} is {state}, but {} records that a job store was created here: its                      unfinished jobs would be lost without a word. Restore the file, or start                      once with --reset-job-store (GATEWAY_RESET_JOB_STORE=1) to begin an empty                      store",
                    path.display(),
                    marker.display()
                )));
            }
            (true, Some(state), true) => tracing::warn!(
                path = %path.display(),
                state,
                "--reset-job-store: the job store was {state}; starting an empty one (the jobs it held are lost)"
            ),
            (_, None, true) => tracing::warn!(
                path = %path.display(),
                "--reset-job-store given, but the job store is intact: it is kept"
            ),
            _ => {}
        }
        let db =
            Arc::new(Database::create(&path).map_err(|e| err(format!("{}: {e}", path.display())))?);
        // Create the tables so that readers find them.
        let txn = db.begin_write().map_err(err)?;
        let (next_seq, stored, open) = {
            let jobs = txn.open_table(JOBS).map_err(err)?;
            txn.open_table(IDEM).map_err(err)?;
            let next = jobs.last().map_err(err)?.map_or(1, |(k, _)| k.value() + 1);
            // Open jobs by caller (their bound is checked at each submit).
            let mut open = OpenJobs::default();
            for entry in jobs.iter().map_err(err)? {
                let rec = JobRecord::decode(entry.map_err(err)?.1.value())?;
                if !rec.state.is_final() {
                    open.add(&rec.caller, 1);
                }
            }
            (next, jobs.len().map_err(err)?, open)
        };
        txn.commit().map_err(err)?;
        if !had_store {
            write_marker(&marker)?;
        }
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let count = Arc::new(AtomicU64::new(stored));
        let writer_count = count.clone();
        std::thread::Builder::new()
            .name("job-store".into())
            .spawn(move || writer(&writer_db, &rx, next_seq, &writer_count, open))
            .map_err(err)?;
        Ok(Self {
            db,
            tx,
            count,
            path,
        })
    }

    /// Jobs stored now (all states).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Size of the store's file.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx
            .send(op)
            .map_err(|_| err("the writer thread has stopped"))
    }

    /// Stores `rec` (its `seq` is assigned) unless a job with `key` exists: then that job
    /// and `true`. Answers after the commit is on disk; `then` runs on a new job right after
    /// its commit, new jobs in the order they were stored. No bounds (see
    /// [`Self::insert_within`]).
    pub async fn insert(
        &self,
        rec: JobRecord,
        key: String,
        then: Option<OnCommit>,
    ) -> Result<(JobRecord, bool), StoreError> {
        match self.insert_within(rec, key, None, then).await? {
            Stored::New { rec, .. } => Ok((rec, false)),
            Stored::Duplicate(rec) => Ok((rec, true)),
            Stored::Full(_) | Stored::CallerFull(_) => {
                unreachable!("no limits, no refusal")
            }
        }
    }

    /// [`Self::insert`] within `limits`: a caller at its bound of open jobs is refused
    /// (`CallerFull`); a store full of jobs makes room by removing its oldest finished ones,
    /// and refuses (`Full`) only when every job in it is open.
    pub async fn insert_within(
        &self,
        rec: JobRecord,
        key: String,
        limits: Option<Limits>,
        then: Option<OnCommit>,
    ) -> Result<Stored, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Insert {
            rec: Box::new(rec),
            key,
            limits,
            then,
            done,
        })?;
        rx.await.map_err(|_| err("the writer thread has stopped"))?
    }

    /// Overwrites a job's record; answers after the commit.
    pub async fn update(&self, rec: JobRecord) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Update {
            rec: Box::new(rec),
            done,
        })?;
        rx.await.map_err(|_| err("the writer thread has stopped"))?
    }

    /// Removes finished jobs last updated before `before_ms`; how many.
    pub async fn expire(&self, before_ms: i64) -> Result<usize, StoreError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Expire { before_ms, done })?;
        rx.await.map_err(|_| err("the writer thread has stopped"))?
    }

    /// The job `seq`, if stored.
    pub fn get(&self, seq: u64) -> Result<Option<JobRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let jobs = txn.open_table(JOBS).map_err(err)?;
        match jobs.get(seq).map_err(err)? {
            None => Ok(None),
            Some(v) => JobRecord::decode(v.value()).map(Some),
        }
    }

    /// For a restart: the jobs not final yet, in the order they were stored, and the final
    /// ones that were sent (attempted) since `since_ms` (they count in Feishu's windows).
    pub fn recovery_scan(
        &self,
        since_ms: i64,
    ) -> Result<(Vec<JobRecord>, Vec<JobRecord>), StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let jobs = txn.open_table(JOBS).map_err(err)?;
        let (mut unfinished, mut recent) = (Vec::new(), Vec::new());
        for entry in jobs.iter().map_err(err)? {
            let (_, v) = entry.map_err(err)?;
            let rec = JobRecord::decode(v.value())?;
            if !rec.state.is_final() {
                unfinished.push(rec);
            } else if rec.attempts > 0 && rec.updated_ms >= since_ms {
                recent.push(rec);
            }
        }
        Ok((unfinished, recent))
    }
}

// === impl JobStore ===

impl Store for JobStore {
    fn submit(
        &self,
        rec: JobRecord,
        key: String,
        limits: Limits,
        start: OnCommit,
    ) -> BoxFuture<'_, Result<Stored, StoreError>> {
        Box::pin(self.insert_within(rec, key, Some(limits), Some(start)))
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<(JobRecord, Owner)>, StoreError>> {
        let found = JobStore::get(self, seq).map(|r| r.map(|rec| (rec, Owner::Here)));
        Box::pin(std::future::ready(found))
    }

    fn update(&self, rec: JobRecord) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move { JobStore::update(self, rec).await.map(|()| true) })
    }

    fn expire(
        &self,
        keep: std::time::Duration,
        limit: usize,
    ) -> BoxFuture<'_, Result<(usize, u64), StoreError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok((0, self.count()));
            }
            let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
            let gone = JobStore::expire(self, super::now_ms() - keep).await?;
            Ok((gone, self.count()))
        })
    }

    fn count(&self) -> Option<u64> {
        Some(JobStore::count(self))
    }

    fn file_bytes(&self) -> Option<u64> {
        Some(JobStore::file_bytes(self))
    }

    fn recovery_scan(&self, since_ms: i64) -> Option<Result<RecoveryScan, StoreError>> {
        Some(JobStore::recovery_scan(self, since_ms))
    }

    fn shared(&self) -> Option<&dyn Shared> {
        None
    }
}

/// The writer: takes what has piled up, applies it in one transaction, commits (fsync), then
/// answers everyone in the batch.
/// Open (not final) jobs, by caller and in all: kept by the writer thread.
#[derive(Debug, Default, Clone)]
struct OpenJobs {
    by_caller: std::collections::HashMap<String, u64>,
    total: u64,
}

impl OpenJobs {
    fn of(&self, caller: &str) -> u64 {
        self.by_caller.get(caller).copied().unwrap_or(0)
    }

    fn add(&mut self, caller: &str, n: u64) {
        *self.by_caller.entry(caller.to_owned()).or_default() += n;
        self.total += n;
    }

    fn remove(&mut self, caller: &str) {
        if let Some(n) = self.by_caller.get_mut(caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_caller.remove(caller);
            }
            self.total = self.total.saturating_sub(1);
        }
    }
}

fn writer(
    db: &Database,
    rx: &mpsc::Receiver<Op>,
    mut next_seq: u64,
    count: &AtomicU64,
    mut open: OpenJobs,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let seq_before = next_seq;
        // The counts change with the batch only once it is committed.
        let mut batch_open = open.clone();
        let applied = apply(db, &mut batch, &mut next_seq, &mut batch_open);
        match applied {
            Ok(answers) => {
                open = batch_open;
                for a in &answers {
                    match a {
                        Answer::Inserted(stored, evicted)
                            if matches!(**stored, Stored::New { .. }) =>
                        {
                            count.fetch_add(1, Ordering::AcqRel);
                            count.fetch_sub(*evicted as u64, Ordering::AcqRel);
                        }
                        Answer::Expired(n) => {
                            count.fetch_sub(*n as u64, Ordering::AcqRel);
                        }
                        _ => {}
                    }
                }
                for (op, answer) in batch.into_iter().zip(answers) {
                    answer_op(op, Ok(answer));
                }
            }
            Err(e) => {
                next_seq = seq_before;
                tracing::error!(error = %e, "job store commit failed; the batch is refused");
                for op in batch {
                    answer_op(op, Err(e.clone()));
                }
            }
        }
    }
}

/// What one operation of a committed batch answers.
enum Answer {
    /// How the insert went, and how many finished jobs it removed to make room.
    Inserted(Box<Stored>, usize),
    Updated,
    Expired(usize),
}

fn answer_op(op: Op, answer: Result<Answer, StoreError>) {
    match (op, answer) {
        (Op::Insert { done, then, .. }, Ok(Answer::Inserted(stored, _))) => {
            if let (Stored::New { rec, .. }, Some(then)) = (&*stored, then) {
                then(rec);
            }
            let _ = done.send(Ok(*stored));
        }
        (Op::Update { done, .. }, Ok(Answer::Updated)) => {
            let _ = done.send(Ok(()));
        }
        (Op::Expire { done, .. }, Ok(Answer::Expired(n))) => {
            let _ = done.send(Ok(n));
        }
        (Op::Insert { done, .. }, Err(e)) => {
            let _ = done.send(Err(e));
        }
        (Op::Update { done, .. }, Err(e)) => {
            let _ = done.send(Err(e));
        }
        (Op::Expire { done, .. }, Err(e)) => {
            let _ = done.send(Err(e));
        }
        (_, Ok(_)) => unreachable!("answers are made per operation kind"),
    }
}

fn apply(
    db: &Database,
    batch: &mut [Op],
    next_seq: &mut u64,
    open: &mut OpenJobs,
) -> Result<Vec<Answer>, StoreError> {
    let txn = db.begin_write().map_err(err)?;
    let mut answers = Vec::with_capacity(batch.len());
    {
        let mut jobs = txn.open_table(JOBS).map_err(err)?;
        let mut idem = txn.open_table(IDEM).map_err(err)?;
        for op in batch.iter_mut() {
            match op {
                Op::Insert {
                    rec, key, limits, ..
                } => {
                    let known = idem.get(key.as_str()).map_err(err)?.map(|v| v.value());
                    if let Some(seq) = known
                        && let Some(v) = jobs.get(seq).map_err(err)?
                    {
                        let known = JobRecord::decode(v.value())?;
                        answers.push(Answer::Inserted(Box::new(Stored::Duplicate(known)), 0));
                        continue;
                    }
                    let mut evicted = 0;
                    if let Some(l) = limits {
                        let mine = open.of(&rec.caller);
                        if mine >= l.per_caller {
                            answers.push(Answer::Inserted(Box::new(Stored::CallerFull(mine)), 0));
                            continue;
                        }
                        if open.total >= l.max_jobs {
                            answers.push(Answer::Inserted(Box::new(Stored::Full(open.total)), 0));
                            continue;
                        }
                        // Full of jobs, some finished: the oldest finished make room.
                        let stored = jobs.len().map_err(err)?;
                        if stored >= l.max_jobs {
                            let over =
                                usize::try_from(stored - l.max_jobs + 1).unwrap_or(usize::MAX);
                            let mut gone = Vec::new();
                            for entry in jobs.iter().map_err(err)? {
                                let (k, v) = entry.map_err(err)?;
                                let old = JobRecord::decode(v.value())?;
                                if old.state.is_final() {
                                    gone.push((k.value(), old.idempotency_key()));
                                    if gone.len() >= over {
                                        break;
                                    }
                                }
                            }
                            for (seq, key) in &gone {
                                jobs.remove(*seq).map_err(err)?;
                                idem.remove(key.as_str()).map_err(err)?;
                            }
                            evicted = gone.len();
                        }
                    }
                    rec.seq = *next_seq;
                    *next_seq += 1;
                    jobs.insert(rec.seq, rec.encode().as_slice()).map_err(err)?;
                    idem.insert(key.as_str(), rec.seq).map_err(err)?;
                    if !rec.state.is_final() {
                        open.add(&rec.caller, 1);
                    }
                    let stored = Stored::New {
                        rec: (**rec).clone(),
                        runs_here: true,
                    };
                    answers.push(Answer::Inserted(Box::new(stored), evicted));
                }
                Op::Update { rec, .. } => {
                    let was_open = match jobs.get(rec.seq).map_err(err)? {
                        Some(v) => !JobRecord::decode(v.value())?.state.is_final(),
                        None => false,
                    };
                    jobs.insert(rec.seq, rec.encode().as_slice()).map_err(err)?;
                    if was_open && rec.state.is_final() {
                        open.remove(&rec.caller);
                    }
                    answers.push(Answer::Updated);
                }
                Op::Expire { before_ms, .. } => {
                    let mut gone = Vec::new();
                    for entry in jobs.iter().map_err(err)? {
                        let (k, v) = entry.map_err(err)?;
                        let rec = JobRecord::decode(v.value())?;
                        if rec.state.is_final() && rec.updated_ms < *before_ms {
                            gone.push((k.value(), rec.idempotency_key()));
                        }
                    }
                    for (seq, key) in &gone {
                        jobs.remove(*seq).map_err(err)?;
                        idem.remove(key.as_str()).map_err(err)?;
                    }
                    answers.push(Answer::Expired(gone.len()));
                }
            }
        }
    }
    txn.commit().map_err(err)?;
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::record::{State, StoredReply};

    fn record(uuid: &str) -> JobRecord {
        JobRecord {
            seq: 0,
            caller: "bot".into(),
            credential: String::new(),
            reply: StoredReply {
                app: "default".into(),
                message_id: "om_1".into(),
                msg_type: "text".into(),
                content: r#"{"text":"x"}"#.into(),
                reply_in_thread: false,
                uuid: uuid.into(),
                feishu_uuid: None,
                chat_id: "oc_1".into(),
                user_id: None,
                send_to: None,
                traceparent: None,
            },
            state: State::Queued,
            attempts: 0,
            created_ms: 1_000,
            updated_ms: 1_000,
            expires_ms: 2_000,
            result: None,
            error: None,
            key: String::new(),
        }
    }

    fn dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("gw-store-{name}-{}", std::process::id()))
    }

    #[tokio::test]
    async fn concurrent_inserts_share_commits_and_keep_their_order() {
        let d = dir("group");
        let _ = std::fs::remove_dir_all(&d);
        let store = JobStore::open(&d, false).unwrap();
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let inserts = (0..200).map(|i| {
            let (store, order) = (store.clone(), order.clone());
            async move {
                let rec = record(&format!("u{i}"));
                let key = rec.idempotency_key();
                let then: OnCommit = Box::new(move |r: &JobRecord| order.lock().push(r.seq));
                store.insert(rec, key, Some(then)).await.unwrap()
            }
        });
        let results = futures_util::future::join_all(inserts).await;
        let mut seqs: Vec<u64> = results
            .iter()
            .map(|(r, dup)| {
                assert!(!dup);
                r.seq
            })
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 200, "distinct seqs");
        let committed = order.lock().clone();
        assert!(
            committed.windows(2).all(|w| w[0] < w[1]),
            "started in store order"
        );
        assert_eq!(store.count(), 200);
        // The same key again is the first job.
        let rec = record("u7");
        let key = rec.idempotency_key();
        let (again, dup) = store.insert(rec, key, None).await.unwrap();
        assert!(dup);
        assert_eq!(again.reply.uuid, "u7");
        // Reopened (once the writer thread has let go of the file): everything is there.
        drop(store);
        let t = std::time::Instant::now();
        let store = loop {
            match JobStore::open(&d, false) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > std::time::Duration::from_secs(10) => panic!("{e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        };
        assert_eq!(store.count(), 200);
        let (unfinished, _) = store.recovery_scan(0).unwrap();
        assert_eq!(unfinished.len(), 200);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Opens `d` once the previous handle's writer thread has let go of the file.
    async fn reopen(d: &Path, reset: bool) -> Result<JobStore, StoreError> {
        let t = std::time::Instant::now();
        loop {
            match JobStore::open(d, reset) {
                Err(e)
                    if e.0.contains("lock") && t.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                r => return r,
            }
        }
    }

    /// Waits until no handle holds `file` (the writer thread of a dropped store lets go of it
    /// a moment later): the file may be damaged on purpose only then, or the closing handle
    /// would write into the damaged file.
    async fn closed(file: &Path) {
        let t = std::time::Instant::now();
        loop {
            let f = std::fs::File::open(file).unwrap();
            if f.try_lock().is_ok() {
                return;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "never closed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn an_empty_or_missing_store_where_one_was_is_refused_unless_reset() {
        let d = dir("forget");
        let _ = std::fs::remove_dir_all(&d);
        let store = JobStore::open(&d, false).unwrap();
        let r = record("kept");
        let k = r.idempotency_key();
        store.insert(r, k, None).await.unwrap();
        let file = d.join("jobs.redb");
        // An open store holds the file's lock (what `closed` waits on).
        assert!(std::fs::File::open(&file).unwrap().try_lock().is_err());
        drop(store);
        // Intact: opens with its job.
        assert_eq!(reopen(&d, false).await.unwrap().count(), 1);
        // Truncated to zero bytes, then gone: refused, naming the way out.
        closed(&file).await;
        std::fs::write(&file, b"").unwrap();
        let e = reopen(&d, false).await.err().expect("refused").0;
        assert!(
            e.contains("is empty") && e.contains("--reset-job-store"),
            "{e}"
        );
        std::fs::remove_file(&file).unwrap();
        let e = reopen(&d, false).await.err().expect("refused").0;
        assert!(e.contains("is missing"), "{e}");
        // Reset: a new, empty store, which opens plainly from then on.
        assert_eq!(reopen(&d, true).await.unwrap().count(), 0);
        assert_eq!(reopen(&d, false).await.unwrap().count(), 0);
        // A store from before the marker existed gets one when opened.
        std::fs::remove_file(d.join(CREATED_MARKER)).unwrap();
        drop(reopen(&d, false).await.unwrap());
        assert!(d.join(CREATED_MARKER).exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_caller_at_its_share_refuses_only_itself_and_finished_jobs_make_room() {
        let d = dir("shares");
        let _ = std::fs::remove_dir_all(&d);
        let store = JobStore::open(&d, false).unwrap();
        let limits = Some(Limits {
            max_jobs: 3,
            per_caller: 2,
        });
        let submit = |caller: &str, uuid: &str| {
            let mut r = record(uuid);
            r.caller = caller.into();
            let k = r.idempotency_key();
            store.insert_within(r, k, limits, None)
        };
        let Stored::New { rec: first, .. } = submit("a", "a1").await.unwrap() else {
            panic!("stored")
        };
        assert!(matches!(
            submit("a", "a2").await.unwrap(),
            Stored::New { .. }
        ));
        // a is at its share: a is refused, b is not.
        assert!(matches!(
            submit("a", "a3").await.unwrap(),
            Stored::CallerFull(2)
        ));
        assert!(matches!(
            submit("b", "b1").await.unwrap(),
            Stored::New { .. }
        ));
        // Every job the store may hold is open: refused, for anyone.
        assert!(matches!(submit("b", "b2").await.unwrap(), Stored::Full(3)));
        // a's first job ends: it no longer counts for a, and it makes room when needed.
        let mut done = first.clone();
        done.state = State::Delivered;
        store.update(done).await.unwrap();
        assert!(matches!(
            submit("a", "a4").await.unwrap(),
            Stored::New { .. }
        ));
        assert_eq!(store.count(), 3);
        assert!(
            store.get(first.seq).unwrap().is_none(),
            "the finished job made room"
        );
        // Its key went with it: the same uuid is a new job now.
        assert!(matches!(
            submit("a", "a1").await.unwrap(),
            Stored::CallerFull(2)
        ));
        // The counts survive a restart.
        drop(store);
        let store = reopen(&d, false).await.unwrap();
        let mut r = record("a5");
        r.caller = "a".into();
        let k = r.idempotency_key();
        assert!(matches!(
            store.insert_within(r, k, limits, None).await.unwrap(),
            Stored::CallerFull(2)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn finished_jobs_expire_with_their_keys() {
        let d = dir("expire");
        let _ = std::fs::remove_dir_all(&d);
        let store = JobStore::open(&d, false).unwrap();
        let (mut done, _) = {
            let r = record("old");
            let k = r.idempotency_key();
            store.insert(r, k, None).await.unwrap()
        };
        let (waiting, _) = {
            let r = record("waiting");
            let k = r.idempotency_key();
            store.insert(r, k, None).await.unwrap()
        };
        done.state = State::Delivered;
        done.updated_ms = 5_000;
        store.update(done.clone()).await.unwrap();
        assert_eq!(store.expire(4_000).await.unwrap(), 0, "not old enough");
        assert_eq!(store.expire(6_000).await.unwrap(), 1);
        assert!(store.get(done.seq).unwrap().is_none());
        assert!(
            store.get(waiting.seq).unwrap().is_some(),
            "unfinished jobs stay"
        );
        assert_eq!(store.count(), 1);
        // Its key went with it: the same uuid is a new job now.
        let r = record("old");
        let k = r.idempotency_key();
        let (_, dup) = store.insert(r, k, None).await.unwrap();
        assert!(!dup);
        let _ = std::fs::remove_dir_all(&d);
    }
}
