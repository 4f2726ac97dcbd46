//! The spans of a job's life in the scheduler, children of the job's own span
//! ([`super::JobSpec::span`]): each wait in its chat's queue, each attempt at Feishu. Their
//! names are fixed (the chat is in the parent's attributes, never in a name).

use tracing::field::Empty;

use super::{Attempt, JobSpec};

/// The job waits in its chat's queue for its `attempt`-th send (ends when it is taken).
pub(super) fn queue_wait(spec: &JobSpec, attempt: u32) -> tracing::Span {
    tracing::info_span!(parent: &spec.span, "queue_wait", attempt)
}

/// One call to a Feishu message endpoint, named by its `operation` attribute (reply, send,
/// update_card, edit, recall; the span keeps its one name); a token fetch it needs is a child.
pub(super) fn attempt(spec: &JobSpec, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        parent: &spec.span,
        "feishu.reply",
        otel.kind = "client",
        operation = spec.request.api().as_str(),
        attempt,
        http.status = Empty,
        feishu.code = Empty,
        feishu.log_id = Empty,
        outcome = Empty,
        error = Empty,
        otel.status_code = Empty,
    )
}

/// Puts what Feishu answered on the attempt's span.
pub(super) fn record_attempt(span: &tracing::Span, result: &Attempt) {
    if span.is_disabled() {
        return;
    }
    match result {
        Attempt::Answered(Ok(m)) => {
            span.record("http.status", 200)
                .record("feishu.code", 0)
                .record("feishu.log_id", m.log_id.as_str())
                .record("outcome", "ok");
        }
        Attempt::Answered(Err(e)) => {
            if let Some(http) = e.http_status() {
                span.record("http.status", http);
            }
            if let Some(code) = e.code() {
                span.record("feishu.code", code);
            }
            if !e.log_id().is_empty() {
                span.record("feishu.log_id", e.log_id());
            }
            span.record("outcome", e.outcome())
                .record("error", tracing::field::display(e))
                .record("otel.status_code", "ERROR");
        }
        Attempt::Panicked(_) => {
            span.record("outcome", "panicked")
                .record("otel.status_code", "ERROR");
        }
    }
}
