//! Introspection: one chat's queue as the dispatcher sees it, and the quotas that hold its
//! head job ("why is my reply slow?").

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{CHAT_QUOTA, Command, Dispatcher, Scheduler};
use crate::feishu::AppIndex;
use crate::quota::QuotaKey;

/// One chat, now.
#[derive(Debug, Clone, Default)]
pub struct ChatSnapshot {
    /// Jobs waiting (the head included while it is being decided).
    pub queued: usize,
    pub queued_bytes: usize,
    /// Its head is being sent, or decided by the shared gate, now.
    pub busy: bool,
    /// How long its head job has waited.
    pub head_age: Option<Duration>,
    /// When its head is tried next (None: right away, busy, or parked behind a shared key).
    pub next_try_in: Option<Duration>,
    /// The quotas the head job counts in (the chat's own quota when nothing waits), as this
    /// process counts them (cluster mode: the admin service asks the shared store for its
    /// counts of the same quotas).
    pub quotas: Vec<QuotaState>,
}

/// One app, now.
#[derive(Debug, Clone, Default)]
pub struct AppSnapshot {
    /// Its app quotas, as this process counts them.
    pub quotas: Vec<QuotaState>,
    /// Its replies queued here, and their bytes.
    pub queued: usize,
    pub queued_bytes: usize,
}

/// One quota key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    /// `chat`, `user`, `app:<window>ms`.
    pub kind: String,
    /// The chat, user or app_id.
    pub id: String,
    pub limit: u32,
    pub window: Duration,
    /// The span a send counts in (window + safety margin), µs.
    pub span_us: u64,
    /// Sends counting in its window now (in flight ones included).
    pub used: u32,
    /// When it has room for one more (zero: now).
    pub frees_in: Duration,
}

impl Dispatcher {
    pub(super) fn inspect_chat(&self, chat_id: &Arc<str>) -> ChatSnapshot {
        let now = Instant::now();
        let at = self.clock.micros(now);
        let view = self.queues.chat(chat_id);
        let keys: Vec<QuotaKey> = match view.as_ref().and_then(|v| v.head) {
            Some(head) if !head.keys.is_empty() => head.keys.clone(),
            _ => vec![QuotaKey::new(CHAT_QUOTA, chat_id.clone())],
        };
        let quotas = self.quota_states(&keys, now);
        let Some(v) = view else {
            return ChatSnapshot {
                quotas,
                ..ChatSnapshot::default()
            };
        };
        ChatSnapshot {
            queued: v.queued,
            queued_bytes: v.bytes,
            busy: v.busy,
            head_age: v.head.map(|h| now.saturating_duration_since(h.accepted_at)),
            next_try_in: v
                .next_try
                .map(|t| Duration::from_micros(t.saturating_sub(at))),
            quotas,
        }
    }
}

impl Dispatcher {
    pub(super) fn inspect_app(&self, app: AppIndex, app_id: &Arc<str>) -> AppSnapshot {
        // Each API's windows (one set when they are pooled).
        let mut keys: Vec<QuotaKey> = Vec::new();
        for api in crate::feishu::Api::ALL {
            let key = self.layout.app_key(app_id, api);
            if keys.iter().any(|k| k.id == key) {
                continue;
            }
            keys.extend(
                self.layout
                    .api_quotas(app_id, api)
                    .map(|q| QuotaKey::new(q, key.clone())),
            );
        }
        let quotas = self.quota_states(&keys, Instant::now());
        let (queued, queued_bytes) = self.queues.app_queued(app);
        AppSnapshot {
            quotas,
            queued,
            queued_bytes,
        }
    }

    /// `keys` as this process counts them.
    fn quota_states(&self, keys: &[QuotaKey], now: Instant) -> Vec<QuotaState> {
        let at = self.clock.micros(now);
        let table = self.gate.table();
        keys.iter()
            .map(|k| {
                let spec = self.layout.specs[k.quota];
                let (used, ready_at) = table.usage(k, at);
                QuotaState {
                    kind: self.layout.kinds[k.quota].clone(),
                    id: k.id.to_string(),
                    limit: spec.limit.get(),
                    window: spec.window,
                    span_us: table.span(k.quota),
                    used,
                    frees_in: Duration::from_micros(ready_at.saturating_sub(at)),
                }
            })
            .collect()
    }
}

impl Scheduler {
    /// App `app` (Feishu `app_id`) as the dispatcher sees it now (None: the dispatcher is gone).
    pub async fn inspect_app(&self, app: AppIndex, app_id: Arc<str>) -> Option<AppSnapshot> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::InspectApp { app, app_id, done });
        rx.await.ok()
    }

    /// Replies and bytes caller `caller` has queued here (None: the dispatcher is gone).
    pub async fn caller_queued(&self, caller: usize) -> Option<(usize, usize)> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::InspectCaller { caller, done });
        rx.await.ok()
    }

    /// Chat `chat_id` as the dispatcher sees it now (None: the dispatcher is gone).
    pub async fn inspect_chat(&self, chat_id: Arc<str>) -> Option<ChatSnapshot> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::InspectChat { chat_id, done });
        rx.await.ok()
    }
}
