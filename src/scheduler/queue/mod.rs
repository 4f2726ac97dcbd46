//! Per-chat FIFO queues as plain state: which chat's head may be tried next (oldest ready
//! first), timers, deadlines, and retries that keep their place. No tasks, no I/O and no quota
//! logic: every method takes `now` in the quota clock's µs and says what the driver must do,
//! so the queue rules are tested without a runtime.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::gate::{Grant, Opaque};
use super::{JobResult, JobSpec};
use crate::quota::{Micros, QuotaKey};

mod take;
mod urgent;

/// Deadline entries allowed beyond the queued jobs before the heap is compacted (entries of
/// jobs already sent or gone stay in it until their instant otherwise).
const DEADLINE_SLACK: usize = 1024;

/// What a queued job weighs besides its content (its request fields, quota keys, channel and
/// queue entry: ~1.1 KB measured by `loadgen depth`).
pub const JOB_OVERHEAD_BYTES: usize = 1024;

/// One accepted reply and its progress.
pub(super) struct Job {
    /// Assigned by [`Queues::push`].
    pub id: u64,
    pub spec: JobSpec,
    pub keys: Vec<QuotaKey>,
    /// Not sent at or after this instant (deadline minus the send budget).
    pub send_by: Option<Micros>,
    /// Backoff: not sent before this instant.
    pub not_before: Micros,
    pub accepted_at: Instant,
    pub first_send_at: Option<Instant>,
    pub attempts: u32,
    pub done: oneshot::Sender<JobResult>,
    /// The quota grant of the attempt in flight (settled at its answer).
    pub grant: Option<Grant>,
    /// Cluster mode: what the shared gate keeps of `keys` (their names in the shared
    /// store), made at the first decision and reused by every later one (line checks,
    /// retries).
    pub gate_memo: Option<Opaque>,
    /// Open while the job waits in the queue (`queue_wait`), closed when it is taken to send.
    pub wait: tracing::Span,
    /// The quota layout generation `keys` were made in (a live reload can change them).
    pub keys_gen: u64,
    /// Where the job goes when another replica decides its chat (`Verdict::Elsewhere`): back
    /// to whoever routed it here (`Scheduler::queue_routed`), not before `stay_until`.
    pub back: Option<oneshot::Sender<Box<JobSpec>>>,
    pub stay_until: Option<Instant>,
}

impl Job {
    pub fn new(spec: JobSpec, done: oneshot::Sender<JobResult>, now: Instant) -> Self {
        Self {
            wait: super::spans::queue_wait(&spec, 1),
            keys_gen: 0,
            id: 0,
            keys: Vec::new(),
            send_by: None,
            not_before: 0,
            accepted_at: now,
            first_send_at: None,
            attempts: 0,
            spec,
            done,
            grant: None,
            gate_memo: None,
            back: None,
            stay_until: None,
        }
    }

    pub fn finish(self, result: JobResult) {
        // The caller may have gone (cancelled); nothing to tell then.
        let _ = self.done.send(result);
    }

    /// The reply's uuid as its caller knows it.
    pub fn uuid(&self) -> String {
        self.uuid_str().to_owned()
    }

    fn uuid_str(&self) -> &str {
        self.spec
            .caller_uuid
            .as_deref()
            .unwrap_or(self.spec.request.uuid())
    }

    /// Bytes this job holds while queued (for the byte bound).
    pub fn weight(&self) -> usize {
        JOB_OVERHEAD_BYTES
            + self.spec.request.weight()
            + self.spec.caller_uuid.as_ref().map_or(0, String::len)
    }
}

/// One chat's queue, read for introspection ([`Queues::chat`]).
pub(super) struct ChatView<'a> {
    pub queued: usize,
    pub bytes: usize,
    pub busy: bool,
    pub head: Option<&'a Job>,
    pub next_try: Option<Micros>,
}

/// Why a queued job left without being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dropped {
    /// Its caller went away.
    Cancelled,
    /// Its send-by instant passed.
    Deadline,
}

#[derive(Default)]
struct ChatQueue {
    jobs: VecDeque<Job>,
    /// The head job is being sent or decided (the rest wait: per-chat order).
    busy: bool,
    /// Ticket of the latest schedule entry (runnable, timer or a gate's line); stale entries
    /// are ignored.
    ticket: u64,
    /// Has a live schedule entry (`ticket`).
    scheduled: bool,
}

/// What the queued jobs hold: in total, per caller and per app.
#[derive(Default)]
struct Counts {
    queued: usize,
    /// Sum of the queued jobs' [`Job::weight`].
    bytes: usize,
    /// Queued jobs and their bytes per caller (index: `JobSpec::caller`).
    per_caller: Vec<(usize, usize)>,
    /// … and per app (index: `JobSpec::app`).
    per_app: Vec<(usize, usize)>,
    /// The app_id of each app index seen (index: `JobSpec::app`).
    app_ids: Vec<Option<Arc<str>>>,
}

/// Entry `i` of a per-caller or per-app count, grown on first use.
fn share(v: &mut Vec<(usize, usize)>, i: usize) -> &mut (usize, usize) {
    if v.len() <= i {
        v.resize(i + 1, (0, 0));
    }
    &mut v[i]
}

impl Counts {
    /// Counts `job` as queued.
    fn add(&mut self, job: &Job) {
        let w = job.weight();
        if self.app_ids.len() <= job.spec.app {
            self.app_ids.resize(job.spec.app + 1, None);
        }
        self.app_ids[job.spec.app] = Some(job.spec.app_id.clone());
        self.queued += 1;
        self.bytes += w;
        for s in [
            share(&mut self.per_caller, job.spec.caller),
            share(&mut self.per_app, job.spec.app),
        ] {
            s.0 += 1;
            s.1 += w;
        }
    }

    /// Stops counting `job` as queued.
    fn remove(&mut self, job: &Job) {
        let w = job.weight();
        self.queued -= 1;
        self.bytes -= w;
        for s in [
            share(&mut self.per_caller, job.spec.caller),
            share(&mut self.per_app, job.spec.app),
        ] {
            s.0 -= 1;
            s.1 -= w;
        }
    }
}

/// Every chat's queue and the order in which their heads are tried.
#[derive(Default)]
pub(super) struct Queues {
    chats: HashMap<Arc<str>, ChatQueue>,
    /// Chats whose head may be sendable now: urgent ones first (see [`Queues::set_urgent`]),
    /// then oldest first (fairness). Entries: (not urgent, ticket, chat).
    runnable: BinaryHeap<Reverse<(bool, u64, Arc<str>)>>,
    /// By app_id: a chat of that app holding at least this many jobs is urgent (its own
    /// quota needs about as long to send them as the app needs for everything queued).
    urgent_depth: HashMap<Arc<str>, usize>,
    /// Chats seen urgent, by app_id (pruned by [`Queues::urgent_chats`]).
    urgent_seen: HashMap<Arc<str>, std::collections::HashSet<Arc<str>>>,
    /// Chats waiting for quota or backoff: (ready at, ticket, chat).
    timers: BinaryHeap<Reverse<(Micros, u64, Arc<str>)>>,
    /// Queued jobs with a deadline: (send_by, job id, chat).
    deadlines: BinaryHeap<Reverse<(Micros, u64, Arc<str>)>>,
    counts: Counts,
    in_flight: usize,
    next_id: u64,
    next_ticket: u64,
}

impl Queues {
    /// Jobs waiting (not in flight).
    pub fn queued(&self) -> usize {
        self.counts.queued
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Bytes held by queued jobs.
    pub fn queued_bytes(&self) -> usize {
        self.counts.bytes
    }

    /// Jobs and bytes `caller` has queued.
    pub fn caller_queued(&self, caller: usize) -> (usize, usize) {
        self.counts
            .per_caller
            .get(caller)
            .copied()
            .unwrap_or((0, 0))
    }

    /// `caller` holds `jobs` more jobs and `bytes` more bytes outside the queues (negative:
    /// fewer): they count in its share ([`Self::caller_queued`]).
    pub fn hold(&mut self, caller: usize, jobs: isize, bytes: isize) {
        let s = share(&mut self.counts.per_caller, caller);
        s.0 = s.0.saturating_add_signed(jobs);
        s.1 = s.1.saturating_add_signed(bytes);
    }

    /// Jobs and bytes of app `app` queued.
    pub fn app_queued(&self, app: usize) -> (usize, usize) {
        self.counts.per_app.get(app).copied().unwrap_or((0, 0))
    }

    /// Jobs queued in `chat` and whether its head is in flight.
    pub fn ahead(&self, chat: &str) -> (usize, bool) {
        self.chats
            .get(chat)
            .map_or((0, false), |c| (c.jobs.len(), c.busy))
    }

    /// Queues `job` at the tail of its chat (an id is assigned).
    pub fn push(&mut self, mut job: Job) {
        job.id = self.next_id;
        self.next_id += 1;
        let chat_id = job.spec.chat_id.clone();
        if let Some(send_by) = job.send_by {
            self.deadlines
                .push(Reverse((send_by, job.id, chat_id.clone())));
            if self.deadlines.len() > 2 * self.counts.queued + DEADLINE_SLACK {
                self.compact_deadlines();
            }
        }
        self.counts.add(&job);
        let chat = self.chats.entry(chat_id.clone()).or_default();
        chat.jobs.push_back(job);
        if !chat.busy && !chat.scheduled {
            self.schedule_now(&chat_id);
        }
    }

    fn bump_ticket(&mut self, chat_id: &Arc<str>) -> Option<u64> {
        let chat = self.chats.get_mut(chat_id)?;
        self.next_ticket += 1;
        chat.ticket = self.next_ticket;
        chat.scheduled = true;
        Some(self.next_ticket)
    }

    /// `chat` tries its head at the next dispatch (ignored when the chat has no queue).
    pub fn schedule_now(&mut self, chat_id: &Arc<str>) {
        if let Some(ticket) = self.bump_ticket(chat_id) {
            self.make_runnable(chat_id.clone(), ticket);
        }
    }

    /// `chat` tries its head again at `at`.
    pub fn schedule_at(&mut self, chat_id: &Arc<str>, at: Micros) {
        if let Some(ticket) = self.bump_ticket(chat_id) {
            self.timers.push(Reverse((at, ticket, chat_id.clone())));
        }
    }

    /// `chat` waits in a line outside (a shared gate's): scheduled, with no entry here until
    /// the line lets it go ([`Self::schedule_now`]).
    pub fn park(&mut self, chat_id: &Arc<str>) {
        self.bump_ticket(chat_id);
    }

    /// `chat`'s head is being decided elsewhere (the shared gate): nothing else of it runs
    /// meanwhile.
    pub fn mark_busy(&mut self, chat_id: &Arc<str>) {
        if let Some(c) = self.chats.get_mut(chat_id) {
            c.busy = true;
        }
    }

    /// The next chat whose head may be tried at `now`, oldest ready first. Heads whose caller
    /// left or whose deadline passed are taken off on the way (into `dropped`); a head in
    /// backoff puts its chat on a timer.
    pub fn next_ready(
        &mut self,
        now: Micros,
        dropped: &mut Vec<(Job, Dropped)>,
    ) -> Option<Arc<str>> {
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, ticket, chat)) = self.timers.pop().expect("peeked");
            self.make_runnable(chat, ticket);
        }
        while let Some(Reverse((_, ticket, chat_id))) = self.runnable.pop() {
            let Some(chat) = self.chats.get_mut(&chat_id) else {
                continue;
            };
            if chat.ticket != ticket || !chat.scheduled {
                continue; // stale entry
            }
            chat.scheduled = false;
            if chat.busy {
                continue;
            }
            while let Some(head) = chat.jobs.front() {
                let why = if head.done.is_closed() {
                    Dropped::Cancelled
                } else if head.send_by.is_some_and(|s| s <= now) {
                    Dropped::Deadline
                } else {
                    break;
                };
                let job = chat.jobs.pop_front().expect("front");
                self.counts.remove(&job);
                dropped.push((job, why));
            }
            let Some(head) = chat.jobs.front() else {
                self.chats.remove(&chat_id);
                continue;
            };
            if head.not_before > now {
                let at = head.not_before;
                self.schedule_at(&chat_id, at);
                continue;
            }
            return Some(chat_id);
        }
        None
    }

    pub fn head_mut(&mut self, chat_id: &str) -> Option<&mut Job> {
        self.chats.get_mut(chat_id)?.jobs.front_mut()
    }

    /// Takes `chat`'s head out to be sent; the chat is busy until [`Self::sent`].
    pub fn pop_for_send(&mut self, chat_id: &str) -> Option<Job> {
        let chat = self.chats.get_mut(chat_id)?;
        let mut job = chat.jobs.pop_front()?;
        job.wait = tracing::Span::none();
        chat.busy = true;
        self.counts.remove(&job);
        self.in_flight += 1;
        Some(job)
    }

    /// The send of `chat`'s head came back; `retry` goes back to the head of the chat (it
    /// keeps its place in line).
    pub fn sent(&mut self, chat_id: &Arc<str>, retry: Option<Job>) {
        self.in_flight -= 1;
        let Some(chat) = self.chats.get_mut(chat_id) else {
            return;
        };
        chat.busy = false;
        if let Some(mut job) = retry {
            job.wait = super::spans::queue_wait(&job.spec, job.attempts + 1);
            self.counts.add(&job);
            chat.jobs.push_front(job);
        }
        if chat.jobs.is_empty() {
            self.chats.remove(chat_id);
        } else {
            self.schedule_now(chat_id);
        }
    }

    /// The outside decision for `chat`'s head `job_id` came back: the chat is no longer busy.
    /// Returns whether that job is still the head (`None`: the chat has no job left).
    pub fn decided(&mut self, chat_id: &str, job_id: u64) -> Option<bool> {
        let chat = self.chats.get_mut(chat_id)?;
        chat.busy = false;
        chat.jobs.front().map(|j| j.id == job_id)
    }

    /// `chat`'s head waits until `at` (e.g. the shared store refused its keys with an error).
    pub fn retry_head_at(&mut self, chat_id: &Arc<str>, at: Micros) {
        if let Some(head) = self.head_mut(chat_id) {
            head.not_before = at;
            self.schedule_at(chat_id, at);
        }
    }

    /// Forgets `chat` if nothing of it is queued or in flight.
    pub fn forget_if_idle(&mut self, chat_id: &str) {
        if self
            .chats
            .get(chat_id)
            .is_some_and(|c| c.jobs.is_empty() && !c.busy)
        {
            self.chats.remove(chat_id);
        }
    }

    /// Every chat with a queued head that is not in flight tries it at the next dispatch
    /// (older timer entries go stale).
    pub fn wake_all(&mut self) {
        let waiting: Vec<Arc<str>> = self
            .chats
            .iter()
            .filter(|(_, c)| !c.busy && !c.jobs.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.schedule_now(&id);
        }
    }

    /// Takes out the queued jobs whose send-by instant is `now` or earlier (jobs in flight
    /// finish on their own).
    pub fn expire(&mut self, now: Micros) -> Vec<Job> {
        let mut expired = Vec::new();
        while let Some(Reverse((at, _, _))) = self.deadlines.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, id, chat_id)) = self.deadlines.pop().expect("peeked");
            let Some(chat) = self.chats.get_mut(&chat_id) else {
                continue;
            };
            if let Some(pos) = chat.jobs.iter().position(|j| j.id == id) {
                let job = chat.jobs.remove(pos).expect("position is valid");
                self.counts.remove(&job);
                expired.push(job);
                if chat.jobs.is_empty() && !chat.busy {
                    self.chats.remove(&chat_id);
                }
            }
        }
        expired
    }

    /// Keeps only the deadline entries of jobs still queued (amortised: runs when the heap has
    /// grown past twice the queue plus [`DEADLINE_SLACK`]).
    fn compact_deadlines(&mut self) {
        let live: std::collections::HashSet<u64> = self
            .chats
            .values()
            .flat_map(|c| c.jobs.iter())
            .filter(|j| j.send_by.is_some())
            .map(|j| j.id)
            .collect();
        let entries = std::mem::take(&mut self.deadlines).into_vec();
        self.deadlines = entries
            .into_iter()
            .filter(|Reverse((_, id, _))| live.contains(id))
            .collect();
    }

    /// Takes out the queued jobs `pred` picks (a live reload removed their app); jobs in
    /// flight finish on their own.
    pub fn remove_where(&mut self, pred: impl Fn(&Job) -> bool) -> Vec<Job> {
        let mut out = Vec::new();
        for chat in self.chats.values_mut() {
            let (gone, kept): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut chat.jobs)
                .into_iter()
                .partition(|j| pred(j));
            chat.jobs = kept;
            out.extend(gone);
        }
        for job in &out {
            self.counts.remove(job);
        }
        self.chats.retain(|_, c| c.busy || !c.jobs.is_empty());
        out
    }

    /// Every queued job, to change in place (not what orders or counts them: their quota
    /// keys after a live reload).
    pub fn jobs_mut(&mut self) -> impl Iterator<Item = &mut Job> {
        self.chats.values_mut().flat_map(|c| c.jobs.iter_mut())
    }

    /// Takes out every queued job (shutdown).
    pub fn drain(&mut self) -> Vec<Job> {
        let mut all = Vec::new();
        for chat in self.chats.values_mut() {
            all.extend(chat.jobs.drain(..));
        }
        self.chats.retain(|_, c| c.busy);
        self.counts = Counts::default();
        all
    }

    /// When the driver must look again: now when a chat is runnable, else the next timer or
    /// deadline.
    pub fn next_wake(&self, now: Micros) -> Option<Micros> {
        if !self.runnable.is_empty() {
            return Some(now);
        }
        let t = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let d = self.deadlines.peek().map(|Reverse((t, _, _))| *t);
        [t, d].into_iter().flatten().min()
    }

    /// One chat as it stands (introspection): its waiting jobs and their bytes, whether its
    /// head is being sent or decided, the head job, and when it is tried next (a timer; None
    /// when runnable now, busy, or waiting in a gate's line).
    pub fn chat(&self, chat_id: &str) -> Option<ChatView<'_>> {
        let q = self.chats.get(chat_id)?;
        let next_try = self
            .timers
            .iter()
            .filter(|Reverse((_, ticket, chat))| **chat == *chat_id && *ticket == q.ticket)
            .map(|Reverse((at, _, _))| *at)
            .min();
        Some(ChatView {
            queued: q.jobs.len(),
            bytes: q.jobs.iter().map(Job::weight).sum(),
            busy: q.busy,
            head: q.jobs.front(),
            next_try,
        })
    }

    /// Returns the memory of a burst of chats once they are gone.
    pub fn shrink(&mut self) {
        if self.chats.is_empty() && self.chats.capacity() > 1024 {
            self.chats.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The queue rules as plain state: no runtime, time passed in.
    use super::*;
    use crate::feishu::{Call, SendRequest};

    const MS: Micros = 1000;

    /// A job for `chat` (with its receiver, so the caller is "still there").
    fn job(chat: &str, n: u32) -> (Job, oneshot::Receiver<JobResult>) {
        let (tx, rx) = oneshot::channel();
        let spec = JobSpec {
            caller: 0,
            credential: "".into(),
            intake: None,
            on_send: None,
            app: 0,
            app_name: "default".into(),
            app_id: "cli".into(),
            chat_id: chat.into(),
            user_id: None,
            target: crate::scheduler::Target::Chat,
            lane: crate::scheduler::Lane::Normal,
            request: Call::Reply(SendRequest {
                message_id: format!("om_{chat}_{n}"),
                content: String::new(),
                msg_type: "text",
                reply_in_thread: false,
                uuid: format!("{chat}-{n}"),
            }),
            caller_uuid: None,
            deadline: None,
            span: tracing::Span::none(),
        };
        (Job::new(spec, tx, Instant::now()), rx)
    }

    fn message_id(q: &mut Queues, chat: &str) -> String {
        q.head_mut(chat)
            .unwrap()
            .spec
            .request
            .message_id()
            .to_owned()
    }

    #[test]
    fn ready_chats_are_served_oldest_first_one_head_each() {
        let mut q = Queues::default();
        let mut keep = Vec::new();
        for (chat, n) in [("a", 0), ("b", 0), ("a", 1), ("c", 0)] {
            let (j, rx) = job(chat, n);
            keep.push(rx);
            q.push(j);
        }
        let mut order = Vec::new();
        while let Some(chat) = q.next_ready(0, &mut Vec::new()) {
            order.push(message_id(&mut q, &chat));
            q.pop_for_send(&chat).unwrap();
        }
        // a's second reply waits for its first: per-chat order, one in flight per chat.
        assert_eq!(order, ["om_a_0", "om_b_0", "om_c_0"]);
        assert_eq!((q.queued(), q.in_flight()), (1, 3));
        q.sent(&"a".into(), None);
        let next = q.next_ready(0, &mut Vec::new()).unwrap();
        assert_eq!(message_id(&mut q, &next), "om_a_1");
    }

    #[test]
    fn an_urgent_chat_is_tried_before_older_ones_and_forgotten_when_it_is_not() {
        let mut q = Queues::default();
        let mut keep = Vec::new();
        // b (one reply) came first, then a with three.
        for (chat, n) in [("b", 0), ("a", 0), ("a", 1), ("a", 2)] {
            let (j, rx) = job(chat, n);
            keep.push(rx);
            q.push(j);
        }
        let app: Arc<str> = "cli".into();
        q.set_urgent(&app, 3);
        // The entries made before count as they were: re-schedule both.
        for c in ["b", "a"] {
            q.schedule_now(&c.into());
        }
        let first = q.next_ready(0, &mut Vec::new()).unwrap();
        assert_eq!(&*first, "a", "three jobs at depth 3: urgent");
        assert_eq!(q.urgent_chats("cli"), [(first.clone(), 3)]);
        q.pop_for_send(&first).unwrap();
        let second = q.next_ready(0, &mut Vec::new()).unwrap();
        assert_eq!(&*second, "b");
        // Two left in a: below the depth, no longer urgent.
        assert!(!q.is_urgent("a"));
        assert!(q.urgent_chats("cli").is_empty());
        // No depth set (usize::MAX): nobody is.
        q.set_urgent(&app, usize::MAX);
        assert!(!q.is_urgent("a"));
    }

    #[test]
    fn a_retry_keeps_its_place_and_waits_out_its_backoff() {
        let mut q = Queues::default();
        let (first, _r1) = job("a", 0);
        let (second, _r2) = job("a", 1);
        q.push(first);
        q.push(second);
        let chat = q.next_ready(0, &mut Vec::new()).unwrap();
        let mut sent = q.pop_for_send(&chat).unwrap();
        sent.not_before = 500 * MS;
        q.sent(&chat, Some(sent));
        // The retried head blocks its chat until its backoff ends; then it goes first.
        assert!(q.next_ready(100 * MS, &mut Vec::new()).is_none());
        assert_eq!(q.next_wake(100 * MS), Some(500 * MS));
        let chat = q.next_ready(500 * MS, &mut Vec::new()).unwrap();
        assert_eq!(message_id(&mut q, &chat), "om_a_0");
    }

    #[test]
    fn cancelled_and_expired_heads_are_dropped_on_the_way() {
        let mut q = Queues::default();
        let (gone, rx) = job("a", 0);
        drop(rx);
        let (mut late, _r) = job("a", 1);
        late.send_by = Some(50 * MS);
        let (ok, _r2) = job("a", 2);
        q.push(gone);
        q.push(late);
        q.push(ok);
        let mut dropped = Vec::new();
        let chat = q.next_ready(60 * MS, &mut dropped).unwrap();
        let why: Vec<Dropped> = dropped.iter().map(|(_, w)| *w).collect();
        assert_eq!(why, [Dropped::Cancelled, Dropped::Deadline]);
        assert_eq!(message_id(&mut q, &chat), "om_a_2");
        assert_eq!(q.queued(), 1);
    }

    #[test]
    fn deadlines_expire_queued_jobs_but_not_the_one_in_flight() {
        let mut q = Queues::default();
        let mut keep = Vec::new();
        for n in 0..3 {
            let (mut j, rx) = job("a", n);
            j.send_by = Some(100 * MS);
            keep.push(rx);
            q.push(j);
        }
        let chat = q.next_ready(0, &mut Vec::new()).unwrap();
        q.pop_for_send(&chat).unwrap();
        assert!(q.expire(99 * MS).is_empty());
        let expired = q.expire(100 * MS);
        assert_eq!(expired.len(), 2);
        assert_eq!((q.queued(), q.in_flight()), (0, 1));
        q.sent(&chat, None);
        assert!(q.next_ready(200 * MS, &mut Vec::new()).is_none());
    }

    #[test]
    fn only_the_latest_schedule_entry_of_a_chat_counts() {
        let mut q = Queues::default();
        let (j, _r) = job("a", 0);
        q.push(j); // runnable now
        let a: Arc<str> = "a".into();
        q.schedule_at(&a, 300 * MS); // supersedes the runnable entry
        assert!(q.next_ready(0, &mut Vec::new()).is_none());
        q.park(&a); // in a line outside: the timer is stale too
        assert!(q.next_ready(400 * MS, &mut Vec::new()).is_none());
        q.schedule_now(&a); // the line lets it go
        assert_eq!(
            q.next_ready(400 * MS, &mut Vec::new()).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn abandoned_jobs_leave_at_once_and_the_rest_keep_their_order() {
        let mut q = Queues::default();
        let (j0, _r0) = job("a", 0);
        let (j1, r1) = job("a", 1);
        let (j2, _r2) = job("a", 2);
        for j in [j0, j1, j2] {
            q.push(j);
        }
        let chat = q.next_ready(0, &mut Vec::new()).unwrap();
        q.pop_for_send(&chat).unwrap(); // a_0 in flight: not queued, not touched
        drop(r1);
        let gone = q.take_abandoned("a");
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].spec.request.message_id(), "om_a_1");
        assert_eq!((q.queued(), q.in_flight()), (1, 1));
        q.sent(&chat, None);
        let next = q.next_ready(0, &mut Vec::new()).unwrap();
        assert_eq!(message_id(&mut q, &next), "om_a_2");
    }

    #[test]
    fn deadlines_of_jobs_that_are_gone_do_not_pile_up() {
        // Callers with far-off deadlines (grpc-timeout: 99999999H): each delivered job used to
        // leave its deadline entry behind until that deadline, so the heap only grew.
        let mut q = Queues::default();
        let far = Micros::MAX / 2;
        let mut keep = Vec::new();
        for n in 0..20_000u32 {
            let (mut j, rx) = job("a", n);
            j.send_by = Some(far);
            keep.push(rx);
            q.push(j);
            let chat = q.next_ready(0, &mut Vec::new()).unwrap();
            q.pop_for_send(&chat).unwrap();
            q.sent(&chat, None);
        }
        assert_eq!(q.queued(), 0);
        assert!(
            q.deadlines.len() <= 2 * DEADLINE_SLACK,
            "{} entries left",
            q.deadlines.len()
        );
    }

    #[test]
    fn a_decision_answer_tells_whether_its_job_is_still_the_head() {
        let mut q = Queues::default();
        let (j, rx) = job("a", 0);
        q.push(j);
        let chat = q.next_ready(0, &mut Vec::new()).unwrap();
        let id = q.head_mut(&chat).unwrap().id;
        q.mark_busy(&chat);
        assert_eq!(q.decided(&chat, id), Some(true));
        drop(rx);
        q.schedule_now(&chat);
        let mut dropped = Vec::new();
        assert!(q.next_ready(0, &mut dropped).is_none());
        assert_eq!(dropped.len(), 1);
        assert_eq!(q.decided(&chat, id), None, "the chat is gone");
    }
}
