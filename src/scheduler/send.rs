//! A send going out: the job taken from its queue with its grant, the upstream call on its
//! own task (bounded by the send timeout, a panic caught), and its answer back to the
//! dispatcher, or, when the dispatcher is gone, straight to the job's caller.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::gate::Grant;
use super::queue::Job;
use super::{Command, Delivered, Dispatcher, GatewayError, spans};
use crate::feishu::{SentMessage, UpstreamError};

/// How one attempt at Feishu ended.
pub(super) enum Attempt {
    /// Feishu's answer (or the network's failure) classified.
    Answered(Result<SentMessage, UpstreamError>),
    /// The upstream call panicked (a bug): the reply may or may not have been posted.
    Panicked(String),
}

impl Dispatcher {
    /// Takes the head of `chat_id` (its quota recorded by `grant`) and sends it.
    pub(super) fn start_send(&mut self, chat_id: &Arc<str>, now: Instant, grant: Grant) {
        let mut job = self.queues.pop_for_send(chat_id).expect("chat with a head");
        job.grant = Some(grant);
        job.attempts += 1;
        if job.first_send_at.is_none() {
            job.first_send_at = Some(now);
            self.metrics.queue_wait(
                job.spec.request.api().as_str(),
                now - job.accepted_at,
                crate::telemetry::trace_id(&job.spec.span),
            );
        }
        self.spawn_send(job);
    }

    fn spawn_send(&self, mut job: Job) {
        if let Some(started) = job.spec.on_send.take() {
            let _ = started.send(());
        }
        let upstream = self.upstream.clone();
        let metrics = self.metrics.clone();
        let tx = self.tx.clone();
        let send_timeout = self.config.send_timeout;
        let span = spans::attempt(&job.spec, job.attempts);
        tokio::spawn(async move {
            metrics.in_flight(1);
            // A panic in the call must not take the job with it (its chat would stay busy
            // and its caller would never hear back).
            let call = AssertUnwindSafe(upstream.call(job.spec.app, &job.spec.request));
            let call = tokio::time::timeout(send_timeout, call.catch_unwind());
            let result = match call.instrument(span.clone()).await {
                Ok(Ok(r)) => Attempt::Answered(r),
                Ok(Err(panic)) => Attempt::Panicked(panic_message(panic.as_ref())),
                Err(_) => Attempt::Answered(Err(UpstreamError::Network {
                    kind: "timeout",
                    detail: format!("no answer within {send_timeout:?}"),
                })),
            };
            let answered = Instant::now();
            spans::record_attempt(&span, &result);
            drop(span);
            metrics.in_flight(-1);
            match tx.upgrade() {
                Some(tx) => {
                    if let Err(mpsc::error::SendError(Command::SendDone { job, result, .. })) = tx
                        .send(Command::SendDone {
                            job: Box::new(job),
                            result,
                            answered,
                        })
                    {
                        finish_orphan(*job, result);
                    }
                }
                None => finish_orphan(job, result),
            }
        });
    }
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// The dispatcher is gone (runtime shutting down): settle the job from its own result.
fn finish_orphan(job: Job, result: Attempt) {
    let (attempts, uuid) = (job.attempts, job.uuid());
    let result = match result {
        Attempt::Answered(r) => r,
        Attempt::Panicked(_) => return job.finish(Err(GatewayError::Internal { attempts, uuid })),
    };
    let r = match result {
        Ok(message) => Ok(Delivered {
            queued: job.first_send_at.unwrap_or(job.accepted_at) - job.accepted_at,
            uuid: uuid.clone(),
            attempts,
            message,
            superseded: false,
        }),
        Err(error) => Err(GatewayError::Upstream {
            error,
            attempts,
            uuid,
        }),
    };
    job.finish(r);
}
