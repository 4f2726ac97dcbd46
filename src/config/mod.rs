//! Configuration: the only place that reads the config file and environment overrides. The
//! result is a validated [`Config`] (non-zero limits, real durations, unique apps).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use crate::quota::QuotaSpec;

mod apps;
mod args;
mod auth;
mod cluster;
mod error;
mod file;
pub mod live;

pub use apps::{
    APIS, AppConfig, BudgetConfig, BudgetPeriod, DEFAULT_APP_NAME, DEFAULT_BUDGET_TIME_ZONE,
};
pub use args::ServeArgs;
pub use auth::{
    ANONYMOUS, ANONYMOUS_ID, AppGrant, AuthConfig, CallerConfig, CallerLimits, Ownership,
    TlsConfig, credential_fingerprint, token_hash,
};
pub use cluster::{
    ClusterConfig, PeerConfig, RedisFailurePolicy, RedisJobsConfig, RedisMode, redact_url,
};
pub use error::ConfigError;
use error::parse_error;
use file::{FileConfig, FileQuota};

/// Largest configuration or secret file read: one this large is a mistake or an attack, and
/// is refused rather than read into memory.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// `path`'s bytes, refused (not read) past [`MAX_FILE_BYTES`].
pub(crate) fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = |bytes: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{bytes} bytes, over the {MAX_FILE_BYTES}-byte limit of configuration files"),
        )
    };
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_FILE_BYTES {
        return Err(too_large(len));
    }
    let mut bytes = Vec::new();
    // The file may grow between the check and the read: never past the limit.
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The paths among `file` and its directory that users other than the owner and group may
/// write (anyone who can write the configuration can make the gateway post as its apps). A
/// directory with the sticky bit (like /tmp) does not count: others cannot replace a file
/// in it.
pub fn writable_by_others(file: &Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    [(file.to_path_buf(), false), (dir, true)]
        .into_iter()
        .filter(|(p, is_dir)| {
            std::fs::metadata(p).is_ok_and(|m| {
                let mode = m.permissions().mode();
                mode & 0o002 != 0 && !(*is_dir && mode & 0o1000 != 0)
            })
        })
        .map(|(p, _)| p)
        .collect()
}

/// Feishu's documented base URL (Lark: `https://open.larksuite.com`).
pub const FEISHU_BASE_URL: &str = "https://open.feishu.cn";

/// Upstream quotas (DESIGN.md §2). Every window is widened by `safety_margin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaConfig {
    pub chat: QuotaSpec,
    pub user: QuotaSpec,
    /// Per message, for its updates and recall (Feishu: 5/s per message on PATCH).
    pub message: QuotaSpec,
    /// Per CardKit card, all of its operations together (Feishu: 10/s per card).
    pub card: QuotaSpec,
    /// Whether each API has its own app windows (Feishu: "per API, per app") or all share one.
    pub app_scope: AppScope,
    /// Whether an update or a recall also counts in its chat's quota (undocumented by Feishu;
    /// off by default), when the caller names the chat.
    pub updates_count_in_chat: bool,
    /// Applied per app_id, to every app without its own (Feishu: 50/s and 1000/min on the
    /// reply endpoint).
    pub app: Vec<QuotaSpec>,
    /// Apps with their own app quotas (`[apps.NAME] quotas`), by app_id, each once.
    pub per_app: Vec<(String, Vec<QuotaSpec>)>,
    /// The share (percent) of each app window that a stream's intermediate texts leave free
    /// for final texts and closes (`[quotas] final_headroom_percent`, 0 to 50): a finishing
    /// stream never waits for a window full of typing.
    pub final_headroom_percent: u8,
    pub safety_margin: Duration,
}

/// `[quotas] app_scope`: what an app's quota windows count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppScope {
    /// Each API (reply, send, update_card, edit, recall) has its own windows.
    #[default]
    Api,
    /// All of an app's calls share one set of windows.
    App,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeishuConfig {
    pub base_url: String,
    pub connect_timeout: Duration,
    /// Whole-request timeout of one HTTP call to Feishu.
    pub request_timeout: Duration,
    /// Refresh a tenant_access_token this long before it expires (in the background).
    pub token_refresh_before: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queued replies one chat may have; beyond it callers get RESOURCE_EXHAUSTED. At 5/s a
    /// full queue of 200 is 40 s of backlog.
    pub max_per_chat: usize,
    /// Queued replies in total (memory bound).
    pub max_total: usize,
    /// Bytes of queued replies in total (content + a fixed per-job overhead): the memory
    /// bound that counts what a reply weighs. Default 64 MiB, a quarter of the pod's limit.
    pub max_total_bytes: usize,
    /// message_id → chat_id entries remembered from lookups.
    pub chat_cache_size: usize,
    /// A job is not started with less than this left before its deadline (time for the send).
    pub min_send_budget: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Attempts at the reply endpoint per job, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Replies per second a configured caller may submit unless its `rate` says otherwise;
    /// anonymous calls get it per peer address.
    pub per_caller_rps: NonZeroU32,
    pub per_caller_burst: NonZeroU32,
    /// A configured caller's default queue share (default: a quarter of `[queue] max_total`).
    pub per_caller_max_queued: usize,
    /// … and in bytes (default: a quarter of `[queue] max_total_bytes`).
    pub per_caller_max_queued_bytes: usize,
}

/// How long and how much clients may hold of the ports (`[server]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open gRPC connections (lowered to fit the process's descriptor limit).
    pub max_connections: usize,
    /// Concurrent streams (calls) per gRPC connection.
    pub max_streams_per_connection: u32,
    /// The longest a call is held: calls without a deadline, or with a later one, get this.
    pub max_call: Duration,
    /// A new connection must send its first bytes (TLS: finish its handshake) by then; the
    /// metrics port's request headers too.
    pub handshake_timeout: Duration,
    /// Open connections on the metrics port.
    pub metrics_max_connections: usize,
    /// Bytes of gRPC requests between the socket and the queue (received, not yet queued or
    /// refused), over all connections: half-sent or piled-up requests hold what they sent;
    /// beyond it a request fails RESOURCE_EXHAUSTED. Live memory is a few times this (the
    /// body, its decoded and validated copies): 8 MiB kept the flood of BENCHMARKS.md under
    /// the pod's 256 MiB.
    pub max_reading_bytes: usize,
}

/// The validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// On SIGTERM, keep sending queued replies this long, then fail the rest with UNAVAILABLE.
    pub shutdown_grace: Duration,
    pub limits: ServerLimits,
    pub feishu: FeishuConfig,
    /// Configured apps (empty only with `embedded_fake`, or in tests).
    pub apps: Vec<AppConfig>,
    /// Run against an embedded fake Feishu on purpose (`serve --embedded-fake`).
    pub embedded_fake: bool,
    /// Name of the app used when a request names none.
    pub default_app: Option<String>,
    pub quotas: QuotaConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
    pub admission: AdmissionConfig,
    /// Who may call: configured callers, or anonymous callers when allowed.
    pub auth: AuthConfig,
    /// TLS (and mTLS) on the gRPC port.
    pub tls: Option<TlsConfig>,
    /// Cluster mode (quotas shared through Redis); None = single node.
    pub cluster: Option<ClusterConfig>,
    /// Where the embedded job store lives (`[jobs] data_dir`, `GATEWAY_DATA_DIR`); None = no
    /// async API.
    pub data_dir: Option<std::path::PathBuf>,
    /// `--reset-job-store`: accept an empty or missing job store where one existed.
    pub reset_job_store: bool,
    /// Jobs the store may hold, all states (finished ones stay 25 h).
    pub max_jobs: u64,
    /// Open (not final) jobs one caller may have: one caller at its bound never refuses
    /// another (`[jobs] max_jobs_per_caller`, default a quarter of `max_jobs`).
    pub max_jobs_per_caller: u64,
    /// Feishu closes a card's streaming mode this long after it was turned on (`[streams]
    /// card_streaming_limit_s`, `GATEWAY_CARD_STREAMING_LIMIT_S`): streams renew it a margin
    /// before.
    pub card_streaming_limit: Duration,
}

// === impl Config ===

impl Config {
    /// Reads the file named by `args.config` (if any), applies env/flag overrides, validates.
    /// The configuration `serve` runs with: the file and overrides, and an app to send as —
    /// or `--embedded-fake`, never both and never neither (a missing secret must not turn
    /// into replies that "succeed" into a fake).
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        let config = Self::build(file, args)?;
        match (config.embedded_fake, config.apps.is_empty()) {
            (false, true) => Err(ConfigError::NoApp),
            (true, false) => Err(ConfigError::Invalid(
                "--embedded-fake (GATEWAY_EMBEDDED_FAKE) cannot be combined with configured apps \
                 (FEISHU_APP_ID or [apps.*]): drop one of them"
                    .into(),
            )),
            // Real apps, nobody configured to call them, anonymous not allowed on purpose.
            (false, false) if config.auth.callers.is_empty() && !config.auth.allow_anonymous => {
                Err(ConfigError::NoCaller)
            }
            _ => Ok(config),
        }
    }

    /// Parses TOML text (no overrides); used by tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| parse_error(Path::new("<inline>"), text, &e))?;
        Self::build(file, &ServeArgs::default())
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.into(),
            source,
        };
        let bytes = read_capped(path).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|e| read(std::io::Error::other(e)))?;
        toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))
    }

    fn build(file: FileConfig, args: &ServeArgs) -> Result<Self, ConfigError> {
        let FileConfig {
            server,
            feishu,
            default_app,
            apps,
            quotas,
            queue,
            retry,
            admission,
            mut cluster,
            callers,
            auth,
            jobs,
            streams,
        } = file;
        let ServeArgs {
            config: _,
            grpc_addr,
            metrics_addr,
            feishu_base_url,
            app_id,
            app_secret,
            redis_url,
            redis_mode,
            peer_listen,
            peer_advertise,
            owner_windows,
            embedded_fake,
            allow_anonymous,
            tls_cert,
            tls_key,
            tls_client_ca,
            data_dir,
            reset_job_store,
            card_streaming_limit_s,
        } = args;
        if let Some(mode) = redis_mode {
            cluster.redis_mode = *mode;
        }
        if let Some(listen) = peer_listen {
            cluster.peer_listen = Some(*listen);
        }
        if let Some(advertise) = peer_advertise {
            cluster.peer_advertise = Some(advertise.clone());
        }
        if let Some(on) = owner_windows {
            cluster.owner_windows = Some(*on);
        }
        let invalid = |m: String| ConfigError::Invalid(m);

        let app_list = apps::apps(apps, (app_id.as_ref(), app_secret.as_ref()))?;
        let default_app = match default_app {
            Some(d) if app_list.iter().any(|a| a.name == d) => Some(d),
            Some(d) => {
                return Err(invalid(format!(
                    "default_app = {d:?} is not one of [apps.*]"
                )));
            }
            None if app_list.iter().any(|a| a.name == DEFAULT_APP_NAME) => {
                Some(DEFAULT_APP_NAME.into())
            }
            None if app_list.len() == 1 => Some(app_list[0].name.clone()),
            None => None,
        };

        let spec = |what: &str, q: FileQuota| apps::quota_spec(&format!("quotas.{what}"), q);
        if quotas.app_scope == AppScope::App
            && let Some(a) = app_list.iter().find(|a| !a.api_quotas.is_empty())
        {
            return Err(ConfigError::Invalid(format!(
                "apps.{}.api_quotas: one API's quotas need [quotas] app_scope = \"api\" (with \"app\" every API shares one set)",
                a.name
            )));
        }
        let quotas = QuotaConfig {
            chat: spec("chat", quotas.chat)?,
            user: spec("user", quotas.user)?,
            message: spec("message", quotas.message)?,
            card: spec("card", quotas.card)?,
            app_scope: quotas.app_scope,
            updates_count_in_chat: quotas.updates_count_in_chat,
            final_headroom_percent: match quotas.final_headroom_percent {
                p @ 0..=50 => p,
                p => {
                    return Err(invalid(format!(
                        "quotas.final_headroom_percent = {p}: give 0 to 50"
                    )));
                }
            },
            app: quotas
                .app
                .iter()
                .map(|q| spec("app", *q))
                .collect::<Result<_, _>>()?,
            safety_margin: Duration::from_millis(quotas.safety_margin_ms),
            per_app: {
                let mut per_app: Vec<(String, Vec<QuotaSpec>)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for a in &app_list {
                    if !seen.insert(a.app_id.as_str()) {
                        continue;
                    }
                    if let Some(q) = &a.quotas {
                        per_app.push((a.app_id.clone(), q.clone()));
                    }
                    // One API's own: keyed `<app_id>/<api>`.
                    for (api, q) in &a.api_quotas {
                        per_app.push((format!("{}/{api}", a.app_id), q.clone()));
                    }
                }
                per_app
            },
        };

        let base_url = feishu_base_url
            .clone()
            .unwrap_or(feishu.base_url)
            .trim_end_matches('/')
            .to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(invalid(format!(
                "feishu.base_url {base_url:?} must start with http:// or https://"
            )));
        }
        if feishu.request_timeout_ms == 0 || feishu.connect_timeout_ms == 0 {
            return Err(invalid("feishu timeouts must be > 0".into()));
        }
        if queue.max_per_chat == 0
            || queue.max_total == 0
            || queue.max_total_bytes == 0
            || queue.chat_cache_size == 0
        {
            return Err(invalid("queue sizes must be > 0".into()));
        }
        if retry.max_attempts == 0 {
            return Err(invalid(
                "retry.max_attempts must be >= 1 (the first attempt counts)".into(),
            ));
        }
        let nz = |what: &str, v: u32| {
            NonZeroU32::new(v).ok_or_else(|| invalid(format!("admission.{what} must be > 0")))
        };
        let admission = AdmissionConfig {
            per_caller_rps: nz("per_caller_rps", admission.per_caller_rps)?,
            per_caller_burst: nz("per_caller_burst", admission.per_caller_burst)?,
            per_caller_max_queued: admission
                .per_caller_max_queued
                .unwrap_or(queue.max_total.div_ceil(4)),
            per_caller_max_queued_bytes: admission
                .per_caller_max_queued_bytes
                .unwrap_or(queue.max_total_bytes.div_ceil(4)),
        };
        if admission.per_caller_max_queued == 0 || admission.per_caller_max_queued_bytes == 0 {
            return Err(invalid(
                "admission.per_caller_max_queued* must be > 0".into(),
            ));
        }
        if server.max_connections == 0
            || server.max_streams_per_connection == 0
            || server.max_call_ms == 0
            || server.handshake_timeout_ms == 0
            || server.metrics_max_connections == 0
            || server.max_reading_bytes == 0
        {
            return Err(invalid("server limits must be > 0".into()));
        }
        let limits = ServerLimits {
            max_connections: server.max_connections,
            max_streams_per_connection: server.max_streams_per_connection,
            max_call: Duration::from_millis(server.max_call_ms),
            handshake_timeout: Duration::from_millis(server.handshake_timeout_ms),
            metrics_max_connections: server.metrics_max_connections,
            max_reading_bytes: server.max_reading_bytes,
        };
        let mut tls = server.tls;
        if tls_cert.is_some() || tls_key.is_some() || tls_client_ca.is_some() {
            let t = tls.get_or_insert(auth::FileTls {
                cert_file: None,
                key_file: None,
                client_ca_file: None,
            });
            for (slot, v) in [
                (&mut t.cert_file, tls_cert),
                (&mut t.key_file, tls_key),
                (&mut t.client_ca_file, tls_client_ca),
            ] {
                if let Some(v) = v {
                    *slot = Some(v.clone());
                }
            }
        }
        let (auth, tls) = auth::build(auth::AuthInput {
            auth,
            // The demo on the embedded fake takes anonymous calls unless callers are configured.
            allow_anonymous_override: *allow_anonymous || (*embedded_fake && callers.is_empty()),
            callers,
            tls,
            apps: &app_list,
            defaults: CallerLimits {
                rate: admission.per_caller_rps,
                burst: admission.per_caller_burst,
                max_queued: admission.per_caller_max_queued,
                max_queued_bytes: admission.per_caller_max_queued_bytes,
            },
            // Anonymous calls are one caller: the whole queue is theirs.
            anonymous: CallerLimits {
                rate: admission.per_caller_rps,
                burst: admission.per_caller_burst,
                max_queued: queue.max_total,
                max_queued_bytes: queue.max_total_bytes,
            },
        })?;

        let asked_owner_windows = cluster.owner_windows;
        let mut cluster = cluster::build(cluster, redis_url.clone())?;
        if quotas.updates_count_in_chat
            && let Some(peers) = cluster.as_mut().and_then(|c| c.peers.as_mut())
        {
            // An update's message and its chat fall in different partitions: no one replica
            // keeps both windows (ARCHITECTURE.md "Scaling out over a Redis Cluster"), so the
            // windows stay in Redis unless owner windows were asked for.
            if asked_owner_windows == Some(true) {
                return Err(invalid(
                    "quotas.updates_count_in_chat is not available with cluster.owner_windows (the chat and the message are kept by different replicas)".into(),
                ));
            }
            peers.owner_windows = false;
        }

        let max_jobs = jobs.max_jobs.unwrap_or(1_000_000);
        Ok(Config {
            grpc_addr: grpc_addr.unwrap_or(server.grpc_addr),
            metrics_addr: metrics_addr.unwrap_or(server.metrics_addr),
            shutdown_grace: Duration::from_millis(server.shutdown_grace_ms),
            limits,
            feishu: FeishuConfig {
                base_url,
                connect_timeout: Duration::from_millis(feishu.connect_timeout_ms),
                request_timeout: Duration::from_millis(feishu.request_timeout_ms),
                token_refresh_before: Duration::from_secs(feishu.token_refresh_before_s),
            },
            apps: app_list,
            embedded_fake: *embedded_fake,
            default_app,
            quotas,
            queue: QueueConfig {
                max_per_chat: queue.max_per_chat,
                max_total: queue.max_total,
                max_total_bytes: queue.max_total_bytes,
                chat_cache_size: queue.chat_cache_size,
                min_send_budget: Duration::from_millis(queue.min_send_budget_ms),
            },
            retry: RetryConfig {
                max_attempts: retry.max_attempts,
                base_delay: Duration::from_millis(retry.base_delay_ms),
                max_delay: Duration::from_millis(retry.max_delay_ms.max(retry.base_delay_ms)),
            },
            admission,
            auth,
            tls,
            cluster,
            data_dir: data_dir.clone().or(jobs.data_dir),
            reset_job_store: *reset_job_store,
            max_jobs,
            max_jobs_per_caller: jobs.max_jobs_per_caller.unwrap_or(max_jobs / 4).max(1),
            card_streaming_limit: match card_streaming_limit_s
                .unwrap_or(streams.card_streaming_limit_s)
            {
                s @ 10..=86_400 => Duration::from_secs(s),
                s => {
                    return Err(invalid(format!(
                        "streams.card_streaming_limit_s = {s} (GATEWAY_CARD_STREAMING_LIMIT_S): give 10 to 86400"
                    )));
                }
            },
        })
    }

    /// The config with no file and no overrides (embedded fake, default quotas).
    pub fn defaults() -> Self {
        Self::build(FileConfig::default(), &ServeArgs::default()).expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of its own (mode 0755) under the temp dir.
    fn temp_dir(tag: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!(
            "gw-config-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn args(path: &Path) -> ServeArgs {
        ServeArgs {
            config: Some(path.into()),
            ..ServeArgs::default()
        }
    }

    #[test]
    fn a_config_or_secret_file_over_1_mib_is_refused_unread() {
        let dir = temp_dir("size");
        let valid =
            "[apps.a]\napp_id = \"cli_a\"\napp_secret = \"s\"\n[auth]\nallow_anonymous = true\n";
        let padded = |to: u64| {
            let mut t = valid.to_owned();
            t.push('#');
            while (t.len() as u64) < to - 1 {
                t.push('x');
            }
            t.push('\n');
            t
        };
        let file = dir.join("gateway.toml");
        std::fs::write(&file, padded(MAX_FILE_BYTES)).unwrap();
        Config::load(&args(&file)).expect("1 MiB exactly is read");
        std::fs::write(&file, padded(MAX_FILE_BYTES + 1)).unwrap();
        let e = Config::load(&args(&file)).unwrap_err().to_string();
        assert!(e.contains("over the 1048576-byte limit"), "{e}");
        // A secret file too (it is read into the configuration as well).
        let secret = dir.join("secret");
        std::fs::write(&secret, "s".repeat(MAX_FILE_BYTES as usize + 1)).unwrap();
        let text = format!(
            "[apps.a]\napp_id = \"cli_a\"\napp_secret_file = \"{}\"\n[auth]\nallow_anonymous = true\n",
            secret.display()
        );
        std::fs::write(&file, text).unwrap();
        let e = Config::load(&args(&file)).unwrap_err().to_string();
        assert!(e.contains("app_secret_file") && e.contains("limit"), "{e}");
        assert!(!e.contains("sss"), "never quotes the secret: {e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn owner_windows_are_on_with_peers_unless_updates_count_in_the_chat() {
        let dir = temp_dir("owner");
        let file = dir.join("gateway.toml");
        let load = |cluster: &str, quotas: &str| {
            let text = format!(
                "[apps.a]\napp_id = \"cli_a\"\napp_secret = \"s\"\n[auth]\nallow_anonymous = true\n\
                 [cluster]\nredis_url = \"redis://127.0.0.1:1\"\n{cluster}\n[quotas]\n{quotas}\n"
            );
            std::fs::write(&file, text).unwrap();
            Config::load(&args(&file))
                .map(|c| c.cluster.and_then(|c| c.peers).map(|p| p.owner_windows))
        };
        let peers = "peer_listen = \"127.0.0.1:7000\"";
        assert_eq!(load("", "").unwrap(), None, "no peers: nothing to keep");
        assert_eq!(load(peers, "").unwrap(), Some(true));
        let off = format!("{peers}\nowner_windows = false");
        assert_eq!(load(&off, "").unwrap(), Some(false));
        let counted = "updates_count_in_chat = true";
        assert_eq!(load(peers, counted).unwrap(), Some(false));
        let asked = format!("{peers}\nowner_windows = true");
        let e = load(&asked, counted).unwrap_err().to_string();
        assert!(e.contains("updates_count_in_chat"), "{e}");
        let e = load("owner_windows = true", "").unwrap_err().to_string();
        assert!(e.contains("needs cluster.peer_listen"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_config_file_or_directory_others_may_write_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let dir = temp_dir("perm");
        let file = dir.join("gateway.toml");
        std::fs::write(&file, "").unwrap();
        set(&file, 0o644);
        assert!(writable_by_others(&file).is_empty());
        set(&file, 0o666);
        assert_eq!(writable_by_others(&file), vec![file.clone()]);
        set(&file, 0o640);
        set(&dir, 0o777);
        assert_eq!(writable_by_others(&file), vec![dir.clone()]);
        // Sticky (like /tmp): others cannot replace the file.
        set(&dir, 0o1777);
        assert!(writable_by_others(&file).is_empty());
        set(&dir, 0o755);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_match_feishu_documentation() {
        let c = Config::defaults();
        assert_eq!(c.quotas.chat.limit.get(), 5);
        assert_eq!(c.quotas.app.len(), 2);
        assert_eq!(c.quotas.app[1].window, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.feishu.base_url, FEISHU_BASE_URL);
        assert!(c.apps.is_empty() && c.default_app.is_none());
    }

    #[test]
    fn several_apps_and_a_default() {
        let c = Config::from_toml(
            r#"
            default_app = "ops"
            [feishu]
            base_url = "https://open.larksuite.com/"
            [apps.ops]
            app_id = "cli_1"
            app_secret = "s1"
            [apps.hr]
            app_id = "cli_2"
            app_secret = "s2"
            [quotas]
            app = [{ limit = 10, window_ms = 1000 }]
            "#,
        )
        .unwrap();
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.default_app.as_deref(), Some("ops"));
        assert_eq!(c.feishu.base_url, "https://open.larksuite.com");
        assert_eq!(c.quotas.app.len(), 1);
        assert!(!format!("{c:?}").contains("s1"), "secrets never printed");
    }

    #[test]
    fn one_api_of_an_app_may_have_its_own_app_quotas() {
        let text = |scope: &str, api: &str| {
            format!(
                "[apps.ops]\napp_id = \"cli_1\"\napp_secret = \"s1\"\n\
                 [apps.ops.api_quotas]\n{api} = [{{ limit = 20, window_ms = 1000 }}]\n\
                 [quotas]\napp_scope = \"{scope}\"\nupdates_count_in_chat = true\n"
            )
        };
        let c = Config::from_toml(&text("api", "send")).unwrap();
        assert_eq!(c.quotas.per_app.len(), 1);
        assert_eq!(c.quotas.per_app[0].0, "cli_1/send");
        assert_eq!(c.quotas.per_app[0].1[0].limit.get(), 20);
        assert!(c.quotas.updates_count_in_chat);
        assert_eq!(c.quotas.message.limit.get(), 5);
        let e = Config::from_toml(&text("api", "patch"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such API"), "{e}");
        let e = Config::from_toml(&text("app", "send"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("app_scope"), "{e}");
    }

    #[test]
    fn a_parse_error_never_quotes_the_file() {
        // The broken line holds the secret: the error names where, not what.
        let text = "[apps.ops]\napp_id = \"cli_1\"\napp_secret = \"s3cr3t-value\" oops\n";
        let e = Config::from_toml(text).unwrap_err();
        let shown = format!("{e} / {e:?} / {:?}", std::error::Error::source(&e));
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("line 3"), "says where: {shown}");
    }

    #[test]
    fn the_cluster_config_never_shows_the_redis_password() {
        let c = Config::from_toml(
            "[cluster]\nredis_url = \"rediss://:hunter2pw@redis.internal:6380\"\n",
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2pw"), "{shown}");
        assert!(
            shown.contains("redis.internal:6380"),
            "the rest stays: {shown}"
        );
    }

    #[test]
    fn mistakes_are_reported_not_ignored() {
        for (toml, want) in [
            (
                "[quotas]\nchat = { limit = 0, window_ms = 1000 }",
                "limit must be > 0",
            ),
            ("[server]\ngrpc_port = 1", "unknown field"),
            ("default_app = \"x\"", "not one of"),
            ("[apps.a]\napp_id = \"cli\"", "exactly one of"),
            ("[feishu]\nbase_url = \"open.feishu.cn\"", "must start with"),
            ("[retry]\nmax_attempts = 0", "max_attempts"),
            ("[cluster]\nredis_url = \"localhost:6379\"", "redis://"),
            (
                "[cluster]\nredis_url = \"redis://r\"\non_redis_failure = \"ignore\"",
                "unknown variant",
            ),
            (
                "[cluster]\nredis_url = \"redis://r\"\nredis_ca_file = \"Cargo.toml\"",
                "use a rediss:// redis_url",
            ),
            (
                "[cluster]\nredis_url = \"redis://a:1,redis://b:1\"",
                "set redis_mode = \"cluster\"",
            ),
            (
                "[cluster]\nredis_url = \"redis://a:1, rediss://b:1\"\nredis_mode = \"cluster\"",
                "mixes",
            ),
            (
                "[cluster]\nredis_url = \"redis://a:1,b:1\"\nredis_mode = \"cluster\"",
                "must start with",
            ),
            (
                "[cluster]\nredis_url = \"rediss://r\"\nredis_ca_file = \"/nonexistent/ca.pem\"",
                "/nonexistent/ca.pem: No such file",
            ),
            (
                "[cluster]\nredis_url = \"rediss://r\"\nredis_ca_file = \"Cargo.toml\"",
                "no PEM certificate",
            ),
            (
                "[cluster]\nredis_url = \"redis://r\"\npeer_listen = \"0.0.0.0:50061\"",
                "set cluster.peer_advertise",
            ),
            (
                "[cluster]\nredis_url = \"redis://r\"\npeer_advertise = \"10.0.0.1:50061\"",
                "needs cluster.peer_listen",
            ),
            (
                "[cluster]\nredis_url = \"redis://r\"\npeer_listen = \"0.0.0.0:1\"\npeer_advertise = \"10.0.0.1\"",
                "must be host:port",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(want), "{toml}: {err}");
        }
    }

    #[test]
    fn env_style_overrides_win() {
        let args = ServeArgs {
            app_id: Some("cli_env".into()),
            app_secret: Some("sec".into()),
            grpc_addr: Some("127.0.0.1:7000".parse().unwrap()),
            ..Default::default()
        };
        let c = Config::build(FileConfig::default(), &args).unwrap();
        assert_eq!(c.default_app.as_deref(), Some(DEFAULT_APP_NAME));
        assert_eq!(c.apps[0].app_id, "cli_env");
        assert_eq!(c.grpc_addr.port(), 7000);
        assert!(c.cluster.is_none());
        assert_eq!(c.card_streaming_limit, Duration::from_secs(600));
        let short = ServeArgs {
            card_streaming_limit_s: Some(30),
            ..Default::default()
        };
        let c = Config::build(FileConfig::default(), &short).unwrap();
        assert_eq!(c.card_streaming_limit, Duration::from_secs(30));
        let file: FileConfig = toml::from_str("[streams]\ncard_streaming_limit_s = 5").unwrap();
        let e = Config::build(file, &ServeArgs::default()).unwrap_err();
        assert!(e.to_string().contains("card_streaming_limit_s = 5"), "{e}");
        let redis = ServeArgs {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..Default::default()
        };
        let c = Config::build(FileConfig::default(), &redis).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!((cl.on_failure, cl.replicas), (RedisFailurePolicy::Local, 3));
        assert_eq!(cl.redis_mode, RedisMode::Standalone);
        let nodes = ServeArgs {
            redis_url: Some("redis://n1:6379,redis://n2:6379".into()),
            redis_mode: Some(RedisMode::Cluster),
            ..Default::default()
        };
        let cl = Config::build(FileConfig::default(), &nodes)
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(cl.redis_mode, RedisMode::Cluster);
        assert_eq!(cl.peers, None);
        let peers = ServeArgs {
            redis_url: Some("redis://r:6379".into()),
            peer_listen: Some("127.0.0.1:50061".parse().unwrap()),
            ..Default::default()
        };
        let cl = Config::build(FileConfig::default(), &peers)
            .unwrap()
            .cluster
            .unwrap();
        let p = cl.peers.unwrap();
        assert_eq!(
            p.advertise, "127.0.0.1:50061",
            "a specific address is its own advertisement"
        );
        let half = ServeArgs {
            app_id: Some("x".into()),
            ..Default::default()
        };
        assert!(Config::build(FileConfig::default(), &half).is_err());
    }
}
