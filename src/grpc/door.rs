//! What the gRPC door checks against: the apps, who may call and their admission buckets,
//! and the rules a live reload may change. Replaced whole by a reload.

use std::time::Duration;

use crate::auth::{Admission, Authenticator};
use crate::config::{AppConfig, Config};
use crate::scheduler::GatewayError;

/// What the door checks against, replaced whole by a live reload: the apps (by index, removed
/// ones kept as tombstones), who may call, and their admission buckets.
pub(crate) struct Door {
    pub(crate) apps: Vec<AppConfig>,
    pub(super) default_app: Option<usize>,
    pub(crate) auth: Authenticator,
    pub(super) admission: Admission,
    /// `[quotas] updates_count_in_chat`: an update or recall naming its chat counts there.
    pub(super) updates_count_in_chat: bool,
    /// `[streams] card_streaming_limit_s`: when Feishu closes a card's streaming mode.
    pub(super) card_streaming_limit: Duration,
}

impl Door {
    pub(super) fn new(config: &Config, admission: Option<&Admission>) -> Self {
        let apps = config.apps.clone();
        let default_app = config
            .default_app
            .as_deref()
            .and_then(|d| apps.iter().position(|a| a.name == d && !a.removed));
        let auth = Authenticator::new(&config.auth);
        let admission = match admission {
            Some(running) => running.next(auth.limits()),
            None => Admission::new(auth.limits()),
        };
        Self {
            apps,
            default_app,
            auth,
            admission,
            updates_count_in_chat: config.quotas.updates_count_in_chat,
            card_streaming_limit: config.card_streaming_limit,
        }
    }

    /// App `name`'s configured name for metrics and logs (`unknown` when it has none).
    pub(super) fn app_label(&self, name: &str) -> String {
        match self.app_index(name) {
            Ok(i) => self.apps[i].name.clone(),
            Err(_) => "unknown".into(),
        }
    }

    /// The index of app `name` (the default app for ""); a removed app is unknown.
    pub(crate) fn app_index(&self, name: &str) -> Result<usize, GatewayError> {
        if name.is_empty() {
            return self.default_app.ok_or(GatewayError::NoDefaultApp);
        }
        self.apps
            .iter()
            .position(|a| a.name == name && !a.removed)
            .ok_or_else(|| GatewayError::UnknownApp(name.chars().take(64).collect()))
    }
}
