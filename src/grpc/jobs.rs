//! The async API: `SubmitReply` stores a job and answers, `GetReply` / `WatchReply` show it,
//! `CancelReply` stops it before its first send. Same authentication, validation and
//! admission as `Reply`; a job is visible to the caller that submitted it only.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::{CallError, ReplyService, to_response};
use crate::auth::Caller;
use crate::jobs::{JobRecord, Jobs, MAX_TTL, State, StoredError, now_ms, parse_job_id};
use crate::proto::{self, GetReplyRequest, ReplyJob, ReplyRequest, SubmitReplyResponse};
use crate::reply::ValidationError;
use crate::scheduler::{Delivered, GatewayError};

/// How often `WatchReply` reads the store again when no change was seen here.
const WATCH_REREAD: Duration = Duration::from_millis(250);
/// How long `CancelReply` waits for the replica running the job (cluster mode) to answer.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// A submit's `ttl_s` (0: the longest).
pub(super) fn ttl_of(ttl_s: u32) -> Result<Duration, CallError> {
    match ttl_s {
        0 => Ok(MAX_TTL),
        s if u64::from(s) <= MAX_TTL.as_secs() => Ok(Duration::from_secs(u64::from(s))),
        s => Err(ValidationError::Ttl(s).into()),
    }
}

/// The stream `WatchReply` answers with.
pub type JobStream = Pin<Box<dyn Stream<Item = Result<ReplyJob, Status>> + Send + 'static>>;

impl ReplyService {
    fn jobs(&self) -> Result<&Arc<Jobs>, GatewayError> {
        self.jobs.as_ref().ok_or(GatewayError::NoJobStore)
    }

    pub(super) async fn submit(
        &self,
        door: &super::Door,
        caller: &Caller,
        req: Request<ReplyRequest>,
    ) -> Result<SubmitReplyResponse, CallError> {
        self.jobs()?;
        let ttl = ttl_of(req.get_ref().ttl_s)?;
        let (spec, reply) = self.prepare(door, caller, req, Some(ttl)).await?;
        self.store_job(caller, spec, reply, ttl).await
    }

    /// Stores a prepared job (a reply or a send) and hands it to the scheduler.
    pub(super) async fn store_job(
        &self,
        caller: &Caller,
        spec: crate::scheduler::JobSpec,
        mut reply: crate::jobs::StoredReply,
        ttl: Duration,
    ) -> Result<SubmitReplyResponse, CallError> {
        let jobs = self.jobs()?.clone();
        // The record keeps exactly what is sent (the validated content).
        reply.content = spec.request.content().to_owned();
        let now = now_ms();
        let rec = JobRecord {
            seq: 0,
            caller: caller.name.to_string(),
            credential: caller.credential.to_string(),
            reply,
            state: State::Queued,
            attempts: 0,
            created_ms: now,
            updated_ms: now,
            expires_ms: now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            result: None,
            error: None,
            key: crate::jobs::record::new_key(),
        };
        let (stored, duplicate) = jobs.submit(rec, spec).await?;
        Ok(SubmitReplyResponse {
            job_id: stored.job_id(),
            duplicate,
        })
    }

    /// The caller's job `id`: submitted under its name with a credential it still owns.
    async fn job(&self, caller: &Caller, id: &str) -> Result<JobRecord, GatewayError> {
        let not_found = || GatewayError::JobNotFound(id.chars().take(64).collect());
        let (seq, key) = parse_job_id(id).ok_or_else(not_found)?;
        let rec = self
            .jobs()?
            .get(seq)
            .await
            .map_err(|e| GatewayError::JobStore(e.0))?
            .ok_or_else(not_found)?;
        // The whole id, key included: a counted or stale id names no job.
        let owned = self.door().auth.owns(caller, &rec.caller, &rec.credential);
        if !owned || !rec.has_key(key) {
            return Err(not_found());
        }
        Ok(rec)
    }

    pub(super) async fn get(
        &self,
        caller: &Caller,
        req: &GetReplyRequest,
    ) -> Result<ReplyJob, CallError> {
        Ok(self.job(caller, &req.job_id).await.map(|r| r.to_proto())?)
    }

    /// Every state change of a job until a final one. Changes made in this process arrive at
    /// once; the store is read again every [`WATCH_REREAD`] for changes made elsewhere (the
    /// replica running the job, in cluster mode) or missed.
    pub(super) async fn watch(
        &self,
        caller: &Caller,
        req: &GetReplyRequest,
    ) -> Result<JobStream, CallError> {
        let jobs = self.jobs()?.clone();
        // Subscribe before reading, so no change falls between the two.
        let updates = jobs.updates();
        let first = self.job(caller, &req.job_id).await?;
        let seq = first.seq;
        struct Watch {
            pending: Option<JobRecord>,
            last: Option<(State, i64)>,
            updates: tokio::sync::broadcast::Receiver<JobRecord>,
            jobs: Arc<Jobs>,
        }
        let state = Watch {
            pending: Some(first),
            last: None,
            updates,
            jobs,
        };
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            move |mut w| async move {
                loop {
                    if matches!(w.last, Some((s, _)) if s.is_final()) {
                        return None;
                    }
                    if let Some(rec) = w.pending.take() {
                        // Only changes: a state or time already shown is skipped.
                        let key = (rec.state, rec.updated_ms);
                        if w.last.is_some_and(|(s, t)| s == key.0 && t >= key.1) {
                            continue;
                        }
                        w.last = Some(key);
                        return Some((Ok(rec.to_proto()), w));
                    }
                    match tokio::time::timeout(WATCH_REREAD, w.updates.recv()).await {
                        Ok(Ok(rec)) if rec.seq == seq => w.pending = Some(rec),
                        Ok(Ok(_)) => {}
                        Ok(Err(RecvError::Closed)) => return None,
                        // Lagged, or quiet for a while: the store has the latest.
                        Ok(Err(RecvError::Lagged(_))) | Err(_) => match w.jobs.get(seq).await {
                            Ok(Some(rec)) => w.pending = Some(rec),
                            Ok(None) => return None,
                            Err(e) => {
                                return Some((
                                    Err(CallError::from(GatewayError::JobStore(e.0)).to_status()),
                                    w,
                                ));
                            }
                        },
                    }
                }
            },
        )))
    }

    pub(super) async fn cancel(
        &self,
        caller: &Caller,
        req: &GetReplyRequest,
    ) -> Result<ReplyJob, CallError> {
        let rec = self.job(caller, &req.job_id).await?;
        let jobs = self.jobs()?.clone();
        let why = |state| match state {
            State::Queued | State::Sending => "being sent",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        };
        match rec.state {
            State::Queued => {}
            State::Cancelled => return Ok(rec.to_proto()),
            s => return Err(GatewayError::NotCancellable(why(s)).into()),
        }
        match jobs.cancel(rec.seq, CANCEL_WAIT).await? {
            Some(rec) => Ok(rec.to_proto()),
            // It moved on meanwhile (or another call cancelled it): say where it is.
            None => match jobs.get(rec.seq).await.ok().flatten() {
                Some(now) if now.state == State::Cancelled => Ok(now.to_proto()),
                now => Err(GatewayError::NotCancellable(why(
                    now.map_or(State::Sending, |r| r.state)
                ))
                .into()),
            },
        }
    }
}

/// Wraps a handler result as the RPC's.
pub(super) fn answer<T>(r: Result<T, CallError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| e.to_status())
}

/// A job's end in the API's terms, for its record ([`crate::jobs::Answers`]): the encoded
/// `ReplyResponse`, or the status `Reply` would have failed with.
pub struct JobAnswers;

impl crate::jobs::Answers for JobAnswers {
    fn delivered(&self, d: Delivered) -> Vec<u8> {
        use prost::Message;
        to_response(d).encode_to_vec()
    }

    fn failed(&self, e: &GatewayError) -> StoredError {
        let status = CallError::from(e.clone()).to_status();
        StoredError {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: status.details().to_vec(),
        }
    }
}

/// A stored job as the API shows it.
pub trait ToProto {
    fn to_proto(&self) -> ReplyJob;
}

impl ToProto for JobRecord {
    fn to_proto(&self) -> proto::ReplyJob {
        use prost::Message;
        proto::ReplyJob {
            job_id: self.job_id(),
            state: state(self.state) as i32,
            result: self
                .result
                .as_deref()
                .and_then(|b| proto::ReplyResponse::decode(b).ok()),
            error: self.error.as_ref().map(|e| {
                tonic_types::pb::Status::decode(e.details.as_slice()).unwrap_or(
                    tonic_types::pb::Status {
                        code: e.code,
                        message: e.message.clone(),
                        details: Vec::new(),
                    },
                )
            }),
            attempts: self.attempts,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        }
    }
}

/// A job's lifecycle state in the API.
fn state(s: State) -> proto::JobState {
    match s {
        State::Queued => proto::JobState::Queued,
        State::Sending => proto::JobState::Sending,
        State::Delivered => proto::JobState::Delivered,
        State::Failed => proto::JobState::Failed,
        State::Cancelled => proto::JobState::Cancelled,
    }
}
