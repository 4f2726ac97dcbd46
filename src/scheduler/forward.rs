//! The seam through which a job goes to the replica that owns its queue (cluster mode with
//! peers configured: ARCHITECTURE.md "Scaling out over a Redis Cluster", step 3). The
//! scheduler defines it; the api layer implements it with a peer gRPC client. A forwarded job
//! is queued, decided and sent by its owner; this replica only waits for its result, and
//! dropping that wait drops the peer call, which takes the job out of the owner's queue.
//! A job queued on a replica that does not (or no longer) own its chat's partition goes back
//! to its router ([`Routed::Back`]), which sends it to the owner of the moment.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{JobResult, JobSpec};

/// What came of a job queued by [`super::Scheduler::queue_routed`]. Returned once per job
/// and matched at once, so the result is not boxed.
#[allow(clippy::large_enum_variant)]
pub enum Routed {
    /// Its result.
    Done(JobResult),
    /// Another replica decides its chat: the job, to be routed again.
    Back(Box<JobSpec>),
}

/// Where jobs go when this replica does not own their queue.
pub trait Forward: Send + Sync + 'static {
    /// The result to come from the replica that owns `spec`'s queue, or `spec` back when it
    /// is to be queued here (this replica owns it, or no owner is known or reachable).
    fn forward(&self, spec: Box<JobSpec>) -> Result<BoxFuture<'static, JobResult>, Box<JobSpec>>;

    /// Asks the owner of `chat_id`'s queue to take the job with `uuid` out of it (the answer
    /// of [`super::Scheduler::cancel`] there); `None` when that queue is this replica's.
    fn cancel(&self, chat_id: &Arc<str>, uuid: &str) -> Option<BoxFuture<'static, bool>>;
}
