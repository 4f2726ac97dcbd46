//! `[cluster]`: the shared Redis, as plain data (the Redis backends turn it into their
//! connections and stores; nothing here knows them).

use std::time::Duration;

use super::error::ConfigError;
use super::file::FileCluster;

/// What to do while Redis does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailurePolicy {
    /// Keep sending with local quotas scaled to this replica's share (limit ÷ replicas).
    Local,
    /// Hold jobs until Redis is back (or their deadline passes).
    FailClosed,
}

/// How `redis_url` is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One endpoint: a standalone Redis, a primary behind a stable name, or a cluster proxy.
    #[default]
    Standalone,
    /// Redis Cluster protocol (slot map, MOVED/ASK redirects); `redis_url` lists one or more
    /// seed nodes separated by commas.
    Cluster,
}

/// `[cluster]` settings (Debug hides the Redis password).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` (TLS; server certificate checked against the system roots,
    /// or `redis_ca_pem`).
    pub redis_url: String,
    pub redis_mode: RedisMode,
    /// PEM root certificate(s) to trust instead of the system roots (a private CA).
    pub redis_ca_pem: Option<Vec<u8>>,
    pub key_prefix: String,
    /// Timeout of every Redis call: an outage costs a request at most this much.
    pub redis_timeout: Duration,
    pub on_failure: RedisFailurePolicy,
    /// Replicas assumed for the local share until the heartbeat has observed the real count.
    pub replicas: usize,
    /// The async job store in Redis: lease, `WAIT`.
    pub jobs: RedisJobsConfig,
    /// Where this replica takes jobs forwarded to it, and where the others reach it (`None`:
    /// nothing is forwarded; every replica queues what it is given).
    pub peers: Option<PeerConfig>,
}

/// `[cluster] peer_listen` and `peer_advertise`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub listen: std::net::SocketAddr,
    /// host:port the other replicas connect to.
    pub advertise: String,
    /// `[cluster] owner_windows` (default: on): the partition's owner keeps its targets'
    /// windows and the app windows sit on 12 slots (ARCHITECTURE.md "Scaling out over a Redis
    /// Cluster", step 2). Off: every quota key on one slot, as without peers.
    pub owner_windows: bool,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            redis_url,
            redis_mode,
            redis_ca_pem,
            key_prefix,
            redis_timeout,
            on_failure,
            replicas,
            jobs,
            peers,
        } = self;
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redact_url(redis_url))
            .field("redis_mode", redis_mode)
            .field("redis_ca_pem", &redis_ca_pem.as_ref().map(Vec::len))
            .field("key_prefix", key_prefix)
            .field("redis_timeout", redis_timeout)
            .field("on_failure", on_failure)
            .field("replicas", replicas)
            .field("jobs", jobs)
            .field("peers", peers)
            .finish()
    }
}

/// `url` with its credentials replaced by `***`, for each URL of a comma-separated list.
pub fn redact_url(url: &str) -> String {
    let one = |u: &str| match (u.find("://"), u.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &u[..scheme], &u[at..]),
        _ => u.to_owned(),
    };
    url.split(',')
        .map(|u| one(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Settings of the cluster job store (`[cluster]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisJobsConfig {
    /// A replica not renewing its lease for this long loses its jobs to another one.
    pub lease: Duration,
    /// Replicas that must have a submit (`WAIT`) before it is answered; 0 = none.
    pub wait_replicas: u32,
}

/// `[cluster]` checked (`redis_url` from the flag or env wins over the file's); None: single
/// node.
pub(super) fn build(
    cluster: FileCluster,
    redis_url: Option<String>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    Ok(match redis_url.or(cluster.redis_url.clone()) {
        None => None,
        Some(url) => {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            if nodes
                .iter()
                .any(|n| !(n.starts_with("redis://") || n.starts_with("rediss://")))
            {
                return Err(invalid(
                    "cluster.redis_url must start with redis:// or rediss://".into(),
                ));
            }
            if nodes.len() > 1 && cluster.redis_mode == RedisMode::Standalone {
                return Err(invalid(
                    "cluster.redis_url lists several nodes: set redis_mode = \"cluster\" (Redis Cluster seed nodes)".into(),
                ));
            }
            let tls = nodes[0].starts_with("rediss://");
            if nodes.iter().any(|n| n.starts_with("rediss://") != tls) {
                return Err(invalid(
                    "cluster.redis_url mixes redis:// and rediss:// nodes".into(),
                ));
            }
            if cluster.redis_timeout_ms == 0 || cluster.replicas == 0 {
                return Err(invalid(
                    "cluster.redis_timeout_ms and cluster.replicas must be > 0".into(),
                ));
            }
            if cluster.job_lease_ms < 1000 || cluster.job_lease_ms < 4 * cluster.redis_timeout_ms {
                return Err(invalid(
                    "cluster.job_lease_ms must be at least 1000 and 4 x redis_timeout_ms (a lease is renewed every quarter of it)".into(),
                ));
            }
            if cluster.jobs_wait_replicas > 0 && cluster.redis_mode == RedisMode::Cluster {
                return Err(invalid(
                    "cluster.jobs_wait_replicas needs redis_mode = \"standalone\" (WAIT must reach the primary that took the write)".into(),
                ));
            }
            if cluster.key_prefix.is_empty() || cluster.key_prefix.contains(['{', '}']) {
                return Err(invalid(
                    "cluster.key_prefix must be non-empty and free of '{' '}'".into(),
                ));
            }
            let redis_ca_pem = match &cluster.redis_ca_file {
                None => None,
                Some(_) if !tls => {
                    return Err(invalid(
                        "cluster.redis_ca_file is for TLS: use a rediss:// redis_url".into(),
                    ));
                }
                Some(path) => {
                    let pem = super::read_capped(path).map_err(|e| {
                        invalid(format!("cluster.redis_ca_file {}: {e}", path.display()))
                    })?;
                    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                        return Err(invalid(format!(
                            "cluster.redis_ca_file {}: no PEM certificate in it",
                            path.display()
                        )));
                    }
                    Some(pem)
                }
            };
            let peers = match (cluster.peer_listen, cluster.peer_advertise) {
                (None, None) if cluster.owner_windows == Some(true) => {
                    return Err(invalid(
                        "cluster.owner_windows needs cluster.peer_listen (jobs go to the replica keeping their chat's window)".into(),
                    ));
                }
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(invalid(
                        "cluster.peer_advertise needs cluster.peer_listen".into(),
                    ));
                }
                (Some(listen), advertise) => {
                    let advertise = match advertise {
                        Some(a) => a,
                        None if listen.ip().is_unspecified() => {
                            return Err(invalid(format!(
                                "cluster.peer_listen = {listen} listens on every address: set cluster.peer_advertise (GATEWAY_PEER_ADVERTISE) to where the other replicas reach it, e.g. the pod IP and port"
                            )));
                        }
                        None => listen.to_string(),
                    };
                    let port_ok = advertise.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok()
                    });
                    if !port_ok || advertise.contains(['/', ',', ' ']) {
                        return Err(invalid(format!(
                            "cluster.peer_advertise = {advertise:?} must be host:port"
                        )));
                    }
                    Some(PeerConfig {
                        listen,
                        advertise,
                        owner_windows: cluster.owner_windows.unwrap_or(true),
                    })
                }
            };
            Some(ClusterConfig {
                redis_url: url,
                redis_mode: cluster.redis_mode,
                redis_ca_pem,
                key_prefix: cluster.key_prefix,
                redis_timeout: Duration::from_millis(cluster.redis_timeout_ms),
                on_failure: cluster.on_redis_failure,
                replicas: cluster.replicas,
                jobs: RedisJobsConfig {
                    lease: Duration::from_millis(cluster.job_lease_ms),
                    wait_replicas: cluster.jobs_wait_replicas,
                },
                peers,
            })
        }
    })
}
