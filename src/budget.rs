//! Calendar call budgets (`[apps.NAME.budget]`). Feishu's free edition allows an app 10 000
//! API calls a month, all APIs together, counted from the 1st in China time; past it the app
//! cannot send at all. Every call the gateway makes for an app (token, reply, message lookup)
//! first takes one call from the app's budget: in a [`SharedCounter`] when the replicas
//! share one (Redis: `cluster::RedisBudgetCounter`, atomic across replicas), else in this
//! process. A spent budget refuses the call before it is made, with the time until the
//! period resets. The Feishu client is charged through [`crate::feishu::CallMeter`].

use std::sync::Arc;
use std::time::Duration;

use jiff::{Span, Timestamp, ToSpan, Zoned};
use parking_lot::Mutex;

use futures_util::future::BoxFuture;

use crate::config::{AppConfig, BudgetConfig, BudgetPeriod};
use crate::feishu::{AppIndex, CallMeter, UpstreamError};
use crate::metrics::Metrics;

/// The period `now` falls in: [start, end) in the budget's time zone.
pub fn period_of(now: Timestamp, b: &BudgetConfig) -> (Zoned, Zoned) {
    let here = now.to_zoned(b.time_zone.clone());
    let start = match b.period {
        BudgetPeriod::Day => here.start_of_day(),
        BudgetPeriod::Month => here.first_of_month().and_then(|d| d.start_of_day()),
    }
    .unwrap_or_else(|_| here.clone());
    let length: Span = match b.period {
        BudgetPeriod::Day => 1.day(),
        BudgetPeriod::Month => 1.month(),
    };
    let end = start.checked_add(length).unwrap_or_else(|_| here.clone());
    (start, end)
}

fn period_name(p: BudgetPeriod) -> &'static str {
    match p {
        BudgetPeriod::Day => "day",
        BudgetPeriod::Month => "month",
    }
}

/// Where the replicas' shared budget counts live (cluster mode). Counters are named by the
/// app's Feishu app_id and the start of the period (seconds since the epoch).
pub trait SharedCounter: Send + Sync {
    /// Takes one call from the counter if fewer than `limit` were taken; the counter may be
    /// forgotten after `expire_at_ms` (ms since the epoch). `Some((taken, used))`, or None
    /// when the store did not answer.
    fn spend<'a>(
        &'a self,
        app_id: &'a str,
        period_start_s: i64,
        limit: u64,
        expire_at_ms: i64,
    ) -> BoxFuture<'a, Option<(bool, u64)>>;

    /// The counter's value (`Ok(None)`: nothing taken this period; Err: no answer).
    fn used<'a>(
        &'a self,
        app_id: &'a str,
        period_start_s: i64,
    ) -> BoxFuture<'a, Result<Option<u64>, ()>>;

    /// Replicas sharing the budgets (each takes its share of what is left while the counter
    /// does not answer).
    fn replicas(&self) -> usize;
}

/// One app's budget and what this process knows of it.
struct AppBudget {
    name: String,
    app_id: String,
    config: BudgetConfig,
    state: Mutex<State>,
}

#[derive(Default, Clone)]
struct State {
    /// The period counted now (its start, as a timestamp); None before the first call.
    start: Option<Timestamp>,
    end: Option<Timestamp>,
    /// Calls counted in this period: this process's (local), or the shared count last seen.
    used: u64,
    /// Calls taken here while Redis did not answer (cluster mode).
    unshared: u64,
}

/// An app's budget as it stands now (introspection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetView {
    pub calls: u64,
    pub period: &'static str,
    pub time_zone: String,
    /// Calls counted in the current period: Redis's shared count in cluster mode (this
    /// process's last sight of it when Redis does not answer), else this process's.
    pub used: u64,
    pub resets_in: Duration,
}

/// Every app's budget; apps without one are never refused.
pub struct Budgets {
    /// By app index; replaced whole by a live reload ([`Budgets::reconfigure`]).
    apps: parking_lot::RwLock<Arc<[Option<Arc<AppBudget>>]>>,
    shared: Option<Arc<dyn SharedCounter>>,
    metrics: Arc<Metrics>,
}

impl Budgets {
    /// Budgets counted in `shared` (cluster mode), else in this process.
    pub fn new(
        apps: &[AppConfig],
        shared: Option<Arc<dyn SharedCounter>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let apps = apps
            .iter()
            .map(|a| {
                a.budget.clone().map(|config| {
                    metrics.set_app_budget(&a.name, config.calls, 0);
                    Arc::new(AppBudget {
                        name: a.name.clone(),
                        app_id: a.app_id.clone(),
                        config,
                        state: Mutex::new(State::default()),
                    })
                })
            })
            .collect();
        Self {
            apps: parking_lot::RwLock::new(apps),
            shared,
            metrics,
        }
    }

    /// Whether any app has a budget.
    pub fn any(&self) -> bool {
        self.apps.read().iter().any(Option::is_some)
    }

    /// `app`'s budget in the configuration running now.
    fn app(&self, app: AppIndex) -> Option<Arc<AppBudget>> {
        self.apps.read().get(app).cloned().flatten()
    }

    /// A live reload: `apps` replaces the apps, slot for slot. A budget that stays the same
    /// keeps its count; a changed one keeps the count of the period running when the app_id,
    /// period and time zone stay (only the number of calls changed).
    pub fn reconfigure(&self, apps: &[AppConfig]) {
        let mut current = self.apps.write();
        let next: Arc<[Option<Arc<AppBudget>>]> = apps
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let config = a.budget.clone().filter(|_| !a.removed)?;
                let old = current.get(i).cloned().flatten();
                if let Some(old) = &old
                    && old.config == config
                    && old.app_id == a.app_id
                    && old.name == a.name
                {
                    return Some(old.clone());
                }
                let state = match &old {
                    Some(o)
                        if o.app_id == a.app_id
                            && o.config.period == config.period
                            && o.config.time_zone_name == config.time_zone_name =>
                    {
                        o.state.lock().clone()
                    }
                    _ => State::default(),
                };
                self.metrics
                    .set_app_budget(&a.name, config.calls, state.used.min(config.calls));
                Some(Arc::new(AppBudget {
                    name: a.name.clone(),
                    app_id: a.app_id.clone(),
                    config,
                    state: Mutex::new(state),
                }))
            })
            .collect();
        *current = next;
    }

    /// Refuses at once when this process already knows the budget of `app` is spent for the
    /// current period (no call is made to find out).
    pub fn check(&self, app: AppIndex) -> Result<(), UpstreamError> {
        let Some(b) = self.app(app) else {
            return Ok(());
        };
        let now = Timestamp::now();
        let state = b.state.lock();
        match (state.end, state.used + state.unshared >= b.config.calls) {
            (Some(end), true) if now < end => Err(self.refuse(&b, now, end)),
            _ => Ok(()),
        }
    }

    /// A refusal: counted, with the time until the period resets.
    fn refuse(&self, b: &AppBudget, now: Timestamp, end: Timestamp) -> UpstreamError {
        self.metrics.app_budget_refused(&b.name);
        let reset_in = end
            .duration_since(now)
            .try_into()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1));
        UpstreamError::BudgetSpent {
            app: b.name.clone(),
            calls: b.config.calls,
            period: period_name(b.config.period),
            reset_in,
        }
    }

    /// `app`'s budget now (None: it has none).
    pub async fn view(&self, app: AppIndex) -> Option<BudgetView> {
        let b = self.app(app)?;
        let now = Timestamp::now();
        let (start, end) = period_of(now, &b.config);
        let (start, end) = (start.timestamp(), end.timestamp());
        let seen = {
            let state = b.state.lock();
            if state.start == Some(start) {
                state.used + state.unshared
            } else {
                0
            }
        };
        let used = match &self.shared {
            None => seen,
            Some(shared) => shared
                .used(&b.app_id, start.as_second())
                .await
                .map_or(seen, Option::unwrap_or_default),
        };
        Some(BudgetView {
            calls: b.config.calls,
            period: period_name(b.config.period),
            time_zone: b.config.time_zone_name.clone(),
            used: used.min(b.config.calls),
            resets_in: end.duration_since(now).try_into().unwrap_or(Duration::ZERO),
        })
    }

    /// Takes one call from `app`'s budget before a Feishu call, or refuses it.
    pub async fn spend(&self, app: AppIndex) -> Result<(), UpstreamError> {
        let Some(b) = self.app(app) else {
            return Ok(());
        };
        let now = Timestamp::now();
        let (start, end) = {
            let mut state = b.state.lock();
            match (state.start, state.end) {
                // The period counted still runs: no calendar arithmetic on this path.
                (Some(start), Some(end)) if start <= now && now < end => (start, end),
                _ => {
                    let (start, end) = period_of(now, &b.config);
                    let (start, end) = (start.timestamp(), end.timestamp());
                    *state = State {
                        start: Some(start),
                        end: Some(end),
                        ..State::default()
                    };
                    (start, end)
                }
            }
        };
        let Some(shared) = &self.shared else {
            // One process: count here.
            let mut state = b.state.lock();
            if state.used >= b.config.calls {
                return Err(self.refuse(&b, now, end));
            }
            state.used += 1;
            self.metrics
                .set_app_budget(&b.name, b.config.calls, state.used);
            return Ok(());
        };
        // The counter outlives its period by a day (then the store drops it).
        let expire_at = end.as_millisecond() + 86_400_000;
        let answer = shared
            .spend(&b.app_id, start.as_second(), b.config.calls, expire_at)
            .await;
        let mut state = b.state.lock();
        match answer {
            Some((taken, used)) => {
                state.used = used;
                state.unshared = 0;
                self.metrics.set_app_budget(&b.name, b.config.calls, used);
                if taken {
                    Ok(())
                } else {
                    Err(self.refuse(&b, now, end))
                }
            }
            None => {
                // The store did not answer: this replica may take its share of what was left
                // at the last count it saw (the others do the same), never more.
                let left = b.config.calls.saturating_sub(state.used);
                let share = left / u64::try_from(shared.replicas().max(1)).unwrap_or(1);
                if state.unshared >= share {
                    return Err(self.refuse(&b, now, end));
                }
                state.unshared += 1;
                Ok(())
            }
        }
    }
}

impl CallMeter for Budgets {
    fn charge(&self, app: AppIndex) -> BoxFuture<'_, Result<(), UpstreamError>> {
        Box::pin(self.spend(app))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(period: BudgetPeriod) -> BudgetConfig {
        BudgetConfig {
            calls: 10,
            period,
            time_zone: jiff::tz::TimeZone::get("Asia/Shanghai").unwrap(),
            time_zone_name: "Asia/Shanghai".into(),
        }
    }

    #[test]
    fn periods_follow_the_calendar_in_the_budget_s_time_zone() {
        // 2026-11-30 16:30 UTC is 2026-12-01 00:30 in Shanghai: December's budget.
        let now: Timestamp = "2026-11-30T16:30:00Z".parse().unwrap();
        let (start, end) = period_of(now, &budget(BudgetPeriod::Month));
        assert_eq!(start.timestamp(), "2026-11-30T16:00:00Z".parse().unwrap());
        assert_eq!(end.timestamp(), "2026-12-31T16:00:00Z".parse().unwrap());
        // Half an hour earlier it is still November there.
        let (start, _) = period_of(
            "2026-11-30T15:30:00Z".parse().unwrap(),
            &budget(BudgetPeriod::Month),
        );
        assert_eq!(start.timestamp(), "2026-10-31T16:00:00Z".parse().unwrap());
        // Days run midnight to midnight, Shanghai time.
        let (start, end) = period_of(now, &budget(BudgetPeriod::Day));
        assert_eq!(start.timestamp(), "2026-11-30T16:00:00Z".parse().unwrap());
        assert_eq!(end.timestamp(), "2026-12-01T16:00:00Z".parse().unwrap());
    }

    #[tokio::test]
    async fn a_local_budget_refuses_the_call_after_the_last_with_the_time_to_reset() {
        let mut app = AppConfig::new("bot", "cli_b", "s");
        app.budget = Some(budget(BudgetPeriod::Day));
        let budgets = Budgets::new(&[app], None, Arc::new(Metrics::new()));
        for _ in 0..10 {
            budgets.spend(0).await.unwrap();
        }
        budgets.check(0).unwrap_err();
        match budgets.spend(0).await {
            Err(UpstreamError::BudgetSpent {
                reset_in, calls, ..
            }) => {
                assert_eq!(calls, 10);
                assert!(reset_in > Duration::ZERO && reset_in <= Duration::from_secs(86_400));
            }
            other => panic!("{other:?}"),
        }
    }
}
