//! What happens after a send comes back: its quota slots are settled by its arrival bound,
//! then the reply is delivered, failed, or retried in its place with backoff.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::GatewayError;
use super::gate::Grant;
use super::queue::Job;
use super::{Attempt, Delivered, Dispatcher, FIRST_APP_QUOTA};
use crate::feishu::{Call, RetryReason, SentMessage, UpstreamError};

/// Feishu's "the message was recalled".
const RECALLED: i64 = 230011;
use crate::quota::{QuotaKey, micros};

/// Backoff doubles at most this many times before `max_delay` caps it (no shift overflow).
const MAX_BACKOFF_DOUBLINGS: u32 = 16;

impl Dispatcher {
    pub(super) fn send_done(&mut self, mut job: Job, attempt: Attempt, answered: Instant) {
        let result = match attempt {
            Attempt::Answered(r) => r,
            Attempt::Panicked(what) => return self.send_panicked(job, what, answered),
        };
        // Count the attempt by its arrival bound: it arrived by `answered`, except where
        // Feishu refused it for rate (see `refused_by`): there it did not count.
        let refused = match &result {
            Err(e) => e.retry_reason().filter(|r| r.is_rate_rejection()),
            Ok(_) => None,
        };
        if let Some(grant) = job.grant.take() {
            let refused = |k: &QuotaKey| refused.is_some_and(|r| refused_by(r, k));
            let local = match &grant {
                Grant::Local { decided } => Some(*decided),
                Grant::Shared(_) => None,
            };
            self.gate
                .settle(self.clock, grant, &job.keys, refused, answered);
            if job.keys_gen != self.layout_gen {
                // A reload replaced quotas of its app while it was out: the new ones started
                // with a copy of its slot, settled here too (only those: a slot is settled
                // once per key).
                let fresh = self.keys_of(&job.spec);
                let copies: Vec<QuotaKey> = fresh
                    .iter()
                    .filter(|k| !job.keys.contains(k))
                    .cloned()
                    .collect();
                if let Some(decided) = local {
                    let grant = Grant::Local { decided };
                    self.gate
                        .settle(self.clock, grant, &copies, refused, answered);
                }
                job.keys = fresh;
                job.gate_memo = None;
                job.keys_gen = self.layout_gen;
            }
        }
        let chat_id = job.spec.chat_id.clone();
        let now = Instant::now();
        let result = match result {
            // A recall retried after an answer that never came back: an earlier attempt
            // recalled it.
            Err(e)
                if job.attempts > 1
                    && matches!(job.spec.request, Call::Recall { .. })
                    && e.code() == Some(RECALLED) =>
            {
                Ok(SentMessage::default())
            }
            other => other,
        };
        let retry = match result {
            Ok(message) => {
                if matches!(job.spec.request, Call::Recall { .. }) {
                    // Later calls on it fail MESSAGE_GONE without asking Feishu.
                    self.gone.remember(job.spec.request.message_id());
                }
                tracing::debug!(message_id = %job.spec.request.message_id(), chat_id = %chat_id, uuid = %job.spec.request.uuid(), log_id = %message.log_id, attempts = job.attempts, "reply delivered");
                let delivered = Delivered {
                    queued: job.first_send_at.unwrap_or(now) - job.accepted_at,
                    uuid: job.uuid(),
                    attempts: job.attempts,
                    message,
                    superseded: false,
                };
                job.finish(Ok(delivered));
                None
            }
            Err(error) => match error.retry_reason() {
                // Its app or caller was removed by a reload while it was out: not tried again.
                Some(_) if self.withdrawn(&job).is_some() => {
                    let e = self.withdrawn(&job).expect("checked");
                    job.finish(Err(e));
                    None
                }
                Some(reason) => self.plan_retry(job, error, reason, now),
                None => {
                    if error
                        .code()
                        .is_some_and(|c| super::gone::GONE_CODES.contains(&c))
                    {
                        // The replies queued to it fail without asking again.
                        self.gone.remember(job.spec.request.message_id());
                    }
                    tracing::info!(message_id = %job.spec.request.message_id(), chat_id = %chat_id, uuid = %job.spec.request.uuid(), log_id = %error.log_id(), %error, "reply failed");
                    let (attempts, uuid) = (job.attempts, job.uuid());
                    job.finish(Err(GatewayError::Upstream {
                        error,
                        attempts,
                        uuid,
                    }));
                    None
                }
            },
        };
        // A retried job keeps its place at the head of its chat.
        self.queues.sent(&chat_id, retry);
    }

    /// The upstream call panicked: the attempt counts as answered now (it may have gone out),
    /// the job fails INTERNAL with its uuid (a retry with it is safe) and its chat moves on.
    fn send_panicked(&mut self, mut job: Job, what: String, answered: Instant) {
        tracing::error!(message_id = %job.spec.request.message_id(), uuid = %job.spec.request.uuid(), panic = %what, "the upstream call panicked; the reply fails INTERNAL");
        if let Some(grant) = job.grant.take() {
            self.gate
                .settle(self.clock, grant, &job.keys, |_| false, answered);
        }
        let chat_id = job.spec.chat_id.clone();
        let (attempts, uuid) = (job.attempts, job.uuid());
        job.finish(Err(GatewayError::Internal { attempts, uuid }));
        self.queues.sent(&chat_id, None);
    }

    /// Decides whether a retryable failure is retried; returns the job to requeue.
    fn plan_retry(
        &mut self,
        mut job: Job,
        error: UpstreamError,
        reason: RetryReason,
        now: Instant,
    ) -> Option<Job> {
        self.metrics.retry(reason.as_str());
        if reason.is_rate_rejection() {
            // We kept our quotas and Feishu still said "too fast": someone else spends them.
            // Treat the keys as spent for a window (or Feishu's reset) so we back off as one.
            self.metrics
                .rate_rejection(&job.spec.app_name, reason.as_str());
            tracing::warn!(app = %job.spec.app_name, chat_id = %job.spec.chat_id, log_id = %error.log_id(), code = ?error.code(), "unexpected upstream rate rejection; cooling the quota down");
            let keys: Vec<QuotaKey> = job
                .keys
                .iter()
                .filter(|k| refused_by(reason, k))
                .cloned()
                .collect();
            // Feishu's reset when it gave one, else the shortest window among the keys (the
            // per-minute app quota must not silence the app for a minute on a per-second hit).
            // A reset is trusted up to the longest window: no rolling window needs longer.
            let specs = self.gate.table().specs();
            let windows = keys.iter().map(|k| specs[k.quota].window);
            let shortest = windows.clone().min().unwrap_or_default();
            let longest = windows.max().unwrap_or_default();
            let wait = error.retry_after().map_or(shortest, |r| r.min(longest));
            self.gate.block(self.clock, &keys, wait, now);
        }
        let backoff = self.backoff(job.attempts, error.retry_after());
        let not_before = now + backoff;
        let out_of_time = job
            .send_by
            .is_some_and(|s| self.clock.micros(not_before) >= s);
        if job.attempts >= self.config.retry.max_attempts
            || out_of_time
            || self.draining_until.is_some_and(|u| not_before >= u)
        {
            tracing::info!(message_id = %job.spec.request.message_id(), chat_id = %job.spec.chat_id, uuid = %job.spec.request.uuid(), attempts = job.attempts, %error, "retries exhausted");
            let (attempts, uuid) = (job.attempts, job.uuid());
            job.finish(Err(GatewayError::Upstream {
                error,
                attempts,
                uuid,
            }));
            return None;
        }
        tracing::debug!(message_id = %job.spec.request.message_id(), uuid = %job.spec.request.uuid(), attempt = job.attempts, ?backoff, reason = reason.as_str(), "retrying");
        job.not_before = self.clock.micros(not_before);
        Some(job)
    }

    /// Exponential backoff with full jitter; never shorter than what Feishu asked for.
    fn backoff(&self, attempts: u32, asked: Option<Duration>) -> Duration {
        let r = &self.config.retry;
        let exp = r
            .base_delay
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(MAX_BACKOFF_DOUBLINGS))
            .min(r.max_delay);
        let jittered = Duration::from_micros(rand::rng().random_range(0..=micros(exp)));
        asked.map_or(jittered, |a| a.max(jittered))
    }
}

/// Whether `key` belongs to the quota layer that refused a send Feishu rejected for `reason`.
///
/// The accounting choice for refused sends (README, "How sends are counted"): Feishu checks
/// the app quotas at its open-platform gateway (99991400 / HTTP 429) before the request
/// reaches the messaging service, which checks the chat and user quotas (230020). A request
/// is not admitted by the layer that refused it (sliding-log, fixed-window and token-bucket
/// limiters alike do not count what they turn away), so it leaves those keys; it passed the
/// layers before, so it stays counted there (the app keys of a 230020). One refusal thus never
/// keeps a slot of the 1000/min ring for a minute.
fn refused_by(reason: RetryReason, key: &QuotaKey) -> bool {
    match reason {
        RetryReason::Frequency => key.quota >= FIRST_APP_QUOTA,
        RetryReason::RateLimited => key.quota < FIRST_APP_QUOTA,
        _ => false,
    }
}
