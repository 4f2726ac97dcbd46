//! How a call ends: its outcome counted (per operation, app, caller), logged, and its error
//! read in its endpoint's table (`CallError::to_status_for`).

use tonic::{Response, Status};

use super::{CallError, ReplyService, jobs};
use crate::auth::Caller;
use crate::feishu::Api;
use crate::proto::SubmitReplyResponse;
use crate::scheduler::Delivered;

impl ReplyService {
    /// Counts, logs and answers the end of a synchronous call of `op`.
    pub(super) fn finish<T>(
        &self,
        op: Api,
        app: &str,
        caller: &Caller,
        span: &tracing::Span,
        result: Result<Delivered, CallError>,
        to: impl FnOnce(Delivered) -> T,
    ) -> Result<Response<T>, Status> {
        let _enter = span.enter();
        let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| "ok");
        self.metrics.caller_request(&caller.name, outcome);
        match result {
            Ok(d) => {
                self.metrics.request(op.as_str(), app, "ok", "0");
                tracing::debug!(operation = op.as_str(), attempts = d.attempts, queued_ms = d.queued.as_millis() as u64, superseded = d.superseded, log_id = %d.message.log_id, "done");
                Ok(Response::new(to(d)))
            }
            Err(e) => {
                let code = e
                    .feishu_code()
                    .map_or_else(|| "none".to_owned(), |c| c.to_string());
                self.metrics.request(op.as_str(), app, e.outcome(), &code);
                tracing::info!(operation = op.as_str(), error = %e, reason = %e.reason(), "refused or failed");
                let status = e.to_status_for(op);
                span.record("otel.status_code", "ERROR")
                    .record("grpc.code", status.code() as i32);
                Err(status)
            }
        }
    }

    /// Counts, logs and answers the end of a submit.
    pub(super) fn submitted(
        &self,
        caller: &Caller,
        span: &tracing::Span,
        result: Result<SubmitReplyResponse, CallError>,
    ) -> Result<Response<SubmitReplyResponse>, Status> {
        let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| "ok");
        self.metrics.caller_request(&caller.name, outcome);
        if let Err(e) = &result {
            span.record("otel.status_code", "ERROR");
            let _enter = span.enter();
            tracing::info!(error = %e, reason = %e.reason(), "submit refused");
        }
        jobs::answer(result)
    }
}
