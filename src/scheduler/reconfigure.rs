//! A live reload reaching the dispatcher: the callers' queue shares, the apps' quota lists,
//! and apps removed (their queued replies fail; none of theirs is admitted or retried again).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::GatewayError;
use super::{Command, Dispatcher, Scheduler};
use crate::config::{CallerLimits, QuotaConfig};
use crate::feishu::AppIndex;
use crate::quota::QuotaKey;

/// What a reload changes in the scheduler.
#[derive(Debug, Clone)]
pub struct Reconfigure {
    /// The quotas (only the app lists may differ from the running ones).
    pub quotas: QuotaConfig,
    /// Each caller's limits by id (ids are stable across reloads).
    pub callers: Vec<CallerLimits>,
    /// Every app's Feishu app_id, by index (removed ones included: their keys stay).
    pub app_ids: Vec<Arc<str>>,
    /// Every app removed (by this reload or before, and not added back): (index, name).
    pub removed_apps: Vec<(AppIndex, String)>,
}

impl Scheduler {
    /// Applies a live reload; returns once the dispatcher has (false: it is gone).
    pub async fn reconfigure(&self, r: Reconfigure) -> bool {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Reconfigure(Box::new(r), done));
        rx.await.is_ok()
    }
}

impl Dispatcher {
    pub(super) fn reconfigure(&mut self, r: Reconfigure) {
        self.config.callers = r.callers;
        // The whole set: an app added back under its old name and app_id is live again.
        self.removed_apps = r.removed_apps.into_iter().collect();
        if !self.removed_apps.is_empty() {
            let removed = &self.removed_apps;
            let gone = self
                .queues
                .remove_where(|j| removed.contains_key(&j.spec.app));
            for job in gone {
                let e = self.app_removed(&job);
                job.finish(Err(e));
            }
        }
        let q = &self.config.quotas;
        if r.quotas.app != q.app || r.quotas.per_app != q.per_app {
            let (layout, moved) = self.layout.next(&r.quotas, &r.app_ids);
            let known = self.layout.specs.len();
            self.gate
                .add_quotas(&layout.specs[known..], &layout.kinds[known..]);
            for m in &moved {
                self.gate.copy_key(
                    &QuotaKey::new(m.from, m.app_id.clone()),
                    &QuotaKey::new(m.to, m.app_id.clone()),
                );
            }
            self.layout = Arc::new(layout);
            self.layout_gen += 1;
            let (layout, generation) = (self.layout.clone(), self.layout_gen);
            for job in self.queues.jobs_mut() {
                job.keys = super::admission::keys_for(&layout, &job.spec);
                job.gate_memo = None;
                job.keys_gen = generation;
            }
            tracing::info!(
                moved = moved.len(),
                quotas = self.layout.specs.len(),
                "app quotas reloaded"
            );
            // Chats waiting on a timer of the old quotas look again under the new.
            self.queues.wake_all();
        }
        self.config.quotas = r.quotas;
    }

    /// The status of a reply whose app a reload removed.
    pub(super) fn app_removed(&self, job: &super::queue::Job) -> GatewayError {
        GatewayError::AppRemoved {
            app: self
                .removed_apps
                .get(&job.spec.app)
                .cloned()
                .unwrap_or_else(|| job.spec.app_name.to_string()),
            attempts: job.attempts,
            uuid: job.uuid(),
        }
    }
}
