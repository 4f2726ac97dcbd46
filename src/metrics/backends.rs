//! The metrics the backends report: the job store (stored, bytes, running, awaiting their
//! caller, takeovers, leases), the apps' call budgets, and the shared Redis (calls, health,
//! fallback, replicas).

use super::Metrics;
use super::labels::{AppLabel, RedisCallLabels};

impl Metrics {
    pub fn set_jobs_stored(&self, n: u64) {
        self.jobs_stored.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_job_store_bytes(&self, n: u64) {
        self.job_store_bytes
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_jobs_running(&self, n: usize) {
        self.jobs_running.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_jobs_awaiting_caller(&self, n: usize) {
        self.jobs_awaiting_caller
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An app's budget: its limit and the calls made this period.
    pub fn set_app_budget(&self, app: &str, calls: u64, used: u64) {
        let label = AppLabel {
            app: app.to_owned(),
        };
        let g = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.app_budget_calls.get_or_create(&label).set(g(calls));
        self.app_budget_used.get_or_create(&label).set(g(used));
        self.app_budget_remaining
            .get_or_create(&label)
            .set(g(calls.saturating_sub(used)));
        // The refusal counter exists (at 0) as soon as the app has a budget.
        let _ = self.app_budget_refusals.get_or_create(&label);
    }

    pub fn app_budget_refused(&self, app: &str) {
        self.app_budget_refusals
            .get_or_create(&AppLabel {
                app: app.to_owned(),
            })
            .inc();
    }

    pub fn jobs_taken_over(&self, n: u64) {
        self.job_takeovers.inc_by(n);
    }

    pub fn job_lease_lost(&self) {
        self.job_leases_lost.inc();
    }

    pub fn redis_call(&self, op: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.redis_calls
            .get_or_create(&RedisCallLabels { op, outcome })
            .inc();
    }

    pub fn set_redis_state(&self, up: bool, fallback: bool) {
        self.redis_up.set(i64::from(up));
        self.redis_fallback.set(i64::from(fallback));
    }

    /// The replica switched to the Redis failure policy.
    pub fn redis_fallback_switch(&self) {
        self.redis_fallback_switches.inc();
    }

    pub fn set_replicas(&self, n: usize) {
        self.replicas.set(n as i64);
    }
}
