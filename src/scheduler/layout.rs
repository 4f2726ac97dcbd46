//! Where each quota lives in the quota table: chat, user, the app quotas every app shares
//! (`[quotas] app`), then each list an app has of its own (`[apps.NAME] quotas`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::{CHAT_QUOTA, FIRST_APP_QUOTA, USER_QUOTA};
use crate::config::QuotaConfig;
use crate::quota::QuotaSpec;

#[derive(Debug)]
pub(super) struct QuotaLayout {
    /// Every quota, by id.
    pub specs: Vec<QuotaSpec>,
    /// Each quota's kind in Redis key names (`chat`, `user`, `app:<window>ms`): a key is
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

    /// The quota ids an app's sends count in.
    pub fn app_quotas(&self, app_id: &str) -> Range<usize> {
        self.per_app
            .get(app_id)
            .cloned()
            .unwrap_or_else(|| self.default_app.clone())
    }

    /// The tightest per-second rate of `app_id`'s quotas.
    pub fn app_rate_per_sec(&self, app_id: &str) -> f64 {
        self.specs[self.app_quotas(app_id)]
            .iter()
            .map(|q| f64::from(q.limit.get()) / q.window.as_secs_f64())
            .fold(f64::INFINITY, f64::min)
    }
}
