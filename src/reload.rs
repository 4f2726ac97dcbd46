//! Live configuration. SIGHUP, or a change in the directory of the config file or of an app's
//! `app_secret_file` (Kubernetes updates ConfigMap and Secret volumes by swapping a `..data`
//! symlink, so directories are watched, not files), reads the configuration again and applies
//! it without dropping a queued reply: apps (added, removed, secrets rotated), callers and
//! their tokens, admission rates and queue shares, app quota lists and budgets.
//!
//! A new configuration that does not load (a syntax error, a missing secret, no caller) is
//! refused with a log line and `feishu_reply_config_reloads_total{outcome="invalid"}`; the
//! running one stays. Settings only a restart can change keep their running values, are named
//! in a warning, and count as `needs_restart` (see `config::live`). Each reload applied
//! bumps `feishu_reply_config_generation`.
//!
//! Order of application: the Feishu client and the budgets learn the new apps first, then
//! the dispatcher (quotas, shares, removed apps: their queued replies fail `APP_REMOVED`;
//! removed callers and credentials rotated out: theirs fail `CALLER_REMOVED`), then the job
//! runner's view of stored jobs, and last the door (who may call, which apps exist). A call
//! that passes the old door meets a dispatcher that already knows everything it needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::budget::Budgets;
use crate::config::live::line_up;
use crate::config::{Config, ConfigError};
use crate::feishu::Upstream;
use crate::grpc::ReplyService;
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::scheduler::reconfigure::Reconfigure;

/// File events closer together than this are one reload (an editor's write, a volume's
/// symlink swap: several events each).
const SETTLE: Duration = Duration::from_millis(200);

/// How the gateway (`app::run`) reloads: where the configuration comes from and what triggers it.
pub struct ReloadSource {
    /// Reads the configuration again (the same file, environment and flags as at start).
    pub load: Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
    /// The config file, when there is one (its directory is watched).
    pub file: Option<PathBuf>,
    /// Reload on SIGHUP.
    pub sighup: bool,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied, except these settings (they need a restart).
    NeedsRestart(Vec<&'static str>),
    /// Refused: the running configuration stays.
    Invalid(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::NeedsRestart(_) => "needs_restart",
            Outcome::Invalid(_) => "invalid",
        }
    }
}

/// Everything a reload changes.
pub struct Live {
    pub(crate) running: Mutex<Config>,
    pub(crate) service: Arc<ReplyService>,
    pub(crate) scheduler: Scheduler,
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) budgets: Option<Arc<Budgets>>,
    pub(crate) jobs: Option<Arc<Jobs>>,
    pub(crate) metrics: Arc<Metrics>,
    generation: Mutex<u64>,
    /// One reload at a time.
    applying: tokio::sync::Mutex<()>,
}

impl Live {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        running: Config,
        service: Arc<ReplyService>,
        scheduler: Scheduler,
        upstream: Arc<dyn Upstream>,
        budgets: Option<Arc<Budgets>>,
        jobs: Option<Arc<Jobs>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            running: Mutex::new(running),
            service,
            scheduler,
            upstream,
            budgets,
            jobs,
            metrics,
            generation: Mutex::new(0),
            applying: tokio::sync::Mutex::new(()),
        }
    }

    /// Applies `loaded` (the configuration read again, or why it could not be).
    pub async fn apply(&self, loaded: Result<Config, ConfigError>) -> Outcome {
        let _one = self.applying.lock().await;
        let outcome = match loaded.and_then(check) {
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
                Outcome::Invalid(e.to_string())
            }
            Ok(new) => self.switch(new).await,
        };
        let generation = {
            let mut g = self.generation.lock();
            if !matches!(outcome, Outcome::Invalid(_)) {
                *g += 1;
            }
            *g
        };
        self.metrics.config_reloaded(outcome.label(), generation);
        outcome
    }

    async fn switch(&self, new: Config) -> Outcome {
        let old = self.running.lock().clone();
        let lined = line_up(&old, new);
        let config = lined.config;
        let removed: Vec<(usize, String)> = lined
            .removed_apps
            .iter()
            .map(|&i| (i, config.apps[i].name.clone()))
            .collect();
        for a in &config.apps[old.apps.len()..] {
            self.metrics.init_app(&a.name);
        }
        self.upstream.reconfigure(&config.apps);
        if let Some(b) = &self.budgets {
            b.reconfigure(&config.apps);
        }
        self.scheduler
            .reconfigure(Reconfigure {
                quotas: config.quotas.clone(),
                callers: config.auth.limits_by_id(),
                app_ids: config
                    .apps
                    .iter()
                    .map(|a| a.app_id.as_str().into())
                    .collect(),
                removed_apps: config
                    .apps
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.removed)
                    .map(|(i, a)| (i, a.name.clone()))
                    .collect(),
                owners: config.auth.ownership_by_id(),
            })
            .await;
        if let Some(jobs) = &self.jobs {
            let owners = config.auth.ownership_by_id();
            jobs.reconfigure(crate::jobs::Specs::new(&config.apps, &owners))
                .await;
        }
        self.service.reload(&config);
        let live_apps = config.apps.iter().filter(|a| !a.removed).count();
        let removed_names: Vec<&str> = removed.iter().map(|(_, n)| n.as_str()).collect();
        tracing::info!(
            apps = live_apps,
            callers = config.auth.callers.len(),
            removed = ?removed_names,
            "configuration reloaded"
        );
        *self.running.lock() = config;
        if lined.needs_restart.is_empty() {
            Outcome::Applied
        } else {
            tracing::warn!(settings = ?lined.needs_restart, "configuration reloaded, but these changed settings need a restart (still running as before)");
            Outcome::NeedsRestart(lined.needs_restart)
        }
    }

    /// The secret files of the running apps (watched with the config file).
    fn secret_files(&self) -> Vec<PathBuf> {
        self.running
            .lock()
            .apps
            .iter()
            .filter(|a| !a.removed)
            .filter_map(|a| a.secret_file.clone())
            .collect()
    }
}

/// What `serve` refuses at start, a reload refuses too.
fn check(c: Config) -> Result<Config, ConfigError> {
    if c.embedded_fake {
        return Err(ConfigError::Invalid(
            "--embedded-fake runs its own app: restart to change it".into(),
        ));
    }
    if c.auth.callers.is_empty() && !c.auth.allow_anonymous {
        return Err(ConfigError::NoCaller);
    }
    Ok(c)
}

/// Reloads on SIGHUP and on changes to the watched files, until the task is aborted. SIGHUP
/// and the file watch are set up here, before the task starts: from this call on a SIGHUP
/// reloads (its default action, ending the process, could otherwise hit a gateway already
/// serving) and no change is missed.
pub fn start(live: Arc<Live>, source: ReloadSource) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::channel::<&'static str>(16);
    #[cfg(unix)]
    if source.sighup {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let _ = tx.send("SIGHUP").await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change only")
            }
        }
    }
    // The files are watched from here on, too.
    let mut watched = Watched::default();
    let mut files = source.file.iter().cloned().collect::<Vec<_>>();
    files.extend(live.secret_files());
    watched.set(&files, &tx);
    tokio::spawn(watch(live, source, watched, tx, rx))
}

/// Warns (log and `feishu_reply_config_writable_by_others`) when others may write the config
/// file or its directory: whoever can write it can make the gateway post as its apps.
pub fn check_permissions(file: &Path, metrics: &Metrics) {
    let open = crate::config::writable_by_others(file);
    for path in &open {
        tracing::warn!(path = %path.display(), "the configuration is writable by other users: anyone who can write it can make the gateway post as its apps; chmod o-w");
    }
    metrics.set_config_writable_by_others(!open.is_empty());
}

async fn watch(
    live: Arc<Live>,
    source: ReloadSource,
    mut watched: Watched,
    tx: mpsc::Sender<&'static str>,
    mut rx: mpsc::Receiver<&'static str>,
) {
    while let Some(why) = rx.recv().await {
        // One reload for a burst of events.
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        // Reading files is blocking I/O (a slow volume must not stall a runtime thread).
        let load = source.load.clone();
        let loaded = match tokio::task::spawn_blocking(move || load()).await {
            Ok(r) => r,
            Err(e) => Err(ConfigError::Invalid(format!(
                "reading the configuration: {e}"
            ))),
        };
        tracing::info!(trigger = why, "reloading the configuration");
        if let Some(file) = &source.file {
            check_permissions(file, &live.metrics);
        }
        let outcome = live.apply(loaded).await;
        if !matches!(outcome, Outcome::Invalid(_)) {
            let mut files = source.file.iter().cloned().collect::<Vec<_>>();
            files.extend(live.secret_files());
            watched.set(&files, &tx);
        }
    }
}

/// The directories watched now (kept alive with their watcher).
#[derive(Default)]
struct Watched {
    dirs: Vec<PathBuf>,
    watcher: Option<notify::RecommendedWatcher>,
}

impl Watched {
    /// Watches the directories of `files` (events naming one of them, or Kubernetes'
    /// `..data`, trigger a reload).
    fn set(&mut self, files: &[PathBuf], tx: &mpsc::Sender<&'static str>) {
        use notify::Watcher;
        let mut dirs: Vec<PathBuf> = files.iter().map(|f| parent(f)).collect();
        dirs.sort();
        dirs.dedup();
        if dirs == self.dirs && self.watcher.is_some() {
            return;
        }
        let names: Vec<std::ffi::OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(ToOwned::to_owned))
            .chain([std::ffi::OsString::from("..data")])
            .collect();
        let tx = tx.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            let ours = event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n)));
            if ours {
                let _ = tx.try_send("file change");
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP");
                return;
            }
        };
        for d in &dirs {
            if let Err(e) = watcher.watch(d, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch a configuration directory; reload with SIGHUP");
            }
        }
        self.dirs = dirs;
        self.watcher = Some(watcher);
    }
}

fn parent(f: &Path) -> PathBuf {
    match f.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}
