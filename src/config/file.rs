//! The config file's format as serde reads it (every section, its defaults). `Config::build`
//! turns it into the validated [`super::Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

use super::FEISHU_BASE_URL;
use super::auth;
use super::cluster::{RedisFailurePolicy, RedisMode};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) server: FileServer,
    #[serde(default)]
    pub(super) feishu: FileFeishu,
    pub(super) default_app: Option<String>,
    #[serde(default)]
    pub(super) apps: BTreeMap<String, super::apps::FileApp>,
    #[serde(default)]
    pub(super) quotas: FileQuotas,
    #[serde(default)]
    pub(super) queue: FileQueue,
    #[serde(default)]
    pub(super) retry: FileRetry,
    #[serde(default)]
    pub(super) admission: FileAdmission,
    #[serde(default)]
    pub(super) cluster: FileCluster,
    #[serde(default)]
    pub(super) callers: BTreeMap<String, auth::FileCaller>,
    #[serde(default)]
    pub(super) auth: auth::FileAuth,
    #[serde(default)]
    pub(super) jobs: FileJobs,
    #[serde(default)]
    pub(super) streams: FileStreams,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileStreams {
    pub(super) card_streaming_limit_s: u64,
}

impl Default for FileStreams {
    fn default() -> Self {
        Self {
            card_streaming_limit_s: 600,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileJobs {
    pub(super) data_dir: Option<std::path::PathBuf>,
    pub(super) max_jobs: Option<u64>,
    /// Open jobs one caller may have (default a quarter of `max_jobs`).
    pub(super) max_jobs_per_caller: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileCluster {
    pub(super) redis_url: Option<String>,
    pub(super) redis_ca_file: Option<std::path::PathBuf>,
    pub(super) redis_mode: RedisMode,
    pub(super) key_prefix: String,
    pub(super) redis_timeout_ms: u64,
    pub(super) on_redis_failure: RedisFailurePolicy,
    pub(super) replicas: usize,
    pub(super) job_lease_ms: u64,
    pub(super) jobs_wait_replicas: u32,
    pub(super) peer_listen: Option<std::net::SocketAddr>,
    pub(super) peer_advertise: Option<String>,
    /// Unset: on with peers (unless `quotas.updates_count_in_chat`).
    pub(super) owner_windows: Option<bool>,
}

impl Default for FileCluster {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_ca_file: None,
            redis_mode: RedisMode::Standalone,
            key_prefix: "feishu-reply".into(),
            redis_timeout_ms: 100,
            on_redis_failure: RedisFailurePolicy::Local,
            replicas: 3,
            job_lease_ms: 10_000,
            jobs_wait_replicas: 0,
            peer_listen: None,
            peer_advertise: None,
            owner_windows: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileServer {
    pub(super) grpc_addr: SocketAddr,
    pub(super) metrics_addr: SocketAddr,
    pub(super) shutdown_grace_ms: u64,
    pub(super) tls: Option<auth::FileTls>,
    pub(super) max_connections: usize,
    pub(super) max_streams_per_connection: u32,
    pub(super) max_call_ms: u64,
    pub(super) handshake_timeout_ms: u64,
    pub(super) metrics_max_connections: usize,
    pub(super) max_reading_bytes: usize,
}

impl Default for FileServer {
    fn default() -> Self {
        Self {
            grpc_addr: ([0, 0, 0, 0], 50051).into(),
            metrics_addr: ([0, 0, 0, 0], 9090).into(),
            shutdown_grace_ms: 25_000,
            tls: None,
            max_connections: 1_024,
            max_streams_per_connection: 100,
            max_call_ms: 600_000,
            handshake_timeout_ms: 10_000,
            metrics_max_connections: 32,
            max_reading_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileFeishu {
    pub(super) base_url: String,
    pub(super) connect_timeout_ms: u64,
    pub(super) request_timeout_ms: u64,
    pub(super) token_refresh_before_s: u64,
}

impl Default for FileFeishu {
    fn default() -> Self {
        Self {
            base_url: FEISHU_BASE_URL.into(),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 10_000,
            token_refresh_before_s: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQuota {
    pub(super) limit: u32,
    pub(super) window_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileQuotas {
    pub(super) chat: FileQuota,
    pub(super) user: FileQuota,
    pub(super) message: FileQuota,
    pub(super) card: FileQuota,
    pub(super) app: Vec<FileQuota>,
    pub(super) app_scope: super::AppScope,
    pub(super) updates_count_in_chat: bool,
    pub(super) final_headroom_percent: u8,
    pub(super) safety_margin_ms: u64,
}

impl Default for FileQuotas {
    fn default() -> Self {
        let q = |limit, window_ms| FileQuota { limit, window_ms };
        Self {
            chat: q(5, 1_000),
            user: q(5, 1_000),
            message: q(5, 1_000),
            card: q(10, 1_000),
            app: vec![q(50, 1_000), q(1_000, 60_000)],
            app_scope: super::AppScope::Api,
            updates_count_in_chat: false,
            final_headroom_percent: 10,
            safety_margin_ms: 5,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileQueue {
    pub(super) max_per_chat: usize,
    pub(super) max_total: usize,
    pub(super) max_total_bytes: usize,
    pub(super) chat_cache_size: usize,
    pub(super) min_send_budget_ms: u64,
}

impl Default for FileQueue {
    fn default() -> Self {
        Self {
            max_per_chat: 200,
            max_total: 100_000,
            max_total_bytes: 64 * 1024 * 1024,
            chat_cache_size: 100_000,
            min_send_budget_ms: 20,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileRetry {
    pub(super) max_attempts: u32,
    pub(super) base_delay_ms: u64,
    pub(super) max_delay_ms: u64,
}

impl Default for FileRetry {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay_ms: 200,
            max_delay_ms: 5_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileAdmission {
    pub(super) per_caller_rps: u32,
    pub(super) per_caller_burst: u32,
    pub(super) per_caller_max_queued: Option<usize>,
    pub(super) per_caller_max_queued_bytes: Option<usize>,
}

impl Default for FileAdmission {
    fn default() -> Self {
        Self {
            per_caller_rps: 2_000,
            per_caller_burst: 4_000,
            per_caller_max_queued: None,
            per_caller_max_queued_bytes: None,
        }
    }
}
