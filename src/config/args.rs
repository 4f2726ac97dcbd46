//! The flags and environment variables of `serve` (clap): what overrides the config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::cluster::RedisMode;

/// Flags and environment overrides of `serve` (env wins over the file, flags win over env).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (see README "Configuration").
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 0.0.0.0:50051].
    #[arg(long, env = "GATEWAY_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Metrics/health listen address (/metrics, /healthz, /readyz) [default: 0.0.0.0:9090].
    #[arg(long, env = "GATEWAY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Feishu base URL [default: https://open.feishu.cn; Lark: https://open.larksuite.com].
    #[allow(rustdoc::bare_urls)] // also the --help text, where <…> would show
    #[arg(long, env = "FEISHU_BASE_URL")]
    pub feishu_base_url: Option<String>,
    /// app_id of the default app (with FEISHU_APP_SECRET).
    #[arg(long, env = "FEISHU_APP_ID")]
    pub app_id: Option<String>,
    /// app_secret of the default app. Prefer the env var: flags show up in `ps`.
    #[arg(long, env = "FEISHU_APP_SECRET", hide_env_values = true)]
    pub app_secret: Option<String>,
    /// Redis URL for cluster mode (replicas share every quota), e.g. redis://redis:6379.
    #[arg(long, env = "GATEWAY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Run against an embedded fake Feishu (a demo or first run: replies are not posted to
    /// Feishu). Cannot be combined with configured apps. Without it, `serve` refuses to start
    /// when no app is configured.
    #[arg(
        long,
        env = "GATEWAY_EMBEDDED_FAKE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub embedded_fake: bool,
    /// How to speak to redis_url: standalone (one endpoint) or cluster (Redis Cluster; the URL
    /// may list seed nodes separated by commas) [default: standalone, or the config file's].
    #[arg(long, env = "GATEWAY_REDIS_MODE", value_enum)]
    pub redis_mode: Option<RedisMode>,
    /// Cluster mode: where this replica takes jobs other replicas forward to it (the owner of
    /// their queue), e.g. 0.0.0.0:50061. Unset: nothing is forwarded.
    #[arg(long, env = "GATEWAY_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Where the other replicas reach `peer_listen` (host:port, e.g. the pod IP) [default:
    /// peer_listen, unless it listens on every address].
    #[arg(long, env = "GATEWAY_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Cluster mode with peers: each replica keeps its partitions' chat windows, and the app
    /// windows spread over the Redis Cluster's masters (`[cluster] owner_windows`, true or
    /// false; default: true with peers, unless quotas.updates_count_in_chat; all replicas at
    /// once: the key layout changes).
    #[arg(long, env = "GATEWAY_OWNER_WINDOWS")]
    pub owner_windows: Option<bool>,
    /// Serve calls that carry no credentials (only when no [callers.*] is configured; then
    /// `x-caller` is a label, not an identity).
    #[arg(
        long,
        env = "GATEWAY_ALLOW_ANONYMOUS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_anonymous: bool,
    /// Directory of the embedded job store (async SubmitReply jobs, single node).
    #[arg(long, env = "GATEWAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Start even though the embedded job store is empty or missing where one existed before
    /// (its unfinished jobs are lost): a new, empty store is made. Without it that start is
    /// refused, so a lost or truncated file is never taken for a new store.
    #[arg(
        long,
        env = "GATEWAY_RESET_JOB_STORE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub reset_job_store: bool,
    /// TLS certificate chain (PEM) of the gRPC port.
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the gRPC port.
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates identify callers (mTLS, `tls_identities`).
    #[arg(long, env = "GATEWAY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Seconds after which Feishu closes a card's streaming mode (`[streams]
    /// card_streaming_limit_s`, default 600): streams renew it a margin before.
    #[arg(long, env = "GATEWAY_CARD_STREAMING_LIMIT_S")]
    pub card_streaming_limit_s: Option<u64>,
}
