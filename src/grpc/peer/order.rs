//! The order of each queue's jobs while some are forwarded: a queue's jobs reach the line
//! that sends them (the owner's, or this replica's) in the order they came here.
//!
//! Each job holds a [`Ticket`] until it is finished, naming where it goes (a peer's address, or
//! here) and whether it has its place in that line yet. A job may go
//! once every earlier job of its queue is finished, or goes to the same place and has its
//! place there. So jobs to one owner stream in one after the other; a job for another place
//! (the owner changed, or failed and its jobs come back here) waits until the earlier ones
//! are finished.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Where a job is sent from: a peer's address, or `None` for this replica.
pub(super) type Dest = Option<String>;

/// Every queue with jobs forwarded and not finished.
#[derive(Default)]
pub(super) struct Order {
    queues: Mutex<HashMap<Arc<str>, Arc<Line>>>,
}

/// Each unfinished job by ticket: where it goes, whether it has its place in that line.
type Unfinished = BTreeMap<u64, (Dest, bool)>;

#[derive(Default)]
struct Line {
    /// The last ticket given, and the unfinished jobs.
    jobs: Mutex<(u64, Unfinished)>,
    moved: Notify,
}

/// One job's place in its queue's [`Order`]; finishes when dropped.
pub(super) struct Ticket {
    order: Arc<Order>,
    queue: Arc<str>,
    line: Arc<Line>,
    n: u64,
}

impl Order {
    /// A ticket for a job of `queue` going to `dest`.
    pub(super) fn take(self: &Arc<Self>, queue: &Arc<str>, dest: Dest) -> Ticket {
        // Under the map's lock: a line is never forgotten while a ticket is added to it.
        let mut queues = self.queues.lock();
        let line = queues.entry(queue.clone()).or_default().clone();
        let n = {
            let mut j = line.jobs.lock();
            j.0 += 1;
            let n = j.0;
            j.1.insert(n, (dest, false));
            n
        };
        drop(queues);
        Ticket {
            order: self.clone(),
            queue: queue.clone(),
            line,
            n,
        }
    }
}

impl Ticket {
    /// Whether every earlier job of the queue is finished, or goes where this one goes and
    /// has its place there.
    fn ready(&self) -> bool {
        let j = self.line.jobs.lock();
        let Some((dest, _)) = j.1.get(&self.n) else {
            return true;
        };
        j.1.range(..self.n)
            .all(|(_, (d, placed))| d == dest && *placed)
    }

    /// Waits until this job may go (see [`Self::ready`]).
    pub(super) async fn turn(&self) {
        loop {
            let moved = self.line.moved.notified();
            if self.ready() {
                return;
            }
            moved.await;
        }
    }

    /// This job has its place in its line: the queue's next job for there may go.
    pub(super) fn placed(&self) {
        if let Some(e) = self.line.jobs.lock().1.get_mut(&self.n) {
            e.1 = true;
        }
        self.line.moved.notify_waiters();
    }

    /// This job goes to `dest` now (its owner failed it, or routed it on): it has no place in
    /// that line yet.
    pub(super) fn go_to(&self, dest: Dest) {
        if let Some(e) = self.line.jobs.lock().1.get_mut(&self.n) {
            *e = (dest, false);
        }
        self.line.moved.notify_waiters();
    }
}

impl Drop for Ticket {
    /// Finished (answered, or the wait for it dropped).
    fn drop(&mut self) {
        let empty = {
            let mut j = self.line.jobs.lock();
            j.1.remove(&self.n);
            j.1.is_empty()
        };
        self.line.moved.notify_waiters();
        if empty {
            let mut queues = self.order.queues.lock();
            // Forget the queue unless a job took a ticket meanwhile.
            if self.line.jobs.lock().1.is_empty() {
                queues.remove(&self.queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Arc<str> {
        "oc_q".into()
    }

    #[test]
    fn a_job_for_another_place_waits_until_the_earlier_are_finished() {
        let order = Arc::new(Order::default());
        let here = order.take(&q(), None);
        assert!(here.ready(), "nothing outstanding: at once");
        here.placed();
        // Ownership moved: a job for the new owner waits for the one queued here.
        let fwd = order.take(&q(), Some("b:1".into()));
        assert!(!fwd.ready(), "placed here is not finished");
        drop(here);
        assert!(fwd.ready());
        let back = order.take(&q(), None);
        fwd.placed();
        assert!(!back.ready());
        drop(fwd);
        assert!(back.ready());
        drop(back);
        assert!(order.queues.lock().is_empty(), "the line is forgotten");
    }

    #[test]
    fn jobs_to_one_owner_go_one_after_the_other_and_fail_over_in_order() {
        let order = Arc::new(Order::default());
        let dest: Dest = Some("b:1".into());
        let t: Vec<Ticket> = (0..3).map(|_| order.take(&q(), dest.clone())).collect();
        assert!(t[0].ready() && !t[1].ready());
        t[0].placed();
        assert!(t[1].ready() && !t[2].ready());
        t[1].placed();
        t[2].placed();
        // The owner fails them all: they come back here in their order.
        for x in &t {
            x.go_to(None);
        }
        assert!(t[0].ready() && !t[1].ready());
        t[0].placed();
        assert!(t[1].ready() && !t[2].ready());
        t[1].placed();
        assert!(t[2].ready());
        // A new owner's job waits until every earlier one is finished.
        let next = order.take(&q(), Some("c:1".into()));
        t[2].placed();
        assert!(!next.ready());
        drop(t);
        assert!(next.ready());
    }
}
