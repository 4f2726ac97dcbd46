//! The connections to the shared Redis, for both Redis backends (the quota gate in `cluster`,
//! the job store in `jobs::redis`): one multiplexed connection to a single endpoint
//! (`redis_mode = standalone`) or the Redis Cluster client (slot map, MOVED/ASK), either over
//! TLS for `rediss://`. Two of them, by [`Lane`]: quota decisions never wait behind the job
//! store's calls (its `WAIT` blocks the connection it is sent on). Every call has the timeout;
//! a failure drops the connection (the next call connects again). Knows no key and no script.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::{ClusterConfig, RedisMode};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered something unexpected: {0}")]
    Protocol(String),
}

impl ClusterError {
    /// Redis refused this replica's credentials (a wrong password, or none where one is
    /// required).
    pub fn is_auth(&self) -> bool {
        match self {
            ClusterError::Redis(e) => {
                e.kind() == redis::ErrorKind::AuthenticationFailed
                    || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
            }
            _ => false,
        }
    }

    /// Redis could not be reached or did not answer in time, or refused the credentials (as
    /// opposed to an error it answered about the keys of one call: a wrong type, a script
    /// error, a bad value).
    pub fn is_outage(&self) -> bool {
        if self.is_auth() {
            return true;
        }
        match self {
            ClusterError::Timeout(_) => true,
            ClusterError::Protocol(_) => false,
            // ERR (a script error such as WRONGTYPE on one key), an unknown error code, an
            // answer of the wrong shape: about this call's data. Everything else (I/O,
            // LOADING, READONLY, MOVED to a node we cannot use, auth, …): Redis is not usable.
            ClusterError::Redis(e) => !matches!(
                e.kind(),
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                    | redis::ErrorKind::Extension
                    | redis::ErrorKind::UnexpectedReturnType
            ),
        }
    }
}

/// The shared Redis of cluster mode: its settings and both lanes' connections (one per
/// process, shared by the quota gate, the budgets and the job store).
pub struct SharedRedis {
    conns: Connections,
    config: ClusterConfig,
    /// By lane: some call has been answered since the process started.
    reached: [AtomicBool; 2],
    /// By lane: the last calls were refused for their credentials (until one is answered).
    refused: [AtomicBool; 2],
}

impl SharedRedis {
    /// Parses the URL; connects lazily (a Redis outage at startup is an outage, not a crash).
    pub fn new(config: ClusterConfig, metrics: Arc<Metrics>) -> Result<Self, ClusterError> {
        Ok(Self {
            conns: Connections::new(&config, metrics)?,
            config,
            reached: Default::default(),
            refused: Default::default(),
        })
    }

    /// Whether the last calls on `lane` were refused for their credentials.
    pub fn refused(&self, lane: Lane) -> bool {
        self.refused[lane as usize].load(Ordering::Acquire)
    }

    /// Whether a call on `lane` was answered since the process started.
    pub fn reached(&self, lane: Lane) -> bool {
        self.reached[lane as usize].load(Ordering::Acquire)
    }

    /// Why Redis cannot be used as configured for `lane`, if it cannot: it refuses the
    /// credentials, or no call on it has been answered since the process started (not
    /// reachable, or answering every call with an error, e.g. MOVED from a Redis Cluster
    /// spoken to as a standalone one). An outage after it was used is not this: the failure
    /// policy covers it.
    pub fn unusable_for(&self, lane: Lane) -> Option<&'static str> {
        if self.refused[lane as usize].load(Ordering::Acquire) {
            Some("refuses the credentials (a wrong or missing password in redis_url)")
        } else if !self.reached(lane) {
            Some("has not answered since the gateway started")
        } else {
            None
        }
    }

    /// Why Redis cannot be used as configured, if it cannot: it refuses the credentials on
    /// either lane, or quota decisions have not been answered since start. (The job store's
    /// lane speaks to the same Redis: it counts for a refusal, not for having been reached
    /// yet, since its background work may be backing off after one failed call.)
    pub fn unusable(&self) -> Option<String> {
        if self.refused[Lane::Jobs as usize].load(Ordering::Acquire) {
            return Some(
                "(the job store) refuses the credentials (a wrong or missing password in redis_url)"
                    .into(),
            );
        }
        self.unusable_for(Lane::Quota)
            .map(|why| format!("(quota decisions) {why}"))
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Runs one script call on `lane`'s connection, with the timeout; a failure drops the
    /// connection (the next call connects again).
    pub async fn call_on<T: redis::FromRedisValue>(
        &self,
        lane: Lane,
        op: &'static str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        let result = self
            .conns
            .timed(lane, op, async |mut c: Conn| {
                inv.invoke_async::<T>(&mut c).await
            })
            .await;
        self.note(lane, result)
    }

    /// One plain command (e.g. `WAIT`) like [`Self::call_on`].
    pub async fn command_on<T: redis::FromRedisValue>(
        &self,
        lane: Lane,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, ClusterError> {
        let result = self
            .conns
            .timed(lane, op, async |mut c: Conn| {
                cmd.query_async::<T>(&mut c).await
            })
            .await;
        self.note(lane, result)
    }

    /// Remembers whether Redis answered on `lane`, or refused the credentials.
    fn note<T>(&self, lane: Lane, result: Result<T, ClusterError>) -> Result<T, ClusterError> {
        let i = lane as usize;
        match &result {
            Ok(_) => {
                self.reached[i].store(true, Ordering::Release);
                self.refused[i].store(false, Ordering::Release);
            }
            Err(e) if e.is_auth() => self.refused[i].store(true, Ordering::Release),
            Err(_) => {}
        }
        result
    }
}

/// Which connection a call goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Quota decisions, settles, heartbeats.
    Quota,
    /// The job store.
    Jobs,
}

/// A Redis endpoint or a Redis Cluster (one per process: variant sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Client {
    Standalone(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to either (cheap to clone: both multiplex one socket per node).
#[derive(Clone)]
enum Conn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Both lanes' connections, made on first use.
struct Connections {
    client: Client,
    quota: Mutex<Option<Conn>>,
    jobs: Mutex<Option<Conn>>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Connections {
    /// Parses the URL; connects lazily (a Redis outage at startup is an outage, not a crash).
    fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Self, ClusterError> {
        let certs = |pem: &Vec<u8>| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        };
        let client = match (config.redis_mode, &config.redis_ca_pem) {
            (RedisMode::Standalone, None) => {
                Client::Standalone(redis::Client::open(config.redis_url.as_str())?)
            }
            (RedisMode::Standalone, Some(pem)) => Client::Standalone(
                redis::Client::build_with_tls(config.redis_url.as_str(), certs(pem))?,
            ),
            (RedisMode::Cluster, ca) => {
                let nodes = config.redis_url.split(',').map(str::trim);
                let mut b = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(config.redis_timeout)
                    .response_timeout(config.redis_timeout);
                if let Some(pem) = ca {
                    b = b.certs(certs(pem));
                }
                Client::Cluster(b.build()?)
            }
        };
        Ok(Self {
            client,
            quota: Mutex::new(None),
            jobs: Mutex::new(None),
            timeout: config.redis_timeout,
            metrics,
        })
    }

    fn slot(&self, lane: Lane) -> &Mutex<Option<Conn>> {
        match lane {
            Lane::Quota => &self.quota,
            Lane::Jobs => &self.jobs,
        }
    }

    async fn connection(&self, lane: Lane) -> Result<Conn, ClusterError> {
        if let Some(c) = self.slot(lane).lock().clone() {
            return Ok(c);
        }
        let t = self.timeout;
        let connect = async {
            Ok::<_, redis::RedisError>(match &self.client {
                Client::Standalone(c) => {
                    Conn::Standalone(c.get_multiplexed_async_connection().await?)
                }
                Client::Cluster(c) => Conn::Cluster(c.get_async_connection().await?),
            })
        };
        let c = tokio::time::timeout(t, connect)
            .await
            .map_err(|_| ClusterError::Timeout(t))??;
        *self.slot(lane).lock() = Some(c.clone());
        Ok(c)
    }

    async fn timed<T>(
        &self,
        lane: Lane,
        op: &'static str,
        run: impl AsyncFnOnce(Conn) -> redis::RedisResult<T>,
    ) -> Result<T, ClusterError> {
        let t = self.timeout;
        let result = async {
            let c = self.connection(lane).await?;
            tokio::time::timeout(t, run(c))
                .await
                .map_err(|_| ClusterError::Timeout(t))?
                .map_err(ClusterError::from)
        }
        .await;
        self.metrics.redis_call(op, result.is_ok());
        if result.is_err() {
            *self.slot(lane).lock() = None;
        }
        result
    }
}

/// A script's answer read as an integer (an integer, or a number in a string).
pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A script's answer read as bytes (a bulk or simple string).
pub fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}
