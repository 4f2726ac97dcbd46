//! `[apps.NAME]`: Feishu apps, their credentials, and what each may override: its quotas
//! (`quotas = [...]`, the shape of `[quotas] app`; `[apps.NAME.api_quotas]` one API's) and a
//! calendar call budget (`[apps.NAME.budget]`).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::error::ConfigError;
use super::file::FileQuota;
use crate::quota::QuotaSpec;

/// The app name used for `FEISHU_APP_ID` / `FEISHU_APP_SECRET` and for requests with no `app`.
pub const DEFAULT_APP_NAME: &str = "default";

/// Feishu's message APIs with app quotas of their own (`feishu::Api` names, checked there).
pub const APIS: [&str; 8] = [
    "reply",
    "send",
    "update_card",
    "edit",
    "recall",
    "card_create",
    "card_content",
    "card_settings",
];

/// Where Feishu counts an app's calls from (free edition: 10 000 a month).
pub const DEFAULT_BUDGET_TIME_ZONE: &str = "Asia/Shanghai";

/// One Feishu app (custom app credentials).
#[derive(Clone, PartialEq)]
pub struct AppConfig {
    /// The name callers use in `ReplyRequest.app`.
    pub name: String,
    pub app_id: String,
    pub app_secret: String,
    /// This app's own app quotas instead of `[quotas] app`.
    pub quotas: Option<Vec<QuotaSpec>>,
    /// One API's app quotas of this app (by [`APIS`] name), instead of `quotas`.
    pub api_quotas: BTreeMap<String, Vec<QuotaSpec>>,
    /// Feishu calls this app may make per calendar period.
    pub budget: Option<BudgetConfig>,
    /// Where the secret was read from (`app_secret_file`): watched for live reload.
    pub secret_file: Option<std::path::PathBuf>,
    /// Removed by a reload: kept in its slot (app indexes stay stable), refused by name.
    pub removed: bool,
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConfig")
            .field("name", &self.name)
            .field("app_id", &self.app_id)
            .field("app_secret", &"<redacted>")
            .field("quotas", &self.quotas)
            .field("api_quotas", &self.api_quotas)
            .field("budget", &self.budget)
            .field("secret_file", &self.secret_file)
            .field("removed", &self.removed)
            .finish()
    }
}

impl AppConfig {
    /// An app with credentials only (default quotas, no budget).
    pub fn new(
        name: impl Into<String>,
        app_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            app_id: app_id.into(),
            app_secret: secret.into(),
            quotas: None,
            api_quotas: BTreeMap::new(),
            budget: None,
            secret_file: None,
            removed: false,
        }
    }
}

/// The calendar period a budget counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    Month,
}

/// `[apps.NAME.budget]`: at most `calls` Feishu calls (token, reply, message lookup) per
/// `period`, counted from the period's start in `time_zone`.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    pub calls: u64,
    pub period: BudgetPeriod,
    pub time_zone: jiff::tz::TimeZone,
    /// The IANA name, as configured (logs, metrics).
    pub time_zone_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApp {
    pub(super) app_id: String,
    /// The secret itself, or…
    pub(super) app_secret: Option<String>,
    /// …the name of an environment variable holding it (keeps secrets out of the file), or…
    pub(super) app_secret_env: Option<String>,
    /// …a file holding it (a mounted Kubernetes Secret: rotated by a live reload).
    pub(super) app_secret_file: Option<std::path::PathBuf>,
    pub(super) quotas: Option<Vec<FileQuota>>,
    #[serde(default)]
    pub(super) api_quotas: BTreeMap<String, Vec<FileQuota>>,
    pub(super) budget: Option<FileBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBudget {
    calls: u64,
    period: BudgetPeriod,
    time_zone: Option<String>,
}

/// A quota list entry as configured (`what` names it in errors).
pub(super) fn quota_spec(what: &str, q: FileQuota) -> Result<QuotaSpec, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let limit =
        NonZeroU32::new(q.limit).ok_or_else(|| invalid(format!("{what}.limit must be > 0")))?;
    if q.window_ms == 0 {
        return Err(invalid(format!("{what}.window_ms must be > 0")));
    }
    Ok(QuotaSpec::new(limit, Duration::from_millis(q.window_ms)))
}

fn budget(name: &str, b: FileBudget) -> Result<BudgetConfig, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    if b.calls == 0 {
        return Err(invalid(format!("apps.{name}.budget.calls must be > 0")));
    }
    let zone = b
        .time_zone
        .unwrap_or_else(|| DEFAULT_BUDGET_TIME_ZONE.into());
    let time_zone = jiff::tz::TimeZone::get(&zone).map_err(|_| {
        invalid(format!(
            "apps.{name}.budget.time_zone {zone:?} is not an IANA time zone (e.g. \"Asia/Shanghai\")"
        ))
    })?;
    Ok(BudgetConfig {
        calls: b.calls,
        period: b.period,
        time_zone,
        time_zone_name: zone,
    })
}

/// The apps of the file, plus the default app from `FEISHU_APP_ID` / `FEISHU_APP_SECRET`
/// (which keeps the quotas and budget of a `[apps.default]` it replaces). Apps sharing an
/// app_id must agree on quotas and budget: they are one app at Feishu.
pub(super) fn apps(
    file: BTreeMap<String, FileApp>,
    env_app: (Option<&String>, Option<&String>),
) -> Result<Vec<AppConfig>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let mut list = Vec::new();
    for (name, a) in file {
        let secret_file = a.app_secret_file.clone();
        let secret = match (a.app_secret, a.app_secret_env, a.app_secret_file) {
            (Some(s), None, None) => s,
            (None, Some(var), None) => std::env::var(&var).map_err(|_| {
                invalid(format!(
                    "apps.{name}.app_secret_env names {var}, which is not set"
                ))
            })?,
            (None, None, Some(path)) => super::read_capped(&path)
                .and_then(|b| String::from_utf8(b).map_err(std::io::Error::other))
                .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                // The error names the path only: never the file's content (the size limit's
                // message gives the size, an OS error its kind).
                .map_err(|e| {
                    let why = match e.kind() {
                        std::io::ErrorKind::InvalidData if e.to_string().contains("limit") => {
                            e.to_string()
                        }
                        kind => kind.to_string(),
                    };
                    invalid(format!(
                        "apps.{name}.app_secret_file {}: {why}",
                        path.display()
                    ))
                })?,
            _ => {
                return Err(invalid(format!(
                    "apps.{name}: give exactly one of app_secret, app_secret_env, app_secret_file"
                )));
            }
        };
        let quotas = match a.quotas {
            None => None,
            Some(q) if q.is_empty() => {
                return Err(invalid(format!(
                    "apps.{name}.quotas: give at least one quota"
                )));
            }
            Some(q) => Some(
                q.into_iter()
                    .map(|q| quota_spec(&format!("apps.{name}.quotas"), q))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let mut api_quotas = BTreeMap::new();
        for (api, q) in a.api_quotas {
            let what = format!("apps.{name}.api_quotas.{api}");
            if !APIS.contains(&api.as_str()) {
                return Err(invalid(format!(
                    "{what}: no such API (one of {})",
                    APIS.join(", ")
                )));
            }
            if q.is_empty() {
                return Err(invalid(format!("{what}: give at least one quota")));
            }
            let specs = q
                .into_iter()
                .map(|q| quota_spec(&what, q))
                .collect::<Result<Vec<_>, _>>()?;
            api_quotas.insert(api, specs);
        }
        let budget = a.budget.map(|b| budget(&name, b)).transpose()?;
        list.push(AppConfig {
            app_id: a.app_id,
            app_secret: secret,
            quotas,
            api_quotas,
            budget,
            secret_file,
            removed: false,
            name,
        });
    }
    match env_app {
        (Some(id), Some(secret)) => {
            let (quotas, api_quotas, budget) = list
                .iter()
                .find(|a| a.name == DEFAULT_APP_NAME)
                .map_or((None, BTreeMap::new(), None), |a| {
                    (a.quotas.clone(), a.api_quotas.clone(), a.budget.clone())
                });
            list.retain(|a| a.name != DEFAULT_APP_NAME);
            list.push(AppConfig {
                quotas,
                api_quotas,
                budget,
                ..AppConfig::new(DEFAULT_APP_NAME, id.clone(), secret.clone())
            });
        }
        (None, None) => {}
        _ => {
            return Err(invalid(
                "FEISHU_APP_ID and FEISHU_APP_SECRET go together: set both or neither".into(),
            ));
        }
    }
    for a in &list {
        if a.app_id.is_empty() || a.app_secret.is_empty() {
            return Err(invalid(format!(
                "app {}: app_id and app_secret must not be empty",
                a.name
            )));
        }
        if let Some(b) = list.iter().find(|b| {
            b.app_id == a.app_id
                && (b.quotas != a.quotas || b.api_quotas != a.api_quotas || b.budget != a.budget)
        }) {
            return Err(invalid(format!(
                "apps {} and {} share an app_id (one app at Feishu): give them the same quotas and budget",
                a.name, b.name
            )));
        }
    }
    Ok(list)
}
