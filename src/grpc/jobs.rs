//! The async API: `SubmitReply` stores a job and answers, `GetReply` / `WatchReply` show it,
//! `CancelReply` stops it before its first send. Same authentication, validation and
//! admission as `Reply`; a job is visible to the caller that submitted it only.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::ReplyService;
use crate::auth::Caller;
use crate::error::GatewayError;
use crate::feishu::SendRequest;
use crate::jobs::{JobRecord, Jobs, MAX_TTL, State, now_ms, parse_job_id};
use crate::proto::{GetReplyRequest, ReplyJob, ReplyRequest, SubmitReplyResponse};
use crate::reply::{MsgType, ValidationError};
use crate::scheduler::JobSpec;

/// The stream `WatchReply` answers with.
pub type JobStream = Pin<Box<dyn Stream<Item = Result<ReplyJob, Status>> + Send + 'static>>;

impl ReplyService {
    fn jobs(&self) -> Result<&Arc<Jobs>, GatewayError> {
        self.jobs.as_ref().ok_or(GatewayError::NoJobStore)
    }

    pub(super) async fn submit(
        &self,
        caller: &Caller,
        req: Request<ReplyRequest>,
    ) -> Result<SubmitReplyResponse, GatewayError> {
        let jobs = self.jobs()?.clone();
        let ttl = match req.get_ref().ttl_s {
            0 => MAX_TTL,
            s if u64::from(s) <= MAX_TTL.as_secs() => Duration::from_secs(u64::from(s)),
            s => return Err(ValidationError::Ttl(s).into()),
        };
        let (spec, mut reply) = self.prepare(caller, req, Some(ttl)).await?;
        // The record keeps exactly what is sent (the validated content).
        reply.content = spec.request.content.clone();
        let now = now_ms();
        let rec = JobRecord {
            seq: 0,
            caller: caller.name.to_string(),
            reply,
            state: State::Queued,
            attempts: 0,
            created_ms: now,
            updated_ms: now,
            expires_ms: now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            result: None,
            error: None,
        };
        let (stored, duplicate) = jobs.submit(rec, spec).await?;
        Ok(SubmitReplyResponse {
            job_id: stored.job_id(),
            duplicate,
        })
    }

    /// The caller's job `id`.
    fn job(&self, caller: &Caller, id: &str) -> Result<JobRecord, GatewayError> {
        let not_found = || GatewayError::JobNotFound(id.chars().take(64).collect());
        let seq = parse_job_id(id).ok_or_else(not_found)?;
        let rec = self
            .jobs()?
            .store()
            .get(seq)
            .map_err(|e| GatewayError::JobStore(e.0))?
            .ok_or_else(not_found)?;
        if rec.caller != *caller.name {
            return Err(not_found());
        }
        Ok(rec)
    }

    pub(super) fn get(
        &self,
        caller: &Caller,
        req: &GetReplyRequest,
    ) -> Result<ReplyJob, GatewayError> {
        self.job(caller, &req.job_id).map(|r| r.to_proto())
    }

    pub(super) fn watch(
        &self,
        caller: &Caller,
        req: &GetReplyRequest,
    ) -> Result<JobStream, GatewayError> {
        let jobs = self.jobs()?.clone();
        // Subscribe before reading, so no change falls between the two.
        let updates = jobs.updates();
        let first = self.job(caller, &req.job_id)?;
        let seq = first.seq;
        let state = (Some(first), updates, jobs, false);
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            move |(pending, mut updates, jobs, done)| async move {
                if done {
                    return None;
                }
                if let Some(rec) = pending {
                    let last = rec.state.is_final();
                    return Some((Ok(rec.to_proto()), (None, updates, jobs, last)));
                }
                loop {
                    match updates.recv().await {
                        Ok(rec) if rec.seq == seq => {
                            let last = rec.state.is_final();
                            return Some((Ok(rec.to_proto()), (None, updates, jobs, last)));
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => {
                            // Missed some changes: the store has the latest.
                            if let Ok(Some(rec)) = jobs.store().get(seq) {
                                let last = rec.state.is_final();
                                return Some((Ok(rec.to_proto()), (None, updates, jobs, last)));
                            }
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        )))
    }

    pub(super) async fn cancel(
        &self,
        caller: &Caller,
        req: &GetReplyRequest,
    ) -> Result<ReplyJob, GatewayError> {
        let rec = self.job(caller, &req.job_id)?;
        let jobs = self.jobs()?.clone();
        match rec.state {
            State::Queued => {}
            State::Sending => return Err(GatewayError::NotCancellable("being sent")),
            State::Delivered => return Err(GatewayError::NotCancellable("delivered")),
            State::Failed => return Err(GatewayError::NotCancellable("failed")),
            State::Cancelled => return Ok(rec.to_proto()),
        }
        match jobs.cancel(rec).await {
            Some(rec) => Ok(rec.to_proto()),
            None => Err(GatewayError::NotCancellable("being sent")),
        }
    }

    /// The scheduler job of a stored job (restart recovery).
    pub fn spec_of(&self, rec: &JobRecord) -> Result<JobSpec, GatewayError> {
        let r = &rec.reply;
        let app = self
            .apps
            .iter()
            .position(|a| a.name == r.app)
            .ok_or_else(|| GatewayError::UnknownApp(r.app.clone()))?;
        let a = &self.apps[app];
        let msg_type = MsgType::ALL
            .into_iter()
            .find(|m| m.as_str() == r.msg_type)
            .ok_or_else(|| ValidationError::MsgType(r.msg_type.clone()))?;
        // A caller removed from the configuration since: its job runs under the anonymous share.
        let names = self.auth.names();
        let caller = names
            .iter()
            .position(|n| **n == *rec.caller)
            .unwrap_or(names.len() - 1);
        let left = rec.expires_ms - now_ms();
        if left <= 0 {
            return Err(GatewayError::DeadlineBeforeSend {
                attempts: rec.attempts,
                uuid: r.uuid.clone(),
            });
        }
        Ok(JobSpec {
            caller,
            intake: None,
            on_send: None,
            app,
            app_name: a.name.as_str().into(),
            app_id: a.app_id.as_str().into(),
            chat_id: r.chat_id.as_str().into(),
            user_id: r.user_id.as_deref().map(Into::into),
            request: SendRequest {
                message_id: r.message_id.clone(),
                content: r.content.clone(),
                msg_type: msg_type.as_str(),
                reply_in_thread: r.reply_in_thread,
                uuid: r.uuid.clone(),
            },
            deadline: Some(
                tokio::time::Instant::now() + Duration::from_millis(left.unsigned_abs()),
            ),
        })
    }
}

/// Wraps a handler result as the RPC's.
pub(super) fn answer<T>(r: Result<T, GatewayError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| e.to_status())
}
