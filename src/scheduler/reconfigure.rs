//! A live reload reaching the dispatcher: the callers' queue shares, the apps' quota lists,
//! apps removed, and callers removed or with a credential rotated out (their queued replies
//! fail; none of theirs is admitted or retried again).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::GatewayError;
use super::{Command, Dispatcher, Scheduler};
use crate::config::{CallerLimits, Ownership, QuotaConfig};
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
    /// What each caller owns now, by id (`AuthConfig::ownership_by_id`).
    pub owners: Vec<Ownership>,
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
        self.owners = r.owners;
        let (removed, owners) = (&self.removed_apps, &self.owners);
        let gone = self
            .queues
            .remove_where(|j| withdrawn(removed, owners, &j.spec).is_some());
        for job in gone {
            let e = self.withdrawn(&job).expect("removed for it");
            job.finish(Err(e));
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

    /// Why `job` may not be sent any more, if a reload took it back: its app was removed
    /// (`APP_REMOVED`), or its caller was, or the credential it came with was rotated out
    /// (`CALLER_REMOVED`).
    pub(super) fn withdrawn(&self, job: &super::queue::Job) -> Option<GatewayError> {
        let (attempts, uuid) = (job.attempts, job.uuid());
        Some(
            match withdrawn(&self.removed_apps, &self.owners, &job.spec)? {
                Withdrawn::App(app) => GatewayError::AppRemoved {
                    app: app.to_owned(),
                    attempts,
                    uuid,
                },
                Withdrawn::Caller(caller) => GatewayError::CallerRemoved {
                    caller: caller.to_owned(),
                    attempts,
                    uuid,
                },
            },
        )
    }
}

/// Who took a job back: its app (name), or its caller (name).
enum Withdrawn<'a> {
    App(&'a str),
    Caller(&'a str),
}

fn withdrawn<'a>(
    removed_apps: &'a std::collections::HashMap<AppIndex, String>,
    owners: &'a [Ownership],
    spec: &super::JobSpec,
) -> Option<Withdrawn<'a>> {
    if let Some(app) = removed_apps.get(&spec.app) {
        return Some(Withdrawn::App(app));
    }
    let owner = owners.get(spec.caller)?;
    (!owner.holds(&spec.credential)).then_some(Withdrawn::Caller(&owner.name))
}
