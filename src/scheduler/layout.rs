//! Where each quota lives in the quota table: chat, user, the app quotas every app shares
//! (`[quotas] app`), then each list an app has of its own (`[apps.NAME] quotas`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::{CHAT_QUOTA, FIRST_APP_QUOTA, USER_QUOTA};
use crate::config::QuotaConfig;
use crate::quota::{QuotaId, QuotaSpec};

/// A quota a live reload replaced, for one app: the sends `app_id` counted in `from` count in
/// `to` from now on (same kind: same window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Moved {
    pub from: QuotaId,
    pub to: QuotaId,
    pub app_id: Arc<str>,
}

#[derive(Debug, Clone)]
pub(super) struct QuotaLayout {
    /// Every quota, by id.
    pub specs: Vec<QuotaSpec>,
    /// Each quota's kind as shared stores name it (`chat`, `user`, `app:<window>ms`): a key is
    /// (kind, id), and an app_id uses one list, so two lists never share a key.
    pub kinds: Vec<String>,
    default_app: Range<usize>,
    per_app: HashMap<Arc<str>, Range<usize>>,
}

impl QuotaLayout {
    pub fn new(q: &QuotaConfig) -> Self {
        let mut specs = vec![q.chat, q.user];
        debug_assert_eq!(
            (specs.len(), CHAT_QUOTA, USER_QUOTA),
            (FIRST_APP_QUOTA, 0, 1)
        );
        let mut push = |list: &[QuotaSpec]| {
            let start = specs.len();
            specs.extend_from_slice(list);
            start..specs.len()
        };
        let default_app = push(&q.app);
        let per_app = q
            .per_app
            .iter()
            .map(|(id, list)| (Arc::from(id.as_str()), push(list)))
            .collect();
        let kinds = specs
            .iter()
            .enumerate()
            .map(|(i, s)| match i {
                CHAT_QUOTA => "chat".to_owned(),
                USER_QUOTA => "user".to_owned(),
                _ => format!("app:{}ms", s.window.as_millis()),
            })
            .collect();
        Self {
            specs,
            kinds,
            default_app,
            per_app,
        }
    }

    /// The layout after a live reload changed the app quota lists in `q` (the chat and user
    /// quotas only change with a restart). Ids never change meaning: a list that stays keeps
    /// its ids, a changed list gets new ids after the existing ones (sends in flight settle on
    /// the old). Returns it with, for each of `app_ids` whose list changed, which old quota's
    /// sends each new one starts with.
    pub fn next(&self, q: &QuotaConfig, app_ids: &[Arc<str>]) -> (Self, Vec<Moved>) {
        let mut specs = self.specs.clone();
        let mut kinds = self.kinds.clone();
        let mut place = |list: &[QuotaSpec], was: Option<&Range<usize>>| match was {
            Some(r) if specs[r.clone()] == *list => r.clone(),
            _ => {
                let start = specs.len();
                specs.extend_from_slice(list);
                kinds.extend(
                    list.iter()
                        .map(|s| format!("app:{}ms", s.window.as_millis())),
                );
                start..specs.len()
            }
        };
        let default_app = place(&q.app, Some(&self.default_app));
        let per_app: HashMap<Arc<str>, Range<usize>> = q
            .per_app
            .iter()
            .map(|(id, list)| {
                let id: Arc<str> = id.as_str().into();
                let r = place(list, self.per_app.get(&id));
                (id, r)
            })
            .collect();
        let next = Self {
            specs,
            kinds,
            default_app,
            per_app,
        };
        let mut moved = Vec::new();
        for id in app_ids {
            let (was, now) = (self.app_quotas(id), next.app_quotas(id));
            if was == now {
                continue;
            }
            for to in now {
                if let Some(from) = was.clone().find(|&f| self.kinds[f] == next.kinds[to]) {
                    moved.push(Moved {
                        from,
                        to,
                        app_id: id.clone(),
                    });
                }
            }
        }
        (next, moved)
    }

    /// The quota ids an app's sends count in.
    pub fn app_quotas(&self, app_id: &str) -> Range<usize> {
        self.per_app
            .get(app_id)
            .cloned()
            .unwrap_or_else(|| self.default_app.clone())
    }

    /// About how long `app_id`'s quotas need to let `queued` sends go when none has gone
    /// lately: each window passes its limit at once, then waits for the window.
    pub fn app_drain(&self, app_id: &str, queued: usize) -> Duration {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| drain(q, queued))
            .max()
            .unwrap_or_default()
    }

    /// The smallest limit among `app_id`'s quotas.
    pub fn app_min_limit(&self, app_id: &str) -> u32 {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| q.limit.get())
            .min()
            .unwrap_or(0)
    }

    /// The tightest per-second rate of `app_id`'s quotas.
    pub fn app_rate_per_sec(&self, app_id: &str) -> f64 {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| f64::from(q.limit.get()) / q.window.as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    }
}

/// How long quota `q` needs to let `n` sends go from an empty window.
pub fn drain(q: &QuotaSpec, n: usize) -> Duration {
    let rounds = n.saturating_sub(1) / usize::try_from(q.limit.get()).unwrap_or(usize::MAX);
    q.window
        .checked_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
        .unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn spec(limit: u32, ms: u64) -> QuotaSpec {
        QuotaSpec::new(NonZeroU32::new(limit).unwrap(), Duration::from_millis(ms))
    }

    fn quotas(app: Vec<QuotaSpec>, per_app: Vec<(&str, Vec<QuotaSpec>)>) -> QuotaConfig {
        QuotaConfig {
            chat: spec(5, 1000),
            user: spec(5, 1000),
            app,
            per_app: per_app
                .into_iter()
                .map(|(id, l)| (id.to_owned(), l))
                .collect(),
            safety_margin: Duration::ZERO,
        }
    }

    #[test]
    fn a_reload_keeps_unchanged_lists_and_appends_changed_ones_with_their_sends() {
        let default = vec![spec(50, 1000), spec(1000, 60_000)];
        let old = QuotaLayout::new(&quotas(
            default.clone(),
            vec![("cli_b", vec![spec(2, 1000)])],
        ));
        let ids: Vec<Arc<str>> = ["cli_a", "cli_b", "cli_c"].map(Arc::from).to_vec();
        // cli_b's list is unchanged; cli_c gets a list of its own (from the default one).
        let same = quotas(
            default.clone(),
            vec![
                ("cli_b", vec![spec(2, 1000)]),
                ("cli_c", vec![spec(10, 1000)]),
            ],
        );
        let (next, moved) = old.next(&same, &ids);
        assert_eq!(next.app_quotas("cli_a"), old.app_quotas("cli_a"));
        assert_eq!(next.app_quotas("cli_b"), old.app_quotas("cli_b"));
        let c = next.app_quotas("cli_c");
        assert_eq!(c, 5..6);
        assert_eq!(next.kinds[5], "app:1000ms");
        // Its 1 s window starts with what it counted in the default 1 s window.
        assert_eq!(
            moved,
            [Moved {
                from: 2,
                to: 5,
                app_id: "cli_c".into()
            }]
        );
        // The default list changes: every app on it moves; ids in use keep their meaning.
        let lower = quotas(vec![spec(40, 1000)], vec![("cli_b", vec![spec(2, 1000)])]);
        let (third, moved) = next.next(&lower, &ids);
        assert_eq!(third.specs[..6], next.specs[..]);
        assert_eq!(third.app_quotas("cli_a"), 6..7);
        assert_eq!(third.app_quotas("cli_c"), 6..7);
        let mut from: Vec<_> = moved
            .iter()
            .map(|m| (m.app_id.to_string(), m.from, m.to))
            .collect();
        from.sort();
        assert_eq!(from, [("cli_a".into(), 2, 6), ("cli_c".into(), 5, 6)]);
    }
}
