//! Admission: what a job must pass to be queued (shutdown, the queue bounds in count and
//! bytes, a deadline the quotas alone show cannot be met), and its quota keys.

use std::time::Duration;

use tokio::time::Instant;

use super::queue::Job;
use std::sync::Arc;

use super::GatewayError;
use super::gate::QuotaGate;
use super::layout::{KeysOf, QuotaLayout};
use super::{CHAT_QUOTA, Dispatcher, JobSpec, PastSend};
use crate::quota::QuotaKey;

impl Dispatcher {
    pub(super) fn admit(&mut self, mut job: Job) {
        // From here the queue's bounds count the job: its intake bytes go back.
        job.spec.intake = None;
        // Draining: only a stream's end is still taken (its card gets the text so far and is
        // closed within the grace period).
        if self.draining_until.is_some() && job.spec.lane != super::Lane::Final {
            let uuid = job.uuid();
            return job.finish(Err(GatewayError::ShuttingDown { attempts: 0, uuid }));
        }
        // Checked at the door under the configuration of its call: a reload may have removed
        // the app or the caller since.
        if let Some(e) = self.withdrawn(&job) {
            return job.finish(Err(e));
        }
        if job.spec.request.latest_wins() {
            self.supersede(&job.spec.chat_id);
        }
        let q = &self.config.queue;
        let queued = self.queues.queued();
        if queued >= q.max_total {
            let per_s = self.app_rate_per_sec(&job.spec.app_id).max(1.0);
            let retry_after = Duration::from_secs_f64((queued as f64 / per_s).clamp(1.0, 600.0));
            return job.finish(Err(GatewayError::QueueFull {
                scope: "gateway",
                queued,
                retry_after,
            }));
        }
        let bytes = self.queues.queued_bytes();
        if bytes + job.weight() > q.max_total_bytes {
            let per_s = self.app_rate_per_sec(&job.spec.app_id).max(1.0);
            let retry_after = Duration::from_secs_f64((queued as f64 / per_s).clamp(1.0, 600.0));
            return job.finish(Err(GatewayError::QueueFull {
                scope: "bytes",
                queued,
                retry_after,
            }));
        }
        if let Some(share) = self.config.callers.get(job.spec.caller) {
            let (jobs, bytes) = self.queues.caller_queued(job.spec.caller);
            let scope = if jobs >= share.max_queued {
                Some("caller")
            } else if bytes + job.weight() > share.max_queued_bytes {
                Some("caller_bytes")
            } else {
                None
            };
            if let Some(scope) = scope {
                // The caller's own backlog drains at most at its admission rate.
                let per_s = f64::from(share.rate.get())
                    .min(self.app_rate_per_sec(&job.spec.app_id).max(1.0));
                let retry_after = Duration::from_secs_f64((jobs as f64 / per_s).clamp(1.0, 600.0));
                return job.finish(Err(GatewayError::QueueFull {
                    scope,
                    queued: jobs,
                    retry_after,
                }));
            }
        }
        let (ahead, busy) = self.queues.ahead(&job.spec.chat_id);
        if ahead >= q.max_per_chat {
            let chat = self.config.quotas.chat;
            let windows = ahead as f64 / f64::from(chat.limit.get());
            let retry_after = chat.window.mul_f64(windows.clamp(1.0, 600.0));
            return job.finish(Err(GatewayError::QueueFull {
                scope: "chat",
                queued: ahead,
                retry_after,
            }));
        }
        job.keys = self.keys_of(&job.spec);
        job.keys_gen = self.layout_gen;
        let now = Instant::now();
        if let Some(deadline) = job.spec.deadline {
            let send_by = deadline.checked_sub(q.min_send_budget).unwrap_or(deadline);
            // Lower bound on the first send: the jobs ahead in this chat, every quota of the job.
            let position = (ahead + usize::from(busy)) as u64 + 1;
            let earliest = job
                .keys
                .iter()
                .map(|k| {
                    let nth = if k.quota == CHAT_QUOTA { position } else { 1 };
                    self.gate.table().nth_ready_at(k, nth)
                })
                .max()
                .unwrap_or(0);
            let earliest = self.clock.instant(earliest).max(now);
            if send_by <= now {
                let uuid = job.uuid();
                return job.finish(Err(GatewayError::DeadlineBeforeSend { attempts: 0, uuid }));
            }
            if earliest >= send_by {
                return job.finish(Err(GatewayError::DeadlineUnreachable {
                    earliest_in: earliest - now,
                    deadline_in: deadline.saturating_duration_since(now),
                }));
            }
            job.send_by = Some(self.clock.micros(send_by));
        }
        self.queues.push(job);
    }

    /// Latest wins: the updates waiting in `queue` (one message's) are answered superseded,
    /// never sent; the newer update queued after them carries the content that counts.
    fn supersede(&mut self, queue: &Arc<str>) {
        let now = Instant::now();
        for old in self.queues.take_superseded(queue) {
            self.metrics.superseded(old.spec.request.api().as_str());
            let delivered = super::Delivered {
                message: crate::feishu::SentMessage::default(),
                uuid: old.uuid(),
                attempts: old.attempts,
                queued: now - old.accepted_at,
                superseded: true,
            };
            old.finish(Ok(delivered));
        }
    }

    pub(super) fn keys_of(&self, spec: &JobSpec) -> Vec<QuotaKey> {
        keys_for(&self.layout, spec)
    }

    /// Counts a previous process's sends in the local table, oldest first (a shared gate
    /// knows them already).
    pub(super) fn seed(&mut self, sends: &mut [PastSend]) {
        sends.sort_by_key(|s| s.arrived_by);
        let seeded: Vec<_> = sends
            .iter()
            .map(|s| {
                let keys = self.layout.keys_in(KeysOf {
                    target: &s.target,
                    chat_id: &s.chat_id,
                    user_id: s.user_id.as_ref(),
                    message_id: "",
                    app_id: &s.app_id,
                    api: s.api,
                    lane: super::Lane::Normal,
                });
                (keys, self.clock.micros(s.arrived_by))
            })
            .collect();
        if let QuotaGate::Local(table) = &mut self.gate {
            for (keys, at) in &seeded {
                table.record_arrived(keys, *at);
            }
        }
    }

    /// Marks, per app, the chats on the critical path of its drain (`Queues::set_urgent`): a
    /// chat whose own quota needs at least as long for its backlog as the app's quotas need for
    /// everything the app has queued, less two chat windows. Such a chat goes first, up to its
    /// own quota, so its backlog ends with the others instead of after them (DESIGN §3); on a
    /// single node the app also keeps for it the slots it can still use in its own window.
    pub(super) fn mark_urgent_chats(&mut self, now: Instant) {
        if self.queues.queued() == 0 && self.reserves.is_empty() {
            // Nothing waits: no chat can be urgent (the common case under light load).
            return;
        }
        let chat = self.config.quotas.chat;
        let before = std::mem::take(&mut self.reserves);
        for (app_id, queued) in self.queues.queued_by_app_id() {
            let slack = self.layout.app_drain(&app_id, queued);
            // The fewest jobs whose drain at the chat quota takes `t` or longer (and at least
            // two: a chat with one job has no drain of its own to shorten). Two windows of
            // margin: an urgent chat still loses a little to its round trips.
            let t = slack.saturating_sub(chat.window * 2);
            let windows = t.as_nanos().div_ceil(chat.window.as_nanos().max(1));
            let depth = usize::try_from(windows)
                .ok()
                .and_then(|w| w.checked_mul(chat.limit.get() as usize))
                .map_or(usize::MAX, |n| n.saturating_add(1).max(2));
            self.queues.set_urgent(&app_id, depth);
            // Single node: keep the app slots the urgent chats can still use in their own
            // windows for them, so the others do not take a whole app window at once while
            // an urgent chat waits for its previous reply's answer.
            if let QuotaGate::Local(table) = &self.gate {
                let now_m = self.clock.micros(now);
                let wanted: usize = self
                    .queues
                    .urgent_chats(&app_id)
                    .into_iter()
                    .map(|(c, depth)| {
                        let (used, _) = table.usage(&QuotaKey::new(CHAT_QUOTA, c), now_m);
                        (chat.limit.get().saturating_sub(used) as usize).min(depth)
                    })
                    .sum();
                let half = self.layout.app_min_limit(&app_id) / 2;
                let reserve = u32::try_from(wanted).unwrap_or(u32::MAX).min(half);
                if reserve > 0 {
                    self.reserves.insert(app_id, reserve);
                }
            }
        }
        // A reserve that shrank lets its waiters try now.
        for (app_id, was) in before {
            if self.reserves.get(&app_id).is_none_or(|&now| now < was)
                && let Some(waiters) = self.reserve_waiters.remove(&app_id)
            {
                for c in waiters {
                    self.queues.schedule_now(&c);
                }
            }
        }
    }

    /// Single node: when `chat`'s head (not urgent) may take an app slot without eating into
    /// the slots kept for its app's urgent chats (None: now).
    pub(super) fn kept_for_urgent(&mut self, chat: &Arc<str>, now: Instant) -> Option<Instant> {
        let QuotaGate::Local(table) = &self.gate else {
            return None;
        };
        if self.reserves.is_empty() {
            return None;
        }
        let head = self.queues.head_mut(chat)?;
        let reserve = *self.reserves.get(&head.spec.app_id)?;
        let at = super::gate::reserved(table, self.clock, &head.keys, reserve, now)?;
        self.reserve_waiters
            .entry(head.spec.app_id.clone())
            .or_default()
            .insert(chat.clone());
        Some(at)
    }

    /// The tightest per-second rate of `app_id`'s quotas (for retry estimates).
    fn app_rate_per_sec(&self, app_id: &str) -> f64 {
        self.layout.app_rate_per_sec(app_id)
    }
}

/// The quota keys a job counts in under `layout`.
pub(super) fn keys_for(layout: &QuotaLayout, spec: &JobSpec) -> Vec<QuotaKey> {
    layout.keys_in(KeysOf {
        target: &spec.target,
        chat_id: &spec.chat_id,
        user_id: spec.user_id.as_ref(),
        message_id: match spec.target {
            super::Target::Card => spec.request.card_id(),
            _ => spec.request.message_id(),
        },
        app_id: &spec.app_id,
        api: spec.request.api(),
        lane: spec.lane,
    })
}
